"""The tables of a results database (``secmig.sqlite``), one record class each.

``runs`` (:class:`RunRow`), ``migrations`` (:class:`MigrationRow`), ``rounds`` (:class:`RoundRow`, a round
of a migration), ``link_usage`` (:class:`LinkUsageRow`, a link's mean load over one time bin), ``flows``
(:class:`FlowRow`, a finished flow: what the monitor reads) and ``monitor_events`` (:class:`MonitorEventRow`,
one verdict of the traffic monitor, written by whoever ran the monitor and read by the report). The
rows are made from what the simulator returns (:class:`~secmig.migration.result.MigrationResult`, …) by
field name, so a figure is named the same in the code, the database, the CSV files and the report.

A consolidation day (``secmig consolidate``, :class:`~secmig.lab.consolidation.DayResult`) is a run too —
a row of ``runs`` — with three tables of its own (:data:`CONSOLIDATION_TABLES`), created only in a
database that holds one: ``consolidation_runs`` (:class:`ConsolidationRunRow`, every figure of
:meth:`~secmig.lab.consolidation.DayResult.summary`), ``consolidation_intervals``
(:class:`ConsolidationIntervalRow`, one scheduling instant) and ``consolidation_migrations``
(:class:`ConsolidationMigrationRow`); its monitor verdicts go to ``monitor_events`` like any run's.
A figure that does not exist (no shutdown, hence no mean time before one) is stored as NULL.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from secmig.lab.consolidation import DayResult
from secmig.migration.result import MigrationResult
from secmig.monitor.samples import Verdict
from secmig.results.records import Record, Table, column
from secmig.sim.engine import FlowRecord, RunResult
from secmig.sim.network import LinkUsage


@dataclass(frozen=True, slots=True)
class RunRow(Record):
    """One run: what was simulated, with which seed, and how long it took."""

    table: ClassVar[Table] = Table("runs", primary_key=("id",))
    id: int | None
    """``None`` until stored: SQLite numbers the runs."""
    name: str
    seed: int
    created_at: float
    sim_time_s: float
    wall_time_s: float
    scenario: str
    """The scenario's YAML text as it was run."""


@dataclass(frozen=True, slots=True)
class MigrationRow(Record):
    """One migration of a run: a :class:`MigrationResult` with its rounds counted (they have their own table)."""

    table: ClassVar[Table] = Table("migrations", primary_key=("run_id", "idx"))
    run_id: int = field(metadata=column(references="runs(id)", export=False))
    idx: int = field(metadata=column(export=False))
    vm: str
    source: str
    destination: str
    strategy: str
    policy: str
    start_s: float
    end_s: float
    total_time_s: float
    downtime_s: float
    rounds: int
    bytes_sent: int
    pages_sent: int
    converged: bool
    stop_reason: str
    outcome: str

    @classmethod
    def of(cls, run_id: int, idx: int, m: MigrationResult) -> MigrationRow:
        return cls.from_object(m, run_id=run_id, idx=idx, rounds=len(m.rounds))


@dataclass(frozen=True, slots=True)
class RoundRow(Record):
    """One round of a migration (a :class:`~secmig.migration.precopy.RoundRecord`)."""

    table: ClassVar[Table] = Table("rounds", primary_key=("run_id", "migration_idx", "idx"))
    run_id: int = field(metadata=column(export=False))
    migration_idx: int
    idx: int
    start_s: float
    duration_s: float
    pages: int
    zero_pages: int
    bytes: int
    dirty_pages_after: int
    live: bool


@dataclass(frozen=True, slots=True)
class LinkUsageRow(Record):
    """A link's mean load over one time bin."""

    table: ClassVar[Table] = Table(
        "link_usage", indexes=(("link_usage_run", ("run_id", "link")),), derived=("utilization",)
    )
    run_id: int = field(metadata=column(export=False))
    link: str
    kind: str
    capacity_bytes_per_s: float | None
    """``None`` for a link without a capacity (an unlimited core or vSwitch)."""
    t_s: float
    load_bytes_per_s: float

    @property
    def utilization(self) -> float:
        cap = self.capacity_bytes_per_s
        return self.load_bytes_per_s / cap if cap is not None and cap > 0 else 0.0


@dataclass(frozen=True, slots=True)
class FlowRow(Record):
    """One finished flow (a :class:`~secmig.sim.engine.FlowRecord`)."""

    table: ClassVar[Table] = Table("flows")
    run_id: int
    kind: str
    vm: str
    src_host: str
    dst_host: str
    start_s: float
    end_s: float
    bytes: float


