"""``secmig experiment paper``: the paper's experiment (section 6), its Table 6.1 and its Chart 1, from a run.

Two datacenters, several VMs per host, VMs moved between hypervisors while the monitor watches the rates
at each VM's vSwitch port. Two moves are authorized live migrations (granted, capped at the VM's preset
transfer rate); two are unauthorized moves of memory to a host outside the cluster at 1.67 × and 2.3 ×
the preset rate, as the paper's rows 3 and 4 (4200 → 7000 and 3500 → 8000 IOPS). The table has the
paper's columns (preset rate, start, completion, actual rate) and the monitor's verdict; the chart
shows the rates over time, the policy's LOW/MEDIUM/HIGH bands and the moment of each detection.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from secmig.lab.attacks import ScenarioRun, bytes_to_outsiders, run_scenario
from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action
from secmig.security.audit import AuditSink

SCENARIO = "experiment-paper.yaml"


@dataclass(frozen=True, slots=True)
class MoveRow:
    """One row of Table 6.1."""

    vm: str
    move: str
    authorized: bool
    preset_bytes_per_s: float
    start_s: float
    completion_s: float
    """When the move ended: the migration's end, or the moment the monitor stopped it."""
    actual_bytes_per_s: float
    verdict: str
    detected_s: float | None = None


def scenario_text() -> str:
    """The bundled experiment scenario, as YAML text."""
    return resources.files("secmig.data").joinpath(SCENARIO).read_text(encoding="utf-8")


def run_paper_experiment(
    rules: RuleSet | None = None, audit: AuditSink | None = None
) -> tuple[ScenarioRun, list[MoveRow]]:
    """Run the experiment; return the run and Table 6.1's rows in order of start."""
    path = Path(str(resources.files("secmig.data").joinpath(SCENARIO)))
    run = run_scenario(path, rules or RuleSet(), audit)
    sim, log = run.sim, run.log
    rows: list[MoveRow] = []
    for m in sim.results:
        vm = sim.vms[m.vm]
        checks = [v for v in log.verdicts if v.vm == m.vm and "challenge" in v.evidence]
        verdict = (
            f"authorized: {checks[0].level.value} → identity check passed → continue"
            if checks
            else "authorized: LOW → continue"
        )
        if m.outcome != "completed":
            verdict = f"aborted: {m.stop_reason}"
        rows.append(
            MoveRow(
                m.vm,
                f"{m.source} → {m.destination}, live migration with a grant",
                True,
                vm.transfer_rate_bytes_per_s or 0.0,
                m.start_s,
                m.end_s,
                m.bytes_sent / m.total_time_s if m.total_time_s > 0 else 0.0,
                verdict,
            )
        )
    for t in sim.spec.traffic:
        if t.kind != "exfil":
            continue  # the ground truth, for the table only: the monitor never reads it
        vm = sim.vms[t.src_vm]
        hits = [v for v in log.verdicts if v.vm == t.src_vm and v.action is not Action.CONTINUE]
        end = hits[0].t_s if hits else min(t.start_s + t.duration_s, float(sim.env.now))
        moved = bytes_to_outsiders(run, t.src_vm)
        if hits:
            h = hits[0]
            ratio = h.evidence.get("ratio", 0.0)
            verdict = (
                f"unauthorized: {h.level.value} ({float(ratio):.2f} × preset) → identity check "
                f"{h.evidence.get('challenge', '—')} → {h.action.value}"
            )
        else:
            verdict = "unauthorized: not detected"
        rows.append(
            MoveRow(
                t.src_vm,
                f"{next(v.host for v in sim.spec.vms if v.name == t.src_vm)} → {t.dst}, memory copied out, no grant",
                False,
                vm.transfer_rate_bytes_per_s or 0.0,
                t.start_s,
                end,
                moved / (end - t.start_s) if end > t.start_s else 0.0,
                verdict,
                hits[0].t_s if hits else None,
            )
        )
    rows.sort(key=lambda r: (r.start_s, r.vm))
    return run, rows


