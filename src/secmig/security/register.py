"""The location register: the one place that says where a VM is, and the one place a move is decided.

**Where it lives, and why.** At the authority, not in a quorum of agents. The authority already signs
every binding and grant, so putting the register beside it adds no new party to trust and needs no
consensus protocol: one SQLite file (``DIR/register.db`` in the cluster folder) with atomic
compare-and-set transactions is linearizable by construction. A quorum of agents would survive the
authority being down, but a VM can only move with a fresh grant from the authority anyway, so it would
buy availability for nothing the cluster can do meanwhile, and cost a Paxos/Raft implementation. The
price is that a commit needs the register: when it cannot be reached, the VM stays paused on both ends
(safe, not live) until it answers.

Two ways to reach it, one interface (:class:`LocationRegister`):

- :class:`SqliteRegister` — the file itself, for the authority and for agents that share its folder
  (one machine, or network namespaces of one machine: a file lock is atomic across processes).
- :class:`RegisterClient` → :class:`RegisterService` — the authority serves the same file over TLS 1.3
  with mutual authentication against the cluster CA (hosts in different network namespaces or on
  different machines). A host learns the address from ``DIR/register.json``, which
  ``secmig register serve`` writes beside the rest of the public trust material. The caller is the
  host its certificate names; a revoked host is refused.

What it records:

- per VM, its **current binding** (the signed :class:`~.credentials.LocationBinding`, epoch and host);
  :meth:`place` (the authority placing a VM anew) sets it, :meth:`commit` moves it on by one epoch;
- per move (named by the grant's nonce), its **outcome**: MOVED or STAYED, decided once. ``commit``
  by the source moves the VM unless the move was already recorded STAYED; ``resolve`` by either end
  records STAYED unless the move was already MOVED. Whichever comes first wins; both learn the answer.

The rule everyone follows (the commit table in :mod:`.state`): the source commits only after the
destination voted; the destination resumes only when the register holds its new binding; after its
commit point an end that lost its peer asks ``resolve`` and does what the answer says. The authority
issues a grant only against the register's current binding, and a destination refuses a binding that
is not the register's current one (:class:`RegisterAuthorizer`), so a stale binding is refused
everywhere, even at a host that never saw the VM.

Must not: decide anything but locations and moves; print; know about agents.
"""

from __future__ import annotations

import contextlib
import enum
import json
import socket
import sqlite3
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from secmig.errors import (
    AuthenticationError,
    AuthorizationError,
    ConfigError,
    DocumentFormatError,
    RegisterConflict,
    RegisterUnavailable,
    SecmigError,
)
from secmig.security.cluster import ClusterTrust, HostIdentity
from secmig.security.credentials import LocationBinding
from secmig.security.encoding import JsonObject, b64decode, b64encode, canonical_json, parse_json_object
from secmig.security.events import Authorized
from secmig.security.grants import NONCE_BYTES, TrustRoots, check_binding_signature
from secmig.security.handshake import Authorizer, SourceHello
from secmig.security.pki import certificate_host_id
from secmig.security.state import Outcome
from secmig.security.tls import TlsChannel, TlsFailure

REGISTER_FILE = "register.db"
ADDRESS_FILE = "register.json"
MAX_MESSAGE_BYTES = 64 * 1024
"""A request or answer is a few signed bindings: anything longer is refused before it is read."""
_LEN = struct.Struct(">I")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    vm_id   TEXT PRIMARY KEY,
    epoch   INTEGER NOT NULL,
    host_id TEXT NOT NULL,
    binding TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS moves (
    nonce      BLOB PRIMARY KEY,
    vm_id      TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    decided_by TEXT NOT NULL,
    decided_at REAL NOT NULL
);
"""


class MoveOutcome(enum.StrEnum):
    """How the register decided one move (stored as text)."""

    MOVED = "moved"
    STAYED = "stayed"

    def as_outcome(self) -> Outcome:
        """The state table's name for it."""
        return Outcome.MOVED if self is MoveOutcome.MOVED else Outcome.STAYED


