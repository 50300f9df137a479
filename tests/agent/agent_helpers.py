"""Helpers for the agent tests: a cluster on disk, host configs, agents started in this process.

A uniquely named module, because ``from conftest import`` would be ambiguous across test folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from secmig.agent.config import HostConfig, parse_config
from secmig.agent.daemon import Agent
from secmig.security import Cluster
from secmig.security.audit import read_records

MIB = 1 << 20
VM_MAC = "52:54:00:12:34:56"
T = TypeVar("T")


def short_dir(prefix: str = "sa-") -> Path:
    """A short temporary directory (UNIX socket paths must stay under 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def host_config(
    cluster_dir: Path, host: str, base: Path, peers: dict[str, str] | None = None, **extra: Any
) -> HostConfig:
    """A host.yaml for ``host`` listening on a free loopback port, its state and socket under ``base``."""
    doc: dict[str, Any] = {
        "host_id": host,
        "cluster": str(cluster_dir),
        "listen": "127.0.0.1:0",
        "control_socket": str(base / f"{host}.sock"),
        "state_dir": str(base / host),
        "peers": peers or {},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return parse_config(doc, f"{host}.yaml")


def spec(ram: int = 64 * MIB, used: int = 32 * MIB, ws: int = 8 * MIB, rate: float = 2000) -> dict[str, Any]:
    """An in-memory VM's workload spec."""
    return {"ram_bytes": ram, "used_bytes": used, "working_set_bytes": ws, "dirty_rate_pages_per_s": rate, "seed": 3}


@contextlib.asynccontextmanager
async def running(config: HostConfig) -> AsyncIterator[Agent]:
    """An agent started for the duration of the block, stopped after."""
    agent = Agent(config)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def start_bound_vm(agent: Agent, cluster: Cluster, name: str, workload: dict[str, Any]) -> None:
    """Start an in-memory VM with a location binding on ``agent``'s host."""
    binding = cluster.issue_binding(name, VM_MAC, agent.host_id)
    await agent.start_vm(name, "memory", workload, binding.to_json())


def grant_for(cluster: Cluster, agent: Agent, name: str, to: str, op: str = "migrate") -> dict[str, Any]:
    """A grant for ``op`` of ``name`` from ``agent``'s host to ``to``, with the VM's current binding."""
    from secmig.security.credentials import LocationBinding
    from secmig.security.policy import Operation

    doc = agent.binding_of(name)
    current = None if doc is None else LocationBinding.from_json(doc)
    return cluster.issue_grant(Operation(op), name, agent.host_id, to, current_binding=current).to_json()


def audit_events(agent: Agent) -> list[str]:
    """``event:decision`` of every row of the agent's audit log."""
    return [f"{r.event}:{r.decision}" for r in read_records(agent.config.state_dir / "audit.db")]


def addr(agent: Agent) -> str:
    """``host:port`` of an agent's migration listener."""
    host, port = agent.address
    return f"{host}:{port}"


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 120.0) -> T:
    """Run an async test body with a hard timeout."""

    async def body() -> T:
        return await asyncio.wait_for(coro_fn(), timeout_s)

    return asyncio.run(body())
