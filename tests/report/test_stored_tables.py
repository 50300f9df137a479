"""The stored tables: the schema made from the records is the one existing files have, and rows round-trip."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from secmig.results.store import connect, save_run
from secmig.results.tables import (
    RUN_TABLES,
    FlowRow,
    LinkUsageRow,
    MigrationRow,
    RoundRow,
    flow_rows,
    link_usage_rows,
    migration_rows,
    round_rows,
)
from secmig.sim.engine import Simulation
from secmig.sim.scenario import load_scenario_text
from secmig.sweep.store import PointRow

SCENARIO = """
name: pair
seed: 5
datacenters:
  - {name: dc, core: 10Gbit/s, hosts: [{name: "h{i}", count: 2, nic: 1Gbit/s}]}
vms:
  - {name: a, host: h1, ram: 1GiB, used: 512MiB, dirty: {pattern: hotspot, rate: 8000pages/s, hot_set: 64MiB}}
  - {name: b, host: h2, ram: 1GiB}
migrations: [{vm: a, to: h2, at: 0.5s}]
traffic: [{from: b, to: a, rate: 50Mbit/s, duration: 3s}]
"""
STORED_SCHEMA = """
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


CREATE TABLE IF NOT EXISTS sweep_points (
    key TEXT PRIMARY KEY,            -- hash of the base scenario, the parameter values and the seed
    sweep TEXT NOT NULL,             -- name of the grid that computed it
    params TEXT NOT NULL,            -- JSON object: dotted path -> value as written in the grid
    seed INTEGER NOT NULL,
    migrations INTEGER NOT NULL,
    completed INTEGER NOT NULL,
    aborted INTEGER NOT NULL,
    mean_total_time_s REAL,          -- over completed migrations; NULL when none completed
    max_total_time_s REAL,
    mean_downtime_s REAL,
    max_downtime_s REAL,
    bytes_sent INTEGER NOT NULL,     -- by all migrations, completed or not
    sim_time_s REAL NOT NULL,
    wall_time_s REAL NOT NULL,       -- the simulation alone, on its worker
    error TEXT,                      -- why the point could not be simulated; NULL when it was
    finished_at REAL NOT NULL
);
"""
"""``secmig.sqlite`` and ``sweep.sqlite`` as files written before the records existed have them."""


def _folded(sql: str) -> str:
    return re.sub(r"\s+", "", sql)


def test_the_schema_made_from_the_records_is_the_stored_one() -> None:
    """Tables, columns, types, keys, references, indexes and comments: the same, white space aside."""
    made = "".join(t.create_sql() for t in (*RUN_TABLES, PointRow))
    assert _folded(made) == _folded(STORED_SCHEMA)


def test_a_saved_run_reads_back_as_the_rows_made_from_it(tmp_path: Path) -> None:
    """Every row of migrations, rounds, link_usage and flows reads back equal to the one made from the run."""
    _, spec = load_scenario_text(SCENARIO, "small.yaml")
    run = Simulation(spec).run()
    db = tmp_path / "secmig.sqlite"
    run_id = save_run(db, run, SCENARIO)
    with connect(db) as conn:
        for table, rows in (
            (MigrationRow, migration_rows(run_id, run)),
            (RoundRow, round_rows(run_id, run)),
            (LinkUsageRow, link_usage_rows(run_id, run.links)),
            (FlowRow, flow_rows(run_id, run.flows)),
        ):
            made = list(rows)
            assert made, table.table.name
            assert table.select(conn, "run_id = ?", (run_id,), order_by="rowid") == made
    with sqlite3.connect(db) as conn:
        converged, live = conn.execute(
            "SELECT m.converged, r.live FROM migrations m JOIN rounds r ON r.migration_idx = m.idx LIMIT 1"
        ).fetchone()
    assert (type(converged), type(live)) == (int, int)  # booleans are stored as 0/1
