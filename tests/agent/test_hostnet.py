"""Host networking for real: bridge, taps, counters, a tc cap measured, ICMP RTT, announced MACs, RAM scrub.

Every device is made for real (root) and named ``smg<role><pid><n>``; each test removes what it made.
The "VM" on a tap is :class:`~secmig.agent.hostnet.TapEndpoint` (the userspace end QEMU would hold); the
far side is a veth pair on the same bridge, blasted or read with ``AF_PACKET``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from secmig.agent import hostnet
from secmig.agent.qemu.machine import scrub_ram

_REASON = hostnet.missing_capability()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
_SEQ = itertools.count()
VM_MAC = "52:54:00:5e:77:01"
FAR_MAC = "52:54:00:5e:77:02"


@dataclass
class Net:
    """A bridge with a VM tap (its endpoint held) and a veth pair: ``port`` on the bridge, ``far`` loose."""

    bridge: str
    tap: str
    port: str
    far: str
    vm: hostnet.TapEndpoint


@pytest.fixture
def net() -> Iterator[Net]:
    """A fresh bridge, tap and veth pair; all removed afterwards."""
    n = f"{os.getpid() % 100000}{next(_SEQ)}"
    bridge, tap, port, far = f"smgb{n}", f"smgt{n}", f"smgv{n}", f"smgw{n}"
    try:
        hostnet.create_bridge(bridge)
        hostnet.create_tap(tap, bridge)
        subprocess.run(["ip", "link", "add", port, "type", "veth", "peer", "name", far], check=True)
        subprocess.run(["ip", "link", "set", far, "address", FAR_MAC], check=True)
        hostnet.attach(port, bridge)
        for dev in (port, far):
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        vm = hostnet.TapEndpoint(tap)
        try:
            yield Net(bridge, tap, port, far, vm)
        finally:
            vm.close()
    finally:
        for dev in (tap, port, bridge):
            hostnet.delete_link(dev)


def _blast_from_vm(vm: hostnet.TapEndpoint, rate_bytes_per_s: float, seconds: float, size: int = 1400) -> int:
    """Frames from the VM towards FAR_MAC at a paced rate; returns bytes written."""
    frame = hostnet.ethernet_frame(FAR_MAC, VM_MAC, size)
    sent = 0
    t0 = time.monotonic()
    while (now := time.monotonic()) - t0 < seconds:
        due = rate_bytes_per_s * (now - t0)
        while sent < due:
            if not vm.send(frame):
                break
            sent += size
        time.sleep(0.002)
    return sent


def _blast_to_vm(far: str, rate_bytes_per_s: float, seconds: float, size: int = 1400) -> int:
    """Frames from the far veth end towards the VM's MAC at a paced rate; returns bytes sent."""
    frame = hostnet.ethernet_frame(VM_MAC, FAR_MAC, size)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((far, 0))
    sent = 0
    try:
        t0 = time.monotonic()
        while (now := time.monotonic()) - t0 < seconds:
            while sent < rate_bytes_per_s * (now - t0):
                try:
                    s.send(frame)
                except OSError:
                    break
                sent += size
            time.sleep(0.002)
    finally:
        s.close()
    return sent


def _drain(vm: hostnet.TapEndpoint, stop: threading.Event) -> None:
    while not stop.is_set():
        vm.drain()
        time.sleep(0.001)


def _measure(dev: str, direction: str, run_s: float, sender: threading.Thread) -> float:
    """Bytes/s counted on ``dev`` (``rx`` or ``tx``) over the middle of a blast (the first 0.3 s left out)."""
    sender.start()
    time.sleep(0.3)
    c0 = hostnet.read_counters(dev)
    time.sleep(run_s)
    c1 = hostnet.read_counters(dev)
    sender.join()
    delta = (c1.rx_bytes - c0.rx_bytes) if direction == "rx" else (c1.tx_bytes - c0.tx_bytes)
    return delta / (c1.t_s - c0.t_s)


def test_tap_counters_count_the_vms_frames_exactly(net: Net) -> None:
    """500 frames of 1000 B written by the VM: the tap's rx counters move by exactly 500 frames and 500 000 B."""
    frame = hostnet.ethernet_frame(FAR_MAC, VM_MAC, 1000)
    # the vSwitch must forward before we count: on a loaded host the veth port can take a moment to come up
    deadline = time.monotonic() + 5.0
    warm = hostnet.read_bridge_counters(net.bridge).tx_bytes
    while hostnet.read_bridge_counters(net.bridge).tx_bytes == warm and time.monotonic() < deadline:
        assert net.vm.send(frame)
        time.sleep(0.05)
    c0 = hostnet.read_counters(net.tap)
    b0 = hostnet.read_bridge_counters(net.bridge)
    for _ in range(500):
        assert net.vm.send(frame)
    time.sleep(0.1)
    c1 = hostnet.read_counters(net.tap)
    b1 = hostnet.read_bridge_counters(net.bridge)
    assert c1.rx_packets - c0.rx_packets == 500
    assert c1.rx_bytes - c0.rx_bytes == 500_000
    # the vSwitch saw them come in on the tap, and forwarded them to the veth port (a burst of 500 written
    # at once may overflow the CPU's backlog: those drops are the kernel's, not a device's)
    assert b1.rx_bytes - b0.rx_bytes >= 500_000
    assert b1.tx_bytes - b0.tx_bytes >= 0.9 * 500_000


