"""The one pre-copy driver over the migration protocol: a sans-IO core and two thin links.

:class:`PreCopySender` drives the shared strategy (:class:`~secmig.migration.PreCopyMigration`, or
:class:`~secmig.migration.StopAndCopyMigration` for a non-live move) with a real :class:`PageSource`
(memory and its dirty bitmap): round 0 sends the pages that hold data (the destination starts zeroed,
as QEMU skips zero pages), each later round the pages the strategy says of those dirtied meanwhile,
and when the strategy says stop, the source is paused, what is left and the device state are sent,
and COMMIT carries the memory digest built from the per-page digests of what was sent. The core yields
the protocol events to send and says when it waits for the destination's vote (PREPARED); it never does
I/O. With ``confirm`` (the in-memory links, which run no location register) it then confirms at once
and waits for COMMITTED; without it (the agents) it stops at the vote, and the caller asks the register
before it confirms (see :mod:`secmig.security.state` for the commit).

Under a policy with QEMU's in-round rule (``check_in_round``), a round sends the number of pages the
strategy names, lowest page numbers first (QEMU walks its bitmap in address order), and carries the
rest into the next round or the stop-and-copy, exactly as the strategy's own bookkeeping assumes.

Two links run the core: :func:`drive_async` over anything with ``async send`` / ``async next_event``
(the agents' :class:`~secmig.agent.channel.SecureChannel`), and :func:`drive_sync` over a
:class:`LoopbackLink` — two in-memory :class:`~secmig.security.MigrationConnection` ends
(:class:`~secmig.security.loopback.ConnectionPair`), which the attack lab and the protocol tests use.

What it must not do: decide anything about security (the connection does), or release the source
(the caller does, once the register holds the new epoch).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from secmig.errors import ChannelClosed, IntegrityError, MigrationAborted, MigrationError
from secmig.migration import (
    AbortMigration,
    Finished,
    PreCopyMigration,
    SendRound,
    StopAndCopyMigration,
    StopAndCopyRound,
    StopPolicy,
)
from secmig.security import frames
from secmig.security.events import (
    Aborted,
    Commit,
    Committed,
    Confirm,
    DeviceState,
    PageBatch,
    Prepared,
    ReceivedEvent,
    Role,
    RoundEnd,
    RoundStart,
    SendableEvent,
    StopAndCopy,
)
from secmig.security.loopback import ConnectionPair
from secmig.security.state import RUNNER

Pages = npt.NDArray[np.intp]
COMMIT_TIMEOUT_S = 30.0


class PageSource(Protocol):
    """A VM's memory as pre-copy sees it: pages, a dirty bitmap, pause and resume, device state."""

    @property
    def page_size(self) -> int: ...

    @property
    def page_count(self) -> int: ...

    def nonzero_pages(self) -> Pages:
        """The pages round 0 must send (every page that may differ from a zero page)."""
        ...

    def sync_dirty(self) -> Pages:
        """The pages dirtied since the last sync, in ascending order; clears their marks."""
        ...

    def read_pages(self, pages: Pages) -> bytes:
        """The contents of ``pages``, concatenated in that order."""
        ...

    def pause(self) -> None:
        """Stop dirtying pages (returns once no write is in flight)."""
        ...

    def resume(self) -> None:
        """Dirty pages again after a pause (the migration did not complete)."""
        ...

    def device_state(self) -> bytes:
        """The CPU and device state sent after the last pages."""
        ...


@dataclass(frozen=True, slots=True)
class AwaitCommitted:
    """The core waits for the destination's answer to COMMIT (send it the next received event)."""

    timeout_s: float


Step = SendableEvent | AwaitCommitted


def _nothing() -> None:
    return None


def _ignore(_: float) -> None:
    return None


@dataclass(frozen=True, slots=True)
class SendHooks:
    """Where the caller hears about the migration as it goes (the agent's handle; no-ops by default)."""

    check: Callable[[], None] = _nothing
    """Called before each page batch and before the pause: raise to stop (an abort was requested)."""
    paused: Callable[[float], None] = _ignore
    """The source was paused at this monotonic time (the downtime starts)."""