@dataclass(frozen=True, slots=True)
class MonitorEventRow(Record):
    """One verdict of the traffic monitor."""

    table: ClassVar[Table] = Table("monitor_events", indexes=(("monitor_events_run", ("run_id", "t_s")),))
    run_id: int = field(metadata=column(references="runs(id)"))
    t_s: float = field(metadata=column(doc="simulated time of the verdict"))
    vm: str = field(metadata=column(doc="the VM whose traffic was judged"))
    vswitch: str = field(metadata=column(doc="the vSwitch (link name) where it was observed"))
    rule: str = field(metadata=column(doc='the rule that fired, e.g. "rtt-peaks" or "data-over-3x-vram"'))
    level: str = field(metadata=column(doc="LOW, MEDIUM or HIGH"))
    action: str = field(metadata=column(doc="continue, check or destroy"))
    evidence: Mapping[str, Any] = field(
        metadata=column(doc="JSON object: the measured figures behind the verdict")
    )


@dataclass(frozen=True, slots=True)
class ConsolidationRunRow(Record):
    """One consolidation day: its policies, and every figure CloudSim prints and secmig adds (fractions, not %)."""

    table: ClassVar[Table] = Table("consolidation_runs", primary_key=("run_id",))
    run_id: int = field(metadata=column(references="runs(id)", export=False))
    workload: str = field(metadata=column(doc="the workload directory (one trace file a VM)"))
    overload: str = field(metadata=column(doc='overload detection as given, e.g. "thr:0.8"'))
    selection: str = field(metadata=column(doc="VM selection: mmt, mc, mu or rs"))
    migration_model: str = field(metadata=column(doc="cloudsim or network"))
    hosts: int
    vms: int
    interval_s: float = field(metadata=column(doc="the scheduling interval"))
    secure: bool = field(metadata=column(doc="Vsignatures, grants and (network model) the monitor"))
    energy_kwh: float
    migrations: int
    slatah: float | None = field(metadata=column(doc="SLA time per active host, a fraction"))
    pdm: float | None = field(metadata=column(doc="performance degradation due to migrations, a fraction"))
    slav: float | None = field(metadata=column(doc="SLATAH × PDM"))
    esv: float | None = field(metadata=column(doc="energy_kwh × SLAV"))
    overall_sla_violation: float | None
    average_sla_violation: float | None
    shutdowns: int
    mean_time_before_shutdown_s: float | None
    stdev_time_before_shutdown_s: float | None
    mean_time_before_migration_s: float | None
    stdev_time_before_migration_s: float | None
    mean_migration_time_s: float | None = field(metadata=column(doc="over completed migrations"))
    total_downtime_s: float
    bytes_moved: float = field(metadata=column(doc="by every migration, completed or not"))
    aborted_migrations: int
    grants_issued: int
    grants_refused: int
    eligible_hosts: int = field(metadata=column(doc="hosts whose Vsignature verifies at the end of the day"))
    vms_retired: int = field(metadata=column(doc="VMs that asked 0 MIPS and left (CloudSim's rule)"))
    monitor_verdicts: int | None = field(metadata=column(doc="NULL: the monitor did not run (cloudsim model)"))
    monitor_challenges_passed: int | None
    monitor_alarms: int | None = field(metadata=column(doc="verdicts ending in throttle, abort or destroy"))
    monitor_destroyed: int | None
    monitor_vm_hours: float | None = field(metadata=column(doc="VM-hours the monitor watched"))
    false_alarms_per_vm_hour: float | None
    mean_cloudlet_capacity_mips: float = field(metadata=column(doc="the paper's ΣC(i)/Nvm over active hosts"))
    wall_time_s: float

    @classmethod
    def of(cls, run_id: int, r: DayResult) -> ConsolidationRunRow:
        values: dict[str, Any] = {k: _finite(v) for k, v in r.summary().items()}
        m, mon = r.metrics, r.monitor
        values.update(
            run_id=run_id,
            workload=str(r.config.workload_dir),
            vms=r.vms,
            interval_s=r.config.interval_s,
            secure=r.config.secure,
            stdev_time_before_shutdown_s=_finite(m.stdev_time_before_shutdown_s),
            stdev_time_before_migration_s=_finite(m.stdev_time_before_migration_s),
            monitor_verdicts=mon.verdicts if mon else None,
            monitor_challenges_passed=mon.challenges_passed if mon else None,
            monitor_vm_hours=mon.vm_hours_watched if mon else None,
        )
        return cls.from_values(values)


