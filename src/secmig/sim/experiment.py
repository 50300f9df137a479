"""``secmig experiment paper``: the paper's experiment, its Table 6.1 and its Chart 1, from a real run."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action
from secmig.sim.attacks import ScenarioRun, run_scenario


@dataclass(frozen=True, slots=True)
class MoveRow:
    """One row of Table 6.1."""

    vm: str
    move: str
    preset_bytes_per_s: float
    start_s: float
    completion_s: float
    actual_bytes_per_s: float
    verdict: str


def run_paper_experiment(rules: RuleSet | None = None) -> tuple[ScenarioRun, list[MoveRow]]:
    path = Path(str(resources.files("secmig.data").joinpath("experiment-paper.yaml")))
    run = run_scenario(path, rules or RuleSet())
    sim, log = run.sim, run.log
    rows: list[MoveRow] = []
    for m in sim.results:
        vm = sim.vms[m.vm]
        actual = m.bytes_sent / m.total_time_s if m.total_time_s > 0 else 0.0
        checks = [v for v in log.verdicts if v.vm == m.vm and "challenge" in v.evidence]
        verdict = "authorized: identity check passed" if checks else "authorized: LOW, continue"
        if m.outcome != "completed":
            verdict = f"aborted: {m.stop_reason}"
        rows.append(
            MoveRow(
                m.vm,
                f"{m.source} → {m.destination} (migration)",
                vm.transfer_rate_bytes_per_s or 0.0,
                m.start_s,
                m.end_s,
                actual,
                verdict,
            )
        )
    for t in sim.spec.traffic:
        if t.kind != "exfil":
            continue
        vm = sim.vms[t.src_vm]
        hits = [v for v in log.verdicts if v.vm == t.src_vm and v.action is not Action.CONTINUE]
        end = hits[0].t_s if hits else t.start_s + t.duration_s
        moved = sum(f.bytes for f in sim.flows if f.vm == t.src_vm and f.kind == "exfil")
        verdict = (
            f"unauthorized: {hits[0].level.value} → identity check failed → {hits[0].action.value}"
            if hits
            else "not detected"
        )
        rows.append(
            MoveRow(
                t.src_vm,
                f"{sim.location.get(t.src_vm, '?')} → {t.dst} (no grant)",
                vm.transfer_rate_bytes_per_s or 0.0,
                t.start_s,
                end,
                moved / (end - t.start_s) if end > t.start_s else 0.0,
                verdict,
            )
        )
    rows.sort(key=lambda r: r.start_s)
    return run, rows


def write_table(rows: list[MoveRow], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["vm", "move", "preset_rate_MB_s", "start_s", "completion_s", "actual_rate_MB_s", "verdict"])
        for r in rows:
            w.writerow(
                [
                    r.vm,
                    r.move,
                    f"{r.preset_bytes_per_s / 1e6:.1f}",
                    f"{r.start_s:.2f}",
                    f"{r.completion_s:.2f}",
                    f"{r.actual_bytes_per_s / 1e6:.1f}",
                    r.verdict,
                ]
            )


def write_chart(run: ScenarioRun, rows: list[MoveRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        series = run.log.rates.get(r.vm, [])
        # One-second means of the 100 ms samples, as the monitor's window sees them.
        pts = [(t, rate / 1e6) for t, rate in series]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        k = 10
        xs = [sum(xs[j : j + k]) / len(xs[j : j + k]) for j in range(0, len(xs), k)]
        ys = [sum(ys[j : j + k]) / len(ys[j : j + k]) for j in range(0, len(ys), k)]
        c = colours[i % len(colours)]
        label = f"{r.vm}: {r.move.split(' (')[1].rstrip(')')}, preset {r.preset_bytes_per_s / 1e6:.0f} MB/s"
        ax.plot(xs, ys, color=c, label=label, lw=1.8)
        ax.axhline(r.preset_bytes_per_s / 1e6, color=c, lw=0.8, ls=":")
        if r.verdict.startswith("unauthorized"):
            ax.axvline(r.completion_s, color=c, lw=1, ls="--")
            ax.annotate(
                f"{r.vm} detected, destroyed\nat {r.completion_s:.1f} s",
                (r.completion_s, max(ys or [0]) * 0.9),
                xytext=(6, 0),
                textcoords="offset points",
                fontsize=8,
                color=c,
            )
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("transfer rate at the VM's vSwitch port (MB/s)")
    ax.set_title(
        "Transfer rate over time: two authorized migrations and two unauthorized moves\n"
        "(dotted: each VM's preset rate; dashed: the monitor's detection)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
