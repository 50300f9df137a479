"""Sweep benchmark: 1,000 points on Dask with 1 and 2 workers, against a plain loop in one process.

The grid: four VMs migrating at once between four hosts (the shape of the sweep tests), over 5 dirty
rates × 4 NIC speeds × 2 stop policies × 25 seeds = 1,000 points. For each number of workers it times

- the cluster's start (a ``LocalCluster`` of that many one-thread worker processes, as ``secmig sweep``
  starts it),
- ``run_sweep`` into an empty folder with one point a Dask task, and with the default chunks of up to
  16 points a task (what ``secmig sweep`` does): cluster start and stop, results committed to SQLite as
  they land,

and compares them with the same points simulated one after the other in this process (``loop``). Dask's
per-point overhead is (the sweep's time on 1 worker from the first point handed over to the last one
committed − the loop's time) / points.

    python benchmarks/sweep.py                  # 1,000 points, 1 and 2 workers
    python benchmarks/sweep.py --points 200 --workers 1 2 4

Run by hand; the figures go into the issue's note, not into a timed test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

from secmig.sim.engine import SimulationSpec
from secmig.sweep import MAX_CHUNK, Grid, load_grid, run_point, run_sweep
from secmig.sweep.runner import _client

BASE = """
name: sweep-bench
seed: 0
defaults: {policy: qemu, downtime_limit: 300ms}
datacenters:
  - name: dc
    core: 20Gbit/s
    hosts:
      - {name: "h{i}", count: 4, nic: 10Gbit/s}
vms:
  - {name: a, host: h1, ram: 2GiB, used: 1GiB,
     dirty: {pattern: uniform, rate: 20000pages/s, working_set: 512MiB, noise: 0.1}}
  - {name: b, host: h1, ram: 2GiB, used: 1GiB,
     dirty: {pattern: hotspot, rate: 30000pages/s, hot_set: 128MiB, noise: 0.1}}
  - {name: c, host: h2, ram: 2GiB, used: 1GiB,
     dirty: {pattern: sequential, rate: 15000pages/s, working_set: 512MiB, noise: 0.1}}
  - {name: d, host: h2, ram: 2GiB, used: 1GiB,
     dirty: {pattern: uniform, rate: 10000pages/s, working_set: 256MiB, noise: 0.1}}
migrations:
  - {vm: a, to: h3, at: 1s}
  - {vm: b, to: h4, at: 1s}
  - {vm: c, to: h3, at: 1.5s}
  - {vm: d, to: h4, at: 2s}
"""
PARAMETERS = {
    "vms[name=a].dirty.rate": ["5000pages/s", "20000pages/s", "60000pages/s", "120000pages/s", "200000pages/s"],
    "datacenters[0].hosts[0].nic": ["1Gbit/s", "2Gbit/s", "5Gbit/s", "10Gbit/s"],
    "defaults.policy": ["qemu", "xen"],
}


def make_grid(folder: Path, points: int) -> Grid:
    combos = 5 * 4 * 2
    (folder / "base.yaml").write_text(BASE)
    seeds = max(1, -(-points // combos))
    grid = {"scenario": "base.yaml", "seeds": seeds, "parameters": PARAMETERS}
    (folder / "grid.yaml").write_text(yaml.safe_dump(grid))
    return load_grid(folder / "grid.yaml")


def plain_loop(specs: list[SimulationSpec]) -> float:
    """Seconds to simulate every point one after the other, in the calling process."""
    t = time.perf_counter()
    for s in specs:
        run_point(s)
    return time.perf_counter() - t


def cluster_start(workers: int) -> float:
    """Seconds to start (and have ready) a local cluster as ``secmig sweep`` starts it."""
    t = time.perf_counter()
    client, cluster = _client(None, workers)
    client.wait_for_workers(workers)
    elapsed = time.perf_counter() - t
    client.close()
    cluster.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        grid = make_grid(folder, args.points)
        t = time.perf_counter()
        points = grid.points()[: args.points]
        validate_s = time.perf_counter() - t
        specs = [p.spec for p in points]
        n = len(specs)
        print(f"{n} points, {os.cpu_count()} cores; validating the grid took {validate_s:.2f} s")
        # The machine may be shared: the loop runs before and after the Dask runs, and the faster one counts.
        loop_s = plain_loop(specs)
        print(f"loop, 1 process       : {loop_s:7.2f} s   {1e3 * loop_s / n:6.2f} ms a point")

        per_task: dict[int, float] = {}
        chunked: dict[int, float] = {}
        for w in args.workers:
            print(f"cluster start, {w} worker{'s' if w > 1 else ''}: {cluster_start(w):.2f} s")
            for label, chunk, into in (("1 point a task", 1, per_task), (f"chunks of <={MAX_CHUNK}", None, chunked)):
                out = folder / f"out-{w}-{chunk}"
                t = time.perf_counter()
                outcome = run_sweep(grid, out, workers=w, points=points, chunk=chunk)
                total = time.perf_counter() - t
                assert outcome.computed == n
                into[w] = outcome.compute_s
                print(
                    f"sweep, {w} worker{'s' if w > 1 else ' '}, {label:>15}: {total:7.2f} s end to end, "
                    f"{into[w]:7.2f} s from the first point handed over to the last committed   "
                    f"{1e3 * into[w] / n:6.2f} ms a point"
                )
        again = plain_loop(specs)
        print(f"loop again            : {again:7.2f} s")
        loop_s = min(loop_s, again)
        if 1 in per_task:
            print(
                f"per-point overhead on 1 worker against the loop: {1e3 * (per_task[1] - loop_s) / n:+.2f} ms "
                f"with one point a task, {1e3 * (chunked[1] - loop_s) / n:+.2f} ms in chunks"
            )
            for w in args.workers:
                if w != 1:
                    print(
                        f"speed-up 1 -> {w} workers (chunks): {chunked[1] / chunked[w]:.2f}x "
                        f"(parallel efficiency {chunked[1] / chunked[w] / w:.0%}); "
                        f"{w} workers against the loop: {loop_s / chunked[w]:.2f}x"
                    )


if __name__ == "__main__":
    main()
