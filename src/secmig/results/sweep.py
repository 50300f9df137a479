"""Parameter sweeps: a grid of scenario variants × seeds, run on Dask, gathered into one SQLite table.

A grid file names a base scenario and the values to try at dotted paths into it::

    name: dirty-vs-policy             # optional; the file's stem by default
    scenario: base.yaml               # relative to the grid file, or a scenario mapping inline
    seeds: [1, 2, 3]                  # or a count N (seeds 0 … N-1); the scenario's own seed by default
    parameters:
      vms[0].dirty.rate: [5000pages/s, 20000pages/s]
      vms[name=db-1].ram: [4GiB, 8GiB]
      defaults.policy: [qemu, xen]

Every point (one value per parameter, one seed) is the base scenario with those values set, validated by
the same :func:`~secmig.sim.scenario.parse_scenario` / :func:`~secmig.sim.scenario.build_spec` as any
scenario, before anything runs. Points are keyed by a hash of the base scenario, their values and their
seed. They travel to the workers in small chunks (one Dask task each), and each chunk's rows are committed
to ``sweep_points`` as soon as it is back; a re-run skips the keys already there, so a sweep stopped at
any moment resumes where it was, losing only the chunks that were in flight. The key does not cover the
simulator's code: after changing it, sweep into a new folder.

This module prints nothing; it reports progress through a callback.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from secmig.errors import ConfigError, SecmigError
from secmig.sim.engine import Simulation, SimulationSpec
from secmig.sim.scenario import build_spec, parse_scenario
from secmig.yamlfile import read_yaml

KEY_VERSION = "secmig-sweep/v1"
DB_NAME = "sweep.sqlite"
SCHEMA = """
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
FIGURES = (
    "migrations completed aborted mean_total_time_s max_total_time_s mean_downtime_s max_downtime_s bytes_sent "
    "sim_time_s wall_time_s error"
).split()
"""The summary figures of a point, in ``sweep_points`` column order."""


# ---- grid files -----------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\.?([A-Za-z_][\w-]*)|\[(\d+)\]|\[([A-Za-z_][\w-]*)=([^\]]+)\]")


def parse_path(path: str) -> list[str | int | tuple[str, str]]:
    """``vms[0].dirty.rate`` → ``["vms", 0, "dirty", "rate"]``; ``vms[name=db-1]`` selects by a field."""
    out: list[str | int | tuple[str, str]] = []
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if m is None or (pos == 0 and path.startswith(".")) or (pos > 0 and m.group(1) and path[pos] != "."):
            raise ConfigError(f"{path!r} is not a dotted path (e.g. vms[0].dirty.rate)")
        if m.group(1) is not None:
            out.append(m.group(1))
        elif m.group(2) is not None:
            out.append(int(m.group(2)))
        else:
            out.append((m.group(3), m.group(4)))
        pos = m.end()
    if not out or not isinstance(out[0], str):
        raise ConfigError(f"{path!r} is not a dotted path (e.g. vms[0].dirty.rate)")
    return out


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at ``path`` in ``data`` (in place); missing mapping keys are created, list items are not."""
    steps = parse_path(path)
    node: Any = data
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        where = path
        if isinstance(step, str):
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {_render(steps[:i]) or 'the scenario'} is not a mapping")
            if last:
                node[step] = copy.deepcopy(value)
            else:
                node = node.setdefault(step, {})
            continue
        if not isinstance(node, list):
            raise ConfigError(f"{where}: {_render(steps[:i])} is not a list")
        if isinstance(step, int):
            if step >= len(node):
                raise ConfigError(f"{where}: index {step} is out of range ({_render(steps[:i])} has {len(node)} items)")
            idx = step
        else:
            field_name, want = step
            hits = [j for j, item in enumerate(node) if isinstance(item, dict) and str(item.get(field_name)) == want]
            if len(hits) != 1:
                raise ConfigError(f"{where}: {len(hits)} items of {_render(steps[:i])} have {field_name} = {want!r}")
            idx = hits[0]
        if last:
            node[idx] = copy.deepcopy(value)
        else:
            node = node[idx]


def _render(steps: Sequence[str | int | tuple[str, str]]) -> str:
    out = ""
    for s in steps:
        if isinstance(s, int):
            out += f"[{s}]"
        elif isinstance(s, tuple):
            out += f"[{s[0]}={s[1]}]"
        else:
            out += f".{s}" if out else s
    return out


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def value_label(value: Any) -> str:
    """How a parameter value is shown in tables and plots."""
    return value if isinstance(value, str) else _canonical(value)


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One point of a grid: its values, its seed, its key and the validated simulation it stands for."""

    index: int
    key: str
    params: tuple[tuple[str, Any], ...]
    seed: int
    spec: SimulationSpec = field(repr=False, compare=False)

    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def describe(self) -> str:
        return ", ".join(f"{p}={value_label(v)}" for p, v in self.params) + f", seed={self.seed}"


