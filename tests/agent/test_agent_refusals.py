"""Refusals over real TCP: a rogue CA or a missing grant gets zero bytes of memory; the VM stays put."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_helpers import (
    MIB,
    CuttingProxy,
    addr,
    audit_events,
    grant_for,
    host_config,
    run,
    running,
    spec,
    start_bound_vm,
)

from secmig.agent.config import parse_address
from secmig.agent.daemon import Agent
from secmig.errors import AuthenticationError, AuthorizationError
from secmig.security import Cluster
from secmig.security.frames import memory_digest


@pytest.fixture(scope="module")
def rogue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another cluster (its own CA) that also has hosts called hv-a and hv-b."""
    root = tmp_path_factory.mktemp("rogue") / "r"
    rogue = Cluster.create(root, name="rogue")
    rogue.join("hv-a")
    rogue.join("hv-b")
    return root


def test_destination_with_its_own_ca_gets_no_memory(
    cluster_dir: Path, cluster: Cluster, rogue_dir: Path, base: Path
) -> None:
    """A destination certified by another CA is refused in TLS: a few KiB of handshake, zero page bytes."""

    async def body() -> None:
        async with running(host_config(rogue_dir, "hv-b", base)) as rogue:
            proxy = CuttingProxy(rogue.address)
            via = await proxy.start()
            async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": via})) as a:
                await start_bound_vm(a, cluster, "vm1", spec(32 * MIB, 16 * MIB))
                with pytest.raises(AuthenticationError):
                    await a.migrate("vm1", "hv-b", "migrate", grant_for(cluster, a, "vm1", "hv-b"))
                assert a.vms["vm1"].vm.running
                assert rogue.stats["payload_bytes_received"] == 0 and not rogue.vms
                # Only the TLS ClientHello and the end of the handshake crossed: nothing near a page batch.
                assert 0 < proxy.to_destination < 8 * 1024
                assert "handshake.failed:refuse" in audit_events(a)
            await proxy.close()

    run(body)


def test_source_with_its_own_ca_is_refused(cluster_dir: Path, cluster: Cluster, rogue_dir: Path, base: Path) -> None:
    """A source certified by another CA cannot push a VM: the destination installs nothing."""

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base)) as b:
            rogue_cluster = Cluster(rogue_dir)
            async with running(host_config(rogue_dir, "hv-a", base, {"hv-b": addr(b)})) as rogue:
                await start_bound_vm(rogue, rogue_cluster, "vm1", spec(16 * MIB, 8 * MIB))
                with pytest.raises(AuthenticationError):
                    await rogue.migrate("vm1", "hv-b", "migrate", grant_for(rogue_cluster, rogue, "vm1", "hv-b"))
            assert b.stats["payload_bytes_received"] == 0 and not b.vms
            assert "handshake.failed:refuse" in audit_events(b)

    run(body)


def test_migration_without_a_grant_is_refused(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """No grant: the destination refuses after authenticating the source; no page byte reaches it."""

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base)) as b:
            proxy = CuttingProxy(b.address)
            via = await proxy.start()
            async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": via})) as a:
                await start_bound_vm(a, cluster, "vm1", spec(32 * MIB, 16 * MIB))
                with pytest.raises(AuthorizationError, match="no grant"):
                    await a.migrate("vm1", "hv-b", "migrate", None)
                assert a.vms["vm1"].vm.running
                assert b.stats["payload_bytes_received"] == 0 and "vm1" not in b.vms
                assert proxy.to_destination < 16 * 1024
                assert "grant.refused:refuse" in audit_events(b)
                assert "migration.failed:refuse" in audit_events(a)
            await proxy.close()

    run(body)


def test_a_grant_works_once(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """A copy grant replayed for a second copy is refused by the destination's nonce store."""

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base)) as b:
            a = Agent(host_config(cluster_dir, "hv-a", base, {"hv-b": addr(b)}))
            await a.start()
            try:
                await start_bound_vm(a, cluster, "vm1", spec(16 * MIB, 8 * MIB))
                grant = grant_for(cluster, a, "vm1", "hv-b", op="copy")
                report = await a.migrate("vm1", "hv-b", "copy", grant)
                assert report.outcome == "completed" and b.vms["vm1"].stored
                # The stored copy is exactly the memory the commit digest names.
                assert memory_digest(b.vms["vm1"].vm.memory.data, 4096).hex() == report.memory_digest
                await b.stop_vm("vm1")
                with pytest.raises(AuthorizationError, match="replay"):
                    await a.migrate("vm1", "hv-b", "copy", grant)
                assert a.vms["vm1"].vm.running and "vm1" not in b.vms
            finally:
                await a.stop()

    run(body)


def test_address_parsing() -> None:
    """host:port, bare hosts and IPv6 literals parse; garbage does not."""
    assert parse_address("10.0.0.2:7301") == ("10.0.0.2", 7301)
    assert parse_address("hv-b") == ("hv-b", 7300)
    assert parse_address("[::1]:9") == ("::1", 9)
    for bad in ("", "a:b", "h:70000", "a:1:2:3x"):
        with pytest.raises(ValueError):
            parse_address(bad)
