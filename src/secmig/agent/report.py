"""What one real migration did, and the handle through which the monitor or an operator can stop it.

:class:`MigrationReport` is what ``secmig migrate`` prints and tests assert on: the shared
:class:`~secmig.migration.result.MigrationResult` (rounds included) with what only a real migration has.
:class:`MigrationHandle` is the live side: byte counters the monitor samples, and ``request_abort``
which the sending loop checks between page batches. No I/O.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from secmig.errors import MigrationAborted
from secmig.migration import RoundRecord
from secmig.migration.result import MigrationResult
from secmig.security.events import Role
from secmig.security.grants import Grant
from secmig.security.policy import Operation

_FLOW_IDS = itertools.count(1)
Figure = float | int | str | bool | None


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """One real migration, seen from the source: the shared :class:`MigrationResult` and what only a real
    migration has (the operation, the driver and data plane, bytes on the wire, the committed digest).

    Times in seconds of wall time. ``to_json`` is flat (what ``secmig migrate`` prints); ``round_log``
    holds the result's rounds.
    """

    result: MigrationResult
    operation: str
    driver: str
    data_plane: str
    wire_bytes: int
    """Bytes the source put on the authenticated channel (TLS records included)."""
    payload_bytes: int
    """Memory (in-memory VMs) or QEMU migration stream bytes carried."""
    memory_digest: str | None = None
    extra: dict[str, Figure] = field(default_factory=dict)
    """Driver-specific measurements (QEMU's own figures, guest writes, …)."""

    @property
    def vm(self) -> str:
        return self.result.vm

    @property
    def source(self) -> str:
        return self.result.source

    @property
    def destination(self) -> str:
        return self.result.destination

    @property
    def outcome(self) -> str:
        """``completed`` (the destination has it) or ``aborted`` (the VM still runs on its source)."""
        return self.result.outcome

    @property
    def reason(self) -> str:
        return self.result.stop_reason

    @property
    def total_time_s(self) -> float:
        return self.result.total_time_s

    @property
    def downtime_s(self) -> float | None:
        """From the VM's pause on the source to the destination's COMMITTED (None unless completed)."""
        return self.result.downtime_s if self.result.outcome == "completed" else None

    @property
    def rounds(self) -> int:
        """Rounds, the stop-and-copy included."""
        return len(self.result.rounds)

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "vm": r.vm,
            "source": r.source,
            "destination": r.destination,
            "operation": self.operation,
            "driver": self.driver,
            "data_plane": self.data_plane,
            "outcome": r.outcome,
            "reason": r.stop_reason,
            "total_time_s": r.total_time_s,
            "downtime_s": self.downtime_s,
            "wire_bytes": self.wire_bytes,
            "payload_bytes": self.payload_bytes,
            "rounds": self.rounds,
            "memory_digest": self.memory_digest,
            "extra": dict(self.extra),
            "strategy": r.strategy,
            "policy": r.policy,
            "converged": r.converged,
            "start_s": r.start_s,
            "end_s": r.end_s,
            "round_log": [asdict(x) for x in r.rounds],
            "result_extra": dict(r.extra),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> MigrationReport:
        result = MigrationResult(
            vm=doc["vm"],
            source=doc["source"],
            destination=doc["destination"],
            strategy=doc["strategy"],
            policy=doc["policy"],
            start_s=doc["start_s"],
            end_s=doc["end_s"],
            downtime_s=doc["downtime_s"] or 0.0,
            converged=doc["converged"],
            stop_reason=doc["reason"],
            outcome=doc["outcome"],
            rounds=tuple(RoundRecord(**x) for x in doc["round_log"]),
            extra=dict(doc.get("result_extra", {})),
        )
        return cls(
            result,
            doc["operation"],
            doc["driver"],
            doc["data_plane"],
            doc["wire_bytes"],
            doc["payload_bytes"],
            doc.get("memory_digest"),
            dict(doc.get("extra", {})),
        )


class MigrationHandle:
    """A migration in flight on this host (either end)."""

    def __init__(self, vm: str, role: Role, peer: str | None) -> None:
        self.vm = vm
        self.role = role
        self.peer = peer
        self.started = time.monotonic()
        self.bytes = 0
        self.abort_reason: str | None = None
        self.destroy_requested = False
        self.flow = f"{role}-{vm}-{next(_FLOW_IDS)}"
        self.paused_at: float | None = None
        """When the VM was paused for the stop-and-copy (monotonic), for the monitor's downtime rule."""
        self.rate_cap_bytes_per_s: float | None = None
        """Set by the monitor's throttle."""
        self.operation: Operation | None = None
        """The operation this flow carries out (the monitor: is it live, is it authorized)."""
        self.grant: Grant | None = None
        """The grant the source presented for this flow: what the monitor's identity check re-verifies."""

    def authorize(self, operation: Operation, grant: Grant | None) -> None:
        """Record the operation and the grant that authorize this flow (the monitor's identity check)."""
        self.operation = operation
        self.grant = grant

    def count(self, nbytes: int) -> None:
        """Account bytes that crossed for this VM (what the monitor samples)."""
        self.bytes += nbytes

    def request_abort(self, reason: str, *, destroy: bool = False) -> None:
        """Ask the migration to stop at its next step (the VM stays on the source unless ``destroy``)."""
        if self.abort_reason is None:
            self.abort_reason = reason
        self.destroy_requested = self.destroy_requested or destroy

    def check(self) -> None:
        """Raise MigrationAborted when an abort was requested."""
        if self.abort_reason is not None:
            raise MigrationAborted(self.abort_reason)
