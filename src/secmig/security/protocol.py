"""The migration protocol, sans-IO: ``receive_data(bytes)``, ``next_event()``, ``send(event) -> bytes``.

A :class:`MigrationConnection` is one end of one migration. It owns a TLS 1.3 session (mutual
authentication against the cluster CA, memory BIOs, see :mod:`.tls`) and, on top of it, the
application handshake:

1. TLS completes. The source sends SOURCE_HELLO: its Vsignature, a *proof* (its host key's signature
   over the session's RFC 9266 ``tls-exporter`` value and its role), the request (operation, VM, memory
   geometry), the grant and the VM's current location binding.
2. The destination checks, in order: Vsignature (authority signature, cluster, expiry, revocation —
   the revocation list is re-read for every handshake), that the TLS peer certificate carries the same
   key and host, the proof, the binding, the grant, and finally consumes the grant's nonce. Any failure
   is audited and answered with ABORT; nothing else is ever sent.
3. The destination sends DESTINATION_HELLO (its own Vsignature and proof) and AUTHORIZED. The source
   checks the destination the same way, plus that it is the grant's destination.

Only then may pages flow. **Rule 1** (as in h11): every transition is in :data:`TRANSITIONS`, keyed by
(sender, state, frame). PAGE_BATCH appears only in states reachable through AUTHORIZED, so sending a
page earlier raises :class:`~secmig.errors.LocalProtocolError` — there is no other code path that emits
a page.

Error discipline: anything the peer sends that is malformed, out of order, oversize or tampered with
raises :class:`~secmig.errors.RemoteProtocolError` from ``next_event`` (and the connection is dead);
a *refused check* (identity, grant, page or memory digest) is not an exception but an :class:`Aborted`
event, because refusing is the protocol working. Every decision goes to the injected audit sink; the
nonce store and binding registry are injected too, so this module itself does no I/O.
"""

from __future__ import annotations

import contextlib
import enum
import struct
import time
from collections import deque
from collections.abc import Callable

from secmig.errors import (
    AuthenticationError,
    AuthorizationError,
    DocumentFormatError,
    LocalProtocolError,
    RemoteProtocolError,
    SecurityError,
)
from secmig.security import frames
from secmig.security.audit import AuditSink, Decision, Detail
from secmig.security.cluster import ClusterTrust, HostIdentity
from secmig.security.credentials import LocationBinding, Vsignature
from secmig.security.encoding import (
    JsonObject,
    b64decode,
    b64encode,
    canonical_json,
    get_int,
    get_obj,
    get_str,
    parse_json_object,
    sign_document,
    verify_document,
)
from secmig.security.events import (
    CONNECTION_CLOSED,
    NEED_DATA,
    Abort,
    AbortCode,
    Aborted,
    Authorized,
    Commit,
    Committed,
    DeviceState,
    MigrationRequest,
    PageBatch,
    ReceivedEvent,
    Role,
    RoundEnd,
    RoundStart,
    SendableEvent,
    StopAndCopy,
)
from secmig.security.frames import FrameType
from secmig.security.grants import Grant, NonceStore, check_binding_signature, check_grant
from secmig.security.keys import public_key_from_raw
from secmig.security.location import BindingRegistry
from secmig.security.pki import certificate_host_id, certificate_raw_key
from secmig.security.policy import Operation
from secmig.security.tls import TlsChannel, TlsFailure

PROOF_KIND = "handshake-proof"
MAX_DEVICE_STATE = frames.MAX_FRAME_PAYLOAD


