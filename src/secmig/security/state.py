"""Where a migration is, and every way it may move: the protocol's state table (h11's ``_state.py``).

**Rule 1**: every transition of a :class:`~secmig.security.protocol.MigrationConnection` is a row of
:data:`TRANSITIONS`, keyed by (who, state, trigger). A trigger is a frame sent or received
(:class:`~secmig.security.frames.FrameType`) or a :class:`Signal` — something that happens at one end
without a frame crossing the wire: TLS completing, a check refusing, a protocol error. PAGE_BATCH
appears only in states reachable through AUTHORIZED, so no code path can emit or accept a page earlier.

:class:`ConnectionState` is the only thing that moves a connection: a trigger absent from the table is a
:class:`~secmig.errors.LocalProtocolError` when this end caused it and a
:class:`~secmig.errors.RemoteProtocolError` when the peer did.

**The commit** (one owner at every instant). libvirt's migration protocol v3 is the anchor — Begin,
Prepare, Perform, Finish, Confirm — where the destination's Finish resumes the guest before the source's
Confirm, and a lost reply can leave both sides guessing. Here the destination resumes only after the
source confirmed, and the location register of :mod:`.register` is the one place a move is decided::

    source                              destination                     who may run the VM
    ── DEVICE_STATE, COMMIT(digest) ─▶  COMMITTING: checks the digest   nobody: source paused, copy loaded
    ◀──────────── PREPARED ──────────   PREPARED: its vote, cannot be taken back
    register.commit: epoch e → e + 1                                    nobody
    ── CONFIRM ─────────────────────▶   CONFIRMED: checks the register  the destination (source released)
    ◀──────────── COMMITTED ─────────   DONE: resumed                   the destination

- COMMIT and PREPARED move nothing: the source stays paused, the destination's copy loaded but paused.
- After its commit point (COMMIT sent; PREPARED sent) an end never leaves on its own: a lost link, a
  silent peer, an unanswered register is a ``PROTOCOL_ERROR`` there and leads to ``IN_DOUBT``, which
  ends only on the register's answer (:data:`REGISTER_ANSWERS`, the one set of rows no frame and no
  local event triggers, so it sits beside :data:`TRANSITIONS` rather than in it). The destination cannot abort after
  its vote; the source's ABORT after COMMIT is sent only once the register recorded the abort.
- :data:`RUNNER` says, for every state, which end may run the VM; no pair of states the protocol can
  reach has both ends running (``tests/security/test_commit_table.py`` walks them all).

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
    """COMMIT sent: the source is paused and stays so until the register decides."""
    PREPARED = "prepared"
    """The destination voted: it holds a loaded, paused copy and waits for CONFIRM (or the register)."""
    CONFIRMED = "confirmed"
    """The register holds the new epoch and the source said so: the destination runs the VM."""
    IN_DOUBT = "in-doubt"
    """The link failed after COMMIT: this end's copy stays paused; only the location register ends this state."""
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
LINK_DEAD = TERMINAL | {State.IN_DOUBT}
"""States in which the connection neither sends nor receives (IN_DOUBT waits for the register, not the peer)."""
PRE_AUTHORIZATION = frozenset(
    {State.TLS_HANDSHAKE, State.AWAIT_SOURCE_HELLO, State.AWAIT_DESTINATION_HELLO, State.AWAIT_AUTHORIZATION}
)
"""States in which neither end has yet been told the operation is authorized."""
ABORTABLE_AFTER_TLS = frozenset(State) - LINK_DEAD - {State.TLS_HANDSHAKE}
"""ABORT may be sent in any of these states (it needs the TLS channel to travel), but see :func:`_may_abort`."""

S, D = Role.SOURCE, Role.DESTINATION

AFTER_COMMIT: dict[Role, frozenset[State]] = {
    S: frozenset({State.COMMITTING, State.PREPARED}),
    D: frozenset({State.PREPARED}),
}
"""Where a failure is ambiguous: the source has sent COMMIT, the destination has voted (PREPARED), and
neither knows the outcome. In CONFIRMED both know it (the register holds the new epoch)."""


