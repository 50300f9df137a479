"""The attack suite end to end: authentication attacks leak nothing (measured), detection attacks are caught."""

import sqlite3
from pathlib import Path

import pytest

from secmig.cli import main
from secmig.errors import ConfigError
from secmig.lab.attacks import (
    AUTH_ATTACKS,
    _Lab,
    _legit,
    _migrate_in_memory,
    false_alarm_rate,
    run_attack,
    run_scenario,
    scenario_files,
)
from secmig.monitor import Action, RuleSet
from secmig.security.policy import Operation
from secmig.sim.gate import SimGate
from secmig.sim.monitoring import new_cluster


@pytest.mark.parametrize("name", sorted(AUTH_ATTACKS))
def test_authentication_attacks_leak_zero_pages(name: str) -> None:
    """Rogue, revoked, MITM, replay and grant-less clone/copy/template: refused with 0 page bytes across."""
    r = run_attack(name)
    assert r.stopped and r.pages_leaked == 0 and r.vm_fate == "stays on its source"
    assert "measured:" in r.detail and "refusal" in r.detail


def test_the_leak_counter_sees_pages_when_they_do_cross(tmp_path: Path) -> None:
    """The same harness with a valid grant to a member delivers all 64 pages, none of them readable on the wire."""
    cluster = new_cluster(tmp_path / "c", ["hv-a", "hv-b"])
    t = _migrate_in_memory(_Lab(cluster), dst_identity=cluster.host_identity("hv-b"), **_legit(cluster))
    assert t.page_bytes_delivered == 64 * 4096 and t.page_bytes_released == 64 * 4096
    assert t.pages_on_wire_in_clear == 0 and t.committed
    assert t.memory[1000:1064] not in t.wire


@pytest.mark.parametrize(
    ("name", "rule", "within_s"),
    [
        ("exfil-unauthorized-move", "rate", 1.0),
        ("coloc-vswitch-flood", "rate", 1.0),
    ],
)
def test_detection_attacks_are_caught_and_the_vm_destroyed(name: str, rule: str, within_s: float) -> None:
    """Each detection attack is caught by the rule meant for it, with its time to detect; the VM self-destructs."""
    r = run_attack(name)
    assert r.stopped and r.rule == rule and r.vm_fate == "destroyed"
    assert r.time_to_detect_s is not None and 0 < r.time_to_detect_s <= within_s


@pytest.mark.parametrize("name", ["migration-storm", "harvest-precopy"])
def test_ungranted_migrations_are_refused_at_the_gate(name: str) -> None:
    """Issue 15: an ungranted migration in the simulator meets the real handshake first and moves no page
    (it used to send pages until the contact rule noticed: 8,473 in migration-storm)."""
    r = run_attack(name)
    assert r.stopped and r.rule == "gate" and r.pages_leaked == 0 and r.vm_fate.startswith("stays on")


def test_low_rate_exfiltration_is_caught_at_its_first_bytes() -> None:
    """The slow leak (a tenth of the preset rate, under every rate threshold) is caught by the contact rule's
    flow check within one step, before 1 % of what it used to leak in 55 s."""
    r = run_attack("low-rate-exfil")
    assert r.stopped and r.rule == "contact" and r.vm_fate == "destroyed"
    assert r.time_to_detect_s is not None and r.time_to_detect_s <= 0.2 and r.pages_leaked < 600


def test_benign_false_alarm_rate_is_at_most_one_percent() -> None:
    """Bursty honest VMs and large legitimate migrations: ≤ 1 % of VM-windows with a wrongful action."""
    results = [run_attack(n) for n in scenario_files() if n.startswith("benign-")]
    assert sum(r.windows for r in results) > 900
    assert false_alarm_rate(results) <= 0.01
    # The legitimate migrations did trigger identity checks, and all passed: no VM was touched.
    assert sum(r.identity_checks for r in results) > 0 and all(r.vm_fate == "all running" for r in results)


def test_throttle_acts_on_the_simulation() -> None:
    """With throttle as the failed check's action, the exfiltrating VM lives on, capped at its preset rate."""
    path = scenario_files()["exfil-unauthorized-move"]
    run = run_scenario(path, RuleSet(on_failed_challenge=Action.THROTTLE))
    assert "db-1" not in run.sim.destroyed and run.sim.rate_cap["db-1"] == pytest.approx(50e6)
    late = [b for t, b in run.log.rates["db-1"] if 20 < t < 40]
    assert max(late) <= 2 * 50e6 * 1.001  # its two flows (app and exfil), each capped at the preset rate


def test_abort_leaves_the_vm_on_its_source() -> None:
    """With abort as the failed check's action, an ungranted migration is cut and the VM stays where it was."""
    run = run_scenario(scenario_files()["migration-storm"], RuleSet(on_failed_challenge=Action.ABORT))
    assert not run.sim.destroyed
    assert run.sim.location["app-1"] == "east-h2" and run.sim.location["web-2"] == "east-h2"
    aborted = {m.vm for m in run.result.migrations if m.outcome == "aborted"}
    assert {"app-1", "web-2", "db-1", "web-1"} == aborted


