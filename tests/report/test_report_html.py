"""The report's content from the database: monitor verdicts, audit logs, empty states and the CLI."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from secmig.cli import main
from secmig.report import SECTIONS, load_run, write_report
from secmig.results.store import MONITOR_EVENT_COLUMNS, save_monitor_events
from secmig.security.audit import AuditLog
from secmig.security.keys import generate_key

SCENARIO = """
name: small
description: two hosts, two migrations
seed: 3
datacenters:
  - name: dc
    core: 10Gbit/s
    hosts:
      - {name: "h{i}", count: 2, nic: 1Gbit/s}
vms:
  - {name: a, host: h1, ram: 1GiB, used: 512MiB, dirty: {pattern: uniform, rate: 5000pages/s, working_set: 256MiB}}
  - {name: b, host: h1, ram: 1GiB, used: 256MiB}
  - {name: c, host: h2, ram: 1GiB}
migrations:
  - {vm: a, to: h2, at: 1s}
  - {vm: b, to: h2, at: 1s, strategy: stop-and-copy}
traffic:
  - {from: c, to: a, rate: 100Mbit/s, duration: 5s}
"""


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results database with one small run in it (run 1), written by ``secmig simulate``."""
    d = tmp_path_factory.mktemp("run")
    (d / "small.yaml").write_text(SCENARIO)
    assert main(["simulate", str(d / "small.yaml"), "--out", str(d / "out")]) == 0
    return d / "out" / "secmig.sqlite"


def section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m is not None, f"no section {sid}"
    return m.group(1)


def test_simulate_writes_the_report_beside_the_exports(stored_run: Path) -> None:
    """``simulate`` writes NAME-runID/report.html with every section, charts inline and nothing remote."""
    page = (stored_run.parent / "small-run1" / "report.html").read_text()
    for sid, title in SECTIONS:
        assert f"<h2>{title}</h2>" in section(page, sid)
    assert page.count('src="data:image/png;base64,') == 3
    assert not re.search(r'(src|href)="(?!data:|#)', page), "a reference that is not inline"
    assert "<script" not in page
    assert "two hosts, two migrations" in section(page, "summary")
    assert "1 datacenters, 2 hosts" in section(page, "summary")


def test_rounds_show_bytes_and_dirty_pages_of_each_round(stored_run: Path) -> None:
    """Each migration has a rounds table whose byte and dirty-page cells match the database."""
    run = load_run(stored_run, 1)
    page = (stored_run.parent / "small-run1" / "report.html").read_text()
    rounds = section(page, "rounds")
    with sqlite3.connect(stored_run) as db:
        n = db.execute("SELECT count(*) FROM rounds WHERE run_id = 1").fetchone()[0]
        dirty = db.execute("SELECT dirty_pages_after FROM rounds WHERE run_id = 1 AND idx = 0").fetchall()
    assert sum(len(r) for r in run.rounds.values()) == n
    assert rounds.count("<details>") == len(run.migrations) == 2
    for (d,) in dirty:
        assert f"<td class=num>{d:,}</td>" in rounds


def test_monitor_and_audit_say_so_when_they_have_nothing(stored_run: Path) -> None:
    """Without monitor rows or an audit log, both sections say so in words rather than disappearing."""
    page = (stored_run.parent / "small-run1" / "report.html").read_text()
    assert "No monitor verdicts recorded for this run" in section(page, "monitor")
    assert "No audit log recorded for this run" in section(page, "audit")


def test_monitor_verdicts_get_a_table_and_a_timeline(stored_run: Path, tmp_path: Path) -> None:
    """Rows in ``monitor_events`` become counts by level, a timeline chart and one table row each."""
    db = tmp_path / "secmig.sqlite"
    db.write_bytes(stored_run.read_bytes())
    events = [
        (1.5, "a", "h1/vswitch", "rate", "LOW", "continue", json.dumps({"rate_bps": 1e8})),
        (2.0, "a", "h1/vswitch", "rtt-peaks", "MEDIUM", "check", json.dumps({"peaks": 6})),
        (2.5, "b", "h1/vswitch", "data-over-3x-vram", "HIGH", "destroy", json.dumps({"sent": 4e9})),
    ]
    assert save_monitor_events(db, 1, events) == 3
    page = write_report(db, 1, tmp_path / "r.html").read_text()
    mon = section(page, "monitor")
    assert "No monitor verdicts" not in mon
    assert "HIGH: 1" in mon and "MEDIUM: 1" in mon and "LOW: 1" in mon
    assert "data-over-3x-vram" in mon and "destroy" in mon and "peaks=6" in mon
    assert mon.count('src="data:image/png;base64,') == 1
    assert len(MONITOR_EVENT_COLUMNS) == 7


def test_an_older_database_without_monitor_table_still_reports(stored_run: Path, tmp_path: Path) -> None:
    """A database from before ``monitor_events`` existed reports, saying the table is missing."""
    db = tmp_path / "old.sqlite"
    db.write_bytes(stored_run.read_bytes())
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE monitor_events")
    page = write_report(db, 1, tmp_path / "r.html").read_text()
    assert "predates the monitor" in section(page, "monitor")


def test_audit_log_is_summarised_and_verified(stored_run: Path, tmp_path: Path) -> None:
    """An audit log given with ``--audit`` shows its counts, its refusals and whether its chain verifies."""
    log = tmp_path / "audit.sqlite"
    with AuditLog(log, generate_key(), "authority") as audit:
        audit.record("grant", "allow", "vm:a", {"operation": "live-migration"})
        audit.record("handshake", "refuse", "host:h9", {"reason": "unknown member"})
    out = tmp_path / "r.html"
    assert main(["report", "1", "--db", str(stored_run), "--out", str(out), "--audit", str(log)]) == 0
    aud = section(out.read_text(), "audit")
    assert "chain and signed head verify" in aud
    assert "Refusals" in aud and "host:h9" in aud and "unknown member" in aud
    with sqlite3.connect(log) as conn:
        conn.execute("UPDATE audit SET subject = 'vm:z' WHERE seq = 1")
    assert main(["report", "1", "--db", str(stored_run), "--out", str(out), "--audit", str(log)]) == 0
    assert "tampered or damaged" in section(out.read_text(), "audit")


def test_report_cli_defaults_and_errors(stored_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``secmig report`` finds the latest run; a bad run id or database is one line, exit 2, nothing written."""
    default = stored_run.parent / "small-run1" / "report.html"
    default.unlink()
    assert main(["report", "--db", str(stored_run)]) == 0
    assert default.is_file() and str(default) in capsys.readouterr().out
    assert main(["report", "7", "--db", str(stored_run)]) == 2
    err = capsys.readouterr().err
    assert "no run 7 (it has runs 1–1)" in err and len(err.strip().splitlines()) == 1
    missing = tmp_path / "nope.sqlite"
    assert main(["report", "--db", str(missing)]) == 2
    assert "no such results database" in capsys.readouterr().err
    assert not missing.exists()
    assert main(["report", "first", "--db", str(stored_run)]) == 2
