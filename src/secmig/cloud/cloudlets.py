"""Cloudlets and the two schedulers a VM runs them under: time-shared and space-shared, as CloudSim does.

A cloudlet is ``length_mi`` million instructions on ``pes`` virtual PEs, submitted at ``submit_s``.

- **Time-shared** (CloudSim's ``CloudletSchedulerTimeShared``): every cloudlet runs at once; each PE of
  the VM's capacity is split so that a cloudlet of k PEs gets ``k × Σ MIPS / max(PEs asked, VM PEs)``.
- **Space-shared** (``CloudletSchedulerSpaceShared``): a cloudlet holds its PEs alone until it ends; the
  others wait in submission order, and a freed PE goes to the first waiting cloudlet that fits.

:func:`schedule` plays a list of cloudlets to the end and returns when each started and finished. Pure:
the VM's MIPS are given, nothing is read from a clock.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from secmig.errors import ConfigError

_EPS = 1e-9


class SchedulerKind(enum.StrEnum):
    """How a VM shares its PEs among its cloudlets."""

    TIME_SHARED = "time-shared"
    SPACE_SHARED = "space-shared"


@dataclass(frozen=True, slots=True)
class Cloudlet:
    """A job of ``length_mi`` million instructions on ``pes`` PEs, submitted at ``submit_s``."""

    name: str
    length_mi: float
    pes: int = 1
    submit_s: float = 0.0

    def __post_init__(self) -> None:
        if self.length_mi <= 0:
            raise ConfigError(f"cloudlet {self.name}: length must be positive")
        if self.pes <= 0:
            raise ConfigError(f"cloudlet {self.name}: needs at least one PE")
        if self.submit_s < 0:
            raise ConfigError(f"cloudlet {self.name}: submitted before time 0")


@dataclass(frozen=True, slots=True)
class CloudletRun:
    """When a cloudlet started and finished."""

    name: str
    start_s: float
    finish_s: float


def schedule(
    cloudlets: Sequence[Cloudlet], *, vm_pes: int, mips_per_pe: float, kind: SchedulerKind
) -> list[CloudletRun]:
    """Run every cloudlet on a VM of ``vm_pes`` × ``mips_per_pe``; return their runs in the given order."""
    if vm_pes <= 0 or mips_per_pe <= 0:
        raise ConfigError("a VM needs positive PEs and MIPS to run cloudlets")
    if kind is SchedulerKind.SPACE_SHARED:
        for c in cloudlets:
            if c.pes > vm_pes:
                raise ConfigError(f"cloudlet {c.name}: {c.pes} PEs on a VM of {vm_pes}: it could never start")
    n = len(cloudlets)
    remaining = [c.length_mi for c in cloudlets]
    start: list[float | None] = [None] * n
    finish: list[float | None] = [None] * n
    arrived: list[int] = []  # in submission order (ties: given order)
    pending = sorted(range(n), key=lambda i: (cloudlets[i].submit_s, i))
    running: list[int] = []
    now = 0.0
    total_mips = vm_pes * mips_per_pe

    def rates() -> dict[int, float]:
        if not running:
            return {}
        if kind is SchedulerKind.TIME_SHARED:
            asked = sum(cloudlets[i].pes for i in running)
            per_pe = total_mips / max(asked, vm_pes)
        else:
            per_pe = mips_per_pe
        return {i: per_pe * cloudlets[i].pes for i in running}

    def admit() -> None:
        if kind is SchedulerKind.TIME_SHARED:
            for i in arrived:
                running.append(i)
                start[i] = now
            arrived.clear()
            return
        free = vm_pes - sum(cloudlets[i].pes for i in running)
        progress = True
        while progress:
            progress = False
            for i in list(arrived):
                if cloudlets[i].pes <= free:
                    arrived.remove(i)
                    running.append(i)
                    start[i] = now
                    free -= cloudlets[i].pes
                    progress = True
                    break

    while pending or arrived or running:
        while pending and cloudlets[pending[0]].submit_s <= now + _EPS:
            arrived.append(pending.pop(0))
        admit()
        r = rates()
        next_finish = min((remaining[i] / r[i] for i in running), default=math.inf)
        next_arrival = cloudlets[pending[0]].submit_s - now if pending else math.inf
        step = min(next_finish, next_arrival)
        if not math.isfinite(step):
            break
        for i in running:
            remaining[i] -= r[i] * step
        now += step
        for i in list(running):
            if remaining[i] <= _EPS * max(1.0, cloudlets[i].length_mi):
                running.remove(i)
                finish[i] = now
    out = []
    for i, c in enumerate(cloudlets):
        s, f = start[i], finish[i]
        assert s is not None and f is not None
        out.append(CloudletRun(c.name, s, f))
    return out
