"""Pre-copy, stop-and-copy and post-copy as sans-IO state machines.

The driver (the simulator, or an agent over a real socket) calls :meth:`start`, sends what each action
says, and reports back: :meth:`round_done` with the pages dirtied meanwhile, :meth:`stop_and_copy_done`
once the last bytes are across, :meth:`push_done` once a post-copy push has ended. Round 0 sends all
used memory (untouched pages as zero-page markers); each later round sends the pages dirtied during the
one before; a :class:`StopPolicy` decides when to stop the VM and copy the rest, or to abort and leave it
running on the source.

Every change of :class:`Phase` goes through one table, :data:`TRANSITIONS` (as h11 keeps its states in
one table): a driver that calls a method out of turn gets a :class:`LocalProtocolError`. Why a
stop-and-copy was started is a :class:`StopReason`, not a string to parse.

This module does no I/O and keeps no clock: times are what the driver says they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from secmig.errors import LocalProtocolError
from secmig.migration.policy import StopPolicy
from secmig.model.analytic import PAGE_WIRE_BYTES, ZERO_PAGE_WIRE_BYTES
from secmig.model.units import PAGE_SIZE


class StopReason(Enum):
    """Why the live rounds ended; the human-readable ``reason`` beside it only explains."""

    CONVERGED = "converged"
    """What is pending fits the downtime budget, or fewer than Th pages are dirty."""
    FORCED = "forced"
    """A cap (rounds, data, time) was reached without converging: copy what is left anyway."""
    NON_LIVE = "non-live"
    """The stop-and-copy baseline: there were no live rounds."""
    POSTCOPY = "post-copy"
    """Send the CPU and device state only, resume on the destination, then push the pages it lacks."""


@dataclass(frozen=True, slots=True)
class SendRound:
    """Send a live round: the VM keeps running."""

    index: int
    pages: int
    zero_pages: int
    bytes: int


@dataclass(frozen=True, slots=True)
class StopAndCopyRound:
    """Pause the VM and send what is left plus its CPU and device state: the downtime starts."""

    index: int
    pages: int
    zero_pages: int
    bytes: int
    converged: bool
    reason: str
    stop: StopReason
    """What the strategy does once this round is across: finish, or continue in post-copy."""


@dataclass(frozen=True, slots=True)
class PostCopyPush:
    """The VM already runs on the destination: push the pages it lacks; it faults on the ones it needs first."""

    index: int
    pages: int
    zero_pages: int
    bytes: int
    remote_fraction: float
    """Share of the VM's working set still on the source when the push starts (1 for pure post-copy)."""


@dataclass(frozen=True, slots=True)
class Finished:
    """The VM runs on the destination."""

    converged: bool
    reason: str
    stop: StopReason


@dataclass(frozen=True, slots=True)
class AbortMigration:
    """The migration is given up; the VM keeps running on its source."""

    reason: str


Action = SendRound | StopAndCopyRound | PostCopyPush | Finished | AbortMigration


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round as it happened."""

    index: int
    start_s: float
    duration_s: float
    pages: int
    zero_pages: int
    bytes: int
    dirty_pages_after: int
    """Pages dirtied while this round was on the wire. Under round-end policies the next round sends
    exactly these; under QEMU's rule it also sends the pages this round left in the bitmap."""
    live: bool


class Phase(Enum):
    """Where a migration is; changed only through :data:`TRANSITIONS`."""

    NEW = "new"
    LIVE = "live"
    STOP_AND_COPY = "stop-and-copy"
    POSTCOPY = "post-copy"
    DONE = "done"
    ABORTED = "aborted"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.LIVE, Phase.STOP_AND_COPY, Phase.ABORTED}),
    Phase.LIVE: frozenset({Phase.STOP_AND_COPY, Phase.ABORTED}),
    Phase.STOP_AND_COPY: frozenset({Phase.DONE, Phase.POSTCOPY, Phase.ABORTED}),
    # A post-copy can still be given up by its driver (the VM then is wherever the driver left it).
    Phase.POSTCOPY: frozenset({Phase.DONE, Phase.ABORTED}),
    Phase.DONE: frozenset(),
    Phase.ABORTED: frozenset(),
}
"""Every phase change a strategy may make: the one place that says which follow which."""


