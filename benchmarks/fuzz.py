"""Structure-aware fuzzing of the whole migration connection, both roles, every state an honest run reaches.

What it does: an honest pair of :class:`~secmig.security.MigrationConnection` ends (real cluster, real
Vsignatures, proofs, grant and binding checks) is driven through a pre-copy migration — handshake, two
rounds, stop-and-copy, device state, commit — and a snapshot of each end is kept after every step. Each
case clones one snapshot and feeds it one to three frames built from what honest ends really sent: a
valid header with a mutated payload (bit flips, truncation, extension, a JSON field replaced by a value of
another type, a lone surrogate, a huge number), a wrong frame type, an unknown type, a header announcing
more than the cap, a frame cut short, or the transport closing. ``next_event`` must then raise nothing but
the protocol's own errors (:class:`~secmig.errors.SecmigError` subclasses); anything else is a finding.

The bulk runs over a plaintext stand-in for TLS (:class:`PlainTls`) so that a snapshot can be cloned; a
second campaign keeps the real TLS 1.3 channel and mutates its records (fresh handshake per case, so far
fewer cases). The audit sink encodes every row as SQLite would, so an unrecordable refusal is a finding.

Run by hand (the CI test runs the same engine on fewer frames)::

    python benchmarks/fuzz.py --frames 1000000 --tls-cases 2000 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secmig.errors import LocalProtocolError, SecmigError
from secmig.security import (
    Cluster,
    Commit,
    Committed,
    DeviceState,
    MigrationConnection,
    MigrationRequest,
    Operation,
    PageBatch,
    Role,
    RoundEnd,
    RoundStart,
    StopAndCopy,
)
from secmig.security import protocol as protocol_module
from secmig.security.audit import Decision, Detail
from secmig.security.encoding import canonical_json
from secmig.security.events import CONNECTION_CLOSED, NEED_DATA
from secmig.security.frames import HEADER, MAX_FRAME_PAYLOAD, FrameType, memory_digest
from secmig.security.handshake import GrantAuthorizer
from secmig.security.location import MemoryBindingRegistry
from secmig.security.loopback import ConnectionPair

PAGE = 4096
PAGES = 16


class EncodingAuditSink:
    """Counts rows and encodes each as the SQLite log would (an unencodable subject raises here)."""

    def __init__(self) -> None:
        self.rows: Counter[str] = Counter()

    def record(self, event: str, decision: Decision, subject: str, detail: Detail | None = None) -> None:
        (event + subject + str(decision)).encode("utf-8")
        canonical_json(detail or {})
        self.rows[event] += 1


class _AlwaysFresh:
    """A nonce store that never sees a replay, so every clone of a snapshot may present the same grant."""

    def consume(self, nonce: bytes, expires_at: int, now: float) -> bool:
        return True


class PlainTls:
    """The TLS channel's interface with no encryption: handshake done at once, fixed exporter, given peer cert."""

    def __init__(self, identity: Any, ca_certificate: Any, *, server: bool) -> None:
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.peer: Any = None
        self.established = True

    def feed(self, data: Any) -> None:
        self.inbox += data

    def handshake(self) -> bool:
        return True

    def send(self, data: Any) -> None:
        self.outbox += data

    def recv_into(self, buf: memoryview) -> int:
        n = min(len(buf), len(self.inbox))
        buf[:n] = self.inbox[:n]
        del self.inbox[:n]
        return n

    def outgoing(self) -> bytes:
        out = bytes(self.outbox)
        self.outbox.clear()
        return out

    def exporter(self) -> bytes:
        return b"\x42" * 32

    def peer_certificate(self) -> Any:
        return self.peer

    def version(self) -> str:
        return "plain"


@contextlib.contextmanager
def plain_tls() -> Iterator[None]:
    """Build connections over :class:`PlainTls` for the duration of the block."""
    real = getattr(protocol_module, "TlsChannel")  # noqa: B009 - the module's own name, not a public export
    setattr(protocol_module, "TlsChannel", PlainTls)  # noqa: B010
    try:
        yield
    finally:
        setattr(protocol_module, "TlsChannel", real)  # noqa: B010


