"""Running a grid on Dask: points in small chunks (one task each), each chunk committed as soon as it is back.

A re-run skips the keys already in ``sweep.sqlite``, so a sweep stopped at any moment resumes where it
was, losing only the chunks that were in flight. Prints nothing; progress goes through a callback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secmig.errors import ConfigError, SecmigError
from secmig.sim.engine import Simulation, SimulationSpec
from secmig.sweep.grid import Grid, SweepPoint
from secmig.sweep.store import DB_NAME, PointResult, finished_keys, open_db, record_points


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
