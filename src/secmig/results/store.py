"""Runs in a SQLite file, each written in one transaction, and their export as JSON and CSV.

Schema (one row per …): ``runs`` (run), ``migrations`` (migration), ``rounds`` (round of a migration),
``link_usage`` (change of a link's load), ``flows`` (finished flow: what the monitor reads),
``monitor_events`` (one verdict of the traffic monitor: created empty here, filled by the monitor, read by
the report; :data:`MONITOR_EVENT_COLUMNS` is its contract).
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from secmig.errors import ConfigError, SecmigError
from secmig.sim.engine import RunResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    seed INTEGER NOT NULL,
    created_at REAL NOT NULL,
    sim_time_s REAL NOT NULL,
    wall_time_s REAL NOT NULL,
    scenario TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    idx INTEGER NOT NULL,
    vm TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL,
    strategy TEXT NOT NULL, policy TEXT NOT NULL,
    start_s REAL NOT NULL, end_s REAL NOT NULL, total_time_s REAL NOT NULL, downtime_s REAL NOT NULL,
    rounds INTEGER NOT NULL, bytes_sent INTEGER NOT NULL, pages_sent INTEGER NOT NULL,
    converged INTEGER NOT NULL, stop_reason TEXT NOT NULL, outcome TEXT NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id INTEGER NOT NULL, migration_idx INTEGER NOT NULL, idx INTEGER NOT NULL,
    start_s REAL NOT NULL, duration_s REAL NOT NULL, pages INTEGER NOT NULL, zero_pages INTEGER NOT NULL,
    bytes INTEGER NOT NULL, dirty_pages_after INTEGER NOT NULL, live INTEGER NOT NULL,
    PRIMARY KEY (run_id, migration_idx, idx)
);
CREATE TABLE IF NOT EXISTS link_usage (
    run_id INTEGER NOT NULL, link TEXT NOT NULL, kind TEXT NOT NULL, capacity_bytes_per_s REAL,
    t_s REAL NOT NULL, load_bytes_per_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS link_usage_run ON link_usage(run_id, link);
CREATE TABLE IF NOT EXISTS flows (
    run_id INTEGER NOT NULL, kind TEXT NOT NULL, vm TEXT NOT NULL, src_host TEXT NOT NULL,
    dst_host TEXT NOT NULL, start_s REAL NOT NULL, end_s REAL NOT NULL, bytes REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS monitor_events (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    t_s REAL NOT NULL,          -- simulated time of the verdict
    vm TEXT NOT NULL,           -- the VM whose traffic was judged
    vswitch TEXT NOT NULL,      -- the vSwitch (link name) where it was observed
    rule TEXT NOT NULL,         -- the rule that fired, e.g. "rtt-peaks" or "data-over-3x-vram"
    level TEXT NOT NULL,        -- LOW, MEDIUM or HIGH
    action TEXT NOT NULL,       -- continue, check or destroy
    evidence TEXT NOT NULL      -- JSON object: the measured figures behind the verdict
);
CREATE INDEX IF NOT EXISTS monitor_events_run ON monitor_events(run_id, t_s);
"""

MIGRATION_COLUMNS = (
    "vm source destination strategy policy start_s end_s total_time_s downtime_s rounds bytes_sent "
    "pages_sent converged stop_reason outcome"
).split()
ROUND_COLUMNS = "migration_idx idx start_s duration_s pages zero_pages bytes dirty_pages_after live".split()
MONITOR_EVENT_COLUMNS = "t_s vm vswitch rule level action evidence".split()
"""Columns of ``monitor_events`` after ``run_id``, in order: what the monitor inserts, what the report reads."""
MONITOR_LEVELS = ("LOW", "MEDIUM", "HIGH")


@contextmanager
def connect(db_path: Path) -> Iterator[sqlite3.Connection]:
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db_path)
    except (OSError, sqlite3.Error) as err:
        raise ConfigError(f"{db_path}: cannot open the results database: {err}") from None
    with closing(conn):
        conn.executescript(SCHEMA)
        yield conn


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def save_run(db_path: Path, run: RunResult, scenario_text: str) -> int:
    """Write a run, all of it or nothing, and return its id."""
    with connect(db_path) as conn:
        try:
            with conn:  # one transaction
                cur = conn.execute(
                    "INSERT INTO runs (name, seed, created_at, sim_time_s, wall_time_s, scenario)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (run.name, run.seed, time.time(), run.sim_time_s, run.wall_time_s, scenario_text),
                )
                run_id = cur.lastrowid
                assert run_id is not None
                conn.executemany(
                    f"INSERT INTO migrations VALUES (?, ?, {', '.join('?' * len(MIGRATION_COLUMNS))})",
                    [(run_id, i, *migration_row(m)) for i, m in enumerate(run.migrations)],
                )
                conn.executemany(
                    f"INSERT INTO rounds VALUES (?, {', '.join('?' * len(ROUND_COLUMNS))})",
                    [(run_id, *row) for row in round_rows(run)],
                )
                conn.executemany(
                    "INSERT INTO link_usage VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        (run_id, u.link.name, u.link.kind, _finite(u.link.capacity_bytes_per_s), float(t), float(v))
                        for u in run.links
                        for t, v in zip(u.times_s, u.load_bytes_per_s, strict=True)
                    ),
                )
                conn.executemany(
                    "INSERT INTO flows VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    ((run_id, f.kind, f.vm, f.src_host, f.dst_host, f.start_s, f.end_s, f.bytes) for f in run.flows),
                )
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
                conn.executemany(
                    f"INSERT INTO monitor_events VALUES (?, {', '.join('?' * len(MONITOR_EVENT_COLUMNS))})", rows
                )
        except sqlite3.Error as err:
            raise SecmigError(f"{db_path}: could not write monitor events: {err}") from err
    return len(rows)


def migration_row(m: Any) -> tuple[Any, ...]:
    return (
        m.vm,
        m.source,
        m.destination,
        m.strategy,
        m.policy,
        m.start_s,
        m.end_s,
        m.total_time_s,
        m.downtime_s,
        len(m.rounds),
        m.bytes_sent,
        m.pages_sent,
        int(m.converged),
        m.stop_reason,
        m.outcome,
    )


def round_rows(run: RunResult) -> Iterator[tuple[Any, ...]]:
    for i, m in enumerate(run.migrations):
        for r in m.rounds:
            yield (i, r.index, r.start_s, r.duration_s, r.pages, r.zero_pages, r.bytes, r.dirty_pages_after, r.live)


def run_to_dict(run: RunResult) -> dict[str, Any]:
    """A JSON-ready view of a run (link usage as lists)."""
    return {
        "name": run.name,
        "seed": run.seed,
        "sim_time_s": run.sim_time_s,
        "migrations": [m.to_dict() for m in run.migrations],
        "links": [
            {
                "link": u.link.name,
                "kind": u.link.kind,
                "capacity_bytes_per_s": _finite(u.link.capacity_bytes_per_s),
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
    with paths[1].open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(MIGRATION_COLUMNS)
        w.writerows(migration_row(m) for m in run.migrations)
    with paths[2].open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(ROUND_COLUMNS)
        w.writerows(round_rows(run))
    with paths[3].open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["link", "kind", "capacity_bytes_per_s", "t_s", "load_bytes_per_s", "utilization"])
        for u in run.links:
            for t, v, x in zip(u.times_s, u.load_bytes_per_s, u.utilization(), strict=True):
                w.writerow([u.link.name, u.link.kind, _finite(u.link.capacity_bytes_per_s), t, v, x])
    return paths
