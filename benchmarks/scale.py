"""Scale benchmark: many concurrent migrations through one shared core.

The platform of issue 2: N hosts, each a 1 Gbit/s NIC into one core whose capacity is a quarter of all
NICs together; M VMs of 1 GiB, each dirtying (uniformly over its RAM) at 30 % of its NIC's speed, migrate
at once from host i to host i + M. Prints wall time, migrations simulated per second and peak memory.

    python benchmarks/scale.py                       # 1,000 hosts, 500 migrations
    python benchmarks/scale.py --migrations 2000     # hosts default to 2 × migrations
    python benchmarks/scale.py --migrations 5000 --profile

Run by hand; the figures go into the issue's note, not into a timed test.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import time

import numpy as np

from secmig.migration.policy import policy_preset
from secmig.model.analytic import PAGE_WIRE_BYTES
from secmig.model.dirty import Uniform
from secmig.model.infra import VM, Datacenter, Host, Infrastructure
from secmig.sim.engine import MigrationSpec, Simulation, SimulationSpec

GiB = 2**30
NIC = 125e6  # 1 Gbit/s in bytes/s


def build(hosts: int, migrations: int, heterogeneous: bool = False) -> SimulationSpec:
    hosts = max(hosts, 2 * migrations)
    core = hosts * NIC / 4
    infra = Infrastructure(
        (Datacenter("dc", core_bytes_per_s=core),), tuple(Host(f"h{i}", "dc", NIC) for i in range(hosts))
    )
    rng = np.random.default_rng(7)
    # Identical VMs started together end their rounds together, which the network coalesces into one
    # re-share; --heterogeneous spreads rates (±20 %) and starts (0–1 s) so every round end is an event.
    spread = rng.uniform(0.8, 1.2, migrations) if heterogeneous else np.ones(migrations)
    starts = rng.uniform(0.0, 1.0, migrations) if heterogeneous else np.zeros(migrations)
    rate_pages = 0.3 * NIC / PAGE_WIRE_BYTES
    vms = tuple(
        VM(f"vm{i}", f"h{i}", GiB, GiB, dirty=Uniform(rate_pages * spread[i], GiB // 4096))
        for i in range(migrations)
    )
    qemu = policy_preset("qemu")
    migs = tuple(
        MigrationSpec(f"vm{i}", f"h{i + migrations}", float(starts[i]), "precopy", qemu)
        for i in range(migrations)
    )
    return SimulationSpec("scale", infra, vms, migs, seed=1, usage_bin_s=1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--migrations", type=int, default=500)
    ap.add_argument("--profile", action="store_true", help="print the top of the cProfile profile")
    ap.add_argument("--heterogeneous", action="store_true", help="spread dirty rates and start times")
    ap.add_argument("--no-usage", action="store_true", help="do not record link utilisation over time")
    args = ap.parse_args()

    t0 = time.perf_counter()
    spec = build(args.hosts, args.migrations, args.heterogeneous)
    sim = Simulation(spec, record_usage=not args.no_usage)
    setup = time.perf_counter() - t0
    prof = cProfile.Profile() if args.profile else None
    t1 = time.perf_counter()
    if prof:
        prof.enable()
    run = sim.run()
    if prof:
        prof.disable()
    wall = time.perf_counter() - t1
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    done = sum(m.outcome == "completed" for m in run.migrations)
    mean_t = sum(m.total_time_s for m in run.migrations) / len(run.migrations)
    rounds = sum(len(m.rounds) for m in run.migrations)
    print(f"hosts={len(spec.infra.hosts)} migrations={len(run.migrations)} completed={done}")
    print(
        f"simulated: {run.sim_time_s:.1f} s, mean migration {mean_t:.1f} s, "
        f"{rounds} rounds, {run.reshares} re-shares"
    )
    print(f"wall time: {wall:.3f} s simulating + {setup:.3f} s building the platform = {wall + setup:.3f} s")
    print(f"migrations simulated per second: {len(run.migrations) / (wall + setup):,.0f} (platform included)")
    print(f"peak memory (max RSS of the process): {peak_mib:.0f} MiB")
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