class MigrationStrategy(Protocol):
    """What a driver needs of any strategy."""

    rounds: list[RoundRecord]
    phase: Phase
    throttle: float
    """Share of vCPU time taken from the guest (auto-converge); the guest dirties (1 − throttle) as fast."""
    extra: dict[str, float]

    def start(self, now_s: float) -> Action: ...

    def round_done(self, now_s: float, dirty_pages: int) -> Action: ...

    def stop_and_copy_done(self, now_s: float) -> Action: ...

    def push_done(self, now_s: float, remote_faults: float) -> Action: ...

    def abort(self, now_s: float, reason: str) -> AbortMigration: ...


def _pages(n_bytes: int) -> int:
    return math.ceil(n_bytes / PAGE_SIZE)


def _wire(pages: int, zero: int) -> int:
    """Wire bytes of ``pages`` pages of which ``zero`` are untouched."""
    return (pages - zero) * PAGE_WIRE_BYTES + zero * ZERO_PAGE_WIRE_BYTES


@dataclass(slots=True)
class _Base:
    ram_bytes: int
    used_bytes: int
    device_state_bytes: int = 0
    phase: Phase = Phase.NEW
    rounds: list[RoundRecord] = field(default_factory=list)
    start_s: float = 0.0
    throttle: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    _round_start_s: float = 0.0
    _pending: SendRound | StopAndCopyRound | PostCopyPush | None = None

    def _need(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise LocalProtocolError(
                f"migration is {self.phase.value}, not {'/'.join(p.value for p in phases)}"
            )

    def _enter(self, phase: Phase, now_s: float | None = None) -> None:
        """Move to ``phase`` if :data:`TRANSITIONS` allows it; with ``now_s`` a new round starts then."""
        if phase not in TRANSITIONS[self.phase]:
            raise LocalProtocolError(f"migration is {self.phase.value}; it cannot become {phase.value}")
        self.phase = phase
        if now_s is not None:
            self._round_start_s = now_s

    def _first_copy(self) -> tuple[int, int, int]:
        used = _pages(self.used_bytes)
        zero = max(_pages(self.ram_bytes) - used, 0)
        return used, zero, used * PAGE_WIRE_BYTES + zero * ZERO_PAGE_WIRE_BYTES

    def _record(self, now_s: float, dirty_after: int, live: bool) -> None:
        sent = self._pending
        assert sent is not None
        self.rounds.append(
            RoundRecord(
                index=sent.index,
                start_s=self._round_start_s,
                duration_s=now_s - self._round_start_s,
                pages=sent.pages,
                zero_pages=sent.zero_pages,
                bytes=sent.bytes,
                dirty_pages_after=dirty_after,
                live=live,
            )
        )

    def stop_and_copy_done(self, now_s: float) -> Action:
        """The paused round is across (and the VM's state): finish, or resume it and push in post-copy."""
        self._need(Phase.STOP_AND_COPY)
        paused = self._pending
        assert isinstance(paused, StopAndCopyRound)
        self._record(now_s, 0, live=False)
        if paused.stop is StopReason.POSTCOPY:
            self._enter(Phase.POSTCOPY, now_s)
            self._pending = self._postcopy_push()
            return self._pending
        self._enter(Phase.DONE)
        return Finished(paused.converged, paused.reason, paused.stop)

    def _postcopy_push(self) -> PostCopyPush:
        """The push that follows a switch to post-copy (only strategies that switch have one)."""
        raise LocalProtocolError(f"{type(self).__name__} has no post-copy push")

    def push_done(self, now_s: float, remote_faults: float) -> Action:
        """The post-copy push is across: every page is on the destination."""
        self._need(Phase.POSTCOPY)
        self._record(now_s, 0, live=True)
        self._enter(Phase.DONE)
        self.extra["remote_faults"] = remote_faults
        self.extra["degraded_s"] = self.rounds[-1].duration_s
        return Finished(True, "post-copy: every page is on the destination", StopReason.POSTCOPY)

    def abort(self, now_s: float, reason: str) -> AbortMigration:
        """Give the migration up; the VM keeps running where it is."""
        self._enter(Phase.ABORTED)
        return AbortMigration(reason)

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes for r in self.rounds)


