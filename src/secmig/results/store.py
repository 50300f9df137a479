"""Runs in a SQLite file, each written in one transaction, and their export as JSON and CSV.

The tables are those of :mod:`secmig.results.tables`; ``monitor_events`` is created empty here and filled
by whoever ran the monitor (:func:`save_monitor_events`). A consolidation day is stored whole by
:func:`save_consolidation` — its ``runs`` row, its own tables and its monitor verdicts in one transaction —
and exported by :func:`export_consolidation`.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from secmig.errors import SecmigError
from secmig.lab.consolidation import DayConfig, DayResult
from secmig.results.records import Record, open_tables
from secmig.results.tables import (
    CONSOLIDATION_TABLES,
    MONITOR_EVENT_COLUMNS,
    RUN_TABLES,
    ConsolidationIntervalRow,
    ConsolidationMigrationRow,
    ConsolidationRunRow,
    FlowRow,
    LinkUsageRow,
    MigrationRow,
    MonitorEventRow,
    RoundRow,
    RunRow,
    consolidation_interval_rows,
    consolidation_migration_rows,
    finite_or_none,
    flow_rows,
    link_usage_rows,
    migration_rows,
    monitor_event_rows,
    round_rows,
)
from secmig.sim.engine import RunResult

R = TypeVar("R", bound=Record)

__all__ = [
    "MONITOR_EVENT_COLUMNS",
    "connect",
    "consolidation_run_name",
    "consolidation_scenario_text",
    "consolidation_summary",
    "export_consolidation",
    "export_run",
    "run_to_dict",
    "save_consolidation",
    "save_monitor_events",
    "save_run",
]


def connect(db_path: Path) -> AbstractContextManager[sqlite3.Connection]:
    """The results database, created if needed."""
    return open_tables(db_path, RUN_TABLES, "results")


def save_run(db_path: Path, run: RunResult, scenario_text: str) -> int:
    """Write a run, all of it or nothing, and return its id."""
    with connect(db_path) as conn:
        try:
            with conn:  # one transaction
                row = RunRow(None, run.name, run.seed, time.time(), run.sim_time_s, run.wall_time_s, scenario_text)
                run_id = conn.execute(RunRow.insert_sql(), row.to_sql()).lastrowid
                assert run_id is not None
                MigrationRow.insert(conn, migration_rows(run_id, run))
                RoundRow.insert(conn, round_rows(run_id, run))
                LinkUsageRow.insert(conn, link_usage_rows(run_id, run.links))
                FlowRow.insert(conn, flow_rows(run_id, run.flows))
        except sqlite3.Error as err:
            raise SecmigError(f"{db_path}: could not write the run: {err}") from err
    return int(run_id)


def save_monitor_events(db_path: Path, run_id: int, events: Iterable[Sequence[Any]]) -> int:
    """Append the monitor's verdicts for a stored run, in one transaction; return how many were written.

    Each event is a tuple in :data:`MONITOR_EVENT_COLUMNS` order; ``evidence`` is a JSON text.
    """
    rows = [(run_id, *e) for e in events]
    for row in rows:
        if len(row) != len(MONITOR_EVENT_COLUMNS) + 1:
            raise SecmigError(f"monitor event {row!r}: expected the columns {', '.join(MONITOR_EVENT_COLUMNS)}")
    with connect(db_path) as conn:
        try:
            with conn:
                conn.executemany(MonitorEventRow.insert_sql(), rows)
        except sqlite3.Error as err:
            raise SecmigError(f"{db_path}: could not write monitor events: {err}") from err
    return len(rows)


def run_to_dict(run: RunResult) -> dict[str, Any]:
    """A JSON-ready view of a run: each migration with its rounds, each link's usage as lists."""
    return {
        "name": run.name,
        "seed": run.seed,
        "sim_time_s": run.sim_time_s,
        "migrations": [m.to_dict() for m in run.migrations],
        "links": [
            {
                "link": u.link.name,
                "kind": u.link.kind,
                "capacity_bytes_per_s": finite_or_none(u.link.capacity_bytes_per_s),
                "t_s": u.times_s.tolist(),
                "load_bytes_per_s": u.load_bytes_per_s.tolist(),
            }
            for u in run.links
        ],
    }