@dataclass(slots=True)
class PreCopySender:
    """The source side of one pre-copy (or non-live stop-and-copy) over the protocol, sans I/O."""

    source: PageSource
    policy: StopPolicy
    live: bool = True
    batch_pages: int = 512
    first_round: int = 0
    """Protocol round number of the strategy's round 0 (the agents spend round 0 on their manifest)."""
    resend: Sequence[int] = ()
    """Page slots round 0 sends even when zero (the agents' manifest slot, so the digest covers the VM)."""
    commit_timeout_s: float = COMMIT_TIMEOUT_S
    confirm: bool = True
    """Confirm as soon as the destination voted (no register: in-memory links); False stops at the vote."""
    memory_digest: Callable[[], bytes] | None = None
    """When given: the source's whole-memory digest, checked against what was sent before COMMIT."""
    hooks: SendHooks = field(default_factory=SendHooks)
    clock: Callable[[], float] = time.monotonic
    # Outcome, filled in as the migration goes.
    strategy: PreCopyMigration | StopAndCopyMigration | None = None
    outcome: Finished | None = None
    payload_bytes: int = 0
    paused_at: float | None = None
    downtime_s: float | None = None
    digest: bytes = b""
    started_at: float = 0.0
    table: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.table = frames.zero_page_table(self.source.page_size, self.source.page_count)

    @property
    def rounds_sent(self) -> int:
        """Rounds on the wire so far, the stop-and-copy included."""
        return 0 if self.strategy is None else len(self.strategy.rounds)

    def recover(self) -> None:
        """After a failure: the source runs again (the VM stays where it was)."""
        if self.paused_at is not None:
            self.source.resume()
            self.paused_at = None

    def _pause(self) -> None:
        self.hooks.check()
        self.source.pause()
        self.paused_at = self.clock()
        self.hooks.paused(self.paused_at)

    def _batches(self, round_no: int, pages: Pages) -> Generator[Step, ReceivedEvent | None, None]:
        rows = np.frombuffer(self.table, dtype=np.uint8).reshape(-1, frames.DIGEST_BYTES)
        page_size = self.source.page_size
        for i in range(0, len(pages), self.batch_pages):
            self.hooks.check()
            chunk = pages[i : i + self.batch_pages]
            data = self.source.read_pages(chunk)
            digests = frames.page_digests(data, page_size)
            rows[chunk] = np.frombuffer(digests, dtype=np.uint8).reshape(-1, frames.DIGEST_BYTES)
            self.payload_bytes += len(data)
            yield PageBatch(round_no, tuple(chunk.tolist()), data, digests)

    def steps(self) -> Generator[Step, ReceivedEvent | None, Finished]:
        """The events to send, in order; after an :class:`AwaitCommitted`, send in the event received."""
        src = self.source
        self.started_at = t0 = self.clock()

        def now() -> float:
            return self.clock() - t0

        if not self.live:
            self._pause()
        pages: Pages = np.union1d(src.nonzero_pages(), np.asarray(self.resend, dtype=np.intp))
        device_bytes = len(src.device_state())
        ram = src.page_size * src.page_count
        used = len(pages) * src.page_size
        strategy: PreCopyMigration | StopAndCopyMigration
        if self.live:
            strategy = PreCopyMigration(ram, used, device_bytes, policy=self.policy)
        else:
            strategy = StopAndCopyMigration(ram, used, device_bytes)
        self.strategy = strategy
        src.sync_dirty()  # dirty logging starts now: every later write is resent
        action = strategy.start(now())
        round_no = self.first_round
        carry: Pages = np.empty(0, dtype=np.intp)
        while True:
            if isinstance(action, SendRound):
                pending = np.union1d(carry, pages)
                # QEMU's in-round rule: the strategy names how many pages this round sends; the rest wait.
                n = action.pages + action.zero_pages
                send, carry = (pending[:n], pending[n:]) if n < len(pending) else (pending, carry[:0])
                yield RoundStart(round_no)
                yield from self._batches(round_no, send)
                yield RoundEnd(round_no)
                pages = src.sync_dirty()
                round_no += 1
                action = strategy.round_done(now(), len(pages))
            elif isinstance(action, StopAndCopyRound):
                if self.paused_at is None:
                    self._pause()
                final = np.union1d(np.union1d(carry, pages), src.sync_dirty()) if self.live else pages
                yield StopAndCopy()
                yield from self._batches(round_no, final)
                yield DeviceState(src.device_state())
                self.digest = frames.memory_digest_from_table(self.table, src.page_size)
                if self.memory_digest is not None and self.memory_digest() != self.digest:
                    raise IntegrityError("source memory changed after it was sent (dirty tracking lost a write)")
                yield Commit(self.digest)
                answer = yield AwaitCommitted(self.commit_timeout_s)
                _expect(answer, Prepared)
                if self.confirm:
                    yield Confirm(self.digest)
                    _expect((yield AwaitCommitted(self.commit_timeout_s)), Committed)
                assert self.paused_at is not None
                self.downtime_s = self.clock() - self.paused_at
                action = strategy.stop_and_copy_done(now())
            elif isinstance(action, Finished):
                self.outcome = action
                return action
            elif isinstance(action, AbortMigration):
                raise MigrationAborted(action.reason)
            else:  # pragma: no cover - pre-copy never pushes
                raise MigrationError(f"unexpected strategy action {action!r}")


