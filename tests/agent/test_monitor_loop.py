"""The daemon's byte-counter monitor loop keeps its last count per migration, not per VM name.

Regression: a VM sent onward within one monitor interval of arriving was judged on a negative delta (its
outgoing migration's count minus the incoming one's), as a first contact with no grant, and destroyed.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from agent_helpers import MIB, addr, audit_events, grant_for, host_config, run, running, spec, start_bound_vm

from secmig.agent.daemon import Agent
from secmig.security import Cluster
from secmig.security.audit import read_records


async def _arrived(agent: Agent, name: str, timeout_s: float = 30.0) -> None:
    """Until ``name`` is installed on ``agent`` and no migration of it is tracked there (no extra wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while name not in agent.vms or name in agent.migrations:
        assert loop.time() < deadline, f"{name} never settled on {agent.host_id}"
        await asyncio.sleep(0.001)


async def _slow_proxy(upstream: str, delay_s: float) -> asyncio.Server:
    """A TCP proxy that holds each connection ``delay_s`` before it connects upstream: the handshake of a
    migration through it takes that long, so the monitor samples its flow before any grant is known."""
    host, port = upstream.rsplit(":", 1)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, ConnectionError):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(delay_s)
        up_r, up_w = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_a_vm_sent_onward_right_after_it_arrived_is_not_destroyed(
    cluster_dir: Path, cluster: Cluster, base: Path
) -> None:
    """a → b, then at once b → c (well within the 100 ms monitor interval): both migrations complete, the VM
    runs on c, and no host's monitor judged it other than allow, nor destroyed it."""

    async def body() -> None:
        slow = {"migration": {"max_bandwidth": "200MB/s"}}  # each migration spans several monitor ticks
        async with running(host_config(cluster_dir, "hv-c", base)) as c:
            proxy = await _slow_proxy(addr(c), 0.35)  # b's outgoing flow is tracked > 3 ticks before its grant
            to_c = f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
            async with (
                proxy,
                running(host_config(cluster_dir, "hv-b", base, {"hv-c": to_c}, **slow)) as b,
                running(host_config(cluster_dir, "hv-a", base, {"hv-b": addr(b)}, **slow)) as a,
            ):
                await start_bound_vm(a, cluster, "hop", spec(128 * MIB, 96 * MIB, 8 * MIB))
                first = await a.migrate("hop", "hv-b", "migrate", grant_for(cluster, a, "hop", "hv-b"))
                assert first.outcome == "completed"
                await _arrived(b, "hop")
                second = await b.migrate("hop", "hv-c", "migrate", grant_for(cluster, b, "hop", "hv-c"))
                assert second.outcome == "completed"
                await _arrived(c, "hop")
                await asyncio.sleep(0.3)  # a few monitor ticks on c after the arrival
                assert "hop" in c.vms and c.vms["hop"].vm.running and "hop" not in b.vms
                # b judged its b → c flow only once it carried bytes: after that flow's handshake (with the
                # count kept per VM name it was sampled at once, on a negative delta, before any grant).
                rows = read_records(b.config.state_dir / "audit.db")
                outgoing = [r.seq for r in rows if r.event == "handshake.ok"][-1]
                early = [
                    f"{r.event}:{r.decision}"
                    for r in rows
                    if r.event.startswith("monitor.")
                    and "hv-c" in str(r.detail.get("destination"))
                    and r.seq < outgoing
                ]
                assert early == [], early
                for agent in (a, b, c):
                    bad = [
                        e
                        for e in audit_events(agent)
                        if e.startswith(("vm.destroyed", "migration.failed"))
                        or (e.startswith("monitor.") and not e.endswith(":allow"))
                    ]
                    assert bad == [], (agent.host_id, bad)

    run(body)
