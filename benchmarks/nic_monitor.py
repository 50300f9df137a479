"""The NIC monitor on a real QEMU guest: a long run at the preset, breach → destroy times, the tc cap.

The reference guest boots with a virtio-net NIC on a tap of a fresh bridge and its RAM in /dev/shm; its
NIC's traffic is QEMU's ``announce-self`` (one 60-byte RARP frame per ms, ~59 KB/s). Three parts:

- **at preset**: the monitor (the bundled rules) watches the NIC with a preset equal to that rate for
  ``--seconds`` (300 by default): every verdict is printed; the target is none, and the peak rate ÷ preset;
- **breach**: ``--repeat`` times, a fresh guest whose binding places it on another host sends at 3 × its
  preset: time from the first frame to the destroy and to the RAM file scrubbed (target < 2 s), and
  whether the file read back all zeros through a descriptor kept open;
- **throttle**: a :class:`TapEndpoint` blasts 4 MB/s from a tap; the rate at the far veth port before and
  after a 1 MB/s ``tc`` cap.

Needs root, QEMU and gcc. ``python benchmarks/nic_monitor.py [--seconds 300] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from secmig.agent import hostnet
from secmig.agent.macverify import BindingCheck
from secmig.agent.nicmonitor import NicMonitor, NicSpec, self_destruct
from secmig.agent.qemu.guest import GuestParams, build_guest
from secmig.agent.qemu.machine import MachineConfig, QemuMachine, choose_accel, find_qemu
from secmig.monitor import load_rules
from secmig.security import Cluster
from secmig.security.audit import MemoryAuditSink

RAM = 32 << 20
MAC = "52:54:00:5e:99:01"
ANNOUNCE_BPS = 60_000.0
_N = [0]


def _name() -> str:
    _N[0] += 1
    return f"{os.getpid() % 100000}{_N[0]}"


@contextlib.asynccontextmanager
async def guest(elf: Path) -> AsyncIterator[tuple[QemuMachine, str, str, Path]]:
    n = _name()
    bridge, tap, mem = f"smgb{n}", f"smgt{n}", Path(f"/dev/shm/secmig-bench-{n}")
    workdir = Path(tempfile.mkdtemp(prefix="smgq-"))
    hostnet.create_bridge(bridge)
    hostnet.create_tap(tap, bridge)
    params = GuestParams(working_set_bytes=8 << 20, rate_pages_per_s=500)
    net = (
        "-netdev",
        f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device",
        f"virtio-net-pci,netdev=n0,mac={MAC},romfile=",
    )
    cfg = MachineConfig(
        elf, params.append_line(), RAM, choose_accel("auto"), find_qemu(), memory_path=mem, extra_args=net
    )
    machine = QemuMachine("nicbench", cfg, workdir)
    try:
        await machine.start()
        await machine.wait_guest_running()
        yield machine, bridge, tap, mem
    finally:
        await machine.kill()
        with contextlib.suppress(FileNotFoundError):
            mem.unlink()
        for dev in (tap, bridge):
            hostnet.delete_link(dev)
        shutil.rmtree(workdir, ignore_errors=True)


class Actions:
    def __init__(self, machine: QemuMachine, mem: Path, audit: MemoryAuditSink) -> None:
        self.machine, self.mem, self.audit = machine, mem, audit
        self.destroyed_at: float | None = None
        self.scrubbed_at: float | None = None
        self.task: asyncio.Task[None] | None = None

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        return True, "member"

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        pass

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        self.destroyed_at = time.monotonic()

        async def go() -> None:
            await self_destruct(self.machine, self.mem, vm, reason, self.audit)
            self.scrubbed_at = time.monotonic()

        self.task = asyncio.get_running_loop().create_task(go())


async def at_preset(elf: Path, cluster: Cluster, seconds: float) -> None:
    audit = MemoryAuditSink()
    binding = cluster.issue_binding("vm1", MAC, "hv-a")
    async with guest(elf) as (machine, bridge, tap, mem):
        mon = NicMonitor(
            load_rules(),
            Actions(machine, mem, audit),
            audit,
            identity=BindingCheck("hv-a", lambda _v: binding, cluster.trust().roots),
        )
        mon.watch_vm("vm1", [NicSpec("vm1", tap, bridge, ANNOUNCE_BPS, mac=MAC)], RAM)
        mon.on_verdict = lambda v: print(f"  verdict at {v.t_s:.1f} s: {v.rule} {v.level} {v.action} {v.evidence}")
        c0 = hostnet.read_counters(tap)
        await machine.execute(
            "announce-self", {"initial": 1, "max": 1, "rounds": int(seconds * 1000) + 2000, "step": 0}
        )
        mon.start()
        t0, peak = time.monotonic(), 0.0
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(0.5)
            peak = max(peak, mon.enforcer.monitor.level("vm1", mon.now())[1])
        await mon.stop()
        c1 = hostnet.read_counters(tap)
    rate = (c1.bytes - c0.bytes) / (c1.t_s - c0.t_s)
    print(
        f"at preset: {seconds:.0f} s, mean {rate:.0f} B/s for a preset of {ANNOUNCE_BPS:.0f} B/s, "
        f"peak ratio {peak:.3f}, {len(mon.verdicts)} verdicts (target 0), "
        f"{mon.enforcer.monitor.windows_evaluated} windows"
    )


async def breach(elf: Path, cluster: Cluster) -> tuple[float, float, bool]:
    audit = MemoryAuditSink()
    binding = cluster.issue_binding("vm1", MAC, "hv-b")  # moved here without authorization
    async with guest(elf) as (machine, bridge, tap, mem):
        actions = Actions(machine, mem, audit)
        mon = NicMonitor(
            load_rules(), actions, audit, identity=BindingCheck("hv-a", lambda _v: binding, cluster.trust().roots)
        )
        mon.watch_vm("vm1", [NicSpec("vm1", tap, bridge, ANNOUNCE_BPS / 3, mac=MAC)], RAM)
        fd = os.open(mem, os.O_RDONLY)
        try:
            mon.start()
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await machine.execute("announce-self", {"initial": 1, "max": 1, "rounds": 5000, "step": 0})
            while actions.scrubbed_at is None and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.01)
            await mon.stop()
            zeros = os.pread(fd, RAM, 0).count(0) == RAM
        finally:
            os.close(fd)
    if actions.destroyed_at is None or actions.scrubbed_at is None:
        raise SystemExit("breach: the VM was not destroyed in 10 s")
    return actions.destroyed_at - t0, actions.scrubbed_at - t0, zeros


def throttle() -> tuple[float, float]:
    n = _name()
    bridge, tap, port, far = f"smgb{n}", f"smgt{n}", f"smgv{n}", f"smgw{n}"
    try:
        hostnet.create_bridge(bridge)
        hostnet.create_tap(tap, bridge)
        subprocess.run(["ip", "link", "add", port, "type", "veth", "peer", "name", far], check=True)
        hostnet.attach(port, bridge)
        for dev in (port, far):
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        vm = hostnet.TapEndpoint(tap)
        frame = hostnet.ethernet_frame(hostnet.mac_of(far), MAC, 1400)

        def blast(seconds: float) -> None:
            sent, t0 = 0, time.monotonic()
            while (now := time.monotonic()) - t0 < seconds:
                while sent < 4e6 * (now - t0) and vm.send(frame):
                    sent += len(frame)
                time.sleep(0.002)

        def measure() -> float:
            t = threading.Thread(target=blast, args=(2.0,))
            t.start()
            time.sleep(0.3)
            c0 = hostnet.read_counters(far)
            time.sleep(1.5)
            c1 = hostnet.read_counters(far)
            t.join()
            return (c1.rx_bytes - c0.rx_bytes) / (c1.t_s - c0.t_s)

        try:
            before = measure()
            hostnet.limit_rate(tap, 1e6)
            after = measure()
        finally:
            vm.close()
        return before, after
    finally:
        for dev in (tap, port, bridge):
            hostnet.delete_link(dev)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="length of the run at the preset")
    ap.add_argument("--repeat", type=int, default=3, help="breaches to time")
    args = ap.parse_args(argv)
    reason = hostnet.missing_capability()
    if reason is not None:
        print(f"nic_monitor: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="smgc-") as tmp:
        cluster = Cluster.create(Path(tmp) / "c", name="bench")
        for host in ("hv-a", "hv-b"):
            cluster.join(host)
        elf = build_guest(cache_dir=Path(tmp) / "guest")
        before, after = throttle()
        print(f"throttle: 4 MB/s offered, {before / 1e6:.3f} MB/s through; capped at 1 MB/s: {after / 1e6:.3f} MB/s")
        times = [asyncio.run(breach(elf, cluster)) for _ in range(args.repeat)]
        for d, s, z in times:
            print(f"breach: destroy asked after {d:.3f} s, RAM scrubbed after {s:.3f} s, file all zeros: {z}")
        print(f"breach: median to scrubbed {statistics.median(s for _d, s, _z in times):.3f} s (target < 2 s)")
        asyncio.run(at_preset(elf, cluster, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
