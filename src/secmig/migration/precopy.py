"""Pre-copy and stop-and-copy as state machines.

The driver (the simulator, or an agent over a real socket) calls :meth:`start`, sends what each action
says, and reports back: :meth:`round_done` with the pages dirtied meanwhile, :meth:`stop_and_copy_done`
once the last bytes are across. Round 0 sends all used memory (untouched pages as zero-page markers);
each later round sends the pages dirtied during the one before; a :class:`StopPolicy` decides when to
stop the VM and copy the rest, or to abort and leave it running on the source.
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


@dataclass(frozen=True, slots=True)
class SendRound:
    """Send a live round: the VM keeps running."""

    index: int
    pages: int
    zero_pages: int
    bytes: int


@dataclass(frozen=True, slots=True)
class StopAndCopy:
    """Pause the VM and send what is left plus its CPU and device state: the downtime starts."""

    index: int
    pages: int
    zero_pages: int
    bytes: int
    converged: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The VM runs on the destination."""

    converged: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Aborted:
    """The migration is given up; the VM keeps running on its source."""

    reason: str


Action = SendRound | StopAndCopy | Finished | Aborted


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
    """Pages dirtied while this round was on the wire (what the next round must send)."""
    live: bool


class Phase(Enum):
    NEW = "new"
    LIVE = "live"
    STOP_AND_COPY = "stop-and-copy"
    DONE = "done"
    ABORTED = "aborted"


class MigrationStrategy(Protocol):
    """What a driver needs of any strategy."""

    rounds: list[RoundRecord]

    def start(self, now_s: float) -> Action: ...

    def round_done(self, now_s: float, dirty_pages: int) -> Action: ...

    def stop_and_copy_done(self, now_s: float) -> Action: ...

    def abort(self, now_s: float, reason: str) -> Aborted: ...


def _pages(n_bytes: int) -> int:
    return math.ceil(n_bytes / PAGE_SIZE)


@dataclass(slots=True)
class _Base:
    ram_bytes: int
    used_bytes: int
    device_state_bytes: int = 0
    phase: Phase = Phase.NEW
    rounds: list[RoundRecord] = field(default_factory=list)
    start_s: float = 0.0
    _round_start_s: float = 0.0
    _pending: SendRound | StopAndCopy | None = None

    def _need(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise LocalProtocolError(
                f"migration is {self.phase.value}, not {'/'.join(p.value for p in phases)}"
            )

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
        self._need(Phase.STOP_AND_COPY)
        assert isinstance(self._pending, StopAndCopy)
        self._record(now_s, 0, live=False)
        self.phase = Phase.DONE
        return Finished(self._pending.converged, self._pending.reason)

    def abort(self, now_s: float, reason: str) -> Aborted:
        self._need(Phase.NEW, Phase.LIVE, Phase.STOP_AND_COPY)
        self.phase = Phase.ABORTED
        return Aborted(reason)

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes for r in self.rounds)


@dataclass(slots=True)
class StopAndCopyMigration(_Base):
    """The non-live baseline: pause the VM, copy all of it, resume it on the destination."""

    def start(self, now_s: float) -> Action:
        self._need(Phase.NEW)
        self.start_s = self._round_start_s = now_s
        used, zero, nbytes = self._first_copy()
        self.phase = Phase.STOP_AND_COPY
        self._pending = StopAndCopy(0, used, zero, nbytes + self.device_state_bytes, True, "non-live copy")
        return self._pending

    def round_done(self, now_s: float, dirty_pages: int) -> Action:
        raise LocalProtocolError("stop-and-copy has no live rounds")


@dataclass(slots=True)
class PreCopyMigration(_Base):
    """Live pre-copy driven by a :class:`StopPolicy`."""

    policy: StopPolicy = field(default_factory=lambda: StopPolicy(name="qemu", downtime_limit_s=0.3))

    def start(self, now_s: float) -> Action:
        self._need(Phase.NEW)
        self.start_s = self._round_start_s = now_s
        used, zero, nbytes = self._first_copy()
        self.phase = Phase.LIVE
        self._pending = SendRound(0, used, zero, nbytes)
        return self._pending

    def round_done(self, now_s: float, dirty_pages: int) -> Action:
        """The round on the wire is across; ``dirty_pages`` were dirtied meanwhile. What next?"""
        self._need(Phase.LIVE)
        assert isinstance(self._pending, SendRound)
        dirty_pages = max(int(dirty_pages), 0)
        self._record(now_s, dirty_pages, live=True)
        last = self.rounds[-1]
        # QEMU measures the bandwidth of the iteration just finished and budgets the downtime with it.
        bandwidth = last.bytes / last.duration_s if last.duration_s > 0 else math.inf
        remaining = dirty_pages * PAGE_WIRE_BYTES
        p = self.policy

        if p.downtime_limit_s is not None and remaining / bandwidth <= p.downtime_limit_s:
            return self._stop(
                now_s,
                dirty_pages,
                True,
                f"converged: {dirty_pages} dirty pages fit the "
                f"{p.downtime_limit_s * 1e3:.0f} ms downtime limit",
                bandwidth,
            )
        if p.dirty_pages_threshold is not None and dirty_pages < p.dirty_pages_threshold:
            return self._stop(
                now_s,
                dirty_pages,
                True,
                f"converged: {dirty_pages} < {p.dirty_pages_threshold} dirty pages",
                bandwidth,
            )

        cap = self._cap_reached(now_s)
        if cap is not None:
            if p.on_nonconvergence == "abort":
                return self.abort(now_s, f"did not converge: {cap}; VM left on source")
            return self._stop(now_s, dirty_pages, False, f"forced stop-and-copy: {cap}", bandwidth)

        self._round_start_s = now_s
        self._pending = SendRound(last.index + 1, dirty_pages, 0, remaining)
        return self._pending

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

    def _stop(self, now_s: float, dirty_pages: int, converged: bool, reason: str, bandwidth: float) -> Action:
        nbytes = dirty_pages * PAGE_WIRE_BYTES + self.device_state_bytes
        limit = self.policy.abort_if_downtime_over_s
        if limit is not None and nbytes / bandwidth > limit:
            return self.abort(
                now_s,
                f"estimated downtime {nbytes / bandwidth * 1e3:.0f} ms over the {limit * 1e3:.0f} ms limit "
                f"({reason}); VM left on source",
            )
        self.phase = Phase.STOP_AND_COPY
        self._round_start_s = now_s
        self._pending = StopAndCopy(len(self.rounds), dirty_pages, 0, nbytes, converged, reason)
        return self._pending
