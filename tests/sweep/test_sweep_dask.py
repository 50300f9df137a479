"""Sweeps on a Dask LocalCluster: 200 points, killed halfway for real, resumed, equal to a plain loop."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from secmig.cli import main
from secmig.sweep import FIGURES, load_grid, read_points, run_point, run_sweep

KILL_AFTER = 40
"""Points that must have landed before the first run is killed (of 200, at about 15 ms each on one worker)."""


def landed(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return int(conn.execute("SELECT count(*) FROM sweep_points").fetchone()[0])
    except sqlite3.Error:
        return 0  # not created yet


def start_sweep(grid: Path, out: Path, workers: int) -> subprocess.Popen[bytes]:
    # Its own session, so that its Dask worker processes can be cleaned up as a group after the kill.
    return subprocess.Popen(
        [sys.executable, "-m", "secmig", "sweep", str(grid), "--workers", str(workers), "--out", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_200_point_sweep_survives_a_kill_and_equals_a_plain_loop(
    sweep_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kill -9 after 40 points, resume: nothing recomputed, 200 rows equal to running each point alone."""
    grid_file, out = sweep_dir / "grid.yaml", sweep_dir / "out"
    db = out / "sweep.sqlite"
    proc = start_sweep(grid_file, out, workers=1)
    try:
        deadline = time.monotonic() + 120
        while landed(db) < KILL_AFTER:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the sweep did not get going"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # the sweep itself, no chance to clean up
        proc.wait(timeout=30)
    finally:
        kill_group(proc)  # its orphaned Dask nanny and worker
        proc.wait(timeout=30)
    before = {r.key: r.finished_at for r in read_points(db)}
    assert KILL_AFTER <= len(before) < 200, f"{len(before)} points landed before the kill"

    assert main(["sweep", str(grid_file), "--workers", "2", "--out", str(out), "--parquet"]) == 0
    text = capsys.readouterr().out
    assert f"{200 - len(before)} points computed on 2 workers" in text
    assert f"{len(before)} were already done" in text

    grid = load_grid(grid_file)
    points = grid.points()
    rows = read_points(db, [p.key for p in points])
    assert len(rows) == 200 and landed(db) == 200
    assert {r.key: r.finished_at for r in rows if r.key in before} == before  # not recomputed
    for point, row in zip(points, rows, strict=True):
        alone = run_point(point.spec)
        assert row.params == point.params_dict() and row.seed == point.seed
        # Everything but the wall time, which is the only figure that is not a function of the point.
        assert row.result.figures()[:-2] == alone.figures()[:-2], point.describe()
        assert row.result.error is None
    assert {r.result.aborted > 0 for r in rows} == {True, False}  # the grid spans both outcomes

    table = pq.read_table(out / "sweep.parquet")
    assert table.num_rows == 200
    assert table.column_names[:5] == [
        "key", "vms[name=a].dirty.rate", "datacenters[0].hosts[0].nic", "defaults.policy", "seed"
    ]
    assert table.column_names[5:] == FIGURES
    assert (out / "heatmap.png").stat().st_size > 20_000


def test_a_finished_sweep_reruns_nothing_and_starts_no_cluster(sweep_dir: Path) -> None:
    """Once every point is in the database, a re-run computes none and needs no Dask cluster at all."""
    grid = load_grid(sweep_dir / "grid.yaml")
    points = grid.points()[:6]
    first = run_sweep(grid, sweep_dir / "out", workers=1, points=points)
    assert (first.computed, first.skipped, first.workers) == (6, 0, 1)
    again = run_sweep(grid, sweep_dir / "out", scheduler="tcp://127.0.0.1:1", points=points)
    assert (again.computed, again.skipped) == (0, 6)


def test_sweep_runs_on_a_given_scheduler(sweep_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--scheduler tcp://…`` sends the points to that cluster's workers; ``--workers`` beside it is refused."""
    from dask.distributed import LocalCluster

    grid = sweep_dir / "small.yaml"
    grid.write_text("scenario: base.yaml\nseeds: 2\nparameters:\n  defaults.policy: [qemu, xen]\n")
    with LocalCluster(
        n_workers=1, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        assert main(["sweep", str(grid), "--scheduler", address, "--out", str(sweep_dir / "out")]) == 0
        assert "4 points computed on 1 worker in" in capsys.readouterr().out
        assert main(["sweep", str(grid), "--scheduler", address, "--workers", "2"]) == 2
        assert "--workers sizes the local cluster" in capsys.readouterr().err
    assert landed(sweep_dir / "out" / "sweep.sqlite") == 4