def test_tap_counters_count_frames_delivered_to_the_vm(net: Net) -> None:
    """Frames sent to the VM's MAC from the far side: the tap's tx counters equal exactly what the VM read."""
    net.vm.send(hostnet.ethernet_frame(FAR_MAC, VM_MAC, 60))  # the bridge learns the VM's port
    net.vm.drain()
    c0 = hostnet.read_counters(net.tap)
    read = [0, 0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            f, b = net.vm.drain()
            read[0] += f
            read[1] += b
            time.sleep(0.001)

    t = threading.Thread(target=reader)
    t.start()
    sent = _blast_to_vm(net.far, 2e6, 0.25, size=1000)
    time.sleep(0.1)
    stop.set()
    t.join()
    frames, nbytes = net.vm.drain()
    c1 = hostnet.read_counters(net.tap)
    assert c1.tx_bytes - c0.tx_bytes == read[1] + nbytes
    assert c1.tx_packets - c0.tx_packets == read[0] + frames
    # what the far side sent arrived (a frame may be lost on the way), plus the odd host broadcast (IPv6 ND)
    assert 0.99 * sent <= read[1] + nbytes <= sent + 4096


def test_throttle_caps_the_rate_from_the_vm(net: Net) -> None:
    """A 4 MB/s blast from the VM reaches the bridge at ~4 MB/s; with a 1 MB/s cap on the tap, at ~1 MB/s."""
    offered, cap = 4e6, 1e6

    def blast() -> threading.Thread:
        return threading.Thread(target=_blast_from_vm, args=(net.vm, offered, 1.8))

    before = _measure(net.far, "rx", 1.4, blast())
    hostnet.limit_rate(net.tap, cap)
    try:
        assert hostnet.rate_limit_of(net.tap) == pytest.approx(cap, rel=0.01)
        after = _measure(net.far, "rx", 1.4, blast())
    finally:
        hostnet.clear_rate_limit(net.tap)
    print(f"\nfrom VM: before {before / 1e6:.2f} MB/s, capped at {cap / 1e6:.2f}: {after / 1e6:.3f} MB/s")
    assert before > 2.5 * cap
    assert 0.8 * cap <= after <= 1.1 * cap
    assert not hostnet.link_exists(hostnet.ifb_name(net.tap))


def test_throttle_caps_the_rate_to_the_vm(net: Net) -> None:
    """A 4 MB/s blast towards the VM is delivered at ~4 MB/s; with a 1 MB/s cap on the tap, at ~1 MB/s."""
    offered, cap = 4e6, 1e6
    net.vm.send(hostnet.ethernet_frame(FAR_MAC, VM_MAC, 60))
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(net.vm, stop))
    drainer.start()
    try:

        def blast() -> threading.Thread:
            return threading.Thread(target=_blast_to_vm, args=(net.far, offered, 1.8))

        before = _measure(net.tap, "tx", 1.4, blast())
        hostnet.limit_rate(net.tap, cap)
        try:
            after = _measure(net.tap, "tx", 1.4, blast())
        finally:
            hostnet.clear_rate_limit(net.tap)
    finally:
        stop.set()
        drainer.join()
    print(f"\nto VM: before {before / 1e6:.2f} MB/s, capped at {cap / 1e6:.2f}: {after / 1e6:.3f} MB/s")
    assert before > 2.5 * cap
    assert 0.8 * cap <= after <= 1.1 * cap


def test_bridge_learns_and_capture_sees_the_mac_the_vm_announces(net: Net) -> None:
    """The MAC in the VM's frames is what the FDB learned on the tap's port and what a capture sees first."""
    frame = hostnet.ethernet_frame("ff:ff:ff:ff:ff:ff", VM_MAC, 60)

    def send_later() -> None:
        time.sleep(0.2)
        for _ in range(3):
            net.vm.send(frame)

    sock = hostnet.open_capture(net.tap)  # frames count from here, however late the thread below runs
    t = threading.Thread(target=send_later)
    t.start()
    seen = hostnet.capture_source_macs(net.tap, 1.5, max_frames=3, sock=sock)
    t.join()
    assert seen[0] == VM_MAC
    assert hostnet.learned_macs(net.bridge, net.tap) == {VM_MAC}
    assert VM_MAC not in hostnet.learned_macs(net.bridge, net.port)


def test_rtt_is_measured_by_icmp_echo(net: Net) -> None:
    """An ICMP echo from the bridge to an address in a network namespace gets a real RTT; a silent address, None."""
    n = os.getpid() % 250 + 1
    ns = f"smgn{os.getpid() % 100000}{next(_SEQ)}"
    subnet = f"10.213.{n}"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "link", "set", net.far, "netns", ns], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{subnet}.2/24", "dev", net.far], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", net.far, "up"], check=True)
        hostnet.set_address(net.bridge, f"{subnet}.1/24")

        async def probe() -> tuple[list[float | None], float | None]:
            prober = hostnet.RttProber(net.bridge)
            try:
                rtts = [await prober.rtt(f"{subnet}.2", 1.0) for _ in range(5)]
                silent = await prober.rtt(f"{subnet}.99", 0.3)
            finally:
                prober.close()
            return rtts, silent

        rtts, silent = asyncio.run(probe())
        print(f"\nRTT to the namespace: {[f'{r * 1e6:.0f} us' if r else None for r in rtts]}")
        assert all(r is not None and 0 < r < 0.1 for r in rtts)
        assert silent is None
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_scrub_ram_zeroes_the_file_before_unlinking_it(tmp_path: Path) -> None:
    """A RAM file full of data reads back as zeros through a descriptor kept open, and is gone by name."""
    path = tmp_path / "ram"
    path.write_bytes(os.urandom(9 << 20))  # not a multiple of the scrub's chunk
    fd = os.open(path, os.O_RDONLY)
    try:
        assert scrub_ram(path) == 9 << 20
        assert not path.exists()
        data = os.pread(fd, 10 << 20, 0)
        assert len(data) == 9 << 20 and data.count(0) == len(data)
    finally:
        os.close(fd)
    assert scrub_ram(path) == 0  # already gone: nothing to do
