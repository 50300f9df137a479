"""How close are secmig's predictions to real QEMU? A grid of real migrations of the reference guest.

Each case boots the reference guest in QEMU (TCG unless ``--accel`` says otherwise), measures its write
rate, migrates it over loopback with QEMU's max-bandwidth and downtime-limit, and reads QEMU's own figures.
secmig predicts the same case from what a user can measure (RAM, used memory, working set, measured write
rate, pattern, bandwidth, downtime limit); CloudSim's formula, RAM ÷ (bandwidth / 2), is the baseline.
Cases that cannot converge are cancelled at ``--timeout`` and count as 'did not converge'.

    python benchmarks/fidelity.py                 # the whole grid, a few minutes
    python benchmarks/fidelity.py --quick         # three cases
    python benchmarks/fidelity.py --json out.json # also write every figure
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from secmig.agent.qemu.calibration import (
    CalibrationConfig,
    CalibrationRun,
    Prediction,
    calibrate,
    cloudsim_prediction,
    measure_loopback_bandwidth,
    predict_for,
)
from secmig.agent.qemu.guest import GuestParams, Pattern
from secmig.errors import SecmigError

MiB = 1 << 20
MB = 1e6


@dataclass(frozen=True)
class Case:
    name: str
    ram_mib: int
    ws_mib: int
    pattern: Pattern
    rate_pages_per_s: int
    bandwidth_mb_s: float
    downtime_limit_ms: int

    def config(self, accel: str, timeout_s: float, measure_s: float, link: float | None = None) -> CalibrationConfig:
        return CalibrationConfig(
            ram_bytes=self.ram_mib * MiB,
            guest=GuestParams(self.ws_mib * MiB, self.rate_pages_per_s, self.pattern),
            bandwidth_bytes_per_s=self.bandwidth_mb_s * MB,
            downtime_limit_s=self.downtime_limit_ms / 1000,
            accel=accel,  # type: ignore[arg-type]
            measure_s=measure_s,
            timeout_s=timeout_s,
            link_bandwidth_bytes_per_s=link,
        )


# RAM 256–512 MiB, working sets 32–256 MiB, rates up to 100 000 pages/s (and flat out), 50–200 MB/s,
# downtime limits 100–300 ms. The last three dirty far faster than the link can carry: they never converge.
GRID = (
    Case("seq-32M-idle-ish", 256, 32, "seq", 5_000, 100, 300),
    Case("seq-64M", 256, 64, "seq", 20_000, 100, 300),
    Case("rand-64M", 256, 64, "rand", 30_000, 100, 200),
    Case("rand-128M-fast-link", 512, 128, "rand", 20_000, 200, 300),
    Case("seq-256M-tight", 512, 256, "seq", 20_000, 200, 100),
    Case("hot-128M", 384, 128, "hot", 40_000, 100, 300),
    Case("rand-256M", 512, 256, "rand", 50_000, 150, 200),
    Case("rand-32M-slow-link", 512, 32, "rand", 5_000, 50, 300),
    Case("seq-64M-stuck", 256, 64, "seq", 40_000, 50, 100),
    Case("rand-256M-stuck", 512, 256, "rand", 100_000, 100, 300),
    Case("hot-128M-flat-out", 256, 128, "hot", 0, 100, 100),
)
QUICK = ("seq-64M", "rand-64M", "seq-64M-stuck")


@dataclass(frozen=True)
class Outcome:
    case: Case
    run: CalibrationRun | None
    secmig: Prediction | None
    cloudsim: Prediction
    error: str | None = None


def rel(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return (pred - meas) / meas


def fmt_s(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}s"


def fmt_ms(v: float | None) -> str:
    return "—" if v is None else f"{v * 1000:.0f}ms"


def fmt_mib(v: float | None) -> str:
    return "—" if v is None else f"{v / MiB:.0f}M"


def fmt_pct(v: float | None) -> str:
    return "—" if v is None else f"{v:+.0%}"


def run_case(case: Case, accel: str, timeout_s: float, measure_s: float, link: float | None) -> Outcome:
    cfg = case.config(accel, timeout_s, measure_s, link)
    cloud = cloudsim_prediction(cfg)
    try:
        run = calibrate(cfg)
    except SecmigError as err:
        return Outcome(case, None, None, cloud, f"run failed: {err}")
    try:
        pred: Prediction | None = predict_for(cfg, run.write_rate.pages_per_s)
        note = None
    except (ImportError, SecmigError) as err:
        pred, note = None, f"no prediction: {err}"
    return Outcome(case, run, pred, cloud, note)


def print_table(outcomes: list[Outcome]) -> None:
    head = (
        f"{'case':<20} {'RAM':>4} {'WS':>4} {'pat':>4} {'asked/s':>7} {'meas/s':>8} {'B/W':>5} {'DTL':>5} │ "
        f"{'conv Q/S':>8} │ {'time Q':>7} {'S':>7} {'err':>6} {'CS':>7} {'err':>6} │ "
        f"{'down Q':>6} {'S':>6} │ {'bytes Q':>7} {'S':>6} {'err':>6} │ {'rnd Q':>5} {'S':>3}"
    )
    print(head)
    print("─" * len(head))
    for o in outcomes:
        c = o.case
        prefix = f"{c.name:<20} {c.ram_mib:>4} {c.ws_mib:>4} {c.pattern:>4} {c.rate_pages_per_s or 'max':>7} "
        if o.run is None:
            print(prefix + f"  {o.error}")
            continue
        m = o.run.migration
        s = o.secmig
        s_time = None if s is None else s.total_time_s
        s_bytes = None if s is None else s.bytes_sent
        conv = f"{'y' if m.converged else 'n'}/{'-' if s is None else 'y' if s.converged else 'n'}"
        print(
            prefix
            + f"{o.run.write_rate.pages_per_s:>8.0f} {c.bandwidth_mb_s:>5.0f} {c.downtime_limit_ms:>5} │ "
            f"{conv:>8} │ {fmt_s(m.total_time_s):>7} {fmt_s(s_time):>7} "
            f"{fmt_pct(rel(s_time, m.total_time_s) if m.converged else None):>6} "
            f"{fmt_s(o.cloudsim.total_time_s):>7} "
            f"{fmt_pct(rel(o.cloudsim.total_time_s, m.total_time_s) if m.converged else None):>6} │ "
            f"{fmt_ms(m.downtime_s):>6} {fmt_ms(None if s is None else s.downtime_s):>6} │ "
            f"{fmt_mib(m.transferred_bytes):>7} {fmt_mib(s_bytes):>6} "
            f"{fmt_pct(rel(s_bytes, m.transferred_bytes) if m.converged else None):>6} │ "
            f"{m.rounds:>5} {'—' if s is None or s.rounds is None else s.rounds:>3}"
        )
        if o.error:
            print(f"{'':<20} {o.error}")


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Median and worst |relative error| over the cases QEMU completed; convergence over all cases."""
    done = [o for o in outcomes if o.run is not None]
    conv = [o for o in done if o.run is not None and o.run.migration.converged]
    out: dict[str, Any] = {"cases": len(outcomes), "ran": len(done), "qemu_converged": len(conv)}

    def stats(values: list[float]) -> dict[str, float | None]:
        a = [abs(v) for v in values]
        return {"median": statistics.median(a) if a else None, "worst": max(a) if a else None}

    for model in ("secmig", "cloudsim"):
        t_err: list[float] = []
        b_err: list[float] = []
        d_ok = d_n = 0
        conv_right = conv_n = 0
        for o in done:
            assert o.run is not None
            m = o.run.migration
            p = o.secmig if model == "secmig" else o.cloudsim
            if p is None:
                continue
            conv_n += 1
            conv_right += p.converged == m.converged
            if not m.converged:
                continue
            if (e := rel(p.total_time_s, m.total_time_s)) is not None:
                t_err.append(e)
            if (e := rel(p.bytes_sent, m.transferred_bytes)) is not None:
                b_err.append(e)
            if p.downtime_s is not None and m.downtime_s is not None:
                d_n += 1
                diff = abs(p.downtime_s - m.downtime_s)
                d_ok += diff <= 0.020 or diff <= 0.25 * m.downtime_s
        out[model] = {
            "total_time_rel_error": stats(t_err),
            "bytes_rel_error": stats(b_err),
            "downtime_within_20ms_or_25pct": f"{d_ok}/{d_n}",
            "convergence_right": f"{conv_right}/{conv_n}",
        }
    return out


