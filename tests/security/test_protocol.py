"""The migration protocol end to end: pre-copy over two in-memory connections, and its state rules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from security_helpers import PAGE, VM, Setup, run_precopy

from secmig.errors import AuthorizationError, LocalProtocolError, RemoteProtocolError
from secmig.security import (
    Abort,
    Aborted,
    Authorized,
    ClusterTrust,
    Committed,
    MigrationConnection,
    MigrationRequest,
    PageBatch,
    Role,
    RoundStart,
    State,
    memory_digest,
)
from secmig.security.frames import FrameType
from secmig.security.handshake import SourceHello
from secmig.security.loopback import ConnectionPair
from secmig.security.state import TRANSITIONS, ConnectionState, Signal, Trigger, next_state


def test_precopy_migration_digests_match(setup: Setup) -> None:
    """A buffer dirtied between rounds arrives whole: the destination's memory digest equals the source's."""
    pair = setup.pair(setup.grant())
    events = pair.pump()
    assert [type(e) for e in events] == [Authorized, Authorized]
    memory = bytearray(os.urandom(setup.page_count * PAGE))
    dest = run_precopy(pair, memory, PAGE, rounds=4)
    assert memory_digest(dest, PAGE) == memory_digest(memory, PAGE)
    assert dest == memory
    assert pair.source.state is State.DONE and pair.destination.state is State.DONE
    assert any(isinstance(e, Committed) for e in pair.events[Role.SOURCE])
    assert "migration.committed:allow" in setup.destination_audit.events()
    assert "grant.used:allow" in setup.destination_audit.events()


def test_new_binding_recorded_on_commit(setup: Setup) -> None:
    """After commit the destination registry holds the VM's next epoch, making the old binding stale."""
    pair = setup.pair(setup.grant())
    pair.pump()
    run_precopy(pair, bytearray(setup.page_count * PAGE), PAGE, rounds=1)
    assert setup.bindings.latest_epoch(VM) == 1


def test_pages_before_authorized_are_impossible(setup: Setup) -> None:
    """Sending a page before AUTHORIZED raises LocalProtocolError, whatever the state before it."""
    pair = setup.pair(setup.grant())
    with pytest.raises(LocalProtocolError):
        pair.source.send(PageBatch(0, (0,), bytes(PAGE)))
    with pytest.raises(LocalProtocolError):
        pair.source.send(RoundStart(0))
    assert pair.bytes_sent(Role.SOURCE) == 0


def test_state_table_admits_pages_only_after_authorized() -> None:
    """Rule 1: every state that admits PAGE_BATCH is reachable only through the AUTHORIZED frame."""
    page_states = {state for (_, state, frame) in TRANSITIONS if frame is FrameType.PAGE_BATCH}
    reachable = {State.TLS_HANDSHAKE, State.AWAIT_SOURCE_HELLO}
    frontier = list(reachable)
    while frontier:
        state = frontier.pop()
        for (_, s, frame), new in TRANSITIONS.items():
            if s is state and frame is not FrameType.AUTHORIZED and new not in reachable:
                reachable.add(new)
                frontier.append(new)
    assert page_states and not (page_states & reachable)
    assert next_state(Role.SOURCE, State.AWAIT_AUTHORIZATION, FrameType.PAGE_BATCH) is None


def test_local_abort_reaches_peer(setup: Setup) -> None:
    """An abort requested mid-migration reaches the destination as Aborted(by_peer=True)."""
    pair = setup.pair(setup.grant())
    pair.pump()
    pair.send(Role.SOURCE, Abort("operator cancelled"))
    pair.pump()
    aborted = [e for e in pair.events[Role.DESTINATION] if isinstance(e, Aborted)]
    assert aborted and aborted[0].by_peer and "operator cancelled" in aborted[0].reason
    with pytest.raises(LocalProtocolError):
        pair.source.send(RoundStart(0))


# -- the state table: every transition in it, and nothing beside it -------------------------------------


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", list(State))
def test_every_trigger_in_every_state_follows_the_table(role: Role, state: State) -> None:
    """Each row of the table moves ConnectionState; each absent one raises Local (own act) or Remote (peer's)."""
    triggers: list[Trigger] = [*FrameType, *Signal]
    for trigger in triggers:
        expected = next_state(role, state, trigger)
        mine = ConnectionState(role)
        mine.state = state
        act = mine.signal if isinstance(trigger, Signal) else mine.sent
        if expected is None:
            with pytest.raises(LocalProtocolError):
                act(trigger)  # type: ignore[arg-type]
        else:
            act(trigger)  # type: ignore[arg-type]
        assert mine.state is (expected or state)
        if isinstance(trigger, Signal):
            continue
        theirs = ConnectionState(role.peer)  # receives what ``role`` sends
        theirs.state = state
        if expected is None:
            with pytest.raises(RemoteProtocolError):
                theirs.received(trigger)
        else:
            theirs.received(trigger)
        assert theirs.state is (expected or state)


@pytest.fixture
def walked(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[tuple[Role, State, Trigger]]]:
    """Every table row the connections use while the test runs, as (who, state, trigger)."""
    used: set[tuple[Role, State, Trigger]] = set()

    def record(kind: str) -> None:
        original = getattr(ConnectionState, kind)

        def wrapper(self: ConnectionState, trigger: Trigger) -> None:
            who = self.role.peer if kind == "received" else self.role
            before = self.state
            original(self, trigger)
            used.add((who, before, trigger))

        monkeypatch.setattr(ConnectionState, kind, wrapper)

    for kind in ("sent", "received", "signal"):
        record(kind)
    yield used