def _may_abort(role: Role, state: State) -> bool:
    # The destination cannot take back its vote; the source may abort after COMMIT until it confirmed
    # (and only once the register recorded the abort: its caller's duty, see the module docstring).
    if role is D:
        return state in ABORTABLE_AFTER_TLS and state not in AFTER_COMMIT[D]
    return state in ABORTABLE_AFTER_TLS and state is not State.CONFIRMED


def _after_protocol_error(role: Role, state: State) -> State:
    if state in AFTER_COMMIT[role]:
        return State.IN_DOUBT
    return State.DONE if state is State.CONFIRMED else State.ERROR


def _may_abandon(role: Role, state: State) -> bool:
    # Giving up locally is not possible once the outcome is the register's to decide.
    return state not in LINK_DEAD and state not in AFTER_COMMIT[role] and state is not State.CONFIRMED


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
    # the commit: the destination votes, the source confirms once the register holds the new epoch,
    # the destination resumes and says so
    (D, State.COMMITTING, FrameType.PREPARED): State.PREPARED,
    (S, State.PREPARED, FrameType.CONFIRM): State.CONFIRMED,
    (D, State.CONFIRMED, FrameType.COMMITTED): State.DONE,
    # either end may abort once the TLS channel can carry the ABORT frame (not the destination after its vote) ...
    **{(role, state, FrameType.ABORT): State.ABORTED for role in Role for state in State if _may_abort(role, state)},
    # ... and may give up locally in any live state before its commit point (before TLS, nothing can be told)
    **{(role, state, Signal.ABANDON): State.ABORTED for role in Role for state in State if _may_abandon(role, state)},
    # a protocol error (a lost link is one) ends every state but ERROR itself, even one the offending frame
    # just ended; after the commit point it leaves the copy paused, IN_DOUBT, and only the register ends
    # that; once CONFIRMED both ends know the outcome (the final COMMITTED is only a courtesy)
    **{
        (role, state, Signal.PROTOCOL_ERROR): _after_protocol_error(role, state)
        for role in Role
        for state in State
        if state not in (State.ERROR, State.IN_DOUBT)
    },
}
"""Rule 1: (who, state, trigger) → next state. Anything absent is a protocol error for whoever caused it."""


RUNNER: dict[State, Role | None] = {
    **{state: S for state in State},
    State.COMMITTING: None,
    State.PREPARED: None,
    State.IN_DOUBT: None,
    State.CONFIRMED: D,
    State.DONE: D,
}
"""Which end may run a relocated VM while an end is in this state: an end runs its copy only when this
names it. ERROR is reached only before the commit point, so there the source runs; ABORTED after the
commit point is reached only on the register's (or the source's) abort. A copy, clone or template
leaves the source running whatever this says: the table speaks of relocations."""


class Outcome(enum.Enum):
    """The location register's answer about one move (see :mod:`.register`)."""

    MOVED = "moved"
    """The register holds the new epoch at the destination."""
    STAYED = "stayed"
    """The register recorded the move as aborted: it can never happen."""


REGISTER_ANSWERS: dict[tuple[State, Outcome], State] = {
    (State.IN_DOUBT, Outcome.MOVED): State.DONE,
    (State.IN_DOUBT, Outcome.STAYED): State.ABORTED,
}
"""The rows the register's answer triggers, for either end: nothing else leaves IN_DOUBT."""


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

    def decided(self, outcome: Outcome) -> None:
        """The register answered; LocalProtocolError unless this end is IN_DOUBT."""
        new = REGISTER_ANSWERS.get((self.state, outcome))
        if new is None:
            raise LocalProtocolError(f"the register's answer changes nothing in state {self.state.value}")
        self.state = new

    def signal(self, signal: Signal) -> None:
        """Something happened at this end; LocalProtocolError when the table does not allow it (our bug)."""
        new = next_state(self.role, self.state, signal)
        if new is None:
            raise LocalProtocolError(f"{signal.value} is not possible in state {self.state.value}")
        self.state = new