@dataclass(frozen=True, slots=True)
class Move:
    """One move as both ends know it: the binding it starts from, the one it ends with, the grant's nonce."""

    current: LocationBinding
    next: LocationBinding
    nonce: bytes

    @classmethod
    def of(cls, auth: Authorized) -> Move | None:
        """The move an authorized relocation makes (None when it has no binding pair or no grant)."""
        if auth.current_binding is None or auth.next_binding is None or auth.grant_nonce is None:
            return None
        return cls(auth.current_binding, auth.next_binding, auth.grant_nonce)

    def to_json(self) -> JsonObject:
        return {"current": self.current.to_json(), "next": self.next.to_json(), "nonce": b64encode(self.nonce)}

    @classmethod
    def from_json(cls, doc: JsonObject) -> Move:
        cur, nxt = doc.get("current"), doc.get("next")
        if not isinstance(cur, dict) or not isinstance(nxt, dict):
            raise DocumentFormatError("move: current and next must be bindings")
        return cls(
            LocationBinding.from_json(cur),
            LocationBinding.from_json(nxt),
            b64decode(doc.get("nonce"), "nonce", NONCE_BYTES),
        )


class LocationRegister(Protocol):
    """Where each VM is, and how each move was decided. Every call is atomic; ``commit`` and ``resolve``
    are idempotent (asking again gets the same answer)."""

    def current(self, vm_id: str) -> LocationBinding | None:
        """The VM's current binding, or None when the register has never seen it."""
        ...

    def commit(self, move: Move, by_host: str) -> LocationBinding:
        """The source's commit: the VM moves to ``move.next`` (returned). RegisterConflict when
        ``move.current`` is not the current binding or the move was already recorded STAYED."""
        ...

    def resolve(self, move: Move, by_host: str) -> MoveOutcome:
        """Either end's question after a lost link: the move's outcome, recording STAYED if undecided."""
        ...


def _check_move(move: Move, by_host: str, roots: TrustRoots | None, *, committer: bool) -> None:
    cur, nxt = move.current, move.next
    if cur.vm_id != nxt.vm_id or nxt.epoch != cur.epoch + 1:
        raise RegisterConflict(f"VM {cur.vm_id!r}: epoch {nxt.epoch} does not follow {cur.epoch}")
    allowed = (cur.host_id,) if committer else (cur.host_id, nxt.host_id)
    if by_host not in allowed:
        raise AuthorizationError(f"VM {cur.vm_id!r}: host {by_host!r} takes no part in this move")
    if roots is not None:
        try:
            check_binding_signature(cur, roots)
            check_binding_signature(nxt, roots)
        except AuthenticationError as err:
            raise AuthorizationError(f"register: {err}") from err