@dataclass
class Report:
    """What a campaign fed and what came out."""

    frames: int = 0
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    states: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: Report) -> None:
        self.frames += other.frames
        self.cases += other.cases
        self.outcomes.update(other.outcomes)
        self.states.update(other.states)
        self.findings.extend(other.findings)
        self.seconds += other.seconds


@dataclass
class World:
    """A cluster and the pieces an honest pair needs."""

    cluster: Cluster
    trust: Any
    audit: EncodingAuditSink
    memory: bytes

    @classmethod
    def create(cls, root: Path) -> World:
        cluster = Cluster.create(root / "c", name="fuzz")
        for host in ("hv-a", "hv-b"):
            cluster.join(host)
        memory = random.Random(7).randbytes(PAGES * PAGE)
        return cls(cluster, cluster.trust(), EncodingAuditSink(), memory)

    def pair(self) -> ConnectionPair:
        c = self.cluster
        binding = c.issue_binding("vm-1", "52:54:00:00:00:01", "hv-a")
        grant = c.issue_grant(Operation.MIGRATE, "vm-1", "hv-a", "hv-b", current_binding=binding)
        request = MigrationRequest(Operation.MIGRATE, "vm-1", PAGE, PAGES, grant, binding)
        src = MigrationConnection.source(c.host_identity("hv-a"), self.trust, request, audit=self.audit)
        dst = MigrationConnection.destination(
            c.host_identity("hv-b"),
            self.trust,
            audit=self.audit,
            authorizer=GrantAuthorizer(_AlwaysFresh(), MemoryBindingRegistry()),
        )
        return ConnectionPair(src, dst)


def _honest_steps(pair: ConnectionPair, memory: bytes) -> Iterator[None]:
    """Drive a whole pre-copy; yield after each step (the caller snapshots both ends)."""
    pair.pump()
    yield
    steps: list[tuple[Role, Any]] = []
    for rnd, pages in ((0, range(PAGES)), (1, range(0, PAGES, 3))):
        steps.append((Role.SOURCE, RoundStart(rnd)))
        for n in pages:
            steps.append((Role.SOURCE, PageBatch(rnd, (n,), memory[n * PAGE : (n + 1) * PAGE])))
        steps.append((Role.SOURCE, RoundEnd(rnd)))
    steps.append((Role.SOURCE, StopAndCopy()))
    steps.append((Role.SOURCE, PageBatch(2, (1,), memory[PAGE : 2 * PAGE])))
    steps.append((Role.SOURCE, DeviceState(b"cpu-and-devices")))
    steps.append((Role.SOURCE, Commit(memory_digest(memory, PAGE))))
    steps.append((Role.DESTINATION, Committed()))
    for role, event in steps:
        try:
            pair.send(role, event)
            pair.pump()
        except LocalProtocolError:
            return  # the commit exchange moved on (e.g. a vote first): the states before are covered
        yield


def _split_frames(chunks: list[bytes]) -> list[tuple[int, bytes]]:
    data = b"".join(chunks)
    out, off = [], 0
    while off + HEADER.size <= len(data):
        ftype, length = HEADER.unpack_from(data, off)
        out.append((ftype, data[off + HEADER.size : off + HEADER.size + length]))
        off += HEADER.size + length
    return out


_WEIRD: list[Any] = [
    None,
    True,
    -1,
    0,
    2**25,
    2**40,
    2**63,
    2**70,
    1.5e308,
    "",
    "\udc80",
    "vm-1\n",
    "x" * 70_000,
    [],
    {},
    [1] * 100,
]


