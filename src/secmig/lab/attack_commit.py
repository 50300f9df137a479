"""Attacks on the commit (issue 12, points 1 and 2), for ``secmig attack run``.

Each is an authentication attack in the shape of :data:`secmig.lab.attacks.AUTH_ATTACKS`: given the lab,
a real cluster with ``hv-a`` and ``hv-b`` and a scratch folder, it returns (what reached the attacker,
what stopped it, how it was measured); zero means blocked. Nothing is assumed: each runs the real code.

- ``split-brain-proxy``: two real agents over real TCP; a proxy on the link withholds the destination's
  answer to COMMIT and resets the connection. Counted: copies of the VM running at once beyond one,
  sampled every 10 ms (before the commit protocol: 1 — the VM ran on both hosts within 0.5 s).
- ``stale-binding-fresh-host``: two grants are issued at epoch 0; the VM moves with the first; the
  second, with its now stale binding, is presented to ``hv-c``, which never saw the VM. Counted: page
  bytes ``hv-c`` accepted, and whether it could commit (before the register: all of them, and the VM
  ended up committed on a third host).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from secmig.errors import LocalProtocolError, SecmigError
from secmig.security.audit import MemoryAuditSink
from secmig.security.cluster import Cluster
from secmig.security.events import MigrationRequest, Role
from secmig.security.handshake import GrantAuthorizer
from secmig.security.loopback import ConnectionPair
from secmig.security.policy import Operation
from secmig.security.protocol import MigrationConnection
from secmig.security.register import Move, RegisterAuthorizer
from secmig.security.state import State

PAGE = 4096
MIB = 1 << 20
VM_MAC = "52:54:00:00:00:01"
Outcome = tuple[int, str, str]


class _WithholdingProxy:
    """Forwards both ways; once the source has sent ``after_bytes``, drops what the destination says and
    resets both connections ``reset_after_s`` later."""

    def __init__(self, target: tuple[str, int], after_bytes: int, reset_after_s: float = 0.3) -> None:
        self.target = target
        self.after_bytes = after_bytes
        self.reset_after_s = reset_after_s
        self.to_destination = 0
        self.withheld = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._reset: asyncio.Task[None] | None = None

    async def start(self) -> tuple[asyncio.Server, str]:
        server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        return server, f"{host}:{port}"

    async def _reset_later(self) -> None:
        await asyncio.sleep(self.reset_after_s)
        for w in self._writers:
            w.transport.abort()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, forward: bool) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await r.read(1 << 16):
                    if forward:
                        self.to_destination += len(data)
                    elif self.to_destination >= self.after_bytes:
                        self.withheld += len(data)
                        if self._reset is None:
                            self._reset = asyncio.ensure_future(self._reset_later())
                        continue
                    w.write(data)
                    await w.drain()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))


async def _split_brain(cluster: Cluster, base: Path) -> tuple[int, int, int]:
    from secmig.agent.config import parse_config  # the lab builds on the agents
    from secmig.agent.daemon import Agent

    def config(host: str, peers: dict[str, str]) -> Any:
        doc = {
            "host_id": host,
            "cluster": str(cluster.root),
            "listen": "127.0.0.1:0",
            "control_socket": str(base / f"{host}.sock"),
            "state_dir": str(base / host),
            "peers": peers,
            "migration": {"idle_timeout": "1s"},
            "monitor": {"enabled": False},
        }
        return parse_config(doc, f"{host}.yaml")

    b = Agent(config("hv-b", {}))
    await b.start()
    proxy = _WithholdingProxy(b.address, after_bytes=8 * MIB)
    server, via = await proxy.start()
    a = Agent(config("hv-a", {"hv-b": via}))
    await a.start()
    try:
        binding = cluster.issue_binding("vm1", VM_MAC, "hv-a")
        spec = {"ram_bytes": 16 * MIB, "used_bytes": 8 * MIB, "working_set_bytes": 2 * MIB}
        await a.start_vm("vm1", "memory", {**spec, "dirty_rate_pages_per_s": 500}, binding.to_json())
        grant = cluster.issue_grant(Operation.MIGRATE, "vm1", "hv-a", "hv-b", current_binding=binding)
        mig = asyncio.ensure_future(a.migrate("vm1", "hv-b", "migrate", grant.to_json()))

        def running(agent: Agent) -> bool:
            entry = agent.vms.get("vm1")
            return entry is not None and not entry.stored and bool(entry.vm.running)

        worst = 0
        for _ in range(300):  # 3 s: the migration, the cut, both ends settling
            worst = max(worst, int(running(a)) + int(running(b)))
            if mig.done() and not a.migrations and not b.migrations:
                break
            await asyncio.sleep(0.01)
        with contextlib.suppress(SecmigError):
            await mig
        return worst, int(running(a)) + int(running(b)), proxy.withheld
    finally:
        await a.stop()
        await b.stop()
        server.close()


def split_brain_proxy(lab: Any, cluster: Cluster, root: Path) -> Outcome:
    """The destination's answer to COMMIT withheld and the link reset: copies running beyond one."""
    base = Path(tempfile.mkdtemp(prefix="sb-"))  # short: UNIX socket paths
    try:
        worst, final, withheld = asyncio.run(_split_brain(cluster, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    extra = max(worst - 1, 0) + (1 if final != 1 else 0)
    how = f"measured: at most {worst} copies running at once, {final} at the end; {withheld} bytes withheld"
    return extra, "commit protocol: no resume before CONFIRM, location register decides", how


def stale_binding_fresh_host(lab: Any, cluster: Cluster, root: Path) -> Outcome:
    """An epoch-0 grant used at a fresh host after the VM moved: page bytes it accepted, and its commit."""
    b0 = cluster.issue_binding("vm-1", VM_MAC, "hv-a")
    to_b = cluster.issue_grant(Operation.MIGRATE, "vm-1", "hv-a", "hv-b", current_binding=b0)
    cluster.join("hv-c")
    to_c = cluster.issue_grant(Operation.MIGRATE, "vm-1", "hv-a", "hv-c", current_binding=b0)
    register = cluster.location_register()
    assert to_b.next_binding is not None
    register.commit(Move(b0, to_b.next_binding, to_b.nonce), "hv-a")  # the VM went to hv-b
    request = MigrationRequest(Operation.MIGRATE, "vm-1", PAGE, 16, to_c, b0)
    source = MigrationConnection.source(
        cluster.host_identity("hv-a"), cluster.trust, request, audit=MemoryAuditSink("hv-a")
    )
    audit = MemoryAuditSink("hv-c")
    destination = MigrationConnection.destination(
        cluster.host_identity("hv-c"),
        cluster.trust,
        audit=audit,
        authorizer=RegisterAuthorizer(GrantAuthorizer(lab.nonces, lab.bindings), register),
    )
    pair = ConnectionPair(source, destination)
    pair.pump()
    with contextlib.suppress(LocalProtocolError):  # a refused source may not send pages
        from secmig.security.events import PageBatch, RoundStart

        pair.send(Role.SOURCE, RoundStart(0))
        pair.send(Role.SOURCE, PageBatch(0, (0,), bytes(PAGE)))
        pair.pump()
    committed = destination.state in (State.CONFIRMED, State.DONE)
    refusals = sum(1 for r in audit.records if r.event == "grant.refused")
    register.close()
    leaked = destination.page_bytes_received // PAGE + int(committed)
    how = f"measured: hv-c accepted {destination.page_bytes_received} page bytes, {refusals} refusal(s) audited"
    return leaked, "location register: binding not current", how


COMMIT_ATTACKS: dict[str, tuple[str, Any]] = {
    "split-brain-proxy": (
        "a proxy withholds the destination's answer to COMMIT and resets the link",
        split_brain_proxy,
    ),
    "stale-binding-fresh-host": (
        "a stale epoch-0 grant used at a host that never saw the VM",
        stale_binding_fresh_host,
    ),
}
