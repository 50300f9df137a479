"""Where a migration is, and every way it may move: the protocol's state table (h11's ``_state.py``).

**Rule 1**: every transition of a :class:`~secmig.security.protocol.MigrationConnection` is a row of
:data:`TRANSITIONS`, keyed by (who, state, trigger). A trigger is a frame sent or received
(:class:`~secmig.security.frames.FrameType`) or a :class:`Signal` — something that happens at one end
without a frame crossing the wire: TLS completing, a check refusing, a protocol error. PAGE_BATCH
appears only in states reachable through AUTHORIZED, so no code path can emit or accept a page earlier.

:class:`ConnectionState` is the only thing that moves a connection: a trigger absent from the table is a
:class:`~secmig.errors.LocalProtocolError` when this end caused it and a
:class:`~secmig.errors.RemoteProtocolError` when the peer did.

Must not: decode bytes, check credentials, audit, or know what a frame carries; it sees only triggers.
"""

from __future__ import annotations

import enum

from secmig.errors import LocalProtocolError, RemoteProtocolError
from secmig.security.frames import FrameType


class Role(enum.StrEnum):
    """Which end of a migration a connection is; the source is the TLS client."""

    SOURCE = "source"
    DESTINATION = "destination"

    @property
    def peer(self) -> Role:
        """The other end."""
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


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


class Signal(enum.Enum):
    """A trigger that is not a frame: it happens at one end and moves only that end."""

    TLS_ESTABLISHED = "tls-established"
    """The TLS handshake completed; the application handshake may start."""
    ABANDON = "abandon"
    """The migration ends aborted: a check refused, the application asked, or the peer's TLS alert."""
    PROTOCOL_ERROR = "protocol-error"
    """The peer broke the protocol; the connection is dead."""


Trigger = FrameType | Signal

TERMINAL = frozenset({State.DONE, State.ABORTED, State.ERROR})
PRE_AUTHORIZATION = frozenset(
    {State.TLS_HANDSHAKE, State.AWAIT_SOURCE_HELLO, State.AWAIT_DESTINATION_HELLO, State.AWAIT_AUTHORIZATION}
)
"""States in which neither end has yet been told the operation is authorized."""
ABORTABLE_AFTER_TLS = frozenset(State) - TERMINAL - {State.TLS_HANDSHAKE}
"""ABORT may be sent by either end in any of these states (it needs the TLS channel to travel)."""

S, D = Role.SOURCE, Role.DESTINATION

TRANSITIONS: dict[tuple[Role, State, Trigger], State] = {
    # handshake: TLS first (a signal at each end), then the application hellos
    **{(role, State.TLS_HANDSHAKE, Signal.TLS_ESTABLISHED): State.AWAIT_SOURCE_HELLO for role in Role},
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
    # either end may abort once the TLS channel can carry the ABORT frame ...
    **{
        (role, state, FrameType.ABORT): State.ABORTED
        for role in Role
        for state in State
        if state in ABORTABLE_AFTER_TLS
    },
    # ... and may give up locally in any live state (before TLS, nothing can be told to the peer)
    **{(role, state, Signal.ABANDON): State.ABORTED for role in Role for state in State if state not in TERMINAL},
    # a protocol error ends every state but ERROR itself, even one the offending frame just ended
    **{
        (role, state, Signal.PROTOCOL_ERROR): State.ERROR
        for role in Role
        for state in State
        if state is not State.ERROR
    },
}
"""Rule 1: (who, state, trigger) → next state. Anything absent is a protocol error for whoever caused it."""


def next_state(sender: Role, state: State, trigger: Trigger) -> State | None:
    """The table lookup: the state after ``sender`` fires ``trigger`` in ``state``; None when it may not."""
    return TRANSITIONS.get((sender, state, trigger))


class ConnectionState:
    """One end's position in the table; the connection moves it and never assigns a state itself."""

    __slots__ = ("role", "state")

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.TLS_HANDSHAKE

    def can_send(self, frame: FrameType) -> bool:
        """True when this end may send ``frame`` now."""
        return next_state(self.role, self.state, frame) is not None

    def check_send(self, frame: FrameType) -> State:
        """The state after this end sends ``frame``; LocalProtocolError when the table does not allow it."""
        new = next_state(self.role, self.state, frame)
        if new is None:
            raise LocalProtocolError(f"{self.role.value} may not send {frame.name} in state {self.state.value}")
        return new

    def sent(self, frame: FrameType) -> None:
        """This end sent ``frame``; LocalProtocolError when the table does not allow it."""
        self.state = self.check_send(frame)

    def received(self, frame: FrameType) -> None:
        """The peer sent ``frame``; RemoteProtocolError when the table does not allow it."""
        peer = self.role.peer
        new = next_state(peer, self.state, frame)
        if new is None:
            raise RemoteProtocolError(f"{peer.value} sent {frame.name} in state {self.state.value}")
        self.state = new

    def signal(self, signal: Signal) -> None:
        """Something happened at this end; LocalProtocolError when the table does not allow it (our bug)."""
        new = next_state(self.role, self.state, signal)
        if new is None:
            raise LocalProtocolError(f"{signal.value} is not possible in state {self.state.value}")
        self.state = new
