"""The commit's state table: every interleaving, lost message and register answer leaves at most one runner."""

from __future__ import annotations

from dataclasses import dataclass, replace

from secmig.security.frames import FrameType
from secmig.security.state import (
    AFTER_COMMIT,
    REGISTER_ANSWERS,
    RUNNER,
    TRANSITIONS,
    Outcome,
    Role,
    Signal,
    State,
)

S, D = Role.SOURCE, Role.DESTINATION


@dataclass(frozen=True)
class World:
    """Both ends, the frames in flight each way (FIFO), whether the link is up, and the register's record."""

    src: State
    dst: State
    to_dst: tuple[FrameType, ...] = ()
    to_src: tuple[FrameType, ...] = ()
    link: bool = True
    register: Outcome | None = None


def _moves(w: World) -> list[World]:
    out: list[World] = []
    # The source: COMMIT; CONFIRM only once the register moved the VM; ABORT after COMMIT only once it kept it.
    sends = {State.STATE_TRANSFERRED: FrameType.COMMIT}
    if w.register is Outcome.MOVED:
        sends[State.PREPARED] = FrameType.CONFIRM
    if w.register is Outcome.STAYED:
        sends[State.COMMITTING] = sends[State.PREPARED] = FrameType.ABORT
    frame = sends.get(w.src)
    if frame is not None and w.link and (new := TRANSITIONS.get((S, w.src, frame))):
        out.append(replace(w, src=new, to_dst=(*w.to_dst, frame)))
    # The source commits at the register once the destination voted (compare-and-set: first decision wins).
    if w.src is State.PREPARED and w.register is None:
        out.append(replace(w, register=Outcome.MOVED))
    # The destination votes, and says its last word once confirmed.
    for state, frame in ((State.COMMITTING, FrameType.PREPARED), (State.CONFIRMED, FrameType.COMMITTED)):
        if w.dst is state and w.link:
            out.append(replace(w, dst=TRANSITIONS[(D, state, frame)], to_src=(*w.to_src, frame)))
    # Delivery of the oldest frame each way.
    if w.to_dst:
        new = TRANSITIONS.get((S, w.dst, w.to_dst[0]))
        assert new is not None, (w.dst, w.to_dst[0])
        out.append(replace(w, dst=new, to_dst=w.to_dst[1:]))
    if w.to_src:
        new = TRANSITIONS.get((D, w.src, w.to_src[0]))
        assert new is not None, (w.src, w.to_src[0])
        out.append(replace(w, src=new, to_src=w.to_src[1:]))
    # The link fails: what is in flight is lost, and each end sees it.
    if w.link:
        out.append(replace(w, link=False, to_dst=(), to_src=()))
    else:
        for role, state in ((S, w.src), (D, w.dst)):
            fail = TRANSITIONS.get((role, state, Signal.PROTOCOL_ERROR))
            if fail is not None and state not in (State.ABORTED, State.DONE):
                out.append(replace(w, src=fail) if role is S else replace(w, dst=fail))
    # An end in doubt asks the register, which records STAYED when nothing was decided.
    for role, state in ((S, w.src), (D, w.dst)):
        if state is State.IN_DOUBT:
            outcome = w.register or Outcome.STAYED
            new = REGISTER_ANSWERS[(state, outcome)]
            out.append(replace(w, register=outcome, **({"src": new} if role is S else {"dst": new})))
    return out


def _runners(w: World) -> int:
    return int(RUNNER[w.src] is S) + int(RUNNER[w.dst] is D)


def test_no_reachable_world_runs_the_vm_twice() -> None:
    """From the stop-and-copy on, no interleaving of sends, losses and register answers has two runners."""
    start = World(State.STATE_TRANSFERRED, State.STATE_TRANSFERRED)
    seen = {start}
    frontier = [start]
    while frontier:
        w = frontier.pop()
        assert _runners(w) <= 1, w
        for nxt in _moves(w):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert len(seen) > 30
    ended = [w for w in seen if not _moves(w)]
    assert ended and all(_runners(w) == 1 for w in ended), [w for w in ended if _runners(w) != 1]
    # Both outcomes are reachable: the table does not get its safety by never moving the VM.
    assert {Outcome.MOVED, Outcome.STAYED} <= {w.register for w in ended}


def test_after_the_commit_point_nothing_ends_without_the_register() -> None:
    """From a commit-point state, no local event leads to a state where an end would run its copy on its own."""
    for role in Role:
        for state in AFTER_COMMIT[role]:
            for signal in (Signal.ABANDON, Signal.PROTOCOL_ERROR):
                assert TRANSITIONS.get((role, state, signal)) in (None, State.IN_DOUBT)
    assert (D, State.PREPARED, FrameType.ABORT) not in TRANSITIONS  # a vote cannot be taken back
    assert {k[0] for k in REGISTER_ANSWERS} == {State.IN_DOUBT}
