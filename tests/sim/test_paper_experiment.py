"""Issue 15: Table 6.1 from behaviour, MEDIUM ≠ HIGH, every threshold acting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from secmig.cli import main
from secmig.lab.attacks import run_attack, run_scenario_doc
from secmig.lab.experiment import IO_BYTES, MoveRow, run_paper_experiment, table_rows
from secmig.migration.policy import policy_preset
from secmig.model.analytic import downtime_data_within_limit
from secmig.model.units import PAGE_SIZE
from secmig.monitor.rules import RuleSet, load_rules
from secmig.sim.engine import Simulation
from secmig.sim.scenario import load_scenario_text
from secmig.yamlfile import read_yaml

DATA = Path(__file__).resolve().parents[2] / "src" / "secmig" / "data"


@pytest.fixture(scope="module")
def paper() -> list[MoveRow]:
    _run, rows = run_paper_experiment(load_rules())
    return rows


def test_table_6_1_rows_emerge_from_the_run(paper: list[MoveRow]) -> None:
    """Two granted migrations below their preset (shared NIC), vm3 caught at MEDIUM at ~1.67 ×, vm4 at
    HIGH at ~2.29 ×; the paper's columns in IOPS (4 KiB I/Os)."""
    by = {r.vm: r for r in paper}
    assert [r.vm for r in paper] == ["vm1", "vm2", "vm3", "vm4"]
    assert [round(r.preset_iops) for r in paper] == [3000, 4000, 4200, 3500]
    assert by["vm1"].authorized and by["vm1"].level == "LOW" and 0.9 < by["vm1"].ratio < 1.0
    assert by["vm2"].authorized and by["vm2"].level == "LOW" and 0.7 < by["vm2"].ratio < 0.8
    assert not by["vm3"].authorized and by["vm3"].level == "MEDIUM" and by["vm3"].ratio == pytest.approx(1.67, abs=0.02)
    assert not by["vm4"].authorized and by["vm4"].level == "HIGH" and by["vm4"].ratio == pytest.approx(2.29, abs=0.02)
    assert by["vm3"].actual_iops == pytest.approx(by["vm3"].actual_bytes_per_s / IO_BYTES)
    assert "refused at the gate (0 pages)" in by["vm3"].move


def test_medium_runs_throttled_until_its_check_fails_and_high_is_cut_at_once() -> None:
    """vm3 (MEDIUM) keeps sending at its preset while the check runs, then is destroyed; vm4 (HIGH) sends
    nothing from the moment it is caught, then is destroyed; the authorized VMs are never touched."""
    run, rows = run_paper_experiment(load_rules())
    by = {r.vm: r for r in rows}
    assert set(run.sim.destroyed) == {"vm3", "vm4"}
    step = run.rules.step_s
    for vm, held in (("vm3", "throttled to preset"), ("vm4", "flows cut")):
        r = by[vm]
        assert r.detected_s is not None and r.completion_s == pytest.approx(r.detected_s + run.rules.check_time)
        during = [b for t, b in run.log.rates[vm] if r.detected_s + step / 2 < t <= r.completion_s + 1e-9]
        assert during, vm
        if held == "flows cut":
            assert max(during) == 0.0
        else:
            assert all(0.8 * r.preset_bytes_per_s <= b <= 1.01 * r.preset_bytes_per_s for b in during)
        assert held in r.verdict
    assert not [v for v in run.log.verdicts if v.vm in ("vm1", "vm2") and v.action.value != "continue"]
    # The paper's stop policy, Th = 50 pages, ended both granted migrations.
    assert all("< 50 dirty pages" in m.stop_reason for m in run.sim.results if m.outcome == "completed")


