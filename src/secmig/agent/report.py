"""What one real migration did, and the handle through which the monitor or an operator can stop it.

:class:`MigrationReport` is what ``secmig migrate`` prints and tests assert on; :class:`MigrationHandle`
is the live side: byte counters the monitor samples, and ``request_abort`` which the sending loop
checks between page batches. No I/O.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from secmig.errors import MigrationAborted

_FLOW_IDS = itertools.count(1)
Figure = float | int | str | bool | None


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """One migration, seen from the source. Times in seconds of wall time, bytes on the wire."""

    vm: str
    source: str
    destination: str
    operation: str
    driver: str
    data_plane: str
    outcome: str
    """``completed`` (the destination has it) or ``aborted`` (the VM still runs on its source)."""
    reason: str
    total_time_s: float
    downtime_s: float | None
    """From the VM's pause on the source to the destination's COMMITTED (None when aborted)."""
    wire_bytes: int
    """Bytes the source put on the authenticated channel (TLS records included)."""
    payload_bytes: int
    """Memory (in-memory VMs) or QEMU migration stream (relay) bytes carried."""
    rounds: int
    memory_digest: str | None = None
    extra: dict[str, Figure] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> MigrationReport:
        return cls(**doc)


class MigrationHandle:
    """A migration in flight on this host (either end)."""

    def __init__(self, vm: str, role: str, peer: str | None) -> None:
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
