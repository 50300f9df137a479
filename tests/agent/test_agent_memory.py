"""Two agents on loopback migrate in-memory VMs over the authenticated channel."""

from __future__ import annotations

from pathlib import Path

from agent_helpers import MIB, addr, audit_events, grant_for, host_config, run, running, spec, start_bound_vm

from secmig.agent.memvm import MemoryVM
from secmig.security import Cluster


def test_live_migration_of_a_dirtying_256mib_vm(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """A 256 MiB VM that keeps dirtying pages arrives intact (digests match), runs on, downtime reported."""

    async def body() -> None:
        verify = {"migration": {"verify_memory": True}}
        async with running(host_config(cluster_dir, "hv-b", base, **verify)) as b:
            peers = {"hv-b": addr(b)}
            async with running(host_config(cluster_dir, "hv-a", base, peers, **verify)) as a:
                await start_bound_vm(a, cluster, "vm1", spec(256 * MIB, 128 * MIB, 32 * MIB, 5000))
                src_vm: MemoryVM = a.vms["vm1"].vm
                grant = grant_for(cluster, a, "vm1", "hv-b")
                report = await a.migrate("vm1", "hv-b", "migrate", grant)
                assert report.outcome == "completed"
                assert report.downtime_s is not None and 0 < report.downtime_s < 2.0
                assert report.rounds >= 2
                assert report.payload_bytes >= 128 * MIB
                print(
                    f"\n256 MiB VM: total {report.total_time_s:.2f} s, downtime {report.downtime_s * 1e3:.0f} ms, "
                    f"{report.rounds} rounds, {report.payload_bytes / MIB:.0f} MiB of pages"
                )
                # The source released (wiped) its copy; the destination runs it with the new binding.
                assert "vm1" not in a.vms and not src_vm.memory.any()
                entry = b.vms["vm1"]
                assert entry.binding is not None and entry.binding.host_id == "hv-b" and entry.binding.epoch == 1
                dst_vm: MemoryVM = entry.vm
                assert dst_vm.running
                writes = dst_vm.writes
                import asyncio

                await asyncio.sleep(0.3)
                assert dst_vm.writes > writes
                assert "migration.committed:allow" in audit_events(b)
                assert "vm.released:info" in audit_events(a)

    run(body)