class SqliteRegister:
    """The register's file: the authority's, and any agent's that shares the cluster folder."""

    def __init__(self, path: Path, roots: Callable[[], TrustRoots] | None = None) -> None:
        self.path = path
        self._roots = roots
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as err:
            raise RegisterUnavailable(f"{path}: cannot open the location register: {err}") from err

    def close(self) -> None:
        """Close the file."""
        self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Any:
        # BEGIN IMMEDIATE takes the write lock at once: two processes' compare-and-set cannot interleave.
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise RegisterUnavailable(f"{self.path}: location register busy: {err}") from err
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    def _current(self, conn: sqlite3.Connection, vm_id: str) -> LocationBinding | None:
        row = conn.execute("SELECT binding FROM vms WHERE vm_id = ?", (vm_id,)).fetchone()
        if row is None:
            return None
        return LocationBinding.from_json(parse_json_object(row[0], "register binding"))

    def _set(self, conn: sqlite3.Connection, binding: LocationBinding) -> None:
        conn.execute(
            "INSERT INTO vms (vm_id, epoch, host_id, binding) VALUES (?, ?, ?, ?) ON CONFLICT(vm_id) DO UPDATE "
            "SET epoch = excluded.epoch, host_id = excluded.host_id, binding = excluded.binding",
            (binding.vm_id, binding.epoch, binding.host_id, canonical_json(binding.to_json()).decode()),
        )

    def current(self, vm_id: str) -> LocationBinding | None:
        """The VM's current binding."""
        try:
            return self._current(self._conn, vm_id)
        except sqlite3.Error as err:
            raise RegisterUnavailable(f"{self.path}: {err}") from err

    def place(self, binding: LocationBinding) -> None:
        """The authority places a VM (first placement, or anew): its binding becomes the current one and
        every other binding of the VM, older or not, is stale from now on."""
        with self._transaction() as conn:
            self._set(conn, binding)

    def commit(self, move: Move, by_host: str) -> LocationBinding:
        """Compare-and-set: ``move.current`` → ``move.next``, once; see :class:`LocationRegister`."""
        _check_move(move, by_host, self._roots() if self._roots else None, committer=True)
        vm_id = move.current.vm_id
        with self._transaction() as conn:
            row = conn.execute("SELECT outcome FROM moves WHERE nonce = ?", (move.nonce,)).fetchone()
            if row is not None:
                if MoveOutcome(row[0]) is MoveOutcome.MOVED and self._current(conn, vm_id) == move.next:
                    return move.next
                raise RegisterConflict(f"VM {vm_id!r}: this move was already decided: {row[0]}")
            now = self._current(conn, vm_id)
            if now != move.current:
                where = "unknown to the register" if now is None else f"at epoch {now.epoch} on {now.host_id!r}"
                raise RegisterConflict(
                    f"VM {vm_id!r}: binding epoch {move.current.epoch} on {move.current.host_id!r} is not "
                    f"current (the VM is {where})"
                )
            self._set(conn, move.next)
            conn.execute(
                "INSERT INTO moves (nonce, vm_id, outcome, decided_by, decided_at) VALUES (?, ?, ?, ?, ?)",
                (move.nonce, vm_id, MoveOutcome.MOVED.value, by_host, time.time()),
            )
        return move.next

    def resolve(self, move: Move, by_host: str) -> MoveOutcome:
        """The move's outcome, recording STAYED when it was not decided yet."""
        _check_move(move, by_host, self._roots() if self._roots else None, committer=False)
        with self._transaction() as conn:
            row = conn.execute("SELECT outcome FROM moves WHERE nonce = ?", (move.nonce,)).fetchone()
            if row is not None:
                return MoveOutcome(row[0])
            conn.execute(
                "INSERT INTO moves (nonce, vm_id, outcome, decided_by, decided_at) VALUES (?, ?, ?, ?, ?)",
                (move.nonce, move.current.vm_id, MoveOutcome.STAYED.value, by_host, time.time()),
            )
        return MoveOutcome.STAYED


def check_current(register: LocationRegister, binding: LocationBinding) -> None:
    """RegisterConflict unless ``binding`` is the VM's current binding in the register."""
    now = register.current(binding.vm_id)
    if now is None:
        raise RegisterConflict(f"VM {binding.vm_id!r} is unknown to the location register (place it first)")
    if now != binding:
        raise RegisterConflict(
            f"VM {binding.vm_id!r}: binding epoch {binding.epoch} on {binding.host_id!r} is stale; the register "
            f"holds epoch {now.epoch} on {now.host_id!r}"
        )


class RegisterAuthorizer:
    """A destination's authorizer: the binding presented must be the register's current one, then ``inner``.

    The lookup is a blocking call (a file read, or one TLS round trip with a short timeout); it runs once
    per handshake, before any page, and fails closed: no answer, no authorization."""

    def __init__(self, inner: Authorizer, register: LocationRegister) -> None:
        self.inner = inner
        self.register = register

    def authorize(self, hello: SourceHello, *, destination_host: str, trust: ClusterTrust, now: float) -> None:
        """Refuse a stale binding (AuthorizationError), then ask ``inner``."""
        binding = hello.request.binding
        if binding is not None and hello.request.operation.relocates:
            try:
                check_current(self.register, binding)
            except RegisterUnavailable as err:
                raise AuthorizationError(f"VM {binding.vm_id!r}: the location register did not answer: {err}") from err
        self.inner.authorize(hello, destination_host=destination_host, trust=trust, now=now)

    def committed(self, authorized: Authorized) -> None:
        """The move happened: ``inner`` records the new binding."""
        self.inner.committed(authorized)