@dataclass(slots=True)
class StopAndCopyMigration(_Base):
    """The non-live baseline: pause the VM, copy all of it, resume it on the destination."""

    def start(self, now_s: float) -> Action:
        self._need(Phase.NEW)
        self.start_s = now_s
        self._enter(Phase.STOP_AND_COPY, now_s)
        used, zero, nbytes = self._first_copy()
        self._pending = StopAndCopyRound(
            0, used, zero, nbytes + self.device_state_bytes, True, "non-live copy", StopReason.NON_LIVE
        )
        return self._pending

    def round_done(self, now_s: float, dirty_pages: int) -> Action:
        raise LocalProtocolError("stop-and-copy has no live rounds")


@dataclass(frozen=True, slots=True)
class AutoConverge:
    """QEMU's auto-converge: throttle the vCPUs when the guest dirties faster than pre-copy sends.

    At each bitmap sync, a period in which the bytes dirtied exceed ``trigger`` × the bytes sent counts
    as high; every second high period raises the throttle: ``initial`` first, then ``increment`` more,
    up to ``maximum`` (QEMU's cpu-throttle-initial 20, -increment 10, max 99, throttle-trigger-threshold 50).
    """

    initial: float = 0.20
    increment: float = 0.10
    maximum: float = 0.99
    trigger: float = 0.50


