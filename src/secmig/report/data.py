"""Everything a report shows about one run, read from the results database (read-only).

The database is opened read-only, so a report never creates or changes a file. Tables that a run may not
have (``monitor_events`` before the monitor existed, an ``audit`` log) load as empty, and the report says so.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from secmig.errors import ConfigError
from secmig.results.store import MIGRATION_COLUMNS, MONITOR_EVENT_COLUMNS, ROUND_COLUMNS
from secmig.security.audit import AuditRecord, AuditReport, read_records, verify_audit_log

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True, slots=True)
class MigrationRow:
    """One row of ``migrations``."""

    idx: int
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


@dataclass(frozen=True, slots=True)
class RoundRow:
    """One row of ``rounds``."""

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
class MonitorEvent:
    """One verdict of the traffic monitor (a row of ``monitor_events``)."""

    t_s: float
    vm: str
    vswitch: str
    rule: str
    level: str
    action: str
    evidence: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditData:
    """An audit log as the report shows it: where it came from, its rows and whether its chain verifies."""

    source: Path
    records: tuple[AuditRecord, ...]
    verification: AuditReport | None
    """``None`` when the log could not be verified at all (the problem is in ``error``)."""
    error: str = ""


@dataclass(frozen=True, slots=True)
class RunData:
    """One stored run, everything the report needs."""

    db_path: Path
    run_id: int
    name: str
    seed: int
    created_at: float
    sim_time_s: float
    wall_time_s: float
    scenario_text: str
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
    rows = conn.execute(
        "SELECT link, kind, capacity_bytes_per_s, t_s, load_bytes_per_s FROM link_usage WHERE run_id = ?"
        " ORDER BY link, t_s",
        (run_id,),
    ).fetchall()
    out: list[LinkSeries] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][0] != rows[start][0]:
            chunk = rows[start:i]
            out.append(
                LinkSeries(
                    name=chunk[0][0],
                    kind=chunk[0][1],
                    capacity_bytes_per_s=_float(chunk[0][2]),
                    times_s=np.array([r[3] for r in chunk], dtype=np.float64),
                    load_bytes_per_s=np.array([r[4] for r in chunk], dtype=np.float64),
                )
            )
            start = i
    return tuple(out)


def _monitor(conn: sqlite3.Connection, run_id: int) -> tuple[MonitorEvent, ...]:
    rows = conn.execute(
        f"SELECT {', '.join(MONITOR_EVENT_COLUMNS)} FROM monitor_events WHERE run_id = ? ORDER BY t_s",
        (run_id,),
    ).fetchall()
    events = []
    for t_s, vm, vswitch, rule, level, action, evidence in rows:
        try:
            parsed = json.loads(evidence)
        except (TypeError, ValueError):
            parsed = {"evidence": str(evidence)}
        events.append(
            MonitorEvent(
                float(t_s), str(vm), str(vswitch), str(rule), str(level).upper(), str(action),
                parsed if isinstance(parsed, dict) else {"evidence": parsed},
            )
        )
    return tuple(events)


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
        row = conn.execute(
            "SELECT name, seed, created_at, sim_time_s, wall_time_s, scenario FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        if row is None:
            ids = [r[0] for r in conn.execute("SELECT id FROM runs ORDER BY id")]
            have = f"runs {ids[0]}–{ids[-1]}" if ids else "no runs"
            raise ConfigError(f"{db_path}: no run {run_id} (it has {have})")
        name, seed, created_at, sim_time_s, wall_time_s, scenario_text = row
        migrations = tuple(
            _migration(r)
            for r in conn.execute(
                f"SELECT idx, {', '.join(MIGRATION_COLUMNS)} FROM migrations WHERE run_id = ? ORDER BY idx",
                (run_id,),
            )
        )
        rounds: dict[int, list[RoundRow]] = {}
        for r in conn.execute(
            f"SELECT {', '.join(ROUND_COLUMNS)} FROM rounds WHERE run_id = ? ORDER BY migration_idx, idx", (run_id,)
        ):
            m_idx, idx, start_s, duration_s, pages, zero_pages, nbytes, dirty_after, live = r
            rounds.setdefault(int(m_idx), []).append(
                RoundRow(m_idx, idx, start_s, duration_s, pages, zero_pages, nbytes, dirty_after, bool(live))
            )
        links = _links(conn, run_id)
        flow_count = int(conn.execute("SELECT count(*) FROM flows WHERE run_id = ?", (run_id,)).fetchone()[0])
        monitor_table = "monitor_events" in tables
        events = _monitor(conn, run_id) if monitor_table else ()
        has_audit_table = "audit" in tables and "audit_head" in tables
    except sqlite3.Error as err:
        raise ConfigError(f"{db_path}: cannot read run {run_id}: {err}") from None
    finally:
        conn.close()
    try:
        scenario = yaml.safe_load(scenario_text)
    except yaml.YAMLError:
        scenario = None
    if audit_log is not None:
        audit: AuditData | None = load_audit(audit_log)
    elif has_audit_table:
        audit = load_audit(db_path)
    else:
        audit = None
    return RunData(
        db_path=db_path,
        run_id=run_id,
        name=str(name),
        seed=int(seed),
        created_at=float(created_at),
        sim_time_s=float(sim_time_s),
        wall_time_s=float(wall_time_s),
        scenario_text=str(scenario_text),
        scenario=scenario if isinstance(scenario, dict) else None,
        migrations=migrations,
        rounds={k: tuple(v) for k, v in rounds.items()},
        links=links,
        flow_count=flow_count,
        monitor_table=monitor_table,
        monitor_events=events,
        audit=audit,
    )


def _migration(row: Sequence[Any]) -> MigrationRow:
    v = dict(zip(("idx", *MIGRATION_COLUMNS), row, strict=True))
    for k in ("start_s", "end_s", "total_time_s", "downtime_s"):
        v[k] = math.nan if v[k] is None else float(v[k])
    v["converged"] = bool(v["converged"])
    return MigrationRow(**v)


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