class State(enum.Enum):
    """Where a migration is. Both ends walk the same states, moved by frames sent and received."""

    TLS_HANDSHAKE = "tls-handshake"
    AWAIT_SOURCE_HELLO = "await-source-hello"
    AWAIT_DESTINATION_HELLO = "await-destination-hello"
    AWAIT_AUTHORIZATION = "await-authorization"
    AUTHORIZED = "authorized"
    """Authenticated and authorized, between rounds."""
    IN_ROUND = "in-round"
    STOPPED = "stopped"
    """Stop-and-copy: the VM is paused; the last dirty pages may still come."""
    STATE_TRANSFERRED = "state-transferred"
    COMMITTING = "committing"
    DONE = "done"
    ABORTED = "aborted"
    ERROR = "error"


S, D = Role.SOURCE, Role.DESTINATION

TRANSITIONS: dict[tuple[Role, State, FrameType], State] = {
    # handshake (TLS_HANDSHAKE → AWAIT_SOURCE_HELLO happens when TLS completes; no frame is involved)
    (S, State.AWAIT_SOURCE_HELLO, FrameType.SOURCE_HELLO): State.AWAIT_DESTINATION_HELLO,
    (D, State.AWAIT_DESTINATION_HELLO, FrameType.DESTINATION_HELLO): State.AWAIT_AUTHORIZATION,
    (D, State.AWAIT_AUTHORIZATION, FrameType.AUTHORIZED): State.AUTHORIZED,
    # pre-copy rounds: the only states that admit PAGE_BATCH are reachable only through AUTHORIZED
    (S, State.AUTHORIZED, FrameType.ROUND_START): State.IN_ROUND,
    (S, State.IN_ROUND, FrameType.PAGE_BATCH): State.IN_ROUND,
    (S, State.IN_ROUND, FrameType.ROUND_END): State.AUTHORIZED,
    # stop-and-copy, device state, commit
    (S, State.AUTHORIZED, FrameType.STOP_AND_COPY): State.STOPPED,
    (S, State.STOPPED, FrameType.PAGE_BATCH): State.STOPPED,
    (S, State.STOPPED, FrameType.DEVICE_STATE): State.STATE_TRANSFERRED,
    (S, State.STATE_TRANSFERRED, FrameType.COMMIT): State.COMMITTING,
    (D, State.COMMITTING, FrameType.COMMITTED): State.DONE,
}
"""Rule 1: (sender, state, frame) → next state. Anything absent is a protocol error for the sender."""

TERMINAL = frozenset({State.DONE, State.ABORTED, State.ERROR})
ABORTABLE_AFTER_TLS = frozenset(State) - TERMINAL - {State.TLS_HANDSHAKE}
"""ABORT may be sent by either end in any of these states (it needs the TLS channel to travel)."""

_MALFORMED = (DocumentFormatError, struct.error, ValueError, UnicodeError, OverflowError)


def next_state(sender: Role, state: State, frame: FrameType) -> State | None:
    """The table lookup, with ABORT's blanket rule; None when ``sender`` may not send ``frame`` now."""
    if frame is FrameType.ABORT:
        return State.ABORTED if state in ABORTABLE_AFTER_TLS else None
    return TRANSITIONS.get((sender, state, frame))


def _proof_payload(role: Role, cluster_id: str, host_id: str, exporter: bytes) -> JsonObject:
    return {"role": role.value, "cluster_id": cluster_id, "host_id": host_id, "exporter": exporter.hex()}