def print_summary(summary: dict[str, Any]) -> None:
    print()
    print(f"{summary['ran']}/{summary['cases']} cases ran; QEMU converged in {summary['qemu_converged']}.")
    cols = ("time med", 8), ("worst", 7), ("bytes med", 9), ("worst", 7), ("downtime ok", 11), ("conv ok", 8)
    print(f"{'model':<9} " + " ".join(f"{name:>{width}}" for name, width in cols))
    for model in ("secmig", "cloudsim"):
        s = summary[model]
        t = s["total_time_rel_error"]

        def p(v: float | None) -> str:
            return "—" if v is None else f"{v:.0%}"

        print(
            f"{model:<9} {p(t['median']):>8} {p(t['worst']):>7} "
            f"{p(s['bytes_rel_error']['median']):>9} {p(s['bytes_rel_error']['worst']):>7} "
            f"{s['downtime_within_20ms_or_25pct']:>11} {s['convergence_right']:>8}"
        )


def outcome_dict(o: Outcome) -> dict[str, Any]:
    d: dict[str, Any] = {"case": o.case.__dict__, "error": o.error}
    if o.run is not None:
        m = o.run.migration
        d["measured"] = {
            "accel": o.run.accel,
            "write_rate_pages_per_s": o.run.write_rate.pages_per_s,
            "write_rate_during_migration_pages_per_s": m.guest_write_rate_pages_per_s,
            "converged": m.converged,
            "total_time_s": m.total_time_s,
            "downtime_s": m.downtime_s,
            "bytes_sent": m.transferred_bytes,
            "rounds": m.rounds,
            "normal_pages": m.normal_pages,
            "zero_pages": m.zero_pages,
            "precopy_bytes": m.precopy_bytes,
            "downtime_bytes": m.downtime_bytes,
            "throughput_mbps": m.throughput_mbps,
        }
    for p in (o.secmig, o.cloudsim):
        if p is not None:
            d[p.model] = {
                "total_time_s": p.total_time_s,
                "downtime_s": p.downtime_s,
                "bytes_sent": p.bytes_sent,
                "rounds": p.rounds,
                "converged": p.converged,
            }
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accel", default="tcg", choices=("auto", "kvm", "tcg"))
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a case counts as stuck")
    ap.add_argument("--measure", type=float, default=2.0, help="seconds of write-rate measurement")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--case", action="append", help="run only this case (repeatable)")
    ap.add_argument("--json", metavar="PATH", help="write every figure to this file")
    args = ap.parse_args(argv)

    cases = [
        c for c in GRID if (not args.quick or c.name in QUICK) and (not args.case or c.name in args.case)
    ]
    if not cases:
        print("no case selected", file=sys.stderr)
        return 2
    outcomes = []
    t0 = time.monotonic()
    # The link's own speed, as a user would measure it: QEMU sends the stop-and-copy uncapped.
    link = measure_loopback_bandwidth()
    print(f"loopback link: {link / 1e9:.2f} GB/s", file=sys.stderr)
    for case in cases:
        print(f"… {case.name}", file=sys.stderr, flush=True)
        outcomes.append(run_case(case, args.accel, args.timeout, args.measure, link))
    print(
        f"secmig fidelity: {len(cases)} real QEMU migrations ({args.accel}), "
        f"Q = QEMU measured, S = secmig, CS = CloudSim; "
        f"errors are (predicted − measured) / measured; {time.monotonic() - t0:.0f} s"
    )
    print_table(outcomes)
    summary = summarize(outcomes)
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": [outcome_dict(o) for o in outcomes], "summary": summary}, f, indent=2)
    return 0 if any(o.run is not None for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