def test_changing_an_attackers_rate_changes_its_row_and_level() -> None:
    """vm4's copy at a lower rate shows as MEDIUM, not HIGH, with a lower actual rate."""
    doc = read_yaml(DATA / "experiment-paper.yaml")
    for t in doc["traffic"]:
        if t["from"] == "vm4" and t.get("kind") == "exfil":
            t["rate"] = "15MB/s"
    rows = {r.vm: r for r in table_rows(run_scenario_doc(doc, "experiment-paper", DATA, load_rules()))}
    assert rows["vm4"].level == "MEDIUM" and rows["vm4"].ratio == pytest.approx((7 + 15) / 14.336, abs=0.03)


def test_experiment_cli_writes_the_paper_columns(tmp_path: Path) -> None:
    """`secmig experiment paper`: the CSV has the paper's columns in IOPS and ms beside secmig's."""
    assert main(["experiment", "paper", "-o", str(tmp_path)]) == 0
    header = (tmp_path / "table-6-1.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["s_no", "vm", "preset_iops", "start_ms", "completion_ms", "actual_iops"]
    assert (tmp_path / "chart-1.png").stat().st_size > 10_000


def test_rtt_rule_is_the_first_to_catch_the_stale_peer_flood() -> None:
    """RTT peaks from the simulated vSwitch queue (> 5 in a window) are the first rule to fire, in 0.6 s."""
    r = run_attack("rtt-stale-peer-flood")
    assert r.stopped and r.rule == "rtt" and r.vm_fate == "destroyed"
    assert r.time_to_detect_s is not None and r.time_to_detect_s <= 1.0


def test_psi_is_a_stop_rule_and_eq_6_holds() -> None:
    """Ψ as a stop-policy parameter: pre-copy stops at the first round whose residual is below Ψ·V, and the
    data of the stop-and-copy obeys eq. (6), V·(P/B)^n < Ψ·V, as the closed form predicts."""
    psi = 0.02
    text = """
name: psi
datacenters: [{name: dc, hosts: [{name: a, nic: 100MB/s}, {name: b, nic: 100MB/s}]}]
vms: [{name: v, host: a, ram: 256MiB, dirty: {pattern: sequential, rate: 5000pages/s, working_set: 256MiB}}]
migrations: [{vm: v, to: b, policy: xen, psi: 0.02}]
"""
    _, spec = load_scenario_text(text, "psi.yaml")
    result = Simulation(spec).run().migrations[0]
    v = 256 * 2**20
    live = [r for r in result.rounds if r.live]
    final = result.rounds[-1]
    assert result.outcome == "completed" and "dirty pages" in result.stop_reason
    assert (final.pages + final.zero_pages) * PAGE_SIZE < psi * v  # eq. (6) at the stop
    assert (live[-1].pages + live[-1].zero_pages) * PAGE_SIZE >= psi * v  # and not a round earlier
    p, b = 5000 * PAGE_SIZE, 100e6
    n = len(live)
    assert downtime_data_within_limit(v, p, b, n, psi) and not downtime_data_within_limit(v, p, b, n - 2, psi)
    th = policy_preset("xen").with_overrides(psi=psi).for_vm(v).dirty_pages_threshold
    assert th == math.ceil(psi * v / PAGE_SIZE)


def test_a_scenario_monitor_block_overrides_the_rules() -> None:
    """The experiment's monitor block turns the first-contact and volume rules off and sets the check time."""
    run, _rows = run_paper_experiment(RuleSet())
    assert not run.rules.contact.enabled and not run.rules.volume.enabled and run.rules.check_time == 0.3


SCENARIOS = sorted(p for p in [*(DATA / "attacks").glob("*.yaml"), *DATA.glob("*.yaml")] if p.name != "rules.yaml")


def test_validate_and_simulate_accept_every_shipped_scenario(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One scenario language: every scenario the project ships validates, and a secure one simulates."""
    assert len(SCENARIOS) >= 13
    for path in SCENARIOS:
        assert main(["validate", str(path)]) == 0, path.name
    assert main(["validate", str(DATA / "rules.yaml")]) == 0
    assert "rule file" in capsys.readouterr().out
    assert main(["simulate", str(DATA / "attacks" / "harvest-precopy.yaml"), "-o", str(tmp_path)]) == 0