def test_a_bad_attack_block_is_one_clear_error(tmp_path: Path) -> None:
    """An unknown host in attack.outside, or no attack block at all, is a ConfigError naming the file."""
    text = scenario_files()["low-rate-exfil"].read_text().replace("outside: [rogue-h1]", "outside: [nowhere]")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"bad.yaml: attack.outside: unknown host 'nowhere'"):
        run_scenario(tmp_path / "bad.yaml", RuleSet())
    (tmp_path / "plain.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="needs an 'attack:' block"):
        run_scenario(tmp_path / "plain.yaml", RuleSet())
    with pytest.raises(ConfigError, match="unknown attack"):
        run_attack("nope")


def test_attack_run_stores_verdicts_and_an_intact_audit_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`attack run NAME --out` prints the table and writes the CSV, the monitor_events and a verifiable audit log."""
    assert main(["attack", "run", "exfil-unauthorized-move", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "exfil-unauthorized-move" in out and "destroyed" in out
    assert "exfil-unauthorized-move,detection,True,rate" in (tmp_path / "attacks.csv").read_text()
    with sqlite3.connect(tmp_path / "secmig.sqlite") as db:
        assert ("db-1", "destroy") in db.execute("SELECT vm, action FROM monitor_events").fetchall()
    assert main(["audit", "verify", "--db", str(tmp_path / "audit.sqlite")]) == 0
    assert main(["attack", "run", "nope"]) == 2


def test_attack_sweep_writes_table_csv_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`attack sweep` over two thresholds: detection falls as the threshold rises; CSV and PNG written."""
    assert main(["attack", "sweep", "--medium", "1.25,30", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("medium,high,detected,detected_by_rate") and len(rows) == 3
    low, high = (dict(zip(rows[0].split(","), map(float, r.split(",")), strict=True)) for r in rows[1:])
    assert low["detected_by_rate"] > high["detected_by_rate"] and low["false_alarm_rate"] <= 0.01
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Rate thresholds" in capsys.readouterr().out
    assert main(["attack", "sweep", "--medium", "x", "--out", str(tmp_path)]) == 2


def test_experiment_paper_writes_table_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`experiment paper`: Table 6.1 as CSV, Chart 1 as PNG, the verdicts in monitor_events and the report."""
    assert main(["experiment", "paper", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "table-6-1.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("s_no,vm,preset_iops,start_ms,completion_ms,actual_iops")
    assert sum("identity check failed → destroy" in r for r in rows) == 2
    assert sum(r.split(",")[-1].startswith("authorized") for r in rows[1:]) == 2
    assert (tmp_path / "chart-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Table 6.1" in capsys.readouterr().out
    with sqlite3.connect(tmp_path / "secmig.sqlite") as db:
        destroyed = db.execute("SELECT vm FROM monitor_events WHERE action = 'destroy' ORDER BY vm").fetchall()
    assert destroyed == [("vm3",), ("vm4",)]
    assert "Monitor verdicts" in (tmp_path / "report.html").read_text()
    assert main(["audit", "verify", "--db", str(tmp_path / "audit.sqlite")]) == 0


def test_every_grantable_operation_without_a_grant_is_in_the_suite() -> None:
    """Clone, copy and template (Table 4.1's insider operations) each have a grant-less attack."""
    names = {f"unauthorized-{op.value}" for op in (Operation.CLONE, Operation.COPY, Operation.TEMPLATE)}
    assert names <= set(AUTH_ATTACKS)


def test_a_harvest_with_a_stolen_valid_grant_is_first_caught_by_the_data_rule() -> None:
    """Issue 15: an insider with a valid, stolen grant runs a never-converging pre-copy to a member it controls,
    at the VM's preset rate. The gate admits it (the grant verifies) and no rate rule sees it; the first rule
    to act is data > 3 × VRAM, which stops the stream and leaves the VM on its source."""
    run = run_scenario(scenario_files()["stolen-grant-harvest"], RuleSet())
    gate = run.sim.gate
    assert isinstance(gate, SimGate)
    assert [d.accepted for vm, _op, d in gate.decisions if vm == "cache-1"] == [True]
    hits = [v for v in run.log.verdicts if v.vm == "cache-1" and v.action is not Action.CONTINUE]
    assert hits and hits[0].rule == "data" and hits[0].action is Action.ABORT
    assert hits[0].evidence["moved_bytes"] > 3 * run.sim.vms["cache-1"].ram_bytes
    assert run.sim.location["cache-1"] == "west-h2" and "cache-1" not in run.sim.destroyed
    r = run_attack("stolen-grant-harvest")
    assert r.stopped and r.rule == "data"
