"""Issue 12 point 4 in the simulator: no honest VM destroyed for the network's fault; exfiltration to a
member and slow exfiltration caught by asking whether each flow is authorized."""

from __future__ import annotations

import pytest

from secmig.cli import main
from secmig.lab import attacks
from secmig.lab.attacks import ExfilFloor, run_attack, run_attack_full, scenario_files, slow_exfil_floor
from secmig.monitor import Action, RuleSet

RATE_RULE_ONLY = RuleSet.model_validate({"contact": {"enabled": False}, "volume": {"enabled": False}})


def test_new_attacks_are_in_the_suite() -> None:
    """The WAN flood at switchover and both member exfiltrations are named detection attacks."""
    assert {"wan-flood-switchover", "exfil-to-member", "slow-exfil-to-member"} <= set(scenario_files())


def test_wan_flood_at_switchover_costs_the_migration_not_the_vm() -> None:
    """Peers flooding the WAN stretch db-1's stop-and-copy past 2 s: its check passes, the migration is
    aborted and db-1 runs on at its source; nothing is destroyed (today: db-1 destroyed at 12.8 s)."""
    r, run = run_attack_full("wan-flood-switchover")
    assert run is not None
    assert not run.sim.destroyed and r.stopped and r.vm_fate == "running on east-h1"
    (v,) = [v for v in run.log.verdicts if v.vm == "db-1" and v.rule == "downtime"]
    assert v.action is Action.ABORT and v.evidence["challenge"] == "passed"
    assert [m.outcome for m in run.result.migrations if m.vm == "db-1"] == ["aborted"]
    assert all(v.action is not Action.DESTROY for v in run.log.verdicts)


def test_a_granted_stop_and_copy_is_paused_by_design() -> None:
    """db-2's granted 2.6 s stop-and-copy is a non-live move: no downtime verdict, it completes; harmless."""
    r, run = run_attack_full("stalled-switchover")
    assert run is not None and not run.sim.destroyed
    assert not [v for v in run.log.verdicts if v.rule == "downtime"]
    (m,) = run.result.migrations
    assert m.outcome == "completed" and m.downtime_s > 2.0
    assert r.stopped and r.rule == "harmless" and r.pages_leaked == 0


def test_exfiltration_to_a_compromised_member_fails_the_flow_check() -> None:
    """650 MB/s to spare-h1, a member with a valid Vsignature but no grant for the flow: the first check fails
    (today: passed 55 times while 33.6 GB left) and app-2 is destroyed; no other VM is touched."""
    r, run = run_attack_full("exfil-to-member")
    assert run is not None and list(run.sim.destroyed) == ["app-2"]
    assert r.stopped and r.vm_fate == "destroyed" and r.time_to_detect_s is not None and r.time_to_detect_s <= 0.2
    first = next(v for v in run.log.verdicts if v.vm == "app-2" and v.t_s > 5.0)
    assert first.evidence["challenge"] == "failed" and first.action is Action.DESTROY
    assert "spare-h1 is not authorized" in str(first.evidence["challenge_detail"])
    assert r.pages_leaked * 4096 < 200e6  # what crossed before the first check, counted against a member too


def test_slow_exfiltration_to_a_member_is_caught() -> None:
    """5 MB/s to a compromised member, under every rate threshold, is caught by the contact rule."""
    r = run_attack("slow-exfil-to-member")
    assert r.stopped and r.rule == "contact" and r.vm_fate == "destroyed"


def test_slow_exfiltration_floor_drops_from_23_to_at_most_0_1_mb_s() -> None:
    """The floor measured on both slow-leak scenarios: the rate rule alone misses 22 MB/s and catches 23;
    with the contact and volume rules every rate down to 0.1 MB/s is caught."""
    before = slow_exfil_floor(RATE_RULE_ONLY, rates_mb_s=(23.0, 22.0))
    assert before.floor_mb_s == 23.0 and before.caught["low-rate-exfil"] == {23.0: True, 22.0: False}
    after = slow_exfil_floor(rates_mb_s=(0.1,))
    assert after.floor_mb_s == 0.1 and after.at_resolution
    assert "slow-exfiltration floor: ≤ 0.1 MB/s" in after.describe()


def test_benign_runs_have_no_false_alarm_and_no_destroy() -> None:
    """Honest VMs, bursts and granted migrations: 0 wrongful actions; the new checks all pass."""
    results = [run_attack(n) for n in scenario_files() if n.startswith("benign-")]
    assert all(r.stopped and r.false_alarms == 0 and r.vm_fate == "all running" for r in results)


def test_attack_run_all_prints_the_floor(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`secmig attack run all` ends with the slow-exfiltration floor in MB/s (suite cut down for speed)."""
    monkeypatch.setattr(attacks, "attack_names", lambda: [("low-rate-exfil", "detection", "")])
    monkeypatch.setattr(
        attacks, "slow_exfil_floor", lambda rules: ExfilFloor(0.1, 0.1, {"low-rate-exfil": {0.1: True}})
    )
    assert main(["attack", "run", "all"]) == 0
    assert "slow-exfiltration floor: ≤ 0.1 MB/s" in capsys.readouterr().out
