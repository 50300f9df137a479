"""Everything a report shows about one run, read from the results database (read-only).

The database is opened read-only, so a report never creates or changes a file. Tables that a run may not
have (``monitor_events`` before the monitor existed, an ``audit`` log) load as empty, and the report says so.
A consolidation day (``secmig consolidate``) also has its summary, intervals and migrations
(:class:`ConsolidationData`); any other run has none.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from secmig.errors import ConfigError
from secmig.results.tables import (
    ConsolidationIntervalRow,
    ConsolidationMigrationRow,
    ConsolidationRunRow,
    LinkUsageRow,
    MigrationRow,
    MonitorEventRow,
    RoundRow,
    RunRow,
)
from secmig.security.audit import AuditRecord, AuditReport, read_records, verify_audit_log
from secmig.yamlfile import parse_yaml

MonitorEvent = MonitorEventRow
"""One verdict of the traffic monitor, as the report shows it (its level in capitals)."""

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True, slots=True)
class LinkSeries:
    """A link's mean load per time bin, and what it adds up to."""

    name: str
    kind: str
    capacity_bytes_per_s: float
    """``inf`` for a link without a capacity (an unlimited core or vSwitch)."""
    times_s: FloatArray
    load_bytes_per_s: FloatArray

    @property
    def bin_s(self) -> float:
        return float(np.median(np.diff(self.times_s))) if len(self.times_s) > 1 else 0.0

    @property
    def carried_bytes(self) -> float:
        return float(self.load_bytes_per_s.sum() * self.bin_s)

    def utilization(self) -> FloatArray:
        cap = self.capacity_bytes_per_s
        if not math.isfinite(cap) or cap <= 0:
            return np.zeros_like(self.load_bytes_per_s)
        return self.load_bytes_per_s / cap

    @property
    def mean_utilization(self) -> float:
        u = self.utilization()
        return float(u.mean()) if len(u) else 0.0

    @property
    def peak_utilization(self) -> float:
        u = self.utilization()
        return float(u.max()) if len(u) else 0.0


@dataclass(frozen=True, slots=True)
class AuditData:
    """An audit log as the report shows it: where it came from, its rows and whether its chain verifies."""

    source: Path
    records: tuple[AuditRecord, ...]
    verification: AuditReport | None
    """``None`` when the log could not be verified at all (the problem is in ``error``)."""
    error: str = ""


@dataclass(frozen=True, slots=True)
class ConsolidationData:
    """A consolidation day as stored: its figures, every scheduling instant, every migration."""

    summary: ConsolidationRunRow
    intervals: tuple[ConsolidationIntervalRow, ...]
    migrations: tuple[ConsolidationMigrationRow, ...]

    def migrations_per_interval(self) -> dict[str, FloatArray]:
        """Migrations started at each instant of :attr:`intervals`, by reason (a migration counts at the
        first instant at or after its start)."""
        t = np.array([iv.t_s for iv in self.intervals], dtype=np.float64)
        out: dict[str, FloatArray] = {}
        if not t.size:
            return out
        for m in self.migrations:
            k = min(int(np.searchsorted(t, m.start_s - 1e-6)), t.size - 1)
            out.setdefault(m.reason, np.zeros(t.size))[k] += 1
        return dict(sorted(out.items()))


@dataclass(frozen=True, slots=True)
class RunData:
    """One stored run, everything the report needs."""

    db_path: Path
    run_id: int
    stored: RunRow
    """The row of ``runs``: name, seed, when, how long, the scenario's text."""
    scenario: dict[str, Any] | None
    """The scenario YAML as loaded, or ``None`` if it does not parse any more."""
    migrations: tuple[MigrationRow, ...]
    rounds: dict[int, tuple[RoundRow, ...]]
    links: tuple[LinkSeries, ...]
    flow_count: int
    monitor_table: bool
    """Whether the database has a ``monitor_events`` table at all (older ones do not)."""
    monitor_events: tuple[MonitorEvent, ...]
    audit: AuditData | None = field(default=None)
    consolidation: ConsolidationData | None = field(default=None)
    """The day's own figures when the run is a consolidation day, else ``None``."""

    def busiest_links(self, n: int) -> list[LinkSeries]:
        """The ``n`` links with the highest mean utilisation (links without a capacity rank last)."""
        ranked = sorted(
            self.links,
            key=lambda s: (math.isfinite(s.capacity_bytes_per_s), s.mean_utilization, s.carried_bytes),
            reverse=True,
        )
        return [s for s in ranked[:n] if s.carried_bytes > 0]


def _open_ro(db_path: Path) -> sqlite3.Connection:
    if not db_path.is_file():
        raise ConfigError(f"{db_path}: no such results database")
    try:
        return sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise ConfigError(f"{db_path}: cannot open the results database: {err}") from None


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def latest_run_id(db_path: Path) -> int:
    """The id of the newest run in the database."""
    conn = _open_ro(db_path)
    try:
        row = conn.execute("SELECT max(id) FROM runs").fetchone()
    except sqlite3.Error as err:
        raise ConfigError(f"{db_path}: not a secmig results database ({err})") from None
    finally:
        conn.close()
    if row is None or row[0] is None:
        raise ConfigError(f"{db_path}: has no runs")
    return int(row[0])


def _float(x: Any) -> float:
    return math.inf if x is None else float(x)


