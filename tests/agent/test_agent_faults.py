"""Faults mid-migration: cut links, killed agents, garbage peers. The VM always keeps running on its source."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from agent_helpers import (
    MIB,
    VM_MAC,
    CuttingProxy,
    addr,
    audit_events,
    free_port,
    grant_for,
    host_config,
    run,
    running,
    spawn_agent,
    spec,
    start_bound_vm,
    write_host_yaml,
)

from secmig.agent.control import ControlClient
from secmig.agent.daemon import Agent
from secmig.errors import AgentUnavailable, MigrationAborted, MigrationError
from secmig.security import Cluster
from secmig.security.credentials import LocationBinding
from secmig.security.policy import Operation


@pytest.mark.parametrize("cut_after", [600, 3 * MIB, 20 * MIB], ids=["handshake", "round0", "late"])
def test_cut_connection_leaves_the_vm_on_its_source(
    cluster_dir: Path, cluster: Cluster, base: Path, cut_after: int
) -> None:
    """A link cut at any point: the source VM runs on, the destination discards, the next migration works."""

    async def body() -> None:
        slow = {"migration": {"max_bandwidth": "200MB/s", "idle_timeout": "3s"}}
        async with running(host_config(cluster_dir, "hv-b", base, **slow)) as b:
            proxy = CuttingProxy(b.address, cut_after_bytes=cut_after)
            via = await proxy.start()
            async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": via}, **slow)) as a:
                await start_bound_vm(a, cluster, "vm1", spec(32 * MIB, 24 * MIB, 8 * MIB, 3000))
                with pytest.raises(MigrationError):
                    await a.migrate("vm1", "hv-b", "migrate", grant_for(cluster, a, "vm1", "hv-b"))
                vm = a.vms["vm1"].vm
                assert vm.running and a.vms["vm1"].handle is None
                writes = vm.writes
                await asyncio.sleep(0.1)
                assert vm.writes > writes
                for _ in range(50):  # the destination notices the cut within its idle timeout
                    if not b.migrations:
                        break
                    await asyncio.sleep(0.1)
                assert "vm1" not in b.vms and not b.migrations
                # Both agents carry on: the same VM migrates directly with a fresh grant.
                report = await a.migrate(
                    "vm1", "hv-b", "migrate", grant_for(cluster, a, "vm1", "hv-b"), address=b.address
                )
                assert report.outcome == "completed" and b.vms["vm1"].vm.running
            await proxy.close()

    run(body)


def test_garbage_peer_is_dropped_and_audited(cluster_dir: Path, base: Path) -> None:
    """Random bytes instead of a TLS handshake: the agent drops the peer, audits it, and keeps serving."""

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base)) as b:
            reader, writer = await asyncio.open_connection(*b.address)
            writer.write(os.urandom(4096))
            await writer.drain()
            got = await asyncio.wait_for(reader.read(), 5.0)  # the agent closes on us
            writer.close()
            assert len(got) < 1024
            for _ in range(50):
                if "protocol.error:refuse" in audit_events(b):
                    break
                await asyncio.sleep(0.05)
            assert "protocol.error:refuse" in audit_events(b)
            assert b.stats["refused"] == 1 and (await b.dispatch("status", {}))["state"] == "running"

    run(body)


def _grant_doc(cluster: Cluster, binding_doc: dict[str, object], name: str, src: str, dst: str) -> dict[str, object]:
    current = LocationBinding.from_json(binding_doc)
    return cluster.issue_grant(Operation.MIGRATE, name, src, dst, current_binding=current).to_json()


def test_killed_destination_agent(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """SIGKILL of the destination agent mid-migration: the VM runs on at the source; the restart is clean."""

    async def body() -> None:
        port_b = free_port()
        cfg_b = write_host_yaml(base / "b.yaml", cluster_dir, "hv-b", base, port_b, {})
        proc = await spawn_agent(cfg_b, base / "b.log")
        try:
            slow = {"migration": {"max_bandwidth": "40MB/s", "idle_timeout": "3s"}}
            async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": f"127.0.0.1:{port_b}"}, **slow)) as a:
                await start_bound_vm(a, cluster, "vm1", spec(64 * MIB, 48 * MIB, 8 * MIB, 2000))
                mig = asyncio.ensure_future(a.migrate("vm1", "hv-b", "migrate", grant_for(cluster, a, "vm1", "hv-b")))
                await asyncio.sleep(0.5)
                assert a.migrations and not mig.done()
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                with pytest.raises(MigrationError):
                    await mig
                assert a.vms["vm1"].vm.running
                # Restarted on the same state directory and socket path, it serves and accepts the VM.
                proc = await spawn_agent(cfg_b, base / "b.log")
                client = ControlClient(base / "hv-b.sock")
                assert await client.call("vm.list") == []
                report = await a.migrate("vm1", "hv-b", "migrate", grant_for(cluster, a, "vm1", "hv-b"))
                assert report.outcome == "completed"
                assert [v["name"] for v in await client.call("vm.list")] == ["vm1"]
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 10) == 0  # a clean SIGTERM shutdown exits 0

    run(body)


def test_killed_source_agent(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """SIGKILL of the source agent mid-migration: the destination discards; the source restarts cleanly."""

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base, migration={"idle_timeout": "2s"})) as b:
            cfg_a = write_host_yaml(base / "a.yaml", cluster_dir, "hv-a", base, free_port(), {"hv-b": addr(b)})
            proc = await spawn_agent(cfg_a, base / "a.log")
            client = ControlClient(base / "hv-a.sock")
            try:
                binding = cluster.issue_binding("vm1", VM_MAC, "hv-a").to_json()
                await client.call(
                    "vm.start", name="vm1", driver="memory", spec=spec(64 * MIB, 48 * MIB), binding=binding
                )
                grant = _grant_doc(cluster, binding, "vm1", "hv-a", "hv-b")
                mig = asyncio.ensure_future(client.call("migrate", name="vm1", to="hv-b", grant=grant))
                for _ in range(100):
                    if b.migrations:
                        break
                    await asyncio.sleep(0.02)
                assert b.migrations, "the migration never reached the destination"
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                with pytest.raises(AgentUnavailable):
                    await mig
                for _ in range(100):
                    if not b.migrations:
                        break
                    await asyncio.sleep(0.05)
                assert not b.migrations and "vm1" not in b.vms
                assert "migration.discarded:refuse" in audit_events(b)
                proc = await spawn_agent(cfg_a, base / "a.log")  # the stale control socket is cleaned up
                assert (await client.call("status"))["state"] == "running"
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(proc.wait(), 10)

    run(body)


def test_shutdown_aborts_outgoing_migration(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """Stopping the source agent mid-migration aborts it with the VM resumed, then stops the VM."""

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base)) as b:
            a = Agent(host_config(cluster_dir, "hv-a", base, {"hv-b": addr(b)}, migration={"max_bandwidth": "30MB/s"}))
            await a.start()
            await start_bound_vm(a, cluster, "vm1", spec(64 * MIB, 48 * MIB))
            vm = a.vms["vm1"].vm
            mig = asyncio.ensure_future(a.migrate("vm1", "hv-b", "migrate", grant_for(cluster, a, "vm1", "hv-b")))
            await asyncio.sleep(0.4)
            await a.stop()
            with pytest.raises(MigrationAborted, match="shutting down"):
                await mig
            assert vm.state.value == "stopped" and "vm1" not in b.vms
            assert not (base / "hv-a.sock").exists()

    run(body)
