"""One owner at every instant: a proxy withholds each commit message and closes; exactly one copy runs."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path

import pytest
from agent_helpers import MIB, grant_for, host_config, run, running, spec, start_bound_vm

from secmig.agent.daemon import Agent
from secmig.errors import MigrationError
from secmig.security import Cluster

_TLS_HEADER = struct.Struct(">BHH")


class RecordProxy:
    """A TCP proxy that cuts each direction into TLS records and, on a rule, withholds records and closes.

    ``hold`` is (direction, rule): direction ``"to_source"`` or ``"to_destination"``; the rule is
    ``("after_bytes", n)`` — withhold every record once the source has sent ``n`` bytes (its pages are
    out), or ``("record", i)`` — withhold from the ``i``-th record of that direction on (negative: from
    the end of a reference run's count, given as ``total``). Withheld records are never delivered;
    ``close_after_s`` after the first one both connections are reset.
    """

    def __init__(
        self, target: tuple[str, int], hold: tuple[str, tuple[str, int]] | None, close_after_s: float = 0.3
    ) -> None:
        self.target = target
        self.hold = hold
        self.close_after_s = close_after_s
        self.records = {"to_source": 0, "to_destination": 0}
        self.bytes = {"to_source": 0, "to_destination": 0}
        self.withheld = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._closing: asyncio.Task[None] | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def close(self) -> None:
        for w in self._writers:
            w.transport.abort()
        if self._server is not None:
            self._server.close()

    def _holds(self, direction: str) -> bool:
        if self.hold is None or self.hold[0] != direction:
            return False
        kind, n = self.hold[1]
        if kind == "after_bytes":
            return self.bytes["to_destination"] >= n
        if kind == "after_records_to_source":
            return self.records["to_source"] >= n
        return self.records[direction] >= n

    async def _reset_later(self) -> None:
        await asyncio.sleep(self.close_after_s)
        for w in self._writers:
            w.transport.abort()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, direction: str) -> None:
            with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
                while True:
                    head = await r.readexactly(_TLS_HEADER.size)
                    body = await r.readexactly(_TLS_HEADER.unpack(head)[2])
                    if self._holds(direction):
                        self.withheld += 1
                        if self._closing is None:
                            self._closing = asyncio.ensure_future(self._reset_later())
                        continue
                    self.records[direction] += 1
                    self.bytes[direction] += len(head) + len(body)
                    w.write(head + body)
                    await w.drain()

        await asyncio.gather(pipe(reader, up_w, "to_destination"), pipe(up_r, writer, "to_source"))


def _running(agent: Agent, name: str) -> bool:
    entry = agent.vms.get(name)
    return entry is not None and not entry.stored and entry.vm.running


async def _watch_copies(a: Agent, b: Agent, name: str, until: asyncio.Future[object]) -> list[tuple[bool, bool]]:
    """Sample (running on a, running on b) every 10 ms until ``until`` is done and 1 s more has passed."""
    seen: list[tuple[bool, bool]] = []
    while not until.done():
        seen.append((_running(a, name), _running(b, name)))
        await asyncio.sleep(0.01)
    for _ in range(100):
        seen.append((_running(a, name), _running(b, name)))
        if not b.migrations and not a.migrations and seen[-1] != (False, False):
            break
        await asyncio.sleep(0.01)
    return seen


async def _migrate_through(
    cluster_dir: Path, cluster: Cluster, base: Path, hold: tuple[str, tuple[str, int]] | None
) -> tuple[list[tuple[bool, bool]], BaseException | None, RecordProxy]:
    """Migrate vm1 hv-a → hv-b through a RecordProxy holding ``hold``; every sampled (on a, on b)."""
    quick = {"migration": {"idle_timeout": "1s"}}
    async with running(host_config(cluster_dir, "hv-b", base, **quick)) as b:
        proxy = RecordProxy(b.address, hold)
        via = await proxy.start()
        async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": via}, **quick)) as a:
            await start_bound_vm(a, cluster, "vm1", spec(16 * MIB, 8 * MIB, 2 * MIB, 500))
            mig = asyncio.ensure_future(a.migrate("vm1", "hv-b", "migrate", grant_for(cluster, a, "vm1", "hv-b")))
            seen = await _watch_copies(a, b, "vm1", mig)
            err = mig.exception()
            await proxy.close()
            return seen, err, proxy


def test_withheld_answer_to_commit_never_runs_the_vm_twice(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """The split-brain proxy: the destination's answer to COMMIT is withheld and the link closed; one copy runs."""

    async def body() -> None:
        seen, err, proxy = await _migrate_through(cluster_dir, cluster, base, ("to_source", ("after_bytes", 8 * MIB)))
        assert proxy.withheld >= 1
        assert (True, True) not in seen, "the VM ran on both hosts"
        assert seen[-1] in ((True, False), (False, True)), seen[-1]
        assert isinstance(err, MigrationError)  # the source was told the move did not happen

    run(body)


@pytest.fixture(scope="module")
def reference_records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Records each direction carries in an unhindered migration (the destination's count is fixed)."""
    from agent_helpers import short_dir

    root = tmp_path_factory.mktemp("ref") / "c"
    cluster = Cluster.create(root)
    for host in ("hv-a", "hv-b"):
        cluster.join(host)
    base = short_dir()

    async def body() -> dict[str, int]:
        seen, err, proxy = await _migrate_through(root, cluster, base, None)
        assert err is None and seen[-1] == (False, True)
        return dict(proxy.records)

    return run(body)


# The vote (PREPARED) withheld is the split-brain test above.
@pytest.mark.parametrize(
    ("cut", "moved"),
    [
        ("final-committed", True),  # the destination's last word withheld: the move happened
        ("confirm", True),  # CONFIRM withheld: the destination asks the register, which moved the VM
    ],
)
def test_every_withheld_commit_message_leaves_one_copy(
    cluster_dir: Path, cluster: Cluster, base: Path, reference_records: dict[str, int], cut: str, moved: bool
) -> None:
    """Each commit message withheld and the link closed: never two copies, and the register's choice runs."""
    to_source = reference_records["to_source"]
    holds: dict[str, tuple[str, tuple[str, int]]] = {
        "final-committed": ("to_source", ("record", to_source - 1)),
        # once the vote went through, the next record the source sends is CONFIRM
        "confirm": ("to_destination", ("after_records_to_source", to_source - 1)),
    }

    async def body() -> None:
        seen, err, proxy = await _migrate_through(cluster_dir, cluster, base, holds[cut])
        assert proxy.withheld >= 1
        assert (True, True) not in seen, "the VM ran on both hosts"
        assert seen[-1] == ((False, True) if moved else (True, False)), seen[-1]
        assert (err is None) is moved or cut == "confirm"

    run(body)
