"""What one migration did, as the simulator and the agents report it.

A plain record: storing and exporting it is :mod:`secmig.results`' job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from secmig.migration.precopy import RoundRecord


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """One migration, start to end. Times in seconds of simulated (or wall) time."""

    vm: str
    source: str
    destination: str
    strategy: str
    policy: str
    start_s: float
    end_s: float
    downtime_s: float
    """Tsd: from the VM's pause on the source to its resume on the destination (0 if aborted)."""
    converged: bool
    stop_reason: str
    outcome: str
    """``completed`` (runs on the destination) or ``aborted`` (still runs on the source)."""
    rounds: tuple[RoundRecord, ...] = field(default=())
    extra: dict[str, float] = field(default_factory=dict)
    """Strategy-specific figures (post-copy faults, auto-converge throttle, …)."""

    @property
    def total_time_s(self) -> float:
        """Tmr: from the start of the first round to the VM running on the destination (or the abort)."""
        return self.end_s - self.start_s

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes for r in self.rounds)

    @property
    def pages_sent(self) -> int:
        return sum(r.pages for r in self.rounds)

    @property
    def live_rounds(self) -> int:
        return sum(1 for r in self.rounds if r.live)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            total_time_s=self.total_time_s,
            bytes_sent=self.bytes_sent,
            pages_sent=self.pages_sent,
            live_rounds=self.live_rounds,
        )
        return d
