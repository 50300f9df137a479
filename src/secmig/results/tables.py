"""The tables of a results database (``secmig.sqlite``), one record class each.

``runs`` (:class:`RunRow`), ``migrations`` (:class:`MigrationRow`), ``rounds`` (:class:`RoundRow`, a round
of a migration), ``link_usage`` (:class:`LinkUsageRow`, a link's mean load over one time bin), ``flows``
(:class:`FlowRow`, a finished flow: what the monitor reads) and ``monitor_events`` (:class:`MonitorEventRow`,
one verdict of the traffic monitor, written by whoever ran the monitor and read by the report). The
rows are made from what the simulator returns (:class:`~secmig.migration.result.MigrationResult`, …) by
field name, so a figure is named the same in the code, the database, the CSV files and the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from secmig.migration.result import MigrationResult
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


RUN_TABLES: tuple[type[Record], ...] = (RunRow, MigrationRow, RoundRow, LinkUsageRow, FlowRow, MonitorEventRow)
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