@dataclass(frozen=True, slots=True)
class Grid:
    """A parsed grid file."""

    name: str
    source: str
    base: dict[str, Any]
    base_dir: Path
    parameters: tuple[tuple[str, tuple[Any, ...]], ...]
    seeds: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(len(v) for _, v in self.parameters) * len(self.seeds)

    def combinations(self) -> Iterator[tuple[tuple[str, Any], ...]]:
        names = [p for p, _ in self.parameters]
        for values in product(*(v for _, v in self.parameters)):
            yield tuple(zip(names, values, strict=True))

    def points(self) -> list[SweepPoint]:
        """Every point, validated as a scenario (the first bad one raises :class:`ConfigError`)."""
        base_hash = hashlib.sha256(_canonical(self.base).encode()).hexdigest()
        out: list[SweepPoint] = []
        for combo in self.combinations():
            for seed in self.seeds:
                data = copy.deepcopy(self.base)
                for path, value in combo:
                    try:
                        set_path(data, path, value)
                    except ConfigError as err:
                        raise ConfigError(f"{self.source}: parameters: {err}") from None
                data["seed"] = seed
                i = len(out)
                label = f"{self.source} (point {i}: " + ", ".join(f"{p}={value_label(v)}" for p, v in combo) + ")"
                spec = build_spec(parse_scenario(data, label), label, self.base_dir)
                key = hashlib.sha256(
                    _canonical([KEY_VERSION, base_hash, [list(c) for c in combo], seed]).encode()
                ).hexdigest()[:32]
                out.append(SweepPoint(i, key, combo, seed, spec))
        return out


