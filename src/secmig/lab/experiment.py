"""``secmig experiment paper``: the paper's experiment (section 6), its Table 6.1 and its Chart 1, from a run.

Two datacenters, several VMs per host, VMs moved between hypervisors while the monitor watches the rates
at each VM's vSwitch port. Two moves are authorized live migrations (granted, capped at the VM's preset
transfer rate); two are unauthorized moves of memory to a host outside the cluster at 1.67 × and 2.3 ×
the preset rate, as the paper's rows 3 and 4 (4200 → 7000 and 3500 → 8000 IOPS). The table has the
paper's columns (preset rate, start, completion, actual rate) and the monitor's verdict; the chart
(:func:`secmig.report.charts.paper_chart_1`) shows the rates over time, the policy's LOW/MEDIUM/HIGH bands
and the moment of each detection. This module returns data; ``secmig experiment paper`` writes the files.
"""

from __future__ import annotations

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