def write_table(rows: list[MoveRow], path: Path) -> None:
    """Table 6.1 as CSV (rates in MB/s, times in seconds of simulated time)."""
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
    """Chart 1: the moved VMs' transfer rates over time (top) and what the rate rule judged (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = run.rules
    end_s = float(run.sim.env.now)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 8.5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    colours = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b"]

    def padded(series: list[tuple[float, float]], vm: str) -> list[tuple[float, float]]:
        out = list(series)
        if vm in run.sim.destroyed and out:  # a destroyed VM sends nothing more
            out += [(out[-1][0] + rules.step_s, 0.0), (end_s, 0.0)]
        return out

    peak = max((b for r in rows for _, b in run.log.rates.get(r.vm, [])), default=1.0) / 1e6
    k = 0
    checked_label = "identity check passed (a granted migration's burst)"
    for i, r in enumerate(rows):
        c = colours[i % len(colours)]
        style = "--" if r.authorized else "-"
        kind = "granted live migration" if r.authorized else "memory copied out, no grant"
        inst = padded(run.log.rates.get(r.vm, []), r.vm)
        top.step(
            [t for t, _ in inst],
            [b / 1e6 for _, b in inst],
            where="pre",
            color=c,
            ls=style,
            lw=1.6 if r.authorized else 2.2,
            label=f"{r.vm}: {kind}, preset {r.preset_bytes_per_s / 1e6:.0f} MB/s",
        )
        top.axhline(r.preset_bytes_per_s / 1e6, color=c, lw=0.7, ls=":")
        window = padded(run.log.window_rates.get(r.vm, []), r.vm)
        preset = r.preset_bytes_per_s or 1.0
        bottom.plot([t for t, _ in window], [b / preset for _, b in window], color=c, ls=style, lw=1.6)
        for v in run.log.verdicts:
            if v.vm == r.vm and v.evidence.get("challenge") == "passed":
                y = max((b for t, b in inst if abs(t - v.t_s) < rules.window), default=0.0) / 1e6
                top.plot([v.t_s], [y], "o", ms=7, mfc="white", mec=c, mew=2, label=checked_label, zorder=5)
                checked_label = "_"
        if r.detected_s is not None:
            y = max((b for t, b in inst if t <= r.detected_s + 1e-9), default=0.0) / 1e6
            top.plot([r.detected_s], [y], marker="X", ms=12, color=c, mec="black", zorder=6)
            top.annotate(
                f"{r.vm} detected {r.detected_s - r.start_s:.1f} s after it began ({r.detected_s:.1f} s):\n"
                f"{r.verdict.split(': ', 1)[1]}",
                (r.detected_s, y),
                xytext=(r.detected_s + 2.5, peak * (1.32 - 0.2 * k)),
                fontsize=8.5,
                color=c,
                va="center",
                ha="left",
                arrowprops={"arrowstyle": "->", "color": c, "lw": 0.9, "relpos": (0.0, 0.5)},
            )
            bottom.axvline(r.detected_s, color=c, lw=0.9, ls=":")
            k += 1
    top.set_ylabel("transfer rate at the VM's vSwitch port (MB/s)")
    top.set_title(
        "Chart 1 — transfer rates while VMs are moved between hypervisors (dotted lines: each VM's preset rate)\n"
        "the unauthorized moves rise suddenly above their preset rate; the monitor catches them (✕) and the VM "
        "destroys itself",
        fontsize=10,
    )
    top.legend(fontsize=8, loc="upper right")
    top.grid(alpha=0.3)
    top.set_ylim(0, peak * 1.45)
    ratios = [b / (r.preset_bytes_per_s or 1) for r in rows for _, b in run.log.window_rates.get(r.vm, [])]
    ymax = max(2.8, max(ratios, default=0.0) * 1.1)
    bottom.axhspan(0, rules.rate.medium, color="#2ca02c", alpha=0.10)
    bottom.axhspan(rules.rate.medium, rules.rate.high, color="#ff7f0e", alpha=0.14)
    bottom.axhspan(rules.rate.high, ymax, color="#d62728", alpha=0.12)
    for y, text in (
        (rules.rate.medium / 2, f"LOW (< {rules.rate.medium:g} × preset) → continue"),
        ((rules.rate.medium + rules.rate.high) / 2, "MEDIUM → identity check"),
        ((rules.rate.high + ymax) / 2, f"HIGH (≥ {rules.rate.high:g} × preset) → identity check, destroy if it fails"),
    ):
        bottom.text(end_s * 0.25, y, text, fontsize=8.5, va="center", ha="left", color="#333333")
    bottom.set_ylim(0, ymax)
    bottom.set_xlim(0, end_s)
    bottom.set_ylabel(f"rate over the last {rules.window:g} s\n÷ preset rate (what the rule judges)")
    bottom.set_xlabel("simulated time (s)")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
