"""The migration protocol's connection, sans-IO: ``receive_data(bytes)``, ``next_event()``, ``send(event) -> bytes``.

A :class:`MigrationConnection` is one end of one migration (h11's ``_connection.py``). It owns a TLS 1.3
session (mutual authentication against the cluster CA, memory BIOs, see :mod:`.tls`) and, on top of it,
the application handshake:

1. TLS completes. The source sends SOURCE_HELLO: its Vsignature, a *proof* (its host key's signature
   over the session's RFC 9266 ``tls-exporter`` value and its role), the request (operation, VM, memory
   geometry), the grant and the VM's current location binding.
2. The destination checks the Vsignature (authority signature, cluster, expiry, revocation — the
   revocation list is re-read for every handshake), that the TLS peer certificate carries the same key
   and host, and the proof; then its injected :class:`~.handshake.Authorizer` decides (by default
   :class:`~.handshake.GrantAuthorizer`: the binding, the grant, and last the grant's nonce). Any failure
   is audited and answered with ABORT; nothing else is ever sent.
3. The destination sends DESTINATION_HELLO (its own Vsignature and proof) and AUTHORIZED. The source
   checks the destination the same way, plus that it is the grant's destination.

Only then may pages flow. The pieces live beside it: every state transition in one table
(:mod:`.state`, **Rule 1**: PAGE_BATCH is admitted only in states reached through AUTHORIZED), the
handshake messages, proof and authorization policy (:mod:`.handshake`), the frames and the one frame
reader (:mod:`.frames`). This module wires them together and must not grow a rule, a codec or a check
of its own.

Error discipline: anything the peer sends that is malformed, out of order, oversize or tampered with
raises :class:`~secmig.errors.RemoteProtocolError` from ``next_event`` (and the connection is dead);
a *refused check* (identity, grant, page or memory digest) is not an exception but an :class:`Aborted`
event, because refusing is the protocol working. Every decision goes to the injected audit sink; the
authorizer (with its nonce store and binding registry) is injected too, so this module does no I/O.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable

from secmig.errors import (
    AuthenticationError,
    DocumentFormatError,
    LocalProtocolError,
    RemoteProtocolError,
    SecurityError,
)
from secmig.security import frames, handshake
from secmig.security.audit import AuditSink, Decision, Detail
from secmig.security.cluster import ClusterTrust, HostIdentity
from secmig.security.credentials import Vsignature
from secmig.security.events import (
    CONNECTION_CLOSED,
    NEED_DATA,
    Abort,
    AbortCode,
    Aborted,
    Authorized,
    Commit,
    Committed,
    Confirm,
    DeviceState,
    MigrationRequest,
    PageBatch,
    Prepared,
    ReceivedEvent,
    RoundEnd,
    RoundStart,
    SendableEvent,
    StopAndCopy,
)
from secmig.security.frames import FrameType
from secmig.security.grants import Grant, NonceStore
from secmig.security.handshake import Authorizer, GrantAuthorizer
from secmig.security.location import BindingRegistry
from secmig.security.state import (
    AFTER_COMMIT,
    LINK_DEAD,
    PRE_AUTHORIZATION,
    ConnectionState,
    Outcome,
    Role,
    Signal,
    State,
)
from secmig.security.tls import TlsChannel, TlsFailure

__all__ = ["MAX_BUFFERED_BYTES", "MAX_DEVICE_STATE", "MigrationConnection", "State"]

MAX_DEVICE_STATE = frames.MAX_FRAME_PAYLOAD
MAX_BUFFERED_BYTES = frames.HEADER_BYTES + frames.MAX_FRAME_PAYLOAD
"""The most received bytes a connection holds outside TLS: one incomplete frame (h11's
``max_incomplete_event_size``). A header announcing more is a RemoteProtocolError before any allocation."""

_MALFORMED = (DocumentFormatError, struct.error, ValueError, UnicodeError, OverflowError)
"""Belt and braces: decoders raise RemoteProtocolError only, but a peer's bytes must never raise anything else."""