@dataclass(slots=True)
class PreCopyMigration(_Base):
    """Live pre-copy driven by a :class:`StopPolicy`, with optional auto-converge and post-copy switch.

    Each round is one period between two syncs of the dirty bitmap. With ``policy.check_in_round`` (QEMU)
    the stop test runs as pages are sent: at the first check (every ``sync_interval_s`` of sending) that
    finds fewer pages left in the bitmap than the downtime budget, the bitmap is synced and, if what is
    then pending fits, the VM stops. So a round ends with up to the budget's worth of pages unsent
    (``carry``), which the next round or the stop-and-copy sends, and near the end rounds shrink to one
    check interval each: the pending set drains at (bandwidth − dirty rate). Without it (Xen, the paper)
    every round sends its whole bitmap and the test runs at its end.
    """

    policy: StopPolicy = field(default_factory=lambda: StopPolicy(name="qemu", downtime_limit_s=0.3))
    auto_converge: AutoConverge | None = None
    bandwidth_hint_bytes_per_s: float = math.inf
    """The bandwidth expected before any is measured (the rate cap, or the path's speed)."""
    switchover_bandwidth_bytes_per_s: float | None = None
    """QEMU's avail-switchover-bandwidth: budget the downtime with this instead of the measured speed."""
    postcopy_after_rounds: int | None = None
    """Hybrid: after this many live rounds, stop and continue in post-copy instead."""
    sync_interval_s: float = 0.1
    """How much sending separates two of QEMU's checks of the budget (its 100 ms rate-limit period)."""
    working_set_pages: int = 0
    """Pages the guest writes to; a hybrid's remote faults hit the pending share of them."""
    _carry: int = 0
    _carry_zero: int = 0
    _carry_in_ws: float = 0.0
    _high_periods: int = 0
    _postcopy_pages: int = 0

    def _budget_pages(self, bandwidth: float) -> int | None:
        limit = self.policy.downtime_limit_s
        if limit is None:
            return None
        bw = self.switchover_bandwidth_bytes_per_s or bandwidth
        return int(bw * limit // PAGE_SIZE) if math.isfinite(bw) else None

    def _send(self, index: int, pending: int, zero: int, nbytes: int, bandwidth: float) -> SendRound:
        """Send ``pending`` pages (``zero`` of them untouched, ``nbytes`` on the wire in all)."""
        budget = self._budget_pages(bandwidth) if self.policy.check_in_round else None
        self._carry = self._carry_zero = 0
        self._carry_in_ws = 0.0
        if budget is None or pending <= 0:
            sent = SendRound(index, pending - zero, zero, nbytes)
        else:
            # QEMU syncs the bitmap at the first check (one per sync interval of sending) that finds
            # fewer pages left than the budget; those pages stay in the bitmap for the next round, with
            # their share of untouched pages (QEMU walks RAM in address order; we assume them spread).
            chunk = max(int(bandwidth * self.sync_interval_s // PAGE_SIZE), 1) if math.isfinite(bandwidth) else pending
            to_send = min(pending, max(pending - budget, chunk))
            share = to_send / pending
            zero_sent = round(zero * share)
            self._carry = pending - to_send
            self._carry_zero = zero - zero_sent
            # The carried pages that lie in the working set: after round 0 every pending page with data
            # was written by the guest; in round 0 the used pages hold the working set among others.
            carried_data = self._carry - self._carry_zero
            used = max(_pages(self.used_bytes), 1)
            ws = self.working_set_pages or used
            self._carry_in_ws = carried_data * min(ws / used, 1.0) if index == 0 else float(carried_data)
            sent = SendRound(index, to_send - zero_sent, zero_sent, round(nbytes * share))
        self._pending = sent
        return sent

    def start(self, now_s: float) -> Action:
        self._need(Phase.NEW)
        self.start_s = now_s
        self._enter(Phase.LIVE, now_s)
        used, zero, nbytes = self._first_copy()
        return self._send(0, used + zero, zero, nbytes, self.bandwidth_hint_bytes_per_s)

    def round_done(self, now_s: float, dirty_pages: int) -> Action:
        """The flow of this round is across; ``dirty_pages`` were dirtied since the last sync. What next?"""
        self._need(Phase.LIVE)
        assert isinstance(self._pending, SendRound)
        dirty_pages = max(int(dirty_pages), 0)
        self._record(now_s, dirty_pages, live=True)
        last = self.rounds[-1]
        # QEMU measures the bandwidth of the period just finished and budgets the downtime with it.
        bandwidth = last.bytes / last.duration_s if last.duration_s > 0 else self.bandwidth_hint_bytes_per_s
        # Pages dirtied meanwhile that were still pending count once: with writes spread over the working
        # set, a share carried-in-working-set ÷ working-set of them were already in the bitmap.
        ws = self.working_set_pages or _pages(self.ram_bytes)
        fresh = round(dirty_pages * (1.0 - min(self._carry_in_ws / ws, 1.0)))
        pending = min(self._carry + fresh, _pages(self.ram_bytes))
        # Untouched pages left in the bitmap stay cheap unless the guest wrote them meanwhile.
        zero = min(self._carry_zero, max(pending - dirty_pages, 0))
        self._auto_converge(dirty_pages, last.bytes)
        p = self.policy

        budget = self._budget_pages(bandwidth)
        if budget is not None and pending <= budget:
            return self._stop(
                now_s,
                pending,
                zero,
                True,
                f"converged: {pending} pending pages fit the {p.downtime_limit_s * 1e3:.0f} ms downtime limit"
                if p.downtime_limit_s is not None
                else "converged",
                bandwidth,
            )
        if p.dirty_pages_threshold is not None and pending < p.dirty_pages_threshold:
            return self._stop(
                now_s, pending, zero, True, f"converged: {pending} < {p.dirty_pages_threshold} dirty pages", bandwidth
            )

        if self.postcopy_after_rounds is not None and len(self.rounds) >= self.postcopy_after_rounds:
            return self._switch_to_postcopy(now_s, pending)

        cap = self._cap_reached(now_s)
        if cap is not None:
            if p.on_nonconvergence == "abort":
                return self.abort(now_s, f"did not converge: {cap}; VM left on source")
            return self._stop(now_s, pending, zero, False, f"forced stop-and-copy: {cap}", bandwidth)

        self._round_start_s = now_s
        return self._send(last.index + 1, pending, zero, _wire(pending, zero), bandwidth)

    def _auto_converge(self, dirty_pages: int, sent_bytes: int) -> None:
        ac = self.auto_converge
        if ac is None or dirty_pages * PAGE_SIZE <= ac.trigger * sent_bytes:
            return
        self._high_periods += 1
        if self._high_periods >= 2:
            self._high_periods = 0
            self.throttle = ac.initial if self.throttle == 0 else min(self.throttle + ac.increment, ac.maximum)
            self.extra["throttle"] = self.throttle

    def _cap_reached(self, now_s: float) -> str | None:
        p = self.policy
        live_rounds = len(self.rounds)
        if p.max_rounds is not None and live_rounds >= p.max_rounds:
            return f"{live_rounds} rounds (limit {p.max_rounds})"
        if p.max_data_factor is not None and self.bytes_sent >= p.max_data_factor * self.ram_bytes:
            return f"{self.bytes_sent / self.ram_bytes:.2f} × RAM sent (limit {p.max_data_factor:g} ×)"
        if now_s - self.start_s >= p.max_time_s:
            return f"{now_s - self.start_s:.0f} s of pre-copy (limit {p.max_time_s:.0f} s)"
        return None

    def _stop(
        self, now_s: float, pending: int, zero: int, converged: bool, reason: str, bandwidth: float
    ) -> Action:
        nbytes = _wire(pending, zero) + self.device_state_bytes
        limit = self.policy.abort_if_downtime_over_s
        if limit is not None and nbytes / bandwidth > limit:
            return self.abort(
                now_s,
                f"estimated downtime {nbytes / bandwidth * 1e3:.0f} ms over the {limit * 1e3:.0f} ms limit "
                f"({reason}); VM left on source",
            )
        self._enter(Phase.STOP_AND_COPY, now_s)
        stop = StopReason.CONVERGED if converged else StopReason.FORCED
        self._pending = StopAndCopyRound(len(self.rounds), pending - zero, zero, nbytes, converged, reason, stop)
        return self._pending

    # --- hybrid: pre-copy rounds, then post-copy ------------------------------------------------------

    def _switch_to_postcopy(self, now_s: float, pending: int) -> Action:
        self._postcopy_pages = pending
        self._enter(Phase.STOP_AND_COPY, now_s)
        reason = f"switched to post-copy after {len(self.rounds)} rounds with {pending} pages pending"
        self._pending = StopAndCopyRound(
            len(self.rounds), 0, 0, self.device_state_bytes, True, reason, StopReason.POSTCOPY
        )
        return self._pending

    def _postcopy_push(self) -> PostCopyPush:
        pages = self._postcopy_pages
        remote = min(pages / self.working_set_pages, 1.0) if self.working_set_pages else 1.0
        return PostCopyPush(len(self.rounds), pages, 0, pages * PAGE_WIRE_BYTES, remote)


@dataclass(slots=True)
class PostCopyMigration(_Base):
    """Post-copy: pause, send CPU and device state, resume on the destination, then push every page.

    The downtime is the state transfer alone, whatever the RAM; the VM then runs degraded, faulting on
    pages not yet pushed, until the background push has sent everything.
    """

    def start(self, now_s: float) -> Action:
        self._need(Phase.NEW)
        self.start_s = now_s
        self._enter(Phase.STOP_AND_COPY, now_s)
        self._pending = StopAndCopyRound(
            0, 0, 0, self.device_state_bytes, True, "post-copy: state sent first", StopReason.POSTCOPY
        )
        return self._pending

    def round_done(self, now_s: float, dirty_pages: int) -> Action:
        raise LocalProtocolError("post-copy has no live pre-copy rounds")

    def _postcopy_push(self) -> PostCopyPush:
        used, zero, nbytes = self._first_copy()
        return PostCopyPush(1, used, zero, nbytes, 1.0)