# -- over the network ---------------------------------------------------------------------------------


def _frame(doc: JsonObject) -> bytes:
    body = canonical_json(doc)
    return _LEN.pack(len(body)) + body


class _Framer:
    """Length-prefixed JSON messages out of a byte stream."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def take(self) -> JsonObject | None:
        if len(self.buf) < _LEN.size:
            return None
        (n,) = _LEN.unpack_from(self.buf)
        if n > MAX_MESSAGE_BYTES:
            raise DocumentFormatError(f"register message of {n} bytes")
        if len(self.buf) < _LEN.size + n:
            return None
        body = bytes(self.buf[_LEN.size : _LEN.size + n])
        del self.buf[: _LEN.size + n]
        return parse_json_object(body, "register message")


def _drain_tls(tls: TlsChannel, framer: _Framer) -> None:
    buf = bytearray(16 * 1024 + 256)
    while True:
        n = tls.recv_into(memoryview(buf))
        if n == 0:
            return
        framer.buf += buf[:n]
        if len(framer.buf) > MAX_MESSAGE_BYTES + _LEN.size:
            raise DocumentFormatError("register message too long")


class RegisterService:
    """The authority's register served over TLS 1.3 with mutual authentication (asyncio).

    ``identity`` is a member identity the authority holds for the service (``secmig register serve``
    joins one named ``register`` when the cluster has none); clients check it names that host."""

    def __init__(self, register: SqliteRegister, identity: HostIdentity, trust: Callable[[], ClusterTrust]) -> None:
        self.register = register
        self.identity = identity
        self.trust = trust
        self.requests = 0

    def answer(self, request: JsonObject, peer: str) -> JsonObject:
        """One request from the authenticated host ``peer``; errors become ``{"error": kind, "message"}``."""
        self.requests += 1
        try:
            if self.trust().revocations.is_revoked(peer):
                raise AuthenticationError(f"host {peer!r} is revoked")
            op = request.get("op")
            if op == "current":
                vm_id = request.get("vm_id")
                if not isinstance(vm_id, str):
                    raise DocumentFormatError("current: vm_id")
                b = self.register.current(vm_id)
                return {"binding": None if b is None else b.to_json()}
            move_doc = request.get("move")
            if not isinstance(move_doc, dict):
                raise DocumentFormatError(f"{op}: move")
            move = Move.from_json(move_doc)
            if op == "commit":
                return {"binding": self.register.commit(move, peer).to_json()}
            if op == "resolve":
                return {"outcome": self.register.resolve(move, peer).value}
            raise DocumentFormatError(f"unknown register request {op!r}")
        except SecmigError as err:
            return {"error": type(err).__name__, "message": str(err)}

    async def serve(self, host: str, port: int) -> Any:
        """Start listening; returns the asyncio server (close it to stop)."""
        import asyncio

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            tls = TlsChannel(self.identity, self.trust().ca_certificate, server=True)
            framer = _Framer()
            try:
                while True:
                    data = await asyncio.wait_for(reader.read(65536), 10.0)
                    if not data:
                        return
                    tls.feed(data)
                    if not tls.handshake():
                        writer.write(tls.outgoing())
                        await writer.drain()
                        continue
                    writer.write(tls.outgoing())
                    cert = tls.peer_certificate()
                    peer = None if cert is None else certificate_host_id(cert)
                    _drain_tls(tls, framer)
                    while (request := framer.take()) is not None:
                        reply = self.answer(request, peer or "?")
                        tls.send(_frame(reply))
                        writer.write(tls.outgoing())
                    await writer.drain()
            except (TlsFailure, DocumentFormatError, OSError, TimeoutError):
                return
            finally:
                writer.close()

        return await asyncio.start_server(on_client, host, port)


def write_address(cluster_root: Path, address: tuple[str, int], host_id: str) -> Path:
    """``DIR/register.json``: where hosts reach the register, and the service's host id."""
    path = cluster_root / ADDRESS_FILE
    path.write_text(json.dumps({"address": f"{address[0]}:{address[1]}", "host_id": host_id}) + "\n")
    return path