class MigrationConnection:
    """One end of one authenticated, authorized migration. Create with :meth:`source` or :meth:`destination`."""

    def __init__(
        self,
        role: Role,
        identity: HostIdentity,
        trust: ClusterTrust | Callable[[], ClusterTrust],
        *,
        audit: AuditSink,
        request: MigrationRequest | None = None,
        nonces: NonceStore | None = None,
        bindings: BindingRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.role = role
        self.identity = identity
        self._trust_source = trust
        self._audit = audit
        self._request = request
        self._nonces = nonces
        self._bindings = bindings
        self._clock = clock
        self.state = State.TLS_HANDSHAKE
        self._tls = TlsChannel(identity, self._trust().ca_certificate, server=role is Role.DESTINATION)
        self._events: deque[ReceivedEvent] = deque()
        self._error: RemoteProtocolError | None = None
        self._eof = False
        # Frame reassembly straight into one buffer per frame: header first, then an exact-size payload.
        self._header = bytearray(frames.HEADER_BYTES)
        self._header_got = 0
        self._payload: bytearray | None = None
        self._payload_type = FrameType.ABORT
        self._payload_got = 0
        # Set once authorized.
        self.peer_host: str | None = None
        self.authorized: Authorized | None = None
        self.current_round = -1
        self._round_pages = 0
        self._digest_table: bytearray | None = None
        self._commit_digest: bytes | None = None
        self.page_bytes_sent = 0
        self.page_bytes_received = 0
        self._subject: str | None = None

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def source(
        cls,
        identity: HostIdentity,
        trust: ClusterTrust | Callable[[], ClusterTrust],
        request: MigrationRequest,
        *,
        audit: AuditSink,
        clock: Callable[[], float] = time.time,
    ) -> MigrationConnection:
        """The sending end (TLS client): it asks for ``request`` and, once authorized, sends the memory."""
        if request.page_size <= 0 or request.page_size > frames.MAX_PAGE_SIZE or request.page_count <= 0:
            raise LocalProtocolError(f"bad memory geometry: {request.page_count} pages of {request.page_size} bytes")
        return cls(Role.SOURCE, identity, trust, audit=audit, request=request, clock=clock)

    @classmethod
    def destination(
        cls,
        identity: HostIdentity,
        trust: ClusterTrust | Callable[[], ClusterTrust],
        *,
        nonces: NonceStore,
        bindings: BindingRegistry,
        audit: AuditSink,
        clock: Callable[[], float] = time.time,
    ) -> MigrationConnection:
        """The receiving end (TLS server): it checks the source and its grant before accepting any page."""
        return cls(Role.DESTINATION, identity, trust, audit=audit, nonces=nonces, bindings=bindings, clock=clock)

    def _trust(self) -> ClusterTrust:
        src = self._trust_source
        return src if isinstance(src, ClusterTrust) else src()

    # -- byte I/O ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer; ``b""`` means the transport closed."""
        if self.state in TERMINAL:
            return  # after the end nothing the peer sends matters
        if not data:
            self._eof = True
            return
        self._tls.feed(data)

    def data_to_send(self) -> bytes:
        """Bytes to deliver to the peer (handshake records, alerts, frames produced as a side effect)."""
        return self._tls.outgoing()

    # -- events in -----------------------------------------------------------------------------------

    def next_event(self) -> ReceivedEvent:
        """The next event, :data:`NEED_DATA` or :data:`CONNECTION_CLOSED`; raises only RemoteProtocolError."""
        if self._error is not None:
            raise self._error
        if self._events:
            return self._events.popleft()
        if self.state in TERMINAL:
            return CONNECTION_CLOSED
        try:
            event = self._advance_inbound()
        except TlsFailure as failure:
            event = self._tls_failed(failure)
        except RemoteProtocolError as err:
            raise self._fail(err) from None
        except _MALFORMED as err:
            raise self._fail(RemoteProtocolError(f"malformed frame: {err}")) from err
        if event is NEED_DATA and self._eof:
            raise self._fail(RemoteProtocolError(f"peer closed the connection in state {self.state.value}"))
        return event

    def _advance_inbound(self) -> ReceivedEvent:
        while True:
            if self.state is State.TLS_HANDSHAKE:
                if not self._tls.handshake():
                    return NEED_DATA
                self._tls_established()
                continue
            frame = self._read_frame()
            if frame is None:
                return NEED_DATA
            event = self._handle_frame(*frame)
            if event is not None:
                return event
            if self.state in TERMINAL:
                return self._events.popleft() if self._events else CONNECTION_CLOSED

    def _read_frame(self) -> tuple[FrameType, bytearray] | None:
        tls = self._tls
        if self._payload is None:
            while self._header_got < frames.HEADER_BYTES:
                n = tls.recv_into(memoryview(self._header)[self._header_got :])
                if n == 0:
                    return None
                self._header_got += n
            ftype, length = frames.parse_header(self._header)
            self._payload_type = ftype
            self._payload = bytearray(length)
            self._payload_got = 0
        payload = self._payload
        view = memoryview(payload)
        while self._payload_got < len(payload):
            n = tls.recv_into(view[self._payload_got :])
            if n == 0:
                return None
            self._payload_got += n
        self._payload = None
        self._header_got = 0
        return self._payload_type, payload

    def _peer_transition(self, frame: FrameType) -> None:
        new = next_state(self.role.peer, self.state, frame)
        if new is None:
            raise RemoteProtocolError(f"{self.role.peer.value} sent {frame.name} in state {self.state.value}")
        self.state = new

    def _handle_frame(self, ftype: FrameType, payload: bytearray) -> ReceivedEvent | None:
        self._peer_transition(ftype)
        if ftype is FrameType.ABORT:
            code, reason = frames.decode_abort(payload)
            try:
                abort_code = AbortCode(code)
            except ValueError:
                abort_code = AbortCode.PROTOCOL
            detail: Detail = {"by": "peer", "code": abort_code.name, "reason": reason}
            self._record("migration.aborted", Decision.REFUSE, detail)
            return Aborted(abort_code, reason, by_peer=True)
        if ftype is FrameType.SOURCE_HELLO:
            return self._on_source_hello(payload)
        if ftype is FrameType.DESTINATION_HELLO:
            return self._on_destination_hello(payload)
        if ftype is FrameType.AUTHORIZED:
            if payload:
                raise RemoteProtocolError("AUTHORIZED carries no payload")
            assert self.authorized is not None  # set when the destination's hello was accepted
            return self.authorized
        if ftype is FrameType.ROUND_START:
            round_no = frames.decode_u32(payload, "round start")
            if round_no != self.current_round + 1:
                raise RemoteProtocolError(f"round {round_no} started after round {self.current_round}")
            self.current_round, self._round_pages = round_no, 0
            return RoundStart(round_no)
        if ftype is FrameType.PAGE_BATCH:
            return self._on_page_batch(payload)
        if ftype is FrameType.ROUND_END:
            round_no, pages = frames.decode_round_end(payload)
            if round_no != self.current_round or pages != self._round_pages:
                raise RemoteProtocolError(
                    f"round end says round {round_no} with {pages} pages; "
                    f"received round {self.current_round} with {self._round_pages}"
                )
            return RoundEnd(round_no, pages)
        if ftype is FrameType.STOP_AND_COPY:
            if payload:
                raise RemoteProtocolError("STOP_AND_COPY carries no payload")
            self.current_round, self._round_pages = self.current_round + 1, 0
            return StopAndCopy()
        if ftype is FrameType.DEVICE_STATE:
            return DeviceState(bytes(payload))
        if ftype is FrameType.COMMIT:
            return self._on_commit(frames.decode_digest(payload, "commit"))
        if ftype is FrameType.COMMITTED:
            digest = frames.decode_digest(payload, "committed")
            if digest != self._commit_digest:
                raise RemoteProtocolError("destination committed a memory digest other than the one sent")
            self._record("migration.committed", Decision.ALLOW, {"peer": self.peer_host})
            return Committed(digest)
        raise RemoteProtocolError(f"unexpected frame {ftype.name}")  # pragma: no cover - table forbids it

    # -- handshake -----------------------------------------------------------------------------------

    def _tls_established(self) -> None:
        self.state = State.AWAIT_SOURCE_HELLO
        if self.role is Role.SOURCE:
            req = self._request
            assert req is not None  # the source factory requires it
            doc: JsonObject = {
                "vsignature": self.identity.vsignature.to_json(),
                "proof": b64encode(self._proof()),
                "request": {
                    "operation": req.operation.value,
                    "vm_id": req.vm_id,
                    "page_size": req.page_size,
                    "page_count": req.page_count,
                },
                "grant": None if req.grant is None else req.grant.to_json(),
                "binding": None if req.binding is None else req.binding.to_json(),
            }
            self._send_frame(FrameType.SOURCE_HELLO, canonical_json(doc))

    def _proof(self) -> bytes:
        cred = self.identity.vsignature
        payload = _proof_payload(self.role, cred.cluster_id, cred.host_id, self._tls.exporter())
        return sign_document(self.identity.key, PROOF_KIND, payload)

    def _check_peer(self, trust: ClusterTrust, cred: Vsignature, proof: bytes) -> None:
        """Vsignature valid and unrevoked, same key and host as the TLS certificate, proof bound to this session."""
        trust.check_member(cred, self._clock())
        cert = self._tls.peer_certificate()
        if cert is None or certificate_raw_key(cert) != cred.public_key or certificate_host_id(cert) != cred.host_id:
            raise AuthenticationError(f"host {cred.host_id!r}: Vsignature does not match the TLS certificate")
        payload = _proof_payload(self.role.peer, cred.cluster_id, cred.host_id, self._tls.exporter())
        if not verify_document(public_key_from_raw(cred.public_key), PROOF_KIND, payload, proof):
            raise AuthenticationError(f"host {cred.host_id!r}: proof is not bound to this TLS session")

    def _on_source_hello(self, payload: bytearray) -> ReceivedEvent:
        doc = parse_json_object(bytes(payload), "source hello")
        cred = Vsignature.from_json(get_obj(doc, "vsignature"))
        proof = b64decode(doc.get("proof"), "proof", 64)
        req = get_obj(doc, "request")
        try:
            operation = Operation(get_str(req, "operation", max_len=16))
        except ValueError as err:
            raise RemoteProtocolError("source hello: unknown operation") from err
        vm_id = get_str(req, "vm_id", max_len=63)
        page_size = get_int(req, "page_size", minimum=1)
        page_count = get_int(req, "page_count", minimum=1)
        if page_size > frames.MAX_PAGE_SIZE or page_count > frames.MAX_PAGE_COUNT:
            raise RemoteProtocolError(f"source hello: {page_count} pages of {page_size} bytes is out of range")
        grant_doc, binding_doc = doc.get("grant"), doc.get("binding")
        if not (grant_doc is None or isinstance(grant_doc, dict)) or not (
            binding_doc is None or isinstance(binding_doc, dict)
        ):
            raise RemoteProtocolError("source hello: grant and binding must be objects or null")
        grant = None if grant_doc is None else Grant.from_json(grant_doc)
        binding = None if binding_doc is None else LocationBinding.from_json(binding_doc)
        self.peer_host = cred.host_id
        self._subject = vm_id
        trust = self._trust()  # read afresh: a revocation made a second ago applies to this handshake
        try:
            self._check_peer(trust, cred, proof)
        except AuthenticationError as err:
            return self._refuse(AbortCode.AUTHENTICATION, "handshake.failed", str(err))
        try:
            self._check_authorization(trust, cred.host_id, operation, vm_id, grant, binding)
        except SecurityError as err:
            return self._refuse(AbortCode.AUTHORIZATION, "grant.refused", str(err), grant)
        self._record("handshake.ok", Decision.ALLOW, {"peer": cred.host_id, "tls": self._tls.version()})
        assert grant is not None
        self._record(
            "grant.used",
            Decision.ALLOW,
            {
                "operation": operation.value,
                "source": cred.host_id,
                "issuer": grant.issuer,
                "nonce": grant.nonce.hex(),
            },
        )
        self._digest_table = frames.zero_page_table(page_size, page_count)
        self.authorized = Authorized(cred.host_id, operation, vm_id, page_size, page_count, grant.next_binding)
        hello: JsonObject = {
            "vsignature": self.identity.vsignature.to_json(),
            "proof": b64encode(self._proof()),
        }
        self._send_frame(FrameType.DESTINATION_HELLO, canonical_json(hello))
        self._send_frame(FrameType.AUTHORIZED, b"")
        return self.authorized

    def _check_authorization(
        self,
        trust: ClusterTrust,
        source_host: str,
        operation: Operation,
        vm_id: str,
        grant: Grant | None,
        binding: LocationBinding | None,
    ) -> None:
        roots = trust.roots()
        me = self.identity.host_id
        if binding is None:
            raise AuthorizationError(f"VM {vm_id!r}: no location binding presented")
        try:
            check_binding_signature(binding, roots)
        except AuthenticationError as err:
            raise AuthorizationError(str(err)) from err
        if binding.vm_id != vm_id or binding.host_id != source_host:
            raise AuthorizationError(
                f"VM {vm_id!r}: binding places VM {binding.vm_id!r} on {binding.host_id!r}, "
                f"not on the source {source_host!r}"
            )
        assert self._bindings is not None and self._nonces is not None
        latest = self._bindings.latest_epoch(vm_id)
        if latest is not None and binding.epoch < latest:
            raise AuthorizationError(
                f"VM {vm_id!r}: binding epoch {binding.epoch} is older than accepted epoch {latest}"
            )
        check_grant(
            grant,
            roots,
            now=self._clock(),
            operation=operation,
            vm_id=vm_id,
            source_host=source_host,
            destination_host=me,
            current_binding=binding,
        )
        assert grant is not None  # check_grant refuses None
        # Last, so that a refused use does not burn a grant that is otherwise valid.
        if not self._nonces.consume(grant.nonce, grant.expires_at, self._clock()):
            raise AuthorizationError(f"grant for {operation.value} of VM {vm_id!r}: already used (replay)")

    def _on_destination_hello(self, payload: bytearray) -> ReceivedEvent | None:
        doc = parse_json_object(bytes(payload), "destination hello")
        cred = Vsignature.from_json(get_obj(doc, "vsignature"))
        proof = b64decode(doc.get("proof"), "proof", 64)
        req = self._request
        assert req is not None
        self.peer_host = cred.host_id
        try:
            self._check_peer(self._trust(), cred, proof)
            expected = req.grant.destination_host if req.grant is not None else None
            if expected is not None and cred.host_id != expected:
                raise AuthenticationError(f"destination is {cred.host_id!r}, the grant names {expected!r}")
        except AuthenticationError as err:
            return self._refuse(AbortCode.AUTHENTICATION, "handshake.failed", str(err))
        self._record("handshake.ok", Decision.ALLOW, {"peer": cred.host_id, "tls": self._tls.version()})
        self.authorized = Authorized(
            cred.host_id,
            req.operation,
            req.vm_id,
            req.page_size,
            req.page_count,
            None if req.grant is None else req.grant.next_binding,
        )
        return None  # the Authorized event is delivered with the AUTHORIZED frame

    # -- pages and commit ----------------------------------------------------------------------------

    def _on_page_batch(self, payload: bytearray) -> ReceivedEvent:
        auth = self.authorized
        table = self._digest_table
        assert auth is not None and table is not None
        batch = frames.decode_page_batch(payload, auth.page_size, auth.page_count)
        if batch.round_no != self.current_round:
            raise RemoteProtocolError(f"page batch for round {batch.round_no} during round {self.current_round}")
        bad = frames.first_bad_page(batch, auth.page_size)
        if bad is not None:
            return self._refuse(
                AbortCode.INTEGRITY,
                "migration.aborted",
                f"page {batch.page_numbers[bad]} of round {batch.round_no}: digest does not match its contents",
            )
        digests = batch.digests
        for i, n in enumerate(batch.page_numbers):
            table[n * 32 : n * 32 + 32] = digests[i * 32 : i * 32 + 32]
        self._round_pages += len(batch.page_numbers)
        self.page_bytes_received += len(batch.data)
        return PageBatch(batch.round_no, batch.page_numbers, batch.data.toreadonly(), bytes(digests))

    def _on_commit(self, digest: bytes) -> ReceivedEvent:
        auth, table = self.authorized, self._digest_table
        assert auth is not None and table is not None
        mine = frames.memory_digest_from_table(table, auth.page_size)
        if mine != digest:
            return self._refuse(
                AbortCode.INTEGRITY, "migration.aborted", "final memory digest differs from the source's"
            )
        self._commit_digest = digest
        return Commit(digest)

    # -- events out ----------------------------------------------------------------------------------

    def send(self, event: SendableEvent) -> bytes:
        """Apply a local event and return the bytes to deliver to the peer; LocalProtocolError if not allowed now."""
        if self.state in TERMINAL:
            raise LocalProtocolError(f"cannot send {type(event).__name__}: migration is {self.state.value}")
        if isinstance(event, Abort):
            return self._send_abort(event)
        if isinstance(event, PageBatch):
            self._send_pages(event)
        elif isinstance(event, RoundStart):
            if event.round_no != self.current_round + 1:
                raise LocalProtocolError(f"round {event.round_no} cannot follow round {self.current_round}")
            self._send_frame(FrameType.ROUND_START, frames.encode_u32(event.round_no))
            self.current_round, self._round_pages = event.round_no, 0
        elif isinstance(event, RoundEnd):
            if event.round_no != self.current_round:
                raise LocalProtocolError(f"round {event.round_no} is not the current round {self.current_round}")
            self._send_frame(FrameType.ROUND_END, frames.encode_round_end(event.round_no, self._round_pages))
        elif isinstance(event, StopAndCopy):
            self._send_frame(FrameType.STOP_AND_COPY, b"")
            self.current_round, self._round_pages = self.current_round + 1, 0
        elif isinstance(event, DeviceState):
            self._send_frame(FrameType.DEVICE_STATE, event.data)
        elif isinstance(event, Commit):
            if len(event.memory_digest) != frames.DIGEST_BYTES:
                raise LocalProtocolError("commit needs a 32-byte memory digest (see frames.memory_digest)")
            self._send_frame(FrameType.COMMIT, event.memory_digest)
            self._commit_digest = event.memory_digest
        elif isinstance(event, Committed):
            if self._commit_digest is None:
                raise LocalProtocolError("nothing to confirm: no matching COMMIT was received")
            self._send_frame(FrameType.COMMITTED, self._commit_digest)
            auth = self.authorized
            if auth is not None and auth.next_binding is not None and self._bindings is not None:
                self._bindings.record(auth.next_binding)
            self._record("migration.committed", Decision.ALLOW, {"peer": self.peer_host})
        else:  # pragma: no cover - typing forbids it
            raise LocalProtocolError(f"not a sendable event: {event!r}")
        return self._tls.outgoing()

    def _send_pages(self, event: PageBatch) -> None:
        auth = self.authorized
        if auth is None or next_state(self.role, self.state, FrameType.PAGE_BATCH) is None:
            raise LocalProtocolError(
                f"no page may be sent in state {self.state.value} (not authorized or not in a round)"
            )
        if event.round_no != self.current_round:
            raise LocalProtocolError(f"page batch for round {event.round_no} during round {self.current_round}")
        if event.page_numbers and (min(event.page_numbers) < 0 or max(event.page_numbers) >= auth.page_count):
            raise LocalProtocolError(f"page numbers must be in [0, {auth.page_count})")
        try:
            frame = frames.encode_page_batch(
                event.round_no, event.page_numbers, event.data, auth.page_size, bytes(event.digests) or None
            )
        except (ValueError, struct.error) as err:
            raise LocalProtocolError(f"bad page batch: {err}") from err
        self._send_encoded(FrameType.PAGE_BATCH, frame)
        self._round_pages += len(event.page_numbers)
        self.page_bytes_sent += len(event.data)

    def _send_frame(self, ftype: FrameType, payload: bytes | bytearray | memoryview) -> None:
        if len(payload) > frames.MAX_FRAME_PAYLOAD:
            raise LocalProtocolError(f"{ftype.name} payload of {len(payload)} bytes exceeds the frame cap")
        self._send_encoded(ftype, frames.encode_frame(ftype, payload))

    def _send_encoded(self, ftype: FrameType, frame: bytes) -> None:
        new = next_state(self.role, self.state, ftype)
        if new is None:
            raise LocalProtocolError(f"{self.role.value} may not send {ftype.name} in state {self.state.value}")
        try:
            self._tls.send(frame)
        except TlsFailure as failure:
            raise LocalProtocolError(f"TLS channel is unusable: {failure}") from failure
        self.state = new

    def _send_abort(self, event: Abort) -> bytes:
        detail: Detail = {"by": "local", "code": event.code.name, "reason": event.reason}
        self._record("migration.aborted", Decision.REFUSE, detail)
        if self.state in ABORTABLE_AFTER_TLS:
            self._try_send_abort(event.code, event.reason)
        self.state = State.ABORTED
        return self._tls.outgoing()

    # -- failure paths -------------------------------------------------------------------------------

    def _record(self, event: str, decision: Decision, detail: Detail) -> None:
        subject = self._subject or (self._request.vm_id if self._request else None) or self.peer_host or "?"
        self._audit.record(event, decision, subject, {"role": self.role.value, "host": self.identity.host_id, **detail})

    def _try_send_abort(self, code: AbortCode, reason: str) -> None:
        if self.state not in ABORTABLE_AFTER_TLS:
            return
        # If the channel is already broken, the peer sees a TLS alert or a closed transport instead.
        with contextlib.suppress(TlsFailure):
            self._tls.send(frames.encode_frame(FrameType.ABORT, frames.encode_abort(code, reason)))

    def _refuse(self, code: AbortCode, audit_event: str, reason: str, grant: Grant | None = None) -> Aborted:
        detail: Detail = {"peer": self.peer_host, "reason": reason}
        if grant is not None:
            detail["nonce"] = grant.nonce.hex()
            detail["operation"] = grant.operation.value
        self._record(audit_event, Decision.REFUSE, detail)
        self._try_send_abort(code, reason)
        self.state = State.ABORTED
        return Aborted(code, reason, by_peer=False)

    def _tls_failed(self, failure: TlsFailure) -> ReceivedEvent:
        if failure.kind == "verify":
            return self._refuse(AbortCode.AUTHENTICATION, "handshake.failed", str(failure))
        if failure.kind == "alert":
            # The peer refused the session (e.g. our certificate, after we already finished our side of TLS 1.3).
            before_auth = self.authorized is None or self.state is State.AWAIT_AUTHORIZATION
            code = AbortCode.AUTHENTICATION if before_auth else AbortCode.PROTOCOL
            self._record(
                "handshake.failed" if before_auth else "migration.aborted",
                Decision.REFUSE,
                {"by": "peer", "reason": str(failure)},
            )
            self.state = State.ABORTED
            return Aborted(code, str(failure), by_peer=True)
        raise self._fail(RemoteProtocolError(str(failure)))

    def _fail(self, err: RemoteProtocolError) -> RemoteProtocolError:
        self._record("protocol.error", Decision.REFUSE, {"state": self.state.value, "reason": str(err)})
        self._try_send_abort(AbortCode.PROTOCOL, str(err))
        self.state = State.ERROR
        self._error = err
        return err

    def __repr__(self) -> str:
        return f"<MigrationConnection {self.role.value} {self.identity.host_id} state={self.state.value}>"