def _expect(answer: ReceivedEvent | None, kind: type[Prepared] | type[Committed]) -> None:
    if isinstance(answer, Aborted):
        raise answer.as_error()
    if not isinstance(answer, kind):
        got = "nothing" if answer is None else type(answer).__name__
        raise MigrationError(f"expected {kind.__name__.upper()}, got {got}")


class AsyncLink(Protocol):
    """What :func:`drive_async` needs of a channel (a :class:`~secmig.agent.channel.SecureChannel`)."""

    async def send(self, event: SendableEvent) -> None: ...

    async def next_event(self, timeout_s: float | None = None) -> ReceivedEvent: ...


async def drive_async(
    sender: PreCopySender, link: AsyncLink, *, after_batch: Callable[[int], Awaitable[None]] | None = None
) -> Finished:
    """Run ``sender`` over an asyncio link; ``after_batch(nbytes)`` paces and yields after each page batch."""
    steps = sender.steps()
    reply: ReceivedEvent | None = None
    while True:
        try:
            step = steps.send(reply)
        except StopIteration as stop:
            result: Finished = stop.value
            return result
        reply = None
        if isinstance(step, AwaitCommitted):
            reply = await link.next_event(step.timeout_s)
            continue
        await link.send(step)
        if after_batch is not None and isinstance(step, PageBatch):
            await after_batch(len(step.data))


class LoopbackLink:
    """The source end of a :class:`ConnectionPair`, pumped after every send; the caller plays the destination.

    ``on_destination`` sees every event the destination end produces (pages, COMMIT, …) as it arrives and
    may answer through the pair (e.g. send COMMITTED).
    """

    def __init__(self, pair: ConnectionPair, on_destination: Callable[[ReceivedEvent], None] | None = None) -> None:
        self.pair = pair
        self.on_destination = on_destination
        self._seen = {role: len(pair.events[role]) for role in Role}

    def _pump(self) -> None:
        self.pair.pump()
        dst = self.pair.events[Role.DESTINATION]
        while self._seen[Role.DESTINATION] < len(dst):
            event = dst[self._seen[Role.DESTINATION]]
            self._seen[Role.DESTINATION] += 1
            if self.on_destination is not None:
                self.on_destination(event)
                self.pair.pump()

    def send(self, event: SendableEvent) -> None:
        """The source sends ``event``; the link settles."""
        self.pair.send(Role.SOURCE, event)
        self._pump()

    def next_event(self) -> ReceivedEvent:
        """The source's next received event; ChannelClosed when the link settled without one."""
        self._pump()
        src = self.pair.events[Role.SOURCE]
        if self._seen[Role.SOURCE] >= len(src):
            raise ChannelClosed("the destination did not answer")
        event = src[self._seen[Role.SOURCE]]
        self._seen[Role.SOURCE] += 1
        return event


def drive_sync(sender: PreCopySender, link: LoopbackLink) -> Finished:
    """Run ``sender`` over an in-memory link; on failure the source is resumed and the error raised — unless
    the failure came after the commit point, where the state table lets nobody run the VM (there is no
    register on an in-memory link to decide: the lab's VM stays paused)."""
    steps = sender.steps()
    reply: ReceivedEvent | None = None
    try:
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as stop:
                result: Finished = stop.value
                return result
            reply = link.next_event() if isinstance(step, AwaitCommitted) else None
            if not isinstance(step, AwaitCommitted):
                link.send(step)
    except BaseException:
        if RUNNER[link.pair.source.state] is Role.SOURCE:
            sender.recover()
        raise


__all__ = [
    "AsyncLink",
    "AwaitCommitted",
    "LoopbackLink",
    "PageSource",
    "PreCopySender",
    "SendHooks",
    "drive_async",
    "drive_sync",
]
