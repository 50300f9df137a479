"""kill -9 of a real agent at each step of a migration, then a restart: exactly one runnable copy every time.

The killed agent is a child process told where to die by the test hook ``SECMIG_TEST_CRASH_AT`` (see
:mod:`secmig.agent.vmstate`); its peer runs in this process. After the restart the location register
decides, and the VM must run on exactly one host — the one the register names — and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import (
    MIB,
    VM_MAC,
    addr,
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
from secmig.agent.vmstate import CRASH_ENV
from secmig.security import Cluster
from secmig.security.credentials import LocationBinding
from secmig.security.policy import Operation

SOURCE_POINTS = [
    "source.handshake",
    "source.transfer",
    "source.commit",
    "source.prepared",
    "source.registered",
    "source.confirmed",
]
DESTINATION_POINTS = [
    "destination.handshake",
    "destination.transfer",
    "destination.commit",
    "destination.prepared",
    "destination.confirmed",
    "destination.registered",
    "destination.resumed",
]
QUICK = {"migration": {"idle_timeout": "1s", "handshake_timeout": "2s", "max_bandwidth": "40MB/s"}}
WORKLOAD = spec(16 * MIB, 8 * MIB, 2 * MIB, 500)


async def _spawn_crashing(monkeypatch: pytest.MonkeyPatch, cfg: Path, log: Path, point: str) -> Any:
    monkeypatch.setenv(CRASH_ENV, point)
    try:
        return await spawn_agent(cfg, log)
    finally:
        monkeypatch.delenv(CRASH_ENV)


async def _running_on(client: ControlClient) -> list[str]:
    return [v["name"] for v in await client.call("vm.list") if v["state"] == "running"]


def _running_in(agent: Agent) -> list[str]:
    return [n for n, e in agent.vms.items() if not e.stored and e.vm.running]


async def _one_copy(cluster: Cluster, child: ControlClient, child_host: str, peer: Agent) -> str:
    """Wait for the restarted agent to settle; then exactly one runnable vm1, where the register says."""
    copies: list[str] = []
    for _ in range(200):
        copies = [child_host] * len(await _running_on(child)) + [peer.host_id] * len(_running_in(peer))
        if len(copies) == 1 and not peer.migrations:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # nothing else starts later
    copies = [child_host] * len(await _running_on(child)) + [peer.host_id] * len(_running_in(peer))
    assert len(copies) == 1, f"runnable copies of vm1: {copies}"
    register = cluster.location_register()
    try:
        current = register.current("vm1")
    finally:
        register.close()
    assert current is not None and current.host_id == copies[0]
    return copies[0]


@pytest.mark.parametrize("point", SOURCE_POINTS)
def test_kill9_source_agent(
    cluster_dir: Path, cluster: Cluster, base: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """The source agent SIGKILLs itself at ``point``; restarted, it and the destination keep exactly one copy."""

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base, **QUICK)) as b:
            cfg_a = write_host_yaml(base / "a.yaml", cluster_dir, "hv-a", base, free_port(), {"hv-b": addr(b)})
            proc = await _spawn_crashing(monkeypatch, cfg_a, base / "a.log", point)
            client = ControlClient(base / "hv-a.sock")
            try:
                binding = cluster.issue_binding("vm1", VM_MAC, "hv-a")
                await client.call("vm.start", name="vm1", driver="memory", spec=WORKLOAD, binding=binding.to_json())
                grant = cluster.issue_grant(Operation.MIGRATE, "vm1", "hv-a", "hv-b", current_binding=binding)
                mig = asyncio.ensure_future(client.call("migrate", name="vm1", to="hv-b", grant=grant.to_json()))
                assert await asyncio.wait_for(proc.wait(), 20) == -signal.SIGKILL, "the crash point was not reached"
                with contextlib.suppress(Exception):
                    await mig
                proc = await spawn_agent(cfg_a, base / "a.log")
                holder = await _one_copy(cluster, client, "hv-a", b)
                moved = point in ("source.registered", "source.confirmed")
                assert holder == ("hv-b" if moved else "hv-a")
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(proc.wait(), 10)

    run(body, 60)


@pytest.mark.parametrize("point", DESTINATION_POINTS)
def test_kill9_destination_agent(
    cluster_dir: Path, cluster: Cluster, base: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """The destination agent SIGKILLs itself at ``point``; restarted, exactly one copy of the VM runs."""

    async def body() -> None:
        port_b = free_port()
        cfg_b = write_host_yaml(base / "b.yaml", cluster_dir, "hv-b", base, port_b, {})
        proc = await _spawn_crashing(monkeypatch, cfg_b, base / "b.log", point)
        client = ControlClient(base / "hv-b.sock")
        try:
            async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": f"127.0.0.1:{port_b}"}, **QUICK)) as a:
                await start_bound_vm(a, cluster, "vm1", WORKLOAD)
                mig = asyncio.ensure_future(a.migrate("vm1", "hv-b", "migrate", grant_for(cluster, a, "vm1", "hv-b")))
                assert await asyncio.wait_for(proc.wait(), 20) == -signal.SIGKILL, "the crash point was not reached"
                with contextlib.suppress(Exception):
                    await mig
                proc = await spawn_agent(cfg_b, base / "b.log")
                holder = await _one_copy(cluster, client, "hv-b", a)
                voted = point in ("destination.prepared", "destination.confirmed", "destination.registered")
                assert holder == ("hv-b" if voted or point == "destination.resumed" else "hv-a")
                if holder == "hv-b":  # the copy that survived the crash is the VM, not a blank one
                    rows = await client.call("vm.list")
                    assert rows[0]["writes"] > 0 and rows[0]["binding_epoch"] == 1
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 10)

    run(body, 60)


def test_clean_stop_in_doubt_keeps_the_copy(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """A source stopped cleanly while the register cannot answer keeps its paused copy; restarted, it runs it."""

    class Down:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def current(self, vm_id: str) -> LocationBinding | None:
            return self.inner.current(vm_id)  # type: ignore[no-any-return]

        def commit(self, *args: Any) -> Any:
            from secmig.errors import RegisterUnavailable

            raise RegisterUnavailable("register down (test)")

        resolve = commit

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base, **QUICK)) as b:
            a = Agent(host_config(cluster_dir, "hv-a", base, {"hv-b": addr(b)}, **QUICK))
            await a.start()
            try:
                await start_bound_vm(a, cluster, "vm1", WORKLOAD)
                a._register = Down(a._register)
                mig = asyncio.ensure_future(a.migrate("vm1", "hv-b", "migrate", grant_for(cluster, a, "vm1", "hv-b")))
                for _ in range(200):  # COMMIT is out, the vote in, the register silent: in doubt
                    if a.migrations and a.migrations["vm1"].paused_at and not b.migrations:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
            finally:
                await a.stop()
            with contextlib.suppress(Exception):
                await mig
            assert not _running_in(b)
            async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": addr(b)}, **QUICK)) as a2:
                for _ in range(100):
                    if _running_in(a2):
                        break
                    await asyncio.sleep(0.05)
                assert _running_in(a2) == ["vm1"] and not _running_in(b)
                assert a2.vms["vm1"].binding is not None and a2.vms["vm1"].binding.epoch == 0

    run(body, 60)
