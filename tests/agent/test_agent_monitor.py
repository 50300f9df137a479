"""The monitor enforced for real: a rule that fires aborts the migration or destroys the VM, audited."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from agent_helpers import MIB, addr, audit_events, grant_for, host_config, run, running, spec, start_bound_vm

from secmig.errors import MigrationAborted
from secmig.security import Cluster


def test_data_rule_aborts_and_the_vm_stays(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """More memory moved than the data rule allows: the migration aborts, the VM runs on at its source."""
    rules = base / "rules.yaml"
    rules.write_text("data: {factor: 0.3, action: abort}\n")

    async def body() -> None:
        mon = {"monitor": {"rules": str(rules)}}
        async with running(host_config(cluster_dir, "hv-b", base, **mon)) as b:
            slow = {"migration": {"max_bandwidth": "40MB/s"}}
            async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": addr(b)}, **mon, **slow)) as a:
                await start_bound_vm(a, cluster, "vm1", spec(32 * MIB, 24 * MIB))
                with pytest.raises(MigrationAborted, match="data rule"):
                    await a.migrate("vm1", "hv-b", "migrate", grant_for(cluster, a, "vm1", "hv-b"))
                assert a.vms["vm1"].vm.running and "vm1" not in b.vms
                assert "monitor.data:abort" in audit_events(a)

    run(body)


def test_failed_identity_check_destroys_the_vm(tmp_path: Path, base: Path) -> None:
    """HIGH rate, then the destination is revoked mid-migration: the check fails and the VM self-destructs."""
    root = tmp_path / "c"
    cluster = Cluster.create(root, name="revoking")
    for host in ("x-a", "x-b"):
        cluster.join(host)

    async def body() -> None:
        mon = {"monitor": {"preset_rate": "1MB/s"}}
        async with running(host_config(root, "x-b", base, **mon)) as b:
            slow = {"migration": {"max_bandwidth": "16MB/s"}}
            async with running(host_config(root, "x-a", base, {"x-b": addr(b)}, **mon, **slow)) as a:
                await start_bound_vm(a, cluster, "vm1", spec(64 * MIB, 48 * MIB))
                vm = a.vms["vm1"].vm
                mig = asyncio.ensure_future(a.migrate("vm1", "x-b", "migrate", grant_for(cluster, a, "vm1", "x-b")))
                await asyncio.sleep(0.6)
                assert not mig.done()
                cluster.revoke("x-b", reason="compromised")
                with pytest.raises(MigrationAborted):
                    await mig
                assert "vm1" not in a.vms and vm.state.value == "destroyed" and not vm.memory.any()
                events = audit_events(a)
                assert "monitor.rate:allow" in events  # checked and passed before the revocation
                assert "monitor.rate:destroy" in events and "vm.destroyed:destroy" in events
                await asyncio.sleep(0.2)
                assert "vm1" not in b.vms

    run(body)
