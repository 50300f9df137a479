"""Consolidation benchmark: the PlanetLab day of CloudSim's power examples, timed.

800 hosts, 1,052 VMs, 288 five-minute intervals, as ``secmig consolidate`` runs it. Prints, per policy,
the wall time and the figures CloudSim prints (energy, migrations, SLATAH, PDM, SLAV, ESV, shutdowns).
CloudSim's own Java run of THR 0.8 + MMT takes about 20 s on the project's 2-core machines.

    python benchmarks/consolidation.py                                   # THR 0.8 + MMT, cloudsim, no security
    python benchmarks/consolidation.py --secure                          # … with grants and Vsignatures
    python benchmarks/consolidation.py --overload iqr:1.5 mad:2.5 lr:1.2 --migration-model network --secure
    python benchmarks/consolidation.py --profile

Run by hand; the figures go into the issue's note, not into a timed test.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

from secmig.cloud.overload import parse_overload
from secmig.cloud.selection import parse_selection
from secmig.lab.consolidation import DayConfig, parse_migration_model, run_day

DEFAULT_DAY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "planetlab" / "20110303"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", nargs="?", type=Path, default=DEFAULT_DAY)
    ap.add_argument("--overload", nargs="+", default=["thr:0.8"])
    ap.add_argument("--selection", default="mmt")
    ap.add_argument("--migration-model", default="cloudsim")
    ap.add_argument("--secure", action="store_true", help="grants, Vsignatures (and the monitor for network)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    header = (
        f"{'policy':<10} {'model':<9} {'wall s':>7} {'energy kWh':>10} {'migrations':>10} {'SLATAH %':>8} "
        f"{'PDM %':>7} {'SLAV %':>9} {'ESV':>8} {'shutdowns':>9} {'downtime s':>10}"
    )
    print(header)
    for spec in args.overload:
        cfg = DayConfig(
            args.workload,
            parse_overload(spec),
            parse_selection(args.selection),
            parse_migration_model(args.migration_model),
            secure=args.secure,
        )
        prof = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        r = run_day(cfg)
        if prof is not None:
            prof.disable()
        wall = time.perf_counter() - t0
        m = r.metrics
        s = r.summary()
        print(
            f"{spec:<10} {cfg.migration_model.value:<9} {wall:7.1f} {m.energy_kwh:10.2f} {m.migrations:10d} "
            f"{m.slatah * 100:8.2f} {m.pdm * 100:7.3f} {m.slav * 100:9.5f} {m.esv:8.5f} {m.shutdowns:9d} "
            f"{float(s['total_downtime_s'] or 0):10.1f}",
            flush=True,
        )
        if prof is not None:
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