def export_run(run: RunResult, out_dir: Path) -> list[Path]:
    """Write ``run.json``, ``migrations.csv``, ``rounds.csv`` and ``links.csv`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in ("run.json", "migrations.csv", "rounds.csv", "links.csv")]
    paths[0].write_text(json.dumps(run_to_dict(run), indent=1) + "\n", encoding="utf-8")
    _write_csv(paths[1], MigrationRow, migration_rows(0, run))
    _write_csv(paths[2], RoundRow, round_rows(0, run))
    _write_csv(paths[3], LinkUsageRow, link_usage_rows(0, run.links))
    return paths


def _write_csv(path: Path, table: type[R], rows: Iterable[R]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        table.write_csv(f, rows)


# --- consolidation days -----------------------------------------------------------------------------------


def consolidation_run_name(cfg: DayConfig) -> str:
    """``consolidate-WORKLOAD-POLICY-SELECTION-MODEL``, e.g. ``consolidate-20110303-thr0.8-mmt-cloudsim``."""
    policy = cfg.overload.spec.replace(":", "")
    return f"consolidate-{cfg.workload_dir.name}-{policy}-{cfg.selection.value}-{cfg.migration_model.value}"


def consolidation_scenario_text(cfg: DayConfig) -> str:
    """The command's parameters as YAML (JSON values, which YAML reads as they are): the run's ``scenario``."""
    params: dict[str, Any] = {
        "command": "secmig consolidate",
        "description": f"consolidation day on {cfg.workload_dir.name}: {cfg.overload.spec} + "
        f"{cfg.selection.value}, migration model {cfg.migration_model.value}",
        "workload": str(cfg.workload_dir),
        "overload": cfg.overload.spec,
        "selection": cfg.selection.value,
        "migration_model": cfg.migration_model.value,
        "hosts": cfg.hosts,
        "interval_s": cfg.interval_s,
        "duration_s": cfg.duration_s,
        "seed": cfg.seed,
        "secure": cfg.secure,
        "revoked": list(cfg.revoked),
        "retire_idle_vms": cfg.retire_idle_vms,
        "dirty_pages_per_s_at_full_cpu": cfg.network.dirty_pages_per_s_at_full_cpu,
    }
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in params.items())


def consolidation_summary(result: DayResult) -> dict[str, Any]:
    """:meth:`DayResult.summary` ready for JSON: a figure that does not exist (NaN) is ``None``."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.summary().items()}


def save_consolidation(db_path: Path, result: DayResult, scenario_text: str | None = None) -> int:
    """Write a consolidation day — ``runs`` row, summary, intervals, migrations, monitor verdicts — all of it
    or nothing, and return its run id. ``scenario_text`` defaults to :func:`consolidation_scenario_text`."""
    cfg = result.config
    text = scenario_text if scenario_text is not None else consolidation_scenario_text(cfg)
    end_s = max((iv.t_s for iv in result.intervals), default=0.0)
    with open_tables(db_path, (*RUN_TABLES, *CONSOLIDATION_TABLES), "results") as conn:
        try:
            with conn:  # one transaction
                row = RunRow(None, consolidation_run_name(cfg), cfg.seed, time.time(), end_s, result.wall_time_s, text)
                run_id = conn.execute(RunRow.insert_sql(), row.to_sql()).lastrowid
                assert run_id is not None
                ConsolidationRunRow.insert(conn, [ConsolidationRunRow.of(run_id, result)])
                ConsolidationIntervalRow.insert(conn, consolidation_interval_rows(run_id, result))
                ConsolidationMigrationRow.insert(conn, consolidation_migration_rows(run_id, result))
                MonitorEventRow.insert(conn, monitor_event_rows(run_id, result.verdicts))
        except sqlite3.Error as err:
            raise SecmigError(f"{db_path}: could not write the consolidation run: {err}") from err
    return int(run_id)


def export_consolidation(result: DayResult, out_dir: Path) -> list[Path]:
    """Write ``summary.json``, ``intervals.csv`` and ``migrations.csv`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in ("summary.json", "intervals.csv", "migrations.csv")]
    paths[0].write_text(json.dumps(consolidation_summary(result), indent=2) + "\n", encoding="utf-8")
    _write_csv(paths[1], ConsolidationIntervalRow, consolidation_interval_rows(0, result))
    _write_csv(paths[2], ConsolidationMigrationRow, consolidation_migration_rows(0, result))
    return paths
