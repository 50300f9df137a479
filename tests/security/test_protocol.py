"""The migration protocol end to end: pre-copy over two in-memory connections, and its state rules."""

from __future__ import annotations

import os

import pytest
from security_helpers import PAGE, VM, Setup, run_precopy

from secmig.errors import LocalProtocolError
from secmig.security import (
    Aborted,
    Authorized,
    Committed,
    PageBatch,
    Role,
    RoundStart,
    State,
    memory_digest,
)
from secmig.security.frames import FrameType
from secmig.security.protocol import TRANSITIONS, next_state


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
    from secmig.security import Abort

    pair.send(Role.SOURCE, Abort("operator cancelled"))
    pair.pump()
    aborted = [e for e in pair.events[Role.DESTINATION] if isinstance(e, Aborted)]
    assert aborted and aborted[0].by_peer and "operator cancelled" in aborted[0].reason
    with pytest.raises(LocalProtocolError):
        pair.source.send(RoundStart(0))
