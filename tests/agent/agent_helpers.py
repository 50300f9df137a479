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


class CuttingProxy:
    """A TCP proxy between two agents that counts bytes each way and can cut the link after N bytes."""

    def __init__(self, target: tuple[str, int], cut_after_bytes: int | None = None) -> None:
        self.target = target
        self.cut_after_bytes = cut_after_bytes
        self.to_destination = 0
        self.to_source = 0
        self.raw: bytearray = bytearray()
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        """Listen on a free loopback port; returns ``host:port``."""
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    def cut_now(self) -> None:
        """Drop both sides at once (RST)."""
        self.cut.set()
        for w in self._writers:
            w.transport.abort()

    async def close(self) -> None:
        self.cut_now()
        if self._server is not None:
            self._server.close()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, forward: bool) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await r.read(1 << 16):
                    if forward:
                        if self.cut_after_bytes is not None and self.to_destination + len(data) > self.cut_after_bytes:
                            self.cut_now()
                            return
                        self.to_destination += len(data)
                        if len(self.raw) < 1 << 20:
                            self.raw += data
                    else:
                        self.to_source += len(data)
                    w.write(data)
                    await w.drain()
                w.close()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))


def free_port() -> int:
    """A TCP port the kernel just said is free on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_host_yaml(path: Path, cluster_dir: Path, host: str, base: Path, port: int, peers: dict[str, str]) -> Path:
    """A host.yaml file for a subprocess agent."""
    import yaml

    doc = {
        "host_id": host,
        "cluster": str(cluster_dir),
        "listen": f"127.0.0.1:{port}",
        "control_socket": str(base / f"{host}.sock"),
        "state_dir": str(base / host),
        "peers": peers,
        "migration": {"max_bandwidth": "40MB/s", "idle_timeout": "5s"},
        "log_level": "debug",
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def spawn_agent(config: Path, log: Path) -> asyncio.subprocess.Process:
    """``secmig agent run --config`` in a child process; returns once its control socket answers."""
    import sys

    from secmig.agent.control import ControlClient
    from secmig.errors import AgentUnavailable
    from secmig.yamlfile import read_yaml

    with open(log, "ab") as fh:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "secmig", "agent", "run", "--config", str(config), stdout=fh, stderr=fh
        )
    sock = Path(read_yaml(config)["control_socket"])
    client = ControlClient(sock, timeout_s=5)
    for _ in range(300):
        if proc.returncode is not None:
            raise AssertionError(f"agent exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            await client.call("status")
            return proc
        except AgentUnavailable:
            await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("agent did not come up")


@contextlib.asynccontextmanager
async def agent_pair(cluster_dir: Path, base: Path, **extra: Any) -> AsyncIterator[tuple[Agent, Agent]]:
    """hv-a (with hv-b as its peer) and hv-b, both running, with the same extra configuration."""
    async with contextlib.AsyncExitStack() as stack:
        b = await stack.enter_async_context(running(host_config(cluster_dir, "hv-b", base, **extra)))
        a = await stack.enter_async_context(running(host_config(cluster_dir, "hv-a", base, {"hv-b": addr(b)}, **extra)))
        yield a, b
