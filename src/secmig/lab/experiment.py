"""``secmig experiment paper``: the paper's experiment (section 6), its Table 6.1 and its Chart 1, from a run.

Two datacenters, several VMs per host, VMs moved between hypervisors while the monitor watches the rates
at each VM's vSwitch port (``data/experiment-paper.yaml``). Every row comes out of the simulation run
behind the gate (the real handshake per operation) with the monitor attached:

- the two granted live migrations (``paper`` stop policy, Th = 50 pages), each capped at its VM's preset
  rate and sharing a NIC: their actual rate is bytes moved ÷ (completion − start), the handshake, every
  round and the stop-and-copy included;
- the two unauthorized rows: an attacker whose ungranted move of vm3 the gate refused (0 pages) and who
  then copies vm3's memory out anyway, and an exfiltration of vm4. Their actual rate is what the monitor
  measured when it judged them (the rate rule's window, the VM's own traffic and the copy together);
  their level is the monitor's: MEDIUM (throttled to its preset while the identity check runs, then
  destroyed when it fails) and HIGH (cut at once, destroyed when the check fails).

Units: the paper counts IOPS; here one I/O is one 4 KiB page (:data:`IO_BYTES`), so IOPS = bytes/s ÷ 4096,
and times are simulated milliseconds. This module returns data; ``secmig experiment paper`` writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from secmig.lab.attacks import ScenarioRun, run_scenario
from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action
from secmig.security.audit import AuditSink

SCENARIO = "experiment-paper.yaml"
IO_BYTES = 4096
"""One I/O of the paper's IOPS: a 4 KiB page."""


@dataclass(frozen=True, slots=True)
class MoveRow:
    """One row of Table 6.1."""

    vm: str
    move: str
    authorized: bool
    preset_bytes_per_s: float
    start_s: float
    completion_s: float
    """When the move ended: the migration's end, or the moment the monitor stopped it (its check answered)."""
    actual_bytes_per_s: float
    """A migration's bytes ÷ its duration; for a caught VM, the rate the monitor judged at detection."""
    verdict: str
    detected_s: float | None = None
    level: str = "LOW"
    """The monitor's level for the row: LOW for an authorized move, MEDIUM or HIGH for a caught one."""

    @property
    def preset_iops(self) -> float:
        """The preset rate in the paper's unit (4 KiB I/Os per second)."""
        return self.preset_bytes_per_s / IO_BYTES

    @property
    def actual_iops(self) -> float:
        """The actual rate in the paper's unit."""
        return self.actual_bytes_per_s / IO_BYTES

    @property
    def ratio(self) -> float:
        """Actual ÷ preset."""
        return self.actual_bytes_per_s / self.preset_bytes_per_s if self.preset_bytes_per_s > 0 else 0.0


def scenario_text() -> str:
    """The bundled experiment scenario, as YAML text."""
    return resources.files("secmig.data").joinpath(SCENARIO).read_text(encoding="utf-8")


def run_paper_experiment(
    rules: RuleSet | None = None, audit: AuditSink | None = None, scenario: Path | None = None
) -> tuple[ScenarioRun, list[MoveRow]]:
    """Run the experiment (the bundled scenario, or ``scenario``); return the run and Table 6.1's rows by start."""
    path = scenario or Path(str(resources.files("secmig.data").joinpath(SCENARIO)))
    run = run_scenario(path, rules or RuleSet(), audit)
    return run, table_rows(run)


def table_rows(run: ScenarioRun) -> list[MoveRow]:
    """Table 6.1 from a run: the completed operations, then each VM the monitor stopped."""
    sim, log = run.sim, run.log
    rows: list[MoveRow] = []
    for m in sim.results:
        if m.outcome != "completed":
            continue  # refused at the gate or stopped: the VM's row is its attacker's, below
        vm = sim.vms[m.vm]
        checks = [v for v in log.verdicts if v.vm == m.vm and "challenge" in v.evidence]
        verdict = (
            f"authorized: {checks[0].level.value} → identity check passed → continue"
            if checks
            else "authorized: LOW → continue"
        )
        rows.append(
            MoveRow(
                m.vm,
                f"{m.source} → {m.destination}, live migration with a grant ({m.policy} policy)",
                True,
                vm.transfer_rate_bytes_per_s or 0.0,
                m.start_s,
                m.end_s,
                m.bytes_sent / m.total_time_s if m.total_time_s > 0 else 0.0,
                verdict,
                level="LOW" if not checks else checks[0].level.value,
            )
        )
    for name in sorted(sim.destroyed):
        hits = [v for v in log.verdicts if v.vm == name and v.action is not Action.CONTINUE]
        if not hits:
            continue
        h = hits[0]
        vm = sim.vms[name]
        refused = [e for e in sim.effects if e.vm == name and e.reason.startswith("refused at the gate")]
        # When the attack began: the first byte to a host it had no grant for (the lab reads the ground truth).
        starts = [t.start_s for t in sim.spec.traffic if t.src_vm == name and t.kind == "exfil"]
        start = min(starts) if starts else h.t_s
        what = (
            f"{refused[0].operation} to {refused[0].destination} refused at the gate (0 pages), "
            "memory copied out anyway"
            if refused
            else "memory copied out, no grant"
        )
        answered = h.evidence.get("answered_s", h.t_s)
        ratio = float(h.evidence.get("ratio", 0.0))
        held = f", {h.evidence['held']} for the check" if "held" in h.evidence else ""
        rows.append(
            MoveRow(
                name,
                what,
                False,
                vm.transfer_rate_bytes_per_s or 0.0,
                start,
                float(answered),
                float(h.evidence.get("rate_bytes_per_s", 0.0)),
                f"unauthorized: {h.rule} {h.level.value} ({ratio:.2f} × preset){held} → identity check "
                f"{h.evidence.get('challenge', '—')} → {h.action.value}",
                h.t_s,
                level=h.level.value,
            )
        )
    rows.sort(key=lambda r: (r.start_s, r.vm))
    return rows