def parse_grid(data: Any, source: str, base_dir: Path) -> Grid:
    """Validate a loaded grid file; ``source`` names it in messages, ``base_dir`` resolves ``scenario:``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    unknown = sorted(set(data) - {"name", "scenario", "seeds", "parameters", "description"})
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown field (expected name, scenario, seeds, parameters)")
    scenario = data.get("scenario")
    scenario_dir = base_dir
    if isinstance(scenario, str):
        path = base_dir / scenario
        base = read_yaml(path, f"{source}: scenario:")
        scenario_dir = path.parent
    elif isinstance(scenario, dict):
        base = scenario
    else:
        raise ConfigError(f"{source}: scenario: required, a scenario file name or an inline scenario mapping")
    if not isinstance(base, dict):
        raise ConfigError(f"{source}: scenario: expected a mapping at the top level of the scenario")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: parameters: expected a mapping of dotted path -> list of values")
    parameters = []
    for path, values in params.items():
        try:
            parse_path(str(path))
        except ConfigError as err:
            raise ConfigError(f"{source}: parameters: {err}") from None
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: parameters.{path}: expected a non-empty list of values")
        labels = [value_label(v) for v in values]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{source}: parameters.{path}: a value is listed twice")
        parameters.append((str(path), tuple(values)))
    seeds_raw = data.get("seeds")
    if seeds_raw is None:
        seeds: tuple[int, ...] = (int(base.get("seed", 0)) if isinstance(base.get("seed", 0), int) else 0,)
    elif isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool) and seeds_raw >= 1:
        seeds = tuple(range(seeds_raw))
    elif (
        isinstance(seeds_raw, list)
        and seeds_raw
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds_raw)
    ):
        seeds = tuple(seeds_raw)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{source}: seeds: a seed is listed twice")
    else:
        raise ConfigError(f"{source}: seeds: expected a positive count or a list of integers, got {seeds_raw!r}")
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: name: expected a non-empty string")
    return Grid(name, source, base, scenario_dir, tuple(parameters), seeds)


def load_grid(path: Path) -> Grid:
    """Read and validate a grid file (not yet its points: see :meth:`Grid.points`)."""
    return parse_grid(read_yaml(path), path.name, path.parent)


# ---- running one point ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointResult:
    """The summary figures of one simulated point (``error`` set and figures empty if it could not run)."""

    migrations: int
    completed: int
    aborted: int
    mean_total_time_s: float | None
    max_total_time_s: float | None
    mean_downtime_s: float | None
    max_downtime_s: float | None
    bytes_sent: int
    sim_time_s: float
    wall_time_s: float
    error: str | None = None

    def figures(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in FIGURES)


def run_points(specs: Sequence[SimulationSpec]) -> list[PointResult]:
    """Simulate a chunk of points, one after the other: one Dask task, so its overhead is paid once."""
    return [run_point(s) for s in specs]


def run_point(spec: SimulationSpec) -> PointResult:
    """Simulate one point and summarise it. Runs on a Dask worker; pure apart from the clock."""
    try:
        run = Simulation(spec, record_usage=False, record_flows=False).run()
    except SecmigError as err:
        return PointResult(len(spec.migrations), 0, 0, None, None, None, None, 0, 0.0, 0.0, f"{err}")
    done = [m for m in run.migrations if m.outcome == "completed"]
    totals = [m.total_time_s for m in done]
    downs = [m.downtime_s for m in done]
    return PointResult(
        migrations=len(run.migrations),
        completed=len(done),
        aborted=len(run.migrations) - len(done),
        mean_total_time_s=float(np.mean(totals)) if totals else None,
        max_total_time_s=max(totals) if totals else None,
        mean_downtime_s=float(np.mean(downs)) if downs else None,
        max_downtime_s=max(downs) if downs else None,
        bytes_sent=int(sum(m.bytes_sent for m in run.migrations)),
        sim_time_s=run.sim_time_s,
        wall_time_s=run.wall_time_s,
    )


# ---- the results table ----------------------------------------------------------------------------------


@contextmanager
def open_db(db_path: Path) -> Iterator[sqlite3.Connection]:
    """The sweep database, created if needed, in WAL mode so that readers see each point as it lands."""
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db_path)
    except (OSError, sqlite3.Error) as err:
        raise ConfigError(f"{db_path}: cannot open the sweep database: {err}") from None
    with closing(conn):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
        except sqlite3.Error as err:
            raise ConfigError(f"{db_path}: not a sweep database: {err}") from None
        yield conn


def finished_keys(conn: sqlite3.Connection, keys: Iterable[str]) -> set[str]:
    """Which of ``keys`` already have a row."""
    have = {r[0] for r in conn.execute("SELECT key FROM sweep_points")}
    return have & set(keys)


def record_points(
    conn: sqlite3.Connection, sweep: str, points: Sequence[SweepPoint], results: Sequence[PointResult]
) -> None:
    """Commit points' rows in one transaction (a point already there is left as it is)."""
    now = time.time()
    with conn:
        conn.executemany(
            f"INSERT OR IGNORE INTO sweep_points VALUES ({', '.join('?' * (5 + len(FIGURES)))})",
            [
                (p.key, sweep, _canonical(p.params_dict()), p.seed, *r.figures(), now)
                for p, r in zip(points, results, strict=True)
            ],
        )


@dataclass(frozen=True, slots=True)
class PointRow:
    """A row of ``sweep_points`` read back."""

    key: str
    params: dict[str, Any]
    seed: int
    result: PointResult
    finished_at: float


def read_points(db_path: Path, keys: Sequence[str] | None = None) -> list[PointRow]:
    """Rows of ``sweep_points`` (those of ``keys`` in that order, or all of them)."""
    with open_db(db_path) as conn:
        rows = conn.execute(f"SELECT key, params, seed, {', '.join(FIGURES)}, finished_at FROM sweep_points")
        by_key = {
            r[0]: PointRow(r[0], json.loads(r[1]), int(r[2]), PointResult(*r[3:-1]), float(r[-1])) for r in rows
        }
    if keys is None:
        return list(by_key.values())
    return [by_key[k] for k in keys if k in by_key]


# ---- running a grid -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SweepOutcome:
    """What a run of a grid did."""

    db_path: Path
    points: tuple[SweepPoint, ...]
    skipped: int
    """Points already in the database from an earlier run."""
    computed: int
    wall_time_s: float
    """Everything: reading the database, starting and stopping the cluster, the points, the commits."""
    compute_s: float
    """From handing the points to Dask to the last result committed."""
    workers: int


Progress = Callable[[int, int], None]


