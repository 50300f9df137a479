"""The attack suite end to end: authentication attacks leak nothing, detection attacks are caught."""

import sqlite3

import pytest

from secmig.cli import main
from secmig.sim.attacks import AUTH_ATTACKS, false_alarm_rate, run_attack


@pytest.mark.parametrize("name", sorted(AUTH_ATTACKS))
def test_authentication_attacks_leak_zero_pages(name: str) -> None:
    """Rogue, revoked, MITM, replay and grant-less clone/copy/template: refused with 0 page bytes across."""
    r = run_attack(name)
    assert r.stopped and r.pages_leaked == 0 and r.vm_fate == "stays on its source"


@pytest.mark.parametrize("name", ["exfil-unauthorized-move", "coloc-vswitch-flood", "migration-storm"])
def test_detection_attacks_are_caught_and_the_vm_destroyed(name: str) -> None:
    """Fast unauthorized moves, a vSwitch flood and a storm: detected within a window, the VM destroyed."""
    r = run_attack(name)
    assert r.stopped and r.vm_fate == "destroyed"
    assert r.time_to_detect_s is not None and 0 < r.time_to_detect_s <= 2.0


def test_low_rate_exfiltration_is_reported_as_it_is() -> None:
    """The slow leak stays under the thresholds: reported undetected, with what leaked."""
    r = run_attack("low-rate-exfil")
    assert not r.stopped and r.pages_leaked > 0 and r.vm_fate.startswith("running")


def test_benign_false_alarm_rate_is_at_most_one_percent() -> None:
    """Bursty honest VMs and large legitimate migrations: ≤ 1 % of VM-windows with a wrongful action."""
    results = [run_attack("benign-bursty"), run_attack("benign-migrations")]
    assert sum(r.windows for r in results) > 500
    assert false_alarm_rate(results) <= 0.01
    # The legitimate migrations did trigger identity checks (HIGH rate), and all passed.
    assert results[1].identity_checks > 0 and results[1].stopped


def test_experiment_paper_writes_table_and_chart(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """`secmig experiment paper` writes Table 6.1 as CSV and Chart 1 as PNG; the unauthorized moves are destroyed."""
    assert main(["experiment", "paper", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "table-6-1.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("vm,move,preset_rate")
    assert sum("identity check failed" in r for r in rows) == 2
    assert (tmp_path / "chart-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Table 6.1" in capsys.readouterr().out
    with sqlite3.connect(tmp_path / "secmig.sqlite") as db:
        destroyed = db.execute("SELECT vm FROM monitor_events WHERE action = 'destroy' ORDER BY vm").fetchall()
    assert destroyed == [("vm3",), ("vm4",)]
    assert "Monitor verdicts" in (tmp_path / "report.html").read_text()
