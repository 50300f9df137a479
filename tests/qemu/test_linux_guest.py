"""The Linux guest: built (cached) from Debian's packages, booted once on a tap, measured from the host."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from secmig.agent.qemu.linuxguest import (
    USER_NET_GUEST_IP,
    USER_NET_HOST_IP,
    GuestImage,
    GuestNic,
    GuestReady,
    LinuxGuestParams,
    UdpArrivals,
    boot_linux_guest,
    build_linux_guest,
    count_udp_arrivals,
    measure_dirty_rate,
    newc_archive,
    parse_ready_line,
)
from secmig.agent.qemu.machine import choose_accel
from secmig.errors import ConfigError, GuestFetchError

pytestmark = pytest.mark.qemu

DIRTY_PAGES_PER_S = 5000
UDP_BYTES_PER_S = 200_000
UDP_PAYLOAD = 1000
WORKING_SET = 64 << 20
RAM = 256 << 20
WINDOW_S = 3
GUEST_MAC = "52:54:00:5e:c0:42"


@dataclass(frozen=True)
class Run:
    image: GuestImage
    warm_build_s: float
    net: str
    """"tap" (a tap on a fresh bridge) or "user" (QEMU's user-mode network, when no tap could be made)."""
    accel: str
    ready: GuestReady
    dirty_pages_per_s: float
    udp: UdpArrivals
    fdb: str
    console: str

    def why(self, what: object) -> str:
        """What a failed assertion shows: the figure, the network and the guest's last console lines."""
        return f"{what} on {self.net}; console: {' | '.join(self.console.strip().splitlines()[-4:])}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def image() -> GuestImage:
    try:
        return build_linux_guest()
    except GuestFetchError as err:
        pytest.skip(f"the Linux guest's Debian packages cannot be fetched: {err}")


def _free_subnet() -> str:
    """A 10.177.N.0/24 that no address or route of this host uses (other tests make bridges too)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, timeout=10).stdout
    for i in range(250):
        subnet = f"10.177.{(os.getpid() + i) % 250}"
        if f"{subnet}." not in used:
            return subnet
    raise OSError("no free 10.177.N.0/24")


@pytest.fixture(scope="module")
def tap_net() -> Iterator[tuple[str, str, str] | None]:
    """A bridge with a host address and a tap on it: (tap, bridge, subnet); None when they cannot be
    made (not root)."""
    tag = f"{os.getpid() % 100000}"
    bridge, taps = f"slgb{tag}", (f"slgt{tag}",)
    made: list[str] = []
    try:
        subnet = _free_subnet()
        _ip("link", "add", bridge, "type", "bridge")
        made.append(bridge)
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for tap in taps:
            _ip("tuntap", "add", "dev", tap, "mode", "tap")
            made.append(tap)
            _ip("link", "set", tap, "master", bridge)
            _ip("link", "set", tap, "up")
    except (OSError, subprocess.SubprocessError):
        for dev in reversed(made):
            subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=10)
        yield None
        return
    yield taps[0], bridge, subnet
    for dev in reversed(made):
        subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def run(image: GuestImage, qemu_binary: str, tap_net: tuple[str, str, str] | None) -> Run:
    """Boot the guest once; measure its dirty rate (QEMU) and its UDP traffic (a host socket) at once."""
    t0 = time.monotonic()
    assert build_linux_guest() == image
    warm_s = time.monotonic() - t0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if tap_net is not None:
        tap, bridge, subnet = tap_net
        sock.bind((f"{subnet}.1", 0))
        nic = GuestNic(mac=GUEST_MAC, tap=tap)
        ip, gw, dest = f"{subnet}.2/24", f"{subnet}.1", f"{subnet}.1"
    else:
        bridge = ""
        sock.bind(("127.0.0.1", 0))
        nic = GuestNic(mac=GUEST_MAC)
        ip, gw, dest = USER_NET_GUEST_IP, USER_NET_HOST_IP, USER_NET_HOST_IP
    params = LinuxGuestParams(
        working_set_bytes=WORKING_SET, dirty_pages_per_s=DIRTY_PAGES_PER_S, ip=ip, gateway=gw,
        udp_dest=(dest, sock.getsockname()[1]), udp_rate_bytes_per_s=UDP_BYTES_PER_S,
        udp_payload_bytes=UDP_PAYLOAD, report_interval_s=1,
    )  # fmt: skip
    accel = choose_accel("auto")
    config = image.machine_config(params, ram_bytes=RAM, accel=accel, qemu_binary=qemu_binary, nics=(nic,))

    def fdb() -> str:
        if not bridge:
            return ""
        out = subprocess.run(["bridge", "fdb", "show", "br", bridge], capture_output=True, text=True, timeout=10)
        return out.stdout

    async def go(workdir: Path) -> Run:
        async with boot_linux_guest("lg", config, workdir) as (vm, ready):
            dirty, udp = await asyncio.gather(measure_dirty_rate(vm, WINDOW_S), count_udp_arrivals(sock, WINDOW_S))
            console = (workdir / "lg.serial").read_text(errors="replace")
            return Run(image, warm_s, "tap" if bridge else "user", accel, ready, dirty, udp, fdb(), console)

    with sock, tempfile.TemporaryDirectory(prefix="secmig-lg-") as workdir:
        return asyncio.run(go(Path(workdir)))


def test_second_build_is_cached(run: Run) -> None:
    """A second build finds the first one's image without fetching or compiling anything."""
    assert run.warm_build_s < 2.0
    assert run.image.initrd.stat().st_size < 8 << 20
    assert {"virtio_net", "virtio_pci"} <= set(run.image.modules)


def test_guest_reaches_ready_with_its_addresses(run: Run) -> None:
    """Debian's kernel boots, /init loads virtio-net, configures eth0 and the workload prints ready."""
    assert run.ready.mac == GUEST_MAC
    assert run.ready.ip.endswith("/24") and run.ready.ip != "none"
    assert run.ready.fields["dirty_pages_per_s"] == str(DIRTY_PAGES_PER_S)
    assert "secmig-guest: error" not in run.console
    assert run.ready.ready_after_s < (30 if run.accel == "kvm" else 60)


def test_qemu_measures_the_set_dirty_rate(run: Run) -> None:
    """QEMU's calc-dirty-rate sees the guest dirty its memory near the set pages/s."""
    assert 0.75 * DIRTY_PAGES_PER_S <= run.dirty_pages_per_s <= 1.25 * DIRTY_PAGES_PER_S, run.dirty_pages_per_s


def test_udp_traffic_arrives_at_the_set_rate(run: Run) -> None:
    """The guest's datagrams reach a host socket through its NIC at near the set bytes/s, none lost."""
    assert 0.85 * UDP_BYTES_PER_S <= run.udp.rate_bytes_per_s <= 1.15 * UDP_BYTES_PER_S, run.why(run.udp)
    assert run.udp.datagrams > 0 and run.udp.lost <= run.udp.datagrams // 100


def _fdb_port(fdb: str, mac: str) -> str | None:
    for line in fdb.splitlines():
        words = line.split()
        if words and words[0] == mac and "dev" in words:
            return words[words.index("dev") + 1]
    return None


def test_the_bridge_learns_the_guest_mac(run: Run, tap_net: tuple[str, str, str] | None) -> None:
    """On a tap, the host bridge (the vSwitch) learns the guest's MAC on the guest's port."""
    if tap_net is None:
        pytest.skip("no tap could be made (not root?): the guest ran on QEMU's user-mode network")
    assert _fdb_port(run.fdb, GUEST_MAC) == tap_net[0]


# ---- without QEMU ----


def test_params_become_kernel_parameters() -> None:
    """Rates, addresses and the report interval reach the command line; bad values are refused."""
    p = LinuxGuestParams(working_set_bytes=32 << 20, dirty_pages_per_s=None, udp_dest=("10.0.0.1", 9000),
                         udp_rate_bytes_per_s=5000, ip="10.0.0.2/24", mac="52:54:00:00:00:01")  # fmt: skip
    words = p.append_params().split()
    assert {"secmig.ws=32", "secmig.dirty=max", "secmig.udp=10.0.0.1:9000", "secmig.udp_rate=5000",
            "secmig.ip=10.0.0.2/24", "secmig.mac=52:54:00:00:00:01"} <= set(words)  # fmt: skip
    assert not any(w.startswith("secmig.udp") for w in LinuxGuestParams().append_params().split())
    with pytest.raises(ConfigError):
        LinuxGuestParams(working_set_bytes=(1 << 20) + 4096)
    with pytest.raises(ConfigError):
        LinuxGuestParams(ip="10.0.0.2 /24")


def test_ready_line_parses() -> None:
    """The ready line's fields are read from among other console lines."""
    text = "[    0.1] boot\nsecmig-guest: ready ip=10.0.0.2/24 mac=52:54:00:00:00:01 ws_mib=64\nmore\n"
    ready = parse_ready_line(text)
    assert ready is not None and ready.ip == "10.0.0.2/24" and ready.fields["ws_mib"] == "64"
    assert parse_ready_line("secmig-guest: running\n") is None


def test_newc_archive_layout() -> None:
    """Each cpio header is newc, names and data are 4-byte aligned, and the archive ends in a trailer."""
    from secmig.agent.qemu.linuxguest import CpioEntry

    raw = newc_archive([CpioEntry("init", 0o100755, b"#!/bin/sh\n"), CpioEntry("bin", 0o40755)])
    assert raw.startswith(b"070701") and len(raw) % 4 == 0
    namesize = int(raw[94:102], 16)
    assert raw[110 : 110 + namesize] == b"init\0" and int(raw[54:62], 16) == 10
    assert b"TRAILER!!!\0" in raw[-128:]
    if shutil.which("cpio"):
        listing = subprocess.run(["cpio", "-t"], input=raw, capture_output=True, timeout=10).stdout.split()
        assert listing == [b"init", b"bin"]
