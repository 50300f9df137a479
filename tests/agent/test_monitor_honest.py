"""Issue 12 point 4 with real agents: the monitor never destroys an honest VM for the network's fault, and
its identity check asks whether the flow itself is authorized (its grant), not whether the peer is a member."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from agent_helpers import MIB, addr, audit_events, grant_for, host_config, run, running, spec, start_bound_vm

from secmig.errors import MigrationError
from secmig.security import Cluster


def test_a_granted_cold_move_of_768_mib_is_not_destroyed(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """A granted `move` (non-live: paused by design from its first page) lasting well over 2 s completes; no
    downtime verdict (today: destroyed by the downtime rule at 2.05 s and lost on both hosts)."""

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base)) as b:
            slow = {"migration": {"max_bandwidth": "100MB/s"}}
            async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": addr(b)}, **slow)) as a:
                await start_bound_vm(a, cluster, "big", spec(768 * MIB, 256 * MIB, 8 * MIB))
                t0 = time.monotonic()
                report = await a.migrate("big", "hv-b", "move", grant_for(cluster, a, "big", "hv-b", op="move"))
                assert time.monotonic() - t0 > 2.1  # long enough for the old rule to have fired
                assert report.outcome == "completed" and "big" in b.vms and "big" not in a.vms
                assert b.vms["big"].vm.running
                events = audit_events(a) + audit_events(b)
                assert not [e for e in events if e.startswith("monitor.downtime") or e.startswith("vm.destroyed")]

    run(body)


async def _stalling_proxy(upstream: tuple[str, int], period_s: float, stall_s: float) -> asyncio.Server:
    """A TCP proxy whose link passes bytes for ``period_s - stall_s`` then stalls for ``stall_s``, repeatedly."""
    t0 = time.monotonic()

    async def gate() -> None:
        phase = (time.monotonic() - t0) % period_s
        open_s = period_s - stall_s
        if phase >= open_s:
            await asyncio.sleep(period_s - phase)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                await gate()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, ConnectionError):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_a_stalling_link_never_destroys_an_honest_vm(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """Four granted live migrations through a link that stalls 2.6 s every 3.2 s: a stop-and-copy caught in a
    stall is aborted after a passed check (the VM stays on its source), none is destroyed, and every VM runs
    exactly once (today: 1 of 4 destroyed)."""

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base)) as b:
            proxy = await _stalling_proxy(b.address, 3.2, 2.6)
            port = proxy.sockets[0].getsockname()[1]
            slow = {"migration": {"max_bandwidth": "40MB/s"}}
            async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": f"127.0.0.1:{port}"}, **slow)) as a:
                names = [f"vm{i}" for i in range(4)]
                for n in names:
                    await start_bound_vm(a, cluster, n, spec(32 * MIB, 24 * MIB, 4 * MIB, rate=4000))
                grants = [grant_for(cluster, a, n, "hv-b") for n in names]
                outcomes = await asyncio.gather(
                    *(a.migrate(n, "hv-b", "migrate", g) for n, g in zip(names, grants, strict=True)),
                    return_exceptions=True,
                )
                await asyncio.sleep(0.3)
                for n, out in zip(names, outcomes, strict=True):
                    assert not isinstance(out, BaseException) or isinstance(out, MigrationError), out
                    on_a = n in a.vms and a.vms[n].vm.running
                    on_b = n in b.vms and b.vms[n].vm.running
                    assert on_a != on_b, f"{n}: on hv-a {on_a}, on hv-b {on_b}"
                events = audit_events(a) + audit_events(b)
                assert "vm.destroyed:destroy" not in events
                assert not [e for e in events if e.endswith(":destroy")]
            proxy.close()

    run(body)


def test_the_check_refuses_a_flow_whose_grant_names_another_destination(
    cluster_dir: Path, cluster: Cluster, base: Path
) -> None:
    """The source re-verifies the grant of its own flow: with a grant to hv-c presented to hv-b, the check
    fails although hv-b is a member in good standing (the old check passed: "peer is a current member")."""

    async def body() -> None:
        from secmig.agent.report import MigrationHandle
        from secmig.security.events import Role
        from secmig.security.grants import Grant
        from secmig.security.policy import Operation

        async with running(host_config(cluster_dir, "hv-a", base)) as a:
            await start_bound_vm(a, cluster, "vm1", spec(16 * MIB, 8 * MIB))
            handle = MigrationHandle("vm1", Role.SOURCE, "hv-b")
            handle.authorize(Operation.MIGRATE, Grant.from_json(grant_for(cluster, a, "vm1", "hv-c")))
            a.migrations["vm1"] = handle
            try:
                ok, why = a.challenge("vm1", 0.0)
                assert not ok and "names destination 'hv-c'" in why
                handle.authorize(Operation.MIGRATE, Grant.from_json(grant_for(cluster, a, "vm1", "hv-b")))
                ok, why = a.challenge("vm1", 0.0)
                assert ok, why
                handle.authorize(Operation.MIGRATE, None)
                assert a.challenge("vm1", 0.0)[0] is False
            finally:
                del a.migrations["vm1"]

    run(body)