def _mutate_json(payload: bytes, rng: random.Random) -> bytes:
    try:
        doc = json.loads(payload)
    except ValueError:
        return payload
    paths: list[list[Any]] = []

    def walk(node: Any, path: list[Any]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append([*path, k])
                walk(v, [*path, k])
        elif isinstance(node, list):
            for i, v in enumerate(node[:4]):
                paths.append([*path, i])
                walk(v, [*path, i])

    walk(doc, [])
    if not paths:
        return payload
    path = rng.choice(paths)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if rng.random() < 0.15 and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = rng.choice(_WEIRD)
    return json.dumps(doc, ensure_ascii=True).encode()


def _mutate(payload: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    b = bytearray(payload)
    if kind == 0 and b:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del b[rng.randrange(len(b) + 1) :]
    elif kind == 2:
        b += rng.randbytes(rng.randint(1, 64))
    elif kind == 3 and payload[:1] == b"{":
        return _mutate_json(payload, rng)
    elif kind == 4:
        return rng.randbytes(rng.choice((0, 1, 4, 8, 12, 32, 33, 200)))
    elif kind == 5 and len(b) >= 8:
        off = rng.randrange(len(b) - 3)
        struct.pack_into(">I", b, off, rng.choice((0, 1, 0xFFFFFFFF, 0x7FFFFFFF, PAGES, PAGES + 1)))
    else:
        b = bytearray(rng.randbytes(len(b)))
    return bytes(b)


def fuzz_frames(rng: random.Random, corpus: list[tuple[int, bytes]]) -> tuple[bytes, int, bool]:
    """One to three frames of adversarial bytes; (bytes, frames in them, close the transport after)."""
    out, n = bytearray(), rng.randint(1, 3)
    for _ in range(n):
        ftype, payload = rng.choice(corpus)
        r = rng.random()
        if r < 0.55:
            payload = _mutate(payload, rng)
        elif r < 0.75:
            ftype = rng.choice(list(FrameType))  # a valid payload under another type
        elif r < 0.8:
            ftype = rng.randrange(256)
        elif r < 0.85:
            out += HEADER.pack(ftype, rng.choice((MAX_FRAME_PAYLOAD + 1, 0xFFFFFFFF)))
            continue
        elif r < 0.9:
            out += HEADER.pack(ftype, len(payload) + rng.randint(1, 99)) + payload  # cut short
            return bytes(out), n, True
        out += HEADER.pack(ftype, len(payload)) + payload
    return bytes(out), n, rng.random() < 0.05


_ALLOWED = SecmigError


def _feed(conn: MigrationConnection, data: bytes, close: bool, report: Report, label: str) -> None:
    try:
        conn.receive_data(data)
        if close:
            conn.receive_data(b"")
        for _ in range(64):
            ev = conn.next_event()
            conn.data_to_send()
            if ev is NEED_DATA or ev is CONNECTION_CLOSED:
                break
            report.outcomes[type(ev).__name__] += 1
    except _ALLOWED as err:
        report.outcomes[type(err).__name__] += 1
    except Exception as err:
        report.outcomes[f"FINDING {type(err).__name__}"] += 1
        if len(report.findings) < 20:
            report.findings.append(f"{label}: {type(err).__name__}: {err!s:.200}")


def _snapshots(world: World) -> tuple[list[tuple[Role, MigrationConnection, Any]], list[tuple[int, bytes]]]:
    pair = world.pair()
    peers = {Role.SOURCE: world.cluster.host_identity("hv-b"), Role.DESTINATION: world.cluster.host_identity("hv-a")}
    for role in Role:
        pair.end(role)._tls.peer = peers[role].certificate  # type: ignore[attr-defined]
    snaps: list[tuple[Role, MigrationConnection, Any]] = []
    seen: set[tuple[Role, str]] = set()
    # The handshake states, one message at a time: a fresh destination; the source after its hello; the
    # source after the destination's hello but before AUTHORIZED.
    src, dst = pair.source, pair.destination
    snaps.append((Role.DESTINATION, copy.deepcopy(dst, _shared_memo(dst)), (Role.DESTINATION, "await-source-hello")))
    src.next_event()
    snaps.append((Role.SOURCE, copy.deepcopy(src, _shared_memo(src)), (Role.SOURCE, src.state.value)))
    probe = copy.deepcopy(dst, _shared_memo(dst))
    probe.receive_data(src._tls.outbox)  # type: ignore[attr-defined]
    probe.next_event()
    first_reply = _split_frames([probe.data_to_send()])[:1]
    half = copy.deepcopy(src, _shared_memo(src))
    for ftype, payload in first_reply:
        half.receive_data(HEADER.pack(ftype, len(payload)) + payload)
        half.next_event()
    snaps.append((Role.SOURCE, half, (Role.SOURCE, half.state.value)))
    seen.update(key for _, _, key in snaps)
    for _ in _honest_steps(pair, world.memory):
        for role in Role:
            conn = pair.end(role)
            key = (role, conn.state.value)
            if key not in seen:
                seen.add(key)
                snaps.append((role, copy.deepcopy(conn, _shared_memo(conn)), key))
    corpus = _split_frames(pair.wire[Role.SOURCE]) + _split_frames(pair.wire[Role.DESTINATION])
    return snaps, corpus


def _shared_memo(conn: MigrationConnection) -> dict[int, Any]:
    """Objects a clone shares with its snapshot: identity, trust, audit, authorizer (keys are not copyable)."""
    memo: dict[int, Any] = {}
    for value in vars(conn).values() if hasattr(conn, "__dict__") else ():
        if not isinstance(value, bytearray | bytes | int | str | type(None)) and type(value).__module__ not in (
            "secmig.security.state",
            "secmig.security.frames",
            "collections",
            __name__,
        ):
            memo[id(value)] = value
    return memo


def campaign(world: World, frames: int, seed: int) -> Report:
    """Feed at least ``frames`` adversarial frames to clones of every snapshot, round robin."""
    report = Report()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    with plain_tls():
        snaps, corpus = _snapshots(world)
        i = 0
        while report.frames < frames:
            role, snap, key = snaps[i % len(snaps)]
            clone = copy.deepcopy(snap, _shared_memo(snap))
            data, n, close = fuzz_frames(rng, corpus)
            report.frames += n
            report.cases += 1
            report.states[f"{role.value}:{key[1]}"] += n
            _feed(clone, data, close, report, f"seed {seed} case {i} ({role.value} in {key[1]})")
            i += 1
    report.seconds = time.perf_counter() - t0
    return report


def tls_campaign(world: World, cases: int, seed: int) -> Report:
    """Real TLS 1.3: a fresh handshake per case, then one end's records bit-flipped, cut, or replaced."""
    report = Report()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for i in range(cases):
        pair = world.pair()
        depth = rng.randrange(6)
        steps = _honest_steps(pair, world.memory)
        with contextlib.suppress(StopIteration, SecmigError):
            for _ in range(depth):
                next(steps)
        role = rng.choice(list(Role))
        victim, sender = pair.end(role), pair.end(role.peer)
        record = sender.data_to_send() or rng.randbytes(rng.randint(1, 300))
        with contextlib.suppress(SecmigError):
            if rng.random() < 0.5 and victim.state.value != "tls-handshake":
                record = sender.send(RoundStart(99)) if role is Role.DESTINATION else record
        b = bytearray(record)
        if b and rng.random() < 0.7:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        else:
            b = b[: rng.randrange(len(b) + 1)] + rng.randbytes(rng.randint(0, 40))
        report.frames += 1
        report.cases += 1
        report.states[f"{role.value}:{victim.state.value}"] += 1
        _feed(victim, bytes(b), rng.random() < 0.3, report, f"tls seed {seed} case {i}")
    report.seconds = time.perf_counter() - t0
    return report


def run(frames: int, tls_cases: int, seed: int) -> Report:
    """Both campaigns in a temporary cluster."""
    with tempfile.TemporaryDirectory() as tmp:
        world = World.create(Path(tmp))
        report = campaign(world, frames, seed)
        report.merge(tls_campaign(world, tls_cases, seed + 1))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--tls-cases", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    report = run(args.frames, args.tls_cases, args.seed)
    print(f"frames fed: {report.frames} in {report.cases} cases, {report.seconds:.1f} s")
    print(f"states: {len(report.states)}: " + ", ".join(f"{k}={v}" for k, v in sorted(report.states.items())))
    print("outcomes: " + ", ".join(f"{k}={v}" for k, v in report.outcomes.most_common()))
    for finding in report.findings:
        print("FINDING", finding)
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