class RegisterClient:
    """A host's blocking client of :class:`RegisterService` (call it from a thread in asyncio code)."""

    def __init__(
        self,
        address: tuple[str, int],
        service_host: str,
        identity: HostIdentity,
        trust: Callable[[], ClusterTrust],
        *,
        timeout_s: float = 2.0,
    ) -> None:
        self.address = address
        self.service_host = service_host
        self.identity = identity
        self.trust = trust
        self.timeout_s = timeout_s

    def _call(self, request: JsonObject) -> JsonObject:
        try:
            with socket.create_connection(self.address, timeout=self.timeout_s) as sock:
                tls = TlsChannel(self.identity, self.trust().ca_certificate, server=False)
                framer = _Framer()
                sent = False
                deadline = time.monotonic() + self.timeout_s
                while True:
                    if tls.handshake() and not sent:
                        cert = tls.peer_certificate()
                        if cert is None or certificate_host_id(cert) != self.service_host:
                            raise AuthenticationError("the register's certificate names another host")
                        tls.send(_frame(request))
                        sent = True
                    out = tls.outgoing()
                    if out:
                        sock.sendall(out)
                    if sent:
                        _drain_tls(tls, framer)
                        reply = framer.take()
                        if reply is not None:
                            return reply
                    if time.monotonic() > deadline:
                        raise TimeoutError("no answer")
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("register closed the connection")
                    tls.feed(data)
        except (OSError, TlsFailure, DocumentFormatError, AuthenticationError, TimeoutError) as err:
            raise RegisterUnavailable(f"location register at {self.address[0]}:{self.address[1]}: {err}") from err

    @staticmethod
    def _raise(reply: JsonObject) -> None:
        kind = reply.get("error")
        if kind is None:
            return
        message = str(reply.get("message", ""))
        if kind == "RegisterConflict":
            raise RegisterConflict(message)
        if kind in ("AuthorizationError", "AuthenticationError"):
            raise AuthorizationError(message)
        raise RegisterUnavailable(f"{kind}: {message}")

    def current(self, vm_id: str) -> LocationBinding | None:
        reply = self._call({"op": "current", "vm_id": vm_id})
        self._raise(reply)
        doc = reply.get("binding")
        return None if not isinstance(doc, dict) else LocationBinding.from_json(doc)

    def commit(self, move: Move, by_host: str) -> LocationBinding:
        reply = self._call({"op": "commit", "move": move.to_json()})
        self._raise(reply)
        doc = reply.get("binding")
        if not isinstance(doc, dict):
            raise RegisterUnavailable("register answered a commit without a binding")
        return LocationBinding.from_json(doc)

    def resolve(self, move: Move, by_host: str) -> MoveOutcome:
        reply = self._call({"op": "resolve", "move": move.to_json()})
        self._raise(reply)
        try:
            return MoveOutcome(str(reply.get("outcome")))
        except ValueError as err:
            raise RegisterUnavailable(f"register answered {reply.get('outcome')!r}") from err


def open_register(cluster_root: Path, identity: HostIdentity, trust: Callable[[], ClusterTrust]) -> LocationRegister:
    """A host's register: the service named in ``DIR/register.json``, else the folder's own file."""
    path = cluster_root / ADDRESS_FILE
    if path.exists():
        try:
            doc = parse_json_object(path.read_bytes(), str(path))
            host, _, port = str(doc["address"]).rpartition(":")
            return RegisterClient((host, int(port)), str(doc["host_id"]), identity, trust)
        except (KeyError, ValueError, OSError, DocumentFormatError) as err:
            raise ConfigError(f"{path}: not a register address: {err}") from err
    return SqliteRegister(cluster_root / REGISTER_FILE, lambda: trust().roots())