def _links(conn: sqlite3.Connection, run_id: int) -> tuple[LinkSeries, ...]:
    rows = LinkUsageRow.select(conn, "run_id = ?", (run_id,), order_by="link, t_s")
    out: list[LinkSeries] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].link != rows[start].link:
            chunk = rows[start:i]
            out.append(
                LinkSeries(
                    name=chunk[0].link,
                    kind=chunk[0].kind,
                    capacity_bytes_per_s=_float(chunk[0].capacity_bytes_per_s),
                    times_s=np.array([r.t_s for r in chunk], dtype=np.float64),
                    load_bytes_per_s=np.array([r.load_bytes_per_s for r in chunk], dtype=np.float64),
                )
            )
            start = i
    return tuple(out)


def _monitor(conn: sqlite3.Connection, run_id: int) -> tuple[MonitorEvent, ...]:
    rows = MonitorEventRow.select(conn, "run_id = ?", (run_id,), order_by="t_s")
    return tuple(replace(e, level=e.level.upper()) for e in rows)


def load_audit(path: Path) -> AuditData:
    """Read and verify an audit log; a log that cannot be read becomes an error to show, not an exception."""
    from secmig.errors import AuditError

    try:
        records = tuple(read_records(path))
    except AuditError as err:
        return AuditData(path, (), None, str(err))
    try:
        verification: AuditReport | None = verify_audit_log(path)
        error = ""
    except AuditError as err:
        verification, error = None, str(err)
    return AuditData(path, records, verification, error)


def load_run(db_path: Path, run_id: int, audit_log: Path | None = None) -> RunData:
    """Read run ``run_id`` from ``db_path``; with ``audit_log``, read that audit log beside it.

    Without ``audit_log``, an ``audit`` table in the results database itself is used when there is one.
    """
    conn = _open_ro(db_path)
    try:
        tables = _tables(conn)
        if "runs" not in tables:
            raise ConfigError(f"{db_path}: not a secmig results database (no runs table)")
        found = RunRow.select(conn, "id = ?", (run_id,))
        if not found:
            ids = [r[0] for r in conn.execute("SELECT id FROM runs ORDER BY id")]
            have = f"runs {ids[0]}–{ids[-1]}" if ids else "no runs"
            raise ConfigError(f"{db_path}: no run {run_id} (it has {have})")
        migrations = tuple(MigrationRow.select(conn, "run_id = ?", (run_id,), order_by="idx"))
        rounds: dict[int, list[RoundRow]] = {}
        for r in RoundRow.select(conn, "run_id = ?", (run_id,), order_by="migration_idx, idx"):
            rounds.setdefault(r.migration_idx, []).append(r)
        links = _links(conn, run_id)
        flow_count = int(conn.execute("SELECT count(*) FROM flows WHERE run_id = ?", (run_id,)).fetchone()[0])
        monitor_table = "monitor_events" in tables
        events = _monitor(conn, run_id) if monitor_table else ()
        has_audit_table = "audit" in tables and "audit_head" in tables
        consolidation = _consolidation(conn, run_id) if ConsolidationRunRow.table.name in tables else None
    except sqlite3.Error as err:
        raise ConfigError(f"{db_path}: cannot read run {run_id}: {err}") from None
    finally:
        conn.close()
    stored = found[0]
    try:
        scenario = parse_yaml(stored.scenario, "scenario")
    except ConfigError:
        scenario = None  # the report shows the text as it was run all the same
    if audit_log is not None:
        audit: AuditData | None = load_audit(audit_log)
    elif has_audit_table:
        audit = load_audit(db_path)
    else:
        audit = None
    return RunData(
        db_path=db_path,
        run_id=run_id,
        stored=stored,
        scenario=scenario if isinstance(scenario, dict) else None,
        migrations=migrations,
        rounds={k: tuple(v) for k, v in rounds.items()},
        links=links,
        flow_count=flow_count,
        monitor_table=monitor_table,
        monitor_events=events,
        audit=audit,
        consolidation=consolidation,
    )


def _consolidation(conn: sqlite3.Connection, run_id: int) -> ConsolidationData | None:
    found = ConsolidationRunRow.select(conn, "run_id = ?", (run_id,))
    if not found:
        return None
    return ConsolidationData(
        found[0],
        tuple(ConsolidationIntervalRow.select(conn, "run_id = ?", (run_id,), order_by="idx")),
        tuple(ConsolidationMigrationRow.select(conn, "run_id = ?", (run_id,), order_by="idx")),
    )


def scenario_counts(scenario: dict[str, Any] | None) -> dict[str, int]:
    """Datacenters, hosts (after ``count:`` expansion), VMs, migrations and traffic flows of a scenario."""
    if scenario is None:
        return {}

    def items(key: str) -> Sequence[Any]:
        v = scenario.get(key) if scenario else None
        return v if isinstance(v, list) else []

    hosts = 0
    for dc in items("datacenters"):
        for h in dc.get("hosts", []) if isinstance(dc, dict) else []:
            hosts += int(h.get("count", 1)) if isinstance(h, dict) else 1
    return {
        "datacenters": len(items("datacenters")),
        "hosts": hosts,
        "WAN links": len(items("wan")),
        "VMs": len(items("vms")),
        "migrations": len(items("migrations")),
        "traffic flows": len(items("traffic")),
    }
