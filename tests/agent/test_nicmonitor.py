"""The NIC monitor and MAC re-verification on a real QEMU guest whose virtio-net NIC is a tap on a real bridge.

The guest is the reference guest (it has no network stack): its NIC's traffic is made by QEMU itself with
``announce-self`` — RARP frames from the NIC's MAC, one per millisecond (~59 KB/s) — which is also how
the agent makes a guest announce its MAC after a move. Its RAM is a file in /dev/shm that a destroy
zeroes. Bindings are signed by the test cluster (hv-a, hv-b, hv-c); this host is hv-a.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agent_helpers import MIB, run, short_dir

from secmig.agent import hostnet
from secmig.agent.macverify import BindingCheck, reverify_mac
from secmig.agent.nicmonitor import NicMonitor, NicSpec, self_destruct
from secmig.agent.qemu.guest import GuestParams, build_guest
from secmig.agent.qemu.machine import MachineConfig, QemuMachine, choose_accel, find_qemu
from secmig.monitor import Action, load_rules
from secmig.security import Cluster
from secmig.security.audit import MemoryAuditSink
from secmig.security.credentials import LocationBinding
from secmig.security.location import LocationAction

pytestmark = pytest.mark.qemu

NIC_MAC = "52:54:00:5e:88:01"
OTHER_MAC = "52:54:00:5e:88:99"
RAM = 32 * MIB
ANNOUNCE_BYTES_PER_S = 60_000.0
"""One 60-byte RARP frame per millisecond: the most ``announce-self`` sends."""


@pytest.fixture(scope="module")
def guest_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Skip without root networking, QEMU or gcc; the reference guest built once for the module."""
    reason = hostnet.missing_capability()
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the reference guest cannot be built")
    return build_guest(cache_dir=tmp_path_factory.mktemp("guest"))


@dataclass
class Guest:
    """A booted guest on a fresh bridge and tap, its RAM in a file."""

    machine: QemuMachine
    bridge: str
    tap: str
    memory_path: Path

    async def announce(self, rounds: int, step_ms: int = 1) -> None:
        """QEMU sends ``rounds`` RARP frames from the NIC's MAC, ``step_ms`` apart."""
        await self.machine.execute("announce-self", {"initial": step_ms, "max": step_ms, "rounds": rounds, "step": 0})


@contextlib.asynccontextmanager
async def guest(elf: Path, mac: str = NIC_MAC) -> AsyncIterator[Guest]:
    """The reference guest with a virtio-net NIC (``mac``) on a tap of a new bridge; all removed afterwards."""
    n = f"{os.getpid() % 100000}{time.monotonic_ns() % 1000}"
    bridge, tap = f"smgb{n}", f"smgt{n}"
    mem = Path(f"/dev/shm/secmig-test-{n}")
    workdir = short_dir("smgq-")
    hostnet.create_bridge(bridge)
    hostnet.create_tap(tap, bridge)
    params = GuestParams(working_set_bytes=8 * MIB, rate_pages_per_s=500)
    cfg = MachineConfig(
        elf,
        params.append_line(),
        RAM,
        choose_accel("auto"),
        find_qemu(),
        memory_path=mem,
        extra_args=(
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=",
        ),
    )  # fmt: skip
    machine = QemuMachine("nicvm", cfg, workdir)
    try:
        await machine.start()
        await machine.wait_guest_running()
        yield Guest(machine, bridge, tap, mem)
    finally:
        await machine.kill()
        with contextlib.suppress(FileNotFoundError):
            mem.unlink()
        for dev in (tap, bridge):
            hostnet.delete_link(dev)
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class DaemonActions:
    """What the daemon would do: its own check passes; destroy = kill QEMU + scrub its RAM, audited."""

    g: Guest
    audit: MemoryAuditSink
    destroyed_at: float | None = None
    scrubbed_at: float | None = None
    reasons: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[int]] = field(default_factory=list)

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        return True, "peer is a current member"

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        self.reasons.append(f"abort: {reason}")

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        self.destroyed_at = time.monotonic()
        self.reasons.append(f"destroy: {reason}")

        async def go() -> int:
            n = await self_destruct(self.g.machine, self.g.memory_path, vm, reason, self.audit)
            self.scrubbed_at = time.monotonic()
            return n

        self.tasks.append(asyncio.get_running_loop().create_task(go()))


def _check(cluster: Cluster, binding: LocationBinding | None) -> BindingCheck:
    trust = cluster.trust()
    return BindingCheck("hv-a", lambda _vm: binding, trust.roots)