@dataclass(frozen=True, slots=True)
class ConsolidationIntervalRow(Record):
    """One scheduling instant of a consolidation day (an :class:`~secmig.lab.consolidation.IntervalRecord`)."""

    table: ClassVar[Table] = Table("consolidation_intervals", primary_key=("run_id", "idx"))
    run_id: int = field(metadata=column(references="runs(id)", export=False))
    idx: int = field(metadata=column(export=False))
    t_s: float = field(metadata=column(doc="the instant, seconds into the day"))
    energy_kwh: float = field(metadata=column(doc="energy of every host since the previous instant"))
    active_hosts: int
    migrations: int = field(metadata=column(doc="migrations started at this instant"))
    cloudlet_capacity_mips: float | None = field(
        metadata=column(doc="ΣC(i)/Nvm averaged over the active hosts; NULL when none was active")
    )


@dataclass(frozen=True, slots=True)
class ConsolidationMigrationRow(Record):
    """One migration a consolidation day issued (a :class:`~secmig.lab.consolidation.MigrationRecord`)."""

    table: ClassVar[Table] = Table("consolidation_migrations", primary_key=("run_id", "idx"))
    run_id: int = field(metadata=column(references="runs(id)", export=False))
    idx: int = field(metadata=column(export=False))
    vm: str
    source: str
    destination: str
    reason: str = field(metadata=column(doc="why the planner moved it, e.g. overload or underload"))
    start_s: float
    end_s: float
    downtime_s: float
    bytes_moved: int
    outcome: str


RUN_TABLES: tuple[type[Record], ...] = (RunRow, MigrationRow, RoundRow, LinkUsageRow, FlowRow, MonitorEventRow)
CONSOLIDATION_TABLES: tuple[type[Record], ...] = (
    ConsolidationRunRow,
    ConsolidationIntervalRow,
    ConsolidationMigrationRow,
)
"""A consolidation day's own tables, beside :data:`RUN_TABLES` (created by the first day stored)."""
MONITOR_EVENT_COLUMNS = MonitorEventRow.column_names()[1:]
"""Columns of ``monitor_events`` after ``run_id``, in order: what the monitor inserts, what the report reads."""


def finite_or_none(x: float) -> float | None:
    """How a capacity is stored: an unlimited (infinite) one as NULL."""
    return x if math.isfinite(x) else None


def migration_rows(run_id: int, run: RunResult) -> Iterator[MigrationRow]:
    for i, m in enumerate(run.migrations):
        yield MigrationRow.of(run_id, i, m)


def round_rows(run_id: int, run: RunResult) -> Iterator[RoundRow]:
    for i, m in enumerate(run.migrations):
        for r in m.rounds:
            yield RoundRow.from_object(r, run_id=run_id, migration_idx=i, idx=r.index)


def link_usage_rows(run_id: int, usage: tuple[LinkUsage, ...]) -> Iterator[LinkUsageRow]:
    for u in usage:
        cap = finite_or_none(u.link.capacity_bytes_per_s)
        for t, v in zip(u.times_s, u.load_bytes_per_s, strict=True):
            yield LinkUsageRow(run_id, u.link.name, u.link.kind, cap, float(t), float(v))


def flow_rows(run_id: int, flows: tuple[FlowRecord, ...]) -> Iterator[FlowRow]:
    for f in flows:
        yield FlowRow.from_object(f, run_id=run_id)


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def consolidation_interval_rows(run_id: int, r: DayResult) -> Iterator[ConsolidationIntervalRow]:
    for i, iv in enumerate(r.intervals):
        yield ConsolidationIntervalRow.from_object(
            iv, run_id=run_id, idx=i, cloudlet_capacity_mips=_finite(iv.cloudlet_capacity_mips)
        )


def consolidation_migration_rows(run_id: int, r: DayResult) -> Iterator[ConsolidationMigrationRow]:
    for i, m in enumerate(r.migrations):
        yield ConsolidationMigrationRow.from_object(m, run_id=run_id, idx=i)


def monitor_event_rows(run_id: int, verdicts: Iterable[Verdict]) -> Iterator[MonitorEventRow]:
    """The monitor's verdicts as rows of ``monitor_events`` (level and action by their values)."""
    for v in verdicts:
        yield MonitorEventRow(run_id, v.t_s, v.vm, v.vswitch, v.rule, v.level.value, v.action.value, dict(v.evidence))
