"""QEMU VMs (TCG, the reference guest) migrated by two agents over both data planes."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from agent_helpers import MIB, VM_MAC, agent_pair, audit_events, grant_for, run

from secmig.agent.drivers.qemu import QemuVM
from secmig.errors import AuthorizationError
from secmig.security import Cluster

pytestmark = pytest.mark.qemu

QEMU_SPEC = {"ram_bytes": 128 * MIB, "working_set_bytes": 16 * MIB, "rate_pages_per_s": 2000, "pattern": "rand"}


@pytest.fixture(scope="module")
def guest_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Skip without QEMU or gcc; a shared build cache for the reference guest."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the reference guest cannot be built")
    return tmp_path_factory.mktemp("guest")


@pytest.mark.parametrize("plane", ["relay", "qemu-tls"])
def test_qemu_vm_migrates_and_runs_on(
    cluster_dir: Path, cluster: Cluster, base: Path, guest_cache: Path, plane: str
) -> None:
    """A running guest migrates; the destination QEMU runs it (its write counter advances) with the new binding."""

    async def body() -> None:
        q = {"qemu": {"guest_cache": str(guest_cache)}}
        async with agent_pair(cluster_dir, base, **q) as (a, b):
            binding = cluster.issue_binding("q1", VM_MAC, "hv-a").to_json()
            await a.start_vm("q1", "qemu", QEMU_SPEC, binding)
            report = await a.migrate("q1", "hv-b", "migrate", grant_for(cluster, a, "q1", "hv-b"), data_plane=plane)
            print(
                f"\nqemu {plane}: total {report.total_time_s:.2f} s, downtime {report.downtime_s:.3f} s "
                f"(QEMU {report.extra['qemu_downtime_s']}), {report.payload_bytes / MIB:.1f} MiB stream, "
                f"{report.wire_bytes / MIB:.1f} MiB on the wire"
            )
            assert report.outcome == "completed" and report.data_plane == plane
            assert report.downtime_s is not None and 0 < report.downtime_s < 5
            assert report.payload_bytes > 16 * MIB  # at least the working set crossed
            rounds = report.result.rounds  # QEMU's rounds, read from query-migrate, as the simulator reports them
            assert len(rounds) == report.extra["qemu_dirty_sync_count"] and not rounds[-1].live
            assert sum(r.bytes for r in rounds) == report.extra["qemu_transferred_bytes"]
            assert "q1" not in a.vms
            vm: QemuVM = b.vms["q1"].vm
            assert b.vms["q1"].binding is not None and b.vms["q1"].binding.epoch == 1
            before = (await vm.machine.read_status()).writes
            await asyncio.sleep(0.3)
            assert (await vm.machine.read_status()).writes > before
            assert "vm.received:allow" in audit_events(b)

    run(body, 180)


def test_qemu_migration_without_grant_sends_no_stream(
    cluster_dir: Path, cluster: Cluster, base: Path, guest_cache: Path
) -> None:
    """No grant: refused before QEMU is even told to migrate; the guest keeps running at the source."""

    async def body() -> None:
        q = {"qemu": {"guest_cache": str(guest_cache)}}
        async with agent_pair(cluster_dir, base, **q) as (a, b):
            binding = cluster.issue_binding("q2", VM_MAC, "hv-a").to_json()
            await a.start_vm("q2", "qemu", QEMU_SPEC, binding)
            with pytest.raises(AuthorizationError):
                await a.migrate("q2", "hv-b", "migrate", None, data_plane="relay")
            vm: QemuVM = a.vms["q2"].vm
            info = await vm.machine.execute("query-migrate")
            assert not info  # QEMU never started a migration
            before = (await vm.machine.read_status()).writes
            await asyncio.sleep(0.2)
            assert (await vm.machine.read_status()).writes > before
            assert b.stats["payload_bytes_received"] == 0 and not b.vms

    run(body, 120)
