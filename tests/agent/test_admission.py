"""Connection admission (issue 12, point 5): a cap on connections not yet authorized, a short handshake
timeout, audit rows from unauthenticated peers rate-limited (counted), and every handler exception caught."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import grant_for, host_config, run, running, spec, start_bound_vm

from secmig.agent.admission import SUMMARY_EVENT, Admission, Ticket
from secmig.security import Cluster
from secmig.security.audit import Decision, MemoryAuditSink, read_records


def test_cap_evicts_the_oldest_idle_connection_first() -> None:
    """At the cap, a new connection drops the oldest one that sent nothing, not a handshake in progress."""
    dropped: list[str] = []
    adm = Admission(MemoryAuditSink(), max_pending=3)
    sent = {"busy": 10}

    def admit(name: str) -> Ticket:
        return adm.admit(name, lambda: dropped.append(name), lambda: sent.get(name, 0))

    tickets = [admit(name) for name in ("busy", "idle-1", "idle-2")]
    adm.admit("new", lambda: dropped.append("new"))
    assert dropped == ["idle-1"] and adm.pending == 3 and adm.stats["evicted"] == 1
    tickets[0].mark_authenticated()
    assert adm.pending == 2


def test_unauthenticated_audit_rows_are_counted_not_dropped() -> None:
    """Over the budget, rows are held back and one summary row per interval says how many of each."""
    now = [0.0]
    sink = MemoryAuditSink()
    adm = Admission(sink, audit_budget=3, audit_interval_s=10.0, clock=lambda: now[0])
    for _ in range(10):
        t = adm.admit("peer", lambda: None)
        t.audit.record("protocol.error", Decision.REFUSE, "?", {})
        t.release()
    assert len(sink.records) == 3
    now[0] = 11.0
    adm.admit("peer", lambda: None).audit.record("handshake.failed", Decision.REFUSE, "?", {})
    summary = [r for r in sink.records if r.event == SUMMARY_EVENT]
    assert len(summary) == 1 and summary[0].detail["rows"] == 7
    assert summary[0].detail["event:protocol.error"] == 7
    ok = adm.admit("member", lambda: None)
    ok.audit.record("handshake.ok", Decision.ALLOW, "vm", {})
    ok.audit.record("grant.used", Decision.ALLOW, "vm", {})
    assert [r.event for r in sink.records[-2:]] == ["handshake.ok", "grant.used"]


def test_garbage_connections_are_rate_limited_in_the_agent_log(cluster_dir: Path, base: Path) -> None:
    """40 garbage connections write at most the budget of rows plus one summary that counts the rest."""

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base)) as agent:
            assert agent._admission is not None
            agent._admission.audit_budget = 5
            host, port = agent.address
            for _ in range(40):
                _r, w = await asyncio.open_connection(host, port)
                w.write(b"\x16\x03\x01\x00\x05garbage-not-tls")
                await w.drain()
                w.close()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if agent._admission.stats["audit_rows_held_back"] + 5 >= 40:
                    break
            agent._admission.flush()
            rows = read_records(agent.config.state_dir / "audit.db")
            unauth = [r for r in rows if r.event not in ("agent.started", SUMMARY_EVENT)]
            summary = [r for r in rows if r.event == SUMMARY_EVENT]
            assert len(unauth) <= 5
            assert len(summary) == 1
            assert len(unauth) + int(str(summary[0].detail["rows"])) >= 40  # every refusal is accounted for

    run(body, 60)


def test_unexpected_exception_in_handler_is_audited_and_agent_serves_on(
    cluster: Cluster, cluster_dir: Path, base: Path
) -> None:
    """A RuntimeError inside the incoming handler is audited as connection.error; the next migration works."""

    async def body() -> None:
        async with (
            running(host_config(cluster_dir, "hv-a", base)) as src,
            running(host_config(cluster_dir, "hv-b", base)) as dst,
        ):
            assert dst._drivers is not None
            drivers = dst._drivers
            real = drivers.lookup

            def boom(kind: Any) -> Any:
                raise RuntimeError("driver registry exploded")

            drivers.lookup = boom  # type: ignore[method-assign,assignment]
            await start_bound_vm(src, cluster, "vm-a", spec(ram=8 << 20, used=4 << 20, ws=1 << 20))
            with pytest.raises(Exception):  # noqa: B017 - the source sees the abort in its own words
                await src.migrate("vm-a", "hv-b", grant=grant_for(cluster, src, "vm-a", "hv-b"), address=dst.address)
            rows = read_records(dst.config.state_dir / "audit.db")
            errors = [r for r in rows if r.event == "connection.error"]
            assert errors and errors[0].detail["error"] == "RuntimeError"
            drivers.lookup = real  # type: ignore[method-assign]
            await src.migrate("vm-a", "hv-b", grant=grant_for(cluster, src, "vm-a", "hv-b"), address=dst.address)
            assert "vm-a" in dst.vms

    run(body, 60)


_AGENT_SCRIPT = """
import asyncio, json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
from secmig.agent.config import parse_config
from secmig.agent.daemon import Agent

async def main():
    agent = Agent(parse_config(json.loads(sys.argv[1]), "hv-b.yaml"))
    await agent.start()
    print(agent.address[1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await agent.stop()

asyncio.run(main())
"""


def test_idle_connection_flood_does_not_lock_out_migrations(cluster: Cluster, cluster_dir: Path, base: Path) -> None:
    """6,000 idle connections to an agent limited to 1,024 descriptors; a migration still succeeds at once."""
    cfg = host_config(cluster_dir, "hv-b", base)
    doc = {
        "host_id": "hv-b",
        "cluster": str(cluster_dir),
        "listen": "127.0.0.1:0",
        "control_socket": str(cfg.control_socket),
        "state_dir": str(cfg.state_dir),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _AGENT_SCRIPT, json.dumps(doc)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    flood: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        t0 = time.monotonic()
        for _ in range(6000):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            flood.append(s)
        time.sleep(1.0)  # let the agent accept (and shed) the burst

        async def body() -> float:
            async with running(host_config(cluster_dir, "hv-a", base)) as src:
                await start_bound_vm(src, cluster, "vm-f", spec(ram=8 << 20, used=4 << 20, ws=1 << 20))
                t = time.monotonic()
                await asyncio.wait_for(
                    src.migrate(
                        "vm-f", "hv-b", grant=grant_for(cluster, src, "vm-f", "hv-b"), address=("127.0.0.1", port)
                    ),
                    8.0,
                )
                return time.monotonic() - t

        took = run(body, 60)
        assert took < 8.0 and time.monotonic() - t0 < 30
    finally:
        for s in flood:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