LOCAL_CLUSTER_CONFIG: dict[str, Any] = {
    # No queuing at the scheduler: each worker holds its next tasks already and never waits a round trip
    # between two of them.
    "distributed.scheduler.worker-saturation": math.inf,
    # The workers' periodic housekeeping (the system monitor's psutil polls every 500 ms, the memory monitor,
    # the statistical profiler, the event-loop tick) took a third of the simulation's speed on a 2-core
    # machine (benchmarks/sweep.py); slower polls keep the protection and lose the cost.
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
}
"""Dask settings for the local cluster ``secmig sweep`` starts; a remote cluster keeps its own."""


def _client(scheduler: str | None, workers: int | None) -> tuple[Any, Any]:
    import logging

    from dask.distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            return Client(scheduler, timeout="10s"), None  # type: ignore[no-untyped-call]
        except (OSError, TimeoutError) as err:
            raise ConfigError(f"--scheduler: cannot reach {scheduler}: {err}") from None
    import dask

    with dask.config.set(LOCAL_CLUSTER_CONFIG):
        cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    return Client(cluster), cluster  # type: ignore[no-untyped-call]


MAX_CHUNK = 16
"""Points per Dask task at most: enough to amortise a task's few milliseconds of overhead, few enough that a
killed sweep loses little and the workers stay balanced."""