def _authorized(peer_host: str, req: MigrationRequest) -> Authorized:
    next_binding = None if req.grant is None else req.grant.next_binding
    bound = None if req.grant is None else req.grant.manifest_digest
    nonce = None if req.grant is None else req.grant.nonce
    return Authorized(
        peer_host, req.operation, req.vm_id, req.page_size, req.page_count, next_binding, bound, nonce, req.binding
    )


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
        authorizer: Authorizer | None = None,
    ) -> None:
        if authorizer is None and nonces is not None and bindings is not None:
            authorizer = GrantAuthorizer(nonces, bindings)
        if role is Role.DESTINATION and authorizer is None:
            raise LocalProtocolError("a destination needs an authorizer (or the nonces and bindings of the default)")
        self.role = role
        self.identity = identity
        self._trust_source = trust
        self._audit = audit
        self._request = request
        self._authorizer = authorizer
        self._clock = clock
        self._state = ConnectionState(role)
        self._tls = TlsChannel(identity, self._trust().ca_certificate, server=role is Role.DESTINATION)
        self._reader = frames.FrameReader(frames.MAX_FRAME_PAYLOAD)  # holds at most MAX_BUFFERED_BYTES
        self._events: deque[ReceivedEvent] = deque()
        self._error: RemoteProtocolError | None = None
        self._eof = False
        # Set once authorized.
        self.peer_host: str | None = None
        self.authorized: Authorized | None = None
        self.current_round = -1
        self._round_pages = 0
        self._digest_table: bytearray | None = None
        self._commit_digest: bytes | None = None
        self._ack_on_confirm = False
        """The destination voted with Committed (no register): the final COMMITTED goes out on CONFIRM."""
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
        nonces: NonceStore | None = None,
        bindings: BindingRegistry | None = None,
        audit: AuditSink,
        clock: Callable[[], float] = time.time,
        authorizer: Authorizer | None = None,
    ) -> MigrationConnection:
        """The receiving end (TLS server): it checks the source and its grant before accepting any page.

        ``authorizer`` decides whether an authenticated source may run its operation; by default a
        :class:`~.handshake.GrantAuthorizer` over ``nonces`` and ``bindings`` (then both are required).
        """
        return cls(
            Role.DESTINATION,
            identity,
            trust,
            audit=audit,
            nonces=nonces,
            bindings=bindings,
            clock=clock,
            authorizer=authorizer,
        )

    def _trust(self) -> ClusterTrust:
        src = self._trust_source
        return src if isinstance(src, ClusterTrust) else src()

    @property
    def state(self) -> State:
        """Where this end is in the state table."""
        return self._state.state

    # -- byte I/O ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer; ``b""`` means the transport closed."""
        if self.state in LINK_DEAD:
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
        if self.state in LINK_DEAD:
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
            frame = self._reader.read_from(self._tls.recv_into)
            if frame is None:
                return NEED_DATA
            event = self._handle_frame(*frame)
            if event is not None:
                return event
            if self.state in LINK_DEAD:
                return self._events.popleft() if self._events else CONNECTION_CLOSED

    def _handle_frame(self, ftype: FrameType, payload: bytearray) -> ReceivedEvent | None:
        self._state.received(ftype)
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
            return self._on_source_hello(handshake.decode_source_hello(payload))
        if ftype is FrameType.DESTINATION_HELLO:
            return self._on_destination_hello(handshake.decode_destination_hello(payload))
        if ftype is FrameType.AUTHORIZED:
            handshake.decode_authorized(payload)
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
        if ftype is FrameType.PREPARED:
            digest = frames.decode_digest(payload, "prepared")
            if digest != self._commit_digest:
                raise RemoteProtocolError("destination prepared a memory digest other than the one sent")
            self._record("migration.prepared", Decision.INFO, {"peer": self.peer_host})
            return Prepared(digest)
        if ftype is FrameType.CONFIRM:
            digest = frames.decode_digest(payload, "confirm")
            if digest != self._commit_digest:
                raise RemoteProtocolError("source confirmed a memory digest other than the one committed")
            self._committed_here()
            if self._ack_on_confirm:
                self._send_frame(FrameType.COMMITTED, digest)
            return Confirm(digest)
        if ftype is FrameType.COMMITTED:
            digest = frames.decode_digest(payload, "committed")
            if digest != self._commit_digest:
                raise RemoteProtocolError("destination committed a memory digest other than the one sent")
            return Committed(digest)
        raise RemoteProtocolError(f"unexpected frame {ftype.name}")  # pragma: no cover - table forbids it

    # -- handshake -----------------------------------------------------------------------------------

    def _tls_established(self) -> None:
        self._state.signal(Signal.TLS_ESTABLISHED)
        if self.role is Role.SOURCE:
            req = self._request
            assert req is not None  # the source factory requires it
            hello = handshake.encode_source_hello(self.identity.vsignature, self._proof(), req)
            self._send_frame(FrameType.SOURCE_HELLO, hello)

    def _proof(self) -> bytes:
        return handshake.sign_proof(self.identity, self.role, self._tls.exporter())

    def _check_peer(self, trust: ClusterTrust, cred: Vsignature, proof: bytes) -> None:
        handshake.check_peer(
            trust,
            cred,
            proof,
            role=self.role.peer,
            certificate=self._tls.peer_certificate(),
            exporter=self._tls.exporter(),
            now=self._clock(),
        )

    def _on_source_hello(self, hello: handshake.SourceHello) -> ReceivedEvent:
        cred, req = hello.vsignature, hello.request
        grant = req.grant
        self.peer_host = cred.host_id
        self._subject = req.vm_id
        trust = self._trust()  # read afresh: a revocation made a second ago applies to this handshake
        try:
            self._check_peer(trust, cred, hello.proof)
        except AuthenticationError as err:
            return self._refuse(AbortCode.AUTHENTICATION, "handshake.failed", str(err))
        assert self._authorizer is not None  # a destination always has one
        try:
            self._authorizer.authorize(hello, destination_host=self.identity.host_id, trust=trust, now=self._clock())
        except SecurityError as err:
            return self._refuse(AbortCode.AUTHORIZATION, "grant.refused", str(err), grant)
        self._record("handshake.ok", Decision.ALLOW, {"peer": cred.host_id, "tls": self._tls.version()})
        if grant is not None:
            self._record(
                "grant.used",
                Decision.ALLOW,
                {
                    "operation": req.operation.value,
                    "source": cred.host_id,
                    "issuer": grant.issuer,
                    "nonce": grant.nonce.hex(),
                },
            )
        self._digest_table = frames.zero_page_table(req.page_size, req.page_count)
        self.authorized = _authorized(cred.host_id, req)
        self._send_frame(
            FrameType.DESTINATION_HELLO, handshake.encode_destination_hello(self.identity.vsignature, self._proof())
        )
        self._send_frame(FrameType.AUTHORIZED, b"")
        return self.authorized

    def _on_destination_hello(self, hello: handshake.DestinationHello) -> ReceivedEvent | None:
        cred = hello.vsignature
        req = self._request
        assert req is not None
        self.peer_host = cred.host_id
        try:
            self._check_peer(self._trust(), cred, hello.proof)
            expected = req.grant.destination_host if req.grant is not None else None
            if expected is not None and cred.host_id != expected:
                raise AuthenticationError(f"destination is {cred.host_id!r}, the grant names {expected!r}")
        except AuthenticationError as err:
            return self._refuse(AbortCode.AUTHENTICATION, "handshake.failed", str(err))
        self._record("handshake.ok", Decision.ALLOW, {"peer": cred.host_id, "tls": self._tls.version()})
        self.authorized = _authorized(cred.host_id, req)
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
        if self.state in LINK_DEAD:
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
        elif isinstance(event, Prepared | Committed):
            if self._commit_digest is None or self.role is not Role.DESTINATION:
                raise LocalProtocolError("nothing to vote on: no matching COMMIT was received")
            if self.state is State.COMMITTING:  # the vote (Committed: and the final word once confirmed)
                self._send_frame(FrameType.PREPARED, self._commit_digest)
                self._ack_on_confirm = isinstance(event, Committed)
            elif isinstance(event, Committed):
                self._send_frame(FrameType.COMMITTED, self._commit_digest)
            else:
                raise LocalProtocolError(f"cannot vote in state {self.state.value}")
        elif isinstance(event, Confirm):
            if self._commit_digest is None:
                raise LocalProtocolError("nothing to confirm: no COMMIT was sent")
            self._send_frame(FrameType.CONFIRM, self._commit_digest)
            self._record("migration.committed", Decision.ALLOW, {"peer": self.peer_host})
        else:  # pragma: no cover - typing forbids it
            raise LocalProtocolError(f"not a sendable event: {event!r}")
        return self._tls.outgoing()

    def _send_pages(self, event: PageBatch) -> None:
        auth = self.authorized
        if auth is None or not self._state.can_send(FrameType.PAGE_BATCH):
            raise LocalProtocolError(
                f"no page may be sent in state {self.state.value} (not authorized or not in a round)"
            )
        if event.round_no != self.current_round:
            raise LocalProtocolError(f"page batch for round {event.round_no} during round {self.current_round}")
        if event.page_numbers and (min(event.page_numbers) < 0 or max(event.page_numbers) >= auth.page_count):
            raise LocalProtocolError(f"page numbers must be in [0, {auth.page_count})")
        frame = frames.encode_page_batch(
            event.round_no, event.page_numbers, event.data, auth.page_size, bytes(event.digests) or None
        )
        self._send_encoded(FrameType.PAGE_BATCH, frame)
        self._round_pages += len(event.page_numbers)
        self.page_bytes_sent += len(event.data)

    def _send_frame(self, ftype: FrameType, payload: bytes | bytearray | memoryview) -> None:
        if len(payload) > frames.MAX_FRAME_PAYLOAD:
            raise LocalProtocolError(f"{ftype.name} payload of {len(payload)} bytes exceeds the frame cap")
        self._send_encoded(ftype, frames.encode_frame(ftype, payload))

    def _send_encoded(self, ftype: FrameType, frame: bytes) -> None:
        self._state.check_send(ftype)
        try:
            self._tls.send(frame)
        except TlsFailure as failure:
            raise LocalProtocolError(f"TLS channel is unusable: {failure}") from failure
        self._state.sent(ftype)

    def _send_abort(self, event: Abort) -> bytes:
        detail: Detail = {"by": "local", "code": event.code.name, "reason": event.reason}
        self._record("migration.aborted", Decision.REFUSE, detail)
        self._abandon(event.code, event.reason)
        return self._tls.outgoing()

    # -- failure paths -------------------------------------------------------------------------------

    def _record(self, event: str, decision: Decision, detail: Detail) -> None:
        subject = self._subject or (self._request.vm_id if self._request else None) or self.peer_host or "?"
        self._audit.record(event, decision, subject, {"role": self.role.value, "host": self.identity.host_id, **detail})

    def _tell_peer_abort(self, code: AbortCode, reason: str) -> bool:
        """Send ABORT when the table allows it now; True when it went (and moved this end to ABORTED)."""
        if not self._state.can_send(FrameType.ABORT):
            return False
        try:
            self._tls.send(frames.encode_frame(FrameType.ABORT, frames.encode_abort(code, reason)))
        except TlsFailure:
            return False  # the channel is already broken: the peer sees a TLS alert or a closed transport
        self._state.sent(FrameType.ABORT)
        return True

    def _abandon(self, code: AbortCode, reason: str) -> None:
        """End ABORTED, telling the peer when the channel can still carry the ABORT frame."""
        if not self._tell_peer_abort(code, reason):
            self._state.signal(Signal.ABANDON)

    def _refuse(self, code: AbortCode, audit_event: str, reason: str, grant: Grant | None = None) -> Aborted:
        detail: Detail = {"peer": self.peer_host, "reason": reason}
        if grant is not None:
            detail["nonce"] = grant.nonce.hex()
            detail["operation"] = grant.operation.value
        self._record(audit_event, Decision.REFUSE, detail)
        self._abandon(code, reason)
        return Aborted(code, reason, by_peer=False)

    def _tls_failed(self, failure: TlsFailure) -> ReceivedEvent:
        if failure.kind == "verify":
            return self._refuse(AbortCode.AUTHENTICATION, "handshake.failed", str(failure))
        if failure.kind == "alert":
            # The peer refused the session (e.g. our certificate, after we already finished our side of TLS 1.3).
            before_auth = self.state in PRE_AUTHORIZATION
            code = AbortCode.AUTHENTICATION if before_auth else AbortCode.PROTOCOL
            self._record(
                "handshake.failed" if before_auth else "migration.aborted",
                Decision.REFUSE,
                {"by": "peer", "reason": str(failure)},
            )
            if self.state in AFTER_COMMIT[self.role] or self.state is State.CONFIRMED:
                self._state.signal(Signal.PROTOCOL_ERROR)  # IN_DOUBT (or DONE once confirmed): no abort now
                return CONNECTION_CLOSED
            self._state.signal(Signal.ABANDON)
            return Aborted(code, str(failure), by_peer=True)
        raise self._fail(RemoteProtocolError(str(failure)))

    def _fail(self, err: RemoteProtocolError) -> RemoteProtocolError:
        self._record("protocol.error", Decision.REFUSE, {"state": self.state.value, "reason": str(err)})
        if self.state not in AFTER_COMMIT[self.role]:  # after the commit point only the register may abort
            self._tell_peer_abort(AbortCode.PROTOCOL, str(err))
        self._state.signal(Signal.PROTOCOL_ERROR)
        self._error = err
        return err

    # -- the commit's outcome -------------------------------------------------------------------------

    def _committed_here(self) -> None:
        """The move is decided and this is the destination: its authorizer records the new binding."""
        if self.role is Role.DESTINATION and self.authorized is not None and self._authorizer is not None:
            self._authorizer.committed(self.authorized)
            self._record("migration.committed", Decision.ALLOW, {"peer": self.peer_host})

    def link_lost(self, reason: str) -> None:
        """The application saw the link fail (closed, silent peer, unanswered register); see the table.

        Before the commit point the migration ends aborted; after it this end is IN_DOUBT until
        :meth:`register_decided`; once CONFIRMED it is DONE."""
        if self.state in LINK_DEAD:
            return
        if self.state in AFTER_COMMIT[self.role] or self.state is State.CONFIRMED:
            self._record("migration.in-doubt", Decision.INFO, {"state": self.state.value, "reason": reason})
            self._state.signal(Signal.PROTOCOL_ERROR)
        else:
            self._state.signal(Signal.ABANDON)

    def register_decided(self, committed: bool) -> None:
        """The location register's answer for this move, which ends IN_DOUBT (LocalProtocolError elsewhere)."""
        self._state.decided(Outcome.MOVED if committed else Outcome.STAYED)
        self._record(
            "migration.decided", Decision.ALLOW if committed else Decision.ABORT, {"by": "register", "moved": committed}
        )
        if committed:
            self._committed_here()

    def __repr__(self) -> str:
        return f"<MigrationConnection {self.role.value} {self.identity.host_id} state={self.state.value}>"