def test_migration_walks_every_forward_row(setup: Setup, walked: set[tuple[Role, State, Trigger]]) -> None:
    """A pre-copy migration moves both ends through every non-abort row of the table, and through nothing else."""
    pair = setup.pair(setup.grant())
    pair.pump()
    run_precopy(pair, bytearray(os.urandom(setup.page_count * PAGE)), PAGE, rounds=2)
    forward = {key for key in TRANSITIONS if key[2] not in (FrameType.ABORT, Signal.ABANDON, Signal.PROTOCOL_ERROR)}
    assert walked == forward


def test_refusal_abort_and_error_go_through_the_table(setup: Setup, walked: set[tuple[Role, State, Trigger]]) -> None:
    """Refusing, aborting and failing move the connections only by table rows (ABORT, ABANDON, PROTOCOL_ERROR)."""
    refused = setup.pair(None)  # no grant: the destination refuses and tells the source
    refused.pump()
    assert (Role.DESTINATION, State.AWAIT_DESTINATION_HELLO, FrameType.ABORT) in walked
    authorized = setup.pair(setup.grant())
    authorized.pump()
    authorized.send(Role.SOURCE, RoundStart(0))
    authorized.pump()
    authorized.source._tls.send(bytes([0xEE, 0, 0, 0, 0]))  # test-only: an unknown frame from a rogue source
    authorized.destination.receive_data(authorized.source.data_to_send())
    with pytest.raises(RemoteProtocolError):
        authorized.destination.next_event()
    assert authorized.destination.state is State.ERROR
    assert (Role.DESTINATION, State.ABORTED, Signal.PROTOCOL_ERROR) in walked  # it sent ABORT, then died
    unstarted = setup.pair(setup.grant())
    unstarted.send(Role.SOURCE, Abort("before TLS"))
    assert (Role.SOURCE, State.TLS_HANDSHAKE, Signal.ABANDON) in walked
    assert walked <= TRANSITIONS.keys()


def test_state_is_read_only(setup: Setup) -> None:
    """No code outside the table moves a connection: its state cannot be assigned."""
    pair = setup.pair(setup.grant())
    with pytest.raises(AttributeError):
        pair.source.state = State.AUTHORIZED  # type: ignore[misc]


# -- the injected authorizer ---------------------------------------------------------------------------


class _RecordingAuthorizer:
    """An authorizer that refuses or allows everything, and remembers what it was asked."""

    def __init__(self, *, allow: bool) -> None:
        self.allow = allow
        self.asked: list[tuple[SourceHello, str]] = []
        self.commits: list[Authorized] = []

    def authorize(self, hello: SourceHello, *, destination_host: str, trust: ClusterTrust, now: float) -> None:
        self.asked.append((hello, destination_host))
        if not self.allow:
            raise AuthorizationError("the custom policy says no")

    def committed(self, authorized: Authorized) -> None:
        self.commits.append(authorized)


def _pair_with(setup: Setup, authorizer: _RecordingAuthorizer, request: MigrationRequest) -> ConnectionPair:
    source = MigrationConnection.source(
        setup.cluster.host_identity(setup.source_host), setup.cluster.trust, request, audit=setup.source_audit
    )
    destination = MigrationConnection.destination(
        setup.cluster.host_identity(setup.destination_host),
        setup.cluster.trust,
        audit=setup.destination_audit,
        authorizer=authorizer,
    )
    return ConnectionPair(source, destination)


def test_custom_authorizer_refusal_is_final(setup: Setup) -> None:
    """An injected authorizer is consulted with the authenticated hello; its refusal aborts even a valid grant."""
    authorizer = _RecordingAuthorizer(allow=False)
    request = MigrationRequest(setup.operation, VM, PAGE, setup.page_count, setup.grant(), setup.binding())
    pair = _pair_with(setup, authorizer, request)
    pair.pump()
    [(hello, destination_host)] = authorizer.asked
    assert hello.request == request and hello.vsignature.host_id == setup.source_host
    assert destination_host == setup.destination_host
    aborted = [e for e in pair.events[Role.SOURCE] if isinstance(e, Aborted)]
    assert aborted and aborted[0].code.name == "AUTHORIZATION" and "custom policy" in aborted[0].reason
    assert not any(isinstance(e, Authorized) for e in pair.events[Role.DESTINATION])
    assert "grant.refused:refuse" in setup.destination_audit.events()


def test_custom_authorizer_may_allow_without_grant(setup: Setup) -> None:
    """The grant policy lives in the authorizer: one that allows lets a grantless migration commit, and hears of it."""
    authorizer = _RecordingAuthorizer(allow=True)
    request = MigrationRequest(setup.operation, VM, PAGE, setup.page_count, None, None)
    pair = _pair_with(setup, authorizer, request)
    pair.pump()
    memory = bytearray(os.urandom(setup.page_count * PAGE))
    assert run_precopy(pair, memory, PAGE, rounds=1) == memory
    assert pair.destination.state is State.DONE
    assert [a.vm_id for a in authorizer.commits] == [VM]
    assert "grant.used:allow" not in setup.destination_audit.events()


def test_destination_needs_an_authorizer(setup: Setup) -> None:
    """Without an authorizer nor the default's nonce store and registry, a destination cannot be made."""
    with pytest.raises(LocalProtocolError):
        MigrationConnection.destination(
            setup.cluster.host_identity(setup.destination_host), setup.cluster.trust, audit=setup.destination_audit
        )