def test_announced_mac_matching_the_binding_continues_another_is_destroyed(guest_elf: Path, cluster: Cluster) -> None:
    """After a move the guest announces its NIC's MAC: its binding's MAC → CONTINUE; a binding with another MAC,
    or for another host → DESTROY; each audited."""

    async def body() -> None:
        audit = MemoryAuditSink()
        async with guest(guest_elf) as g:

            async def announce() -> None:
                await g.announce(rounds=5, step_ms=20)

            right = cluster.issue_binding("vm1", NIC_MAC, "hv-a", epoch=3)
            ok = await reverify_mac(_check(cluster, right), "vm1", g.bridge, g.tap, announce=announce, audit=audit)
            wrong_mac = cluster.issue_binding("vm1", OTHER_MAC, "hv-a", epoch=3)
            bad = await reverify_mac(_check(cluster, wrong_mac), "vm1", g.bridge, g.tap, announce=announce, audit=audit)
            elsewhere = cluster.issue_binding("vm1", NIC_MAC, "hv-b", epoch=3)
            moved = await reverify_mac(_check(cluster, elsewhere), "vm1", g.bridge, g.tap, announce=announce)
        print(f"\nannounced {ok.observed}: {ok.verdict.reason} | {bad.verdict.reason} | {moved.verdict.reason}")
        assert ok.observed[0] == NIC_MAC and ok.action is LocationAction.CONTINUE
        assert bad.action is LocationAction.DESTROY and NIC_MAC in bad.verdict.reason
        assert moved.action is LocationAction.DESTROY and "hv-b" in moved.verdict.reason
        events = [(r.event, str(r.decision)) for r in audit.records]
        assert events == [("vm.mac_verified", "allow"), ("vm.mac_mismatch", "destroy")]

    run(body, timeout_s=90)


def test_flow_above_preset_is_challenged_and_destroyed_within_2s_ram_zeroed(guest_elf: Path, cluster: Cluster) -> None:
    """The VM's NIC sends ~3 x its preset; the identity check fails (its binding places it on hv-b): destroyed
    within 2 s of the breach, QEMU gone, its RAM file all zeros, the monitor's verdict and the scrub audited."""

    async def body() -> None:
        audit = MemoryAuditSink()
        async with guest(guest_elf) as g:
            actions = DaemonActions(g, audit)
            rules = load_rules()
            mon = NicMonitor(
                rules, actions, audit, identity=_check(cluster, cluster.issue_binding("vm1", NIC_MAC, "hv-b"))
            )
            mon.watch_vm("vm1", [NicSpec("vm1", g.tap, g.bridge, ANNOUNCE_BYTES_PER_S / 3, mac=NIC_MAC)], RAM)
            fd = os.open(g.memory_path, os.O_RDONLY)  # kept open: the scrubbed file is read after its unlink
            try:
                before = os.pread(fd, RAM, 0)
                assert before.count(0) < len(before)  # the guest's data is in the file
                mon.start()
                await asyncio.sleep(0.5)  # quiet: nothing said
                assert mon.verdicts == []
                breach = time.monotonic()
                await g.announce(rounds=5000)
                while actions.scrubbed_at is None and time.monotonic() - breach < 5:
                    await asyncio.sleep(0.02)
                await mon.stop()
                assert actions.destroyed_at is not None and actions.scrubbed_at is not None
                after = os.pread(fd, RAM, 0)
            finally:
                os.close(fd)
            print(
                f"\nbreach -> destroy asked {actions.destroyed_at - breach:.3f} s, -> RAM scrubbed "
                f"{actions.scrubbed_at - breach:.3f} s; verdict {mon.verdicts[0].evidence}"
            )
            assert actions.scrubbed_at - breach < 2.0
            assert not g.machine.running and not g.memory_path.exists()
            assert len(after) == RAM and after.count(0) == RAM
            v = mon.verdicts[0]
            assert v.rule == "rate" and v.action is Action.DESTROY and v.evidence["challenge"] == "failed"
            assert "hv-b" in str(v.evidence["challenge_detail"])
            events = [(r.event, str(r.decision)) for r in audit.records]
            assert ("monitor.rate", "destroy") in events and ("vm.ram_scrubbed", "destroy") in events
            scrub = next(r for r in audit.records if r.event == "vm.ram_scrubbed")
            assert scrub.detail["bytes_zeroed"] == RAM

    run(body, timeout_s=90)


@pytest.mark.slow
def test_flow_at_its_preset_runs_60s_without_a_challenge(guest_elf: Path, cluster: Cluster) -> None:
    """The VM's NIC sends at its preset rate for 60 s (SECMIG_NIC_PRESET_S to change): no verdict at all."""
    seconds = float(os.environ.get("SECMIG_NIC_PRESET_S", "60"))

    async def body() -> None:
        audit = MemoryAuditSink()
        async with guest(guest_elf) as g:
            actions = DaemonActions(g, audit)
            mon = NicMonitor(load_rules(), actions, audit, identity=_check(cluster, None))
            mon.watch_vm("vm1", [NicSpec("vm1", g.tap, g.bridge, ANNOUNCE_BYTES_PER_S, mac=NIC_MAC)], RAM)
            c0 = hostnet.read_counters(g.tap)
            await g.announce(rounds=int(seconds * 1000) + 2000)
            mon.start()
            peak = 0.0
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                await asyncio.sleep(0.5)
                peak = max(peak, mon.enforcer.monitor.level("vm1", mon.now())[1])
            await mon.stop()
            c1 = hostnet.read_counters(g.tap)
            rate = (c1.bytes - c0.bytes) / (c1.t_s - c0.t_s)
        print(
            f"\nat preset for {seconds:.0f} s: mean {rate:.0f} B/s "
            f"(preset {ANNOUNCE_BYTES_PER_S:.0f}), peak ratio {peak:.3f}"
        )
        assert rate > 0.5 * ANNOUNCE_BYTES_PER_S  # the flow really ran
        assert mon.verdicts == [] and actions.reasons == [] and audit.records == []

    run(body, timeout_s=seconds + 90)
