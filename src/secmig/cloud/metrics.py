"""Energy and SLA metrics as CloudSim's PlanetLab ``Helper.printResults`` computes them.

A :class:`StateLog` keeps, for each instant the hosts were updated, every host's allocated and requested
MIPS and whether it was active, and every VM's allocated and requested MIPS and whether it was migrating
out; a later row at the same instant replaces the earlier one (CloudSim's ``addStateHistoryEntry``).
From it :func:`summarize` derives (each entry's state holds until the next entry):

- **SLATAH** — the fraction of active-host time during which a host was given less than it asked;
- **PDM** — the MIPS VMs lost while migrating, over the MIPS they asked;
- **SLAV** = SLATAH × PDM, and **ESV** = energy × SLAV (Beloglazov & Buyya 2012);
- the overall and average SLA violation, host shutdowns and the mean time before one, and the mean time
  before a VM migration, with CloudSim's own bookkeeping of those times.

Pure: rows in, figures out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

JOULES_PER_KWH = 3.6e6


@dataclass(slots=True)
class StateLog:
    """Host and VM state at each update instant (dense: every host and VM has a row at every instant)."""

    times: list[float] = field(default_factory=list)
    host_allocated: list[FloatArray] = field(default_factory=list)
    host_requested: list[FloatArray] = field(default_factory=list)
    host_active: list[BoolArray] = field(default_factory=list)
    vm_allocated: list[FloatArray] = field(default_factory=list)
    vm_requested: list[FloatArray] = field(default_factory=list)
    vm_migrating: list[BoolArray] = field(default_factory=list)
    vm_placed: list[BoolArray] = field(default_factory=list)

    def record(
        self,
        t_s: float,
        host_allocated: FloatArray,
        host_requested: FloatArray,
        vm_allocated: FloatArray,
        vm_requested: FloatArray,
        vm_migrating: BoolArray,
        vm_placed: BoolArray,
    ) -> None:
        same = bool(self.times) and self.times[-1] == t_s
        if not same:
            self.times.append(t_s)
        floats = (
            (self.host_allocated, host_allocated),
            (self.host_requested, host_requested),
            (self.vm_allocated, vm_allocated),
            (self.vm_requested, vm_requested),
        )
        for flst, fval in floats:
            fcopy: FloatArray = np.array(fval, dtype=np.float64)
            if same:
                flst[-1] = fcopy
            else:
                flst.append(fcopy)
        flags = (
            (self.host_active, host_allocated > 0),
            (self.vm_migrating, vm_migrating),
            (self.vm_placed, vm_placed),
        )
        for blst, bval in flags:
            bcopy: BoolArray = np.array(bval, dtype=bool)
            if same:
                blst[-1] = bcopy
            else:
                blst.append(bcopy)


@dataclass(frozen=True, slots=True)
class ConsolidationMetrics:
    """What CloudSim prints at the end of a PlanetLab run, plus ESV; fractions, not percent."""

    energy_kwh: float
    migrations: int
    slatah: float
    pdm: float
    slav: float
    esv: float
    overall_sla_violation: float
    average_sla_violation: float
    shutdowns: int
    mean_time_before_shutdown_s: float
    stdev_time_before_shutdown_s: float
    mean_time_before_migration_s: float
    stdev_time_before_migration_s: float


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    a = np.asarray(values)
    std = float(a.std(ddof=1)) if a.size > 1 else math.nan
    return float(a.mean()), std


def _times_before_flips(times: FloatArray, flags: npt.NDArray[np.bool_], initially: bool) -> list[float]:
    """CloudSim's bookkeeping: at each True → False flip, the time since the last False → True flip (or 0)."""
    out: list[float] = []
    for col in range(flags.shape[1]):
        f = flags[:, col]
        prev = np.concatenate(([initially], f[:-1]))
        fall = np.flatnonzero(prev & ~f)
        rise = np.flatnonzero(~prev & f)
        if fall.size == 0:
            continue
        j = np.searchsorted(rise, fall, side="left") - 1
        rise_t = times[rise] if rise.size else np.zeros(1)
        since = np.where(j >= 0, rise_t[np.maximum(j, 0)], 0.0)
        out.extend((times[fall] - since).tolist())
    return out


def summarize(log: StateLog, energy_j: float, migrations: int) -> ConsolidationMetrics:
    """The run's figures from its state log, total energy and migration count."""
    t = np.asarray(log.times)
    if t.size < 2:
        nan = math.nan
        return ConsolidationMetrics(
            energy_j / JOULES_PER_KWH, migrations, nan, nan, nan, nan, nan, nan, 0, nan, nan, nan, nan
        )
    dt = np.diff(t)[:, None]
    ha = np.stack(log.host_allocated)[:-1]
    hr = np.stack(log.host_requested)[:-1]
    act = np.stack(log.host_active)
    hact = act[:-1]
    active_time = float((hact * dt).sum())
    slatah = float(((hact & (ha < hr)) * dt).sum()) / active_time if active_time > 0 else math.nan

    va = np.stack(log.vm_allocated)[:-1]
    vr = np.stack(log.vm_requested)[:-1]
    vm_mig = np.stack(log.vm_migrating)
    vmig = vm_mig[:-1]
    placed = np.stack(log.vm_placed)[:-1]
    short = placed & (va < vr)
    requested = float((np.where(placed, vr, 0.0) * dt).sum())
    allocated = float((np.where(placed, va, 0.0) * dt).sum())
    lost_migrating = float((np.where(short & vmig, vr - va, 0.0) * dt).sum())
    pdm = lost_migrating / requested if requested > 0 else math.nan
    overall = (requested - allocated) / requested if requested > 0 else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = ((vr - va) / vr)[short]
    average = float(ratios.mean()) if ratios.size else 0.0
    slav = slatah * pdm
    energy_kwh = energy_j / JOULES_PER_KWH

    shut = _times_before_flips(t, act, True)
    mig_times = _times_before_flips(t, vm_mig, False)
    ms, ss = _mean_std(shut)
    mm, sm = _mean_std(mig_times)
    return ConsolidationMetrics(
        energy_kwh=energy_kwh,
        migrations=migrations,
        slatah=slatah,
        pdm=pdm,
        slav=slav,
        esv=energy_kwh * slav,
        overall_sla_violation=overall,
        average_sla_violation=average,
        shutdowns=len(shut),
        mean_time_before_shutdown_s=ms,
        stdev_time_before_shutdown_s=ss,
        mean_time_before_migration_s=mm,
        stdev_time_before_migration_s=sm,
    )