def chunk_size(points: int, workers: int) -> int:
    """Points per task: at most :data:`MAX_CHUNK`, and at least eight tasks per worker when there are enough."""
    return max(1, min(MAX_CHUNK, points // (8 * max(1, workers))))


def run_sweep(
    grid: Grid,
    out_dir: Path,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    points: Sequence[SweepPoint] | None = None,
    chunk: int | None = None,
) -> SweepOutcome:
    """Run the points of ``grid`` not yet in ``out_dir/sweep.sqlite`` on Dask, committing each as it lands.

    ``scheduler`` is a Dask scheduler address (``tcp://HOST:8786``); without it a ``LocalCluster`` of
    ``workers`` processes (one thread each; default: one per core) is started and stopped. ``progress(done,
    total)`` is called as results land, counting the skipped points as done. Points travel in chunks of
    ``chunk`` (default :func:`chunk_size`); each chunk's rows are committed as soon as it is back.
    """
    if scheduler is not None and workers is not None:
        raise ConfigError("--workers sizes the local cluster; a --scheduler brings its own workers")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    if chunk is not None and chunk < 1:
        raise ConfigError(f"--chunk: must be at least 1, got {chunk}")
    pts = list(points) if points is not None else grid.points()
    db_path = out_dir / DB_NAME
    t0 = time.perf_counter()
    with open_db(db_path) as conn:
        done = finished_keys(conn, (p.key for p in pts))
        todo = [p for p in pts if p.key not in done]
        n_done = len(pts) - len(todo)
        if progress is not None:
            progress(n_done, len(pts))
        n_workers = 0
        compute_s = 0.0
        if todo:
            from dask.distributed import as_completed

            client, cluster = _client(scheduler, workers)
            try:
                n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
                t_compute = time.perf_counter()
                size = chunk or chunk_size(len(todo), n_workers)
                chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
                futures = client.map(
                    run_points,
                    [[p.spec for p in c] for c in chunks],
                    key=[f"secmig-points-{c[0].key}-{len(c)}" for c in chunks],
                )
                by_key = {f.key: c for f, c in zip(futures, chunks, strict=True)}
                for fut in as_completed(futures):  # type: ignore[no-untyped-call]
                    done_chunk = by_key[fut.key]
                    record_points(conn, grid.name, done_chunk, fut.result())
                    n_done += len(done_chunk)
                    if progress is not None:
                        progress(n_done, len(pts))
                    fut.release()
                compute_s = time.perf_counter() - t_compute
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    return SweepOutcome(
        db_path, tuple(pts), len(pts) - len(todo), len(todo), time.perf_counter() - t0, compute_s, n_workers
    )


# ---- gathering ------------------------------------------------------------------------------------------


def table_rows(grid: Grid, rows: Sequence[PointRow]) -> list[dict[str, Any]]:
    """Flat records, one per point: key, one column per parameter (as written), seed, the figures."""
    out = []
    for r in rows:
        rec: dict[str, Any] = {"key": r.key}
        for path, _ in grid.parameters:
            rec[path] = value_label(r.params[path]) if path in r.params else None
        rec["seed"] = r.seed
        rec.update(zip(FIGURES, r.result.figures(), strict=True))
        out.append(rec)
    return out


def write_parquet(grid: Grid, rows: Sequence[PointRow], path: Path) -> Path:
    """The grid's rows as a Parquet file (needs pyarrow: ``pip install 'secmig[parquet]'``)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("--parquet needs pyarrow: pip install 'secmig[parquet]'") from None
    records = table_rows(grid, rows)
    schema = pa.schema(
        [("key", pa.string())]
        + [(p, pa.string()) for p, _ in grid.parameters]
        + [
            ("seed", pa.int64()),
            ("migrations", pa.int64()),
            ("completed", pa.int64()),
            ("aborted", pa.int64()),
            ("mean_total_time_s", pa.float64()),
            ("max_total_time_s", pa.float64()),
            ("mean_downtime_s", pa.float64()),
            ("max_downtime_s", pa.float64()),
            ("bytes_sent", pa.int64()),
            ("sim_time_s", pa.float64()),
            ("wall_time_s", pa.float64()),
            ("error", pa.string()),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Points sharing the values of some parameters, averaged over seeds (and the other parameters)."""

    values: tuple[Any, ...]
    points: int
    completed: int
    aborted: int
    errors: int
    mean_total_time_s: float
    """Mean over points of their mean total time (NaN if no migration completed)."""
    max_total_time_s: float
    mean_max_downtime_s: float
    """Mean over points of their max downtime."""
    max_downtime_s: float
    mean_bytes_sent: float


def _nanmean(xs: Sequence[float | None]) -> float:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(vals)) if vals else math.nan


def _nanmax(xs: Sequence[float | None]) -> float:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return max(vals) if vals else math.nan


def aggregate(grid: Grid, rows: Sequence[PointRow], over: Sequence[str] | None = None) -> list[Aggregate]:
    """Group the rows by the values of the parameters ``over`` (default: all), in grid order."""
    names = list(over) if over is not None else [p for p, _ in grid.parameters]
    values = dict(grid.parameters)
    groups: dict[tuple[str, ...], list[PointRow]] = {}
    for r in rows:
        groups.setdefault(tuple(value_label(r.params.get(n)) for n in names), []).append(r)
    out = []
    for combo in product(*(values[n] for n in names)):
        g = groups.get(tuple(value_label(v) for v in combo), [])
        res = [r.result for r in g]
        out.append(
            Aggregate(
                values=tuple(combo),
                points=len(g),
                completed=sum(x.completed for x in res),
                aborted=sum(x.aborted for x in res),
                errors=sum(1 for x in res if x.error),
                mean_total_time_s=_nanmean([x.mean_total_time_s for x in res]),
                max_total_time_s=_nanmax([x.max_total_time_s for x in res]),
                mean_max_downtime_s=_nanmean([x.max_downtime_s for x in res]),
                max_downtime_s=_nanmax([x.max_downtime_s for x in res]),
                mean_bytes_sent=_nanmean([float(x.bytes_sent) for x in res]),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class HeatmapData:
    """Two parameters' values and, per cell, the mean total time and the mean max downtime (NaN: none)."""

    xname: str
    yname: str
    xlabels: tuple[str, ...]
    ylabels: tuple[str, ...]
    total_time_s: np.ndarray[Any, np.dtype[np.float64]]
    downtime_s: np.ndarray[Any, np.dtype[np.float64]]


def heatmap_data(grid: Grid, rows: Sequence[PointRow]) -> HeatmapData | None:
    """Cells over the first two parameters (one row when there is one; ``None`` when there is none)."""
    if not grid.parameters:
        return None
    xname, xs = grid.parameters[0]
    yname, ys = grid.parameters[1] if len(grid.parameters) > 1 else ("", ("",))
    over = [xname] + ([yname] if yname else [])
    cells = {a.values: a for a in aggregate(grid, rows, over)}
    tt = np.full((len(ys), len(xs)), math.nan)
    dt = np.full((len(ys), len(xs)), math.nan)
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            a = cells[(x, y) if yname else (x,)]
            tt[j, i], dt[j, i] = a.mean_total_time_s, a.mean_max_downtime_s
    return HeatmapData(
        xname, yname, tuple(value_label(v) for v in xs), tuple(value_label(v) for v in ys) if yname else ("",), tt, dt
    )
