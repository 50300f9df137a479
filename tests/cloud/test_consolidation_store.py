"""A consolidation day in the results database and the HTML report: stored, read back, shown, written by the CLI."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from secmig.cli import main
from secmig.lab.consolidation import DayConfig, DayResult, MigrationModel, run_day
from secmig.report import CONSOLIDATION_SECTIONS, load_run, write_report
from secmig.results.records import open_tables
from secmig.results.store import consolidation_run_name, save_consolidation, save_run
from secmig.results.tables import (
    CONSOLIDATION_TABLES,
    RUN_TABLES,
    ConsolidationIntervalRow,
    ConsolidationMigrationRow,
    ConsolidationRunRow,
    MonitorEventRow,
    RunRow,
    consolidation_interval_rows,
    consolidation_migration_rows,
    monitor_event_rows,
)
from secmig.sim.engine import Simulation
from secmig.sim.scenario import load_scenario_text

SCENARIO = """
name: pair
datacenters:
  - {name: dc, hosts: [{name: "h{i}", count: 2, nic: 1Gbit/s}]}
vms: [{name: a, host: h1, ram: 256MiB}]
migrations: [{vm: a, to: h2, at: 0.1s}]
"""


def write_traces(directory: Path, n_vms: int) -> Path:
    """``n_vms`` PlanetLab-shaped files (288 integer percentages: a daily wave plus noise), seeded.

    Written here rather than imported from ``conftest``: a ``from conftest import`` breaks when pytest
    collects several test folders, each with its own ``conftest``, in one session.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(288)
    for i in range(n_vms):
        wave = 35 * (1 + 0.8 * np.sin(2 * np.pi * (t / 288 + rng.random())))
        values = np.clip(wave + rng.normal(0, 12, 288), 0, 100).astype(int)
        (directory / f"vm {i:03d}").write_text("\n".join(map(str, values)) + "\n", encoding="ascii")
    return directory


@pytest.fixture(scope="module")
def network_day(tmp_path_factory: pytest.TempPathFactory) -> DayResult:
    """Twenty VMs on 12 hosts for two hours, the network model under the monitor: migrations and verdicts."""
    day = write_traces(tmp_path_factory.mktemp("traces") / "day", 20)
    cfg = DayConfig(day, hosts=12, duration_s=2 * 3600.0, migration_model=MigrationModel.NETWORK)
    return run_day(cfg)


def section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m is not None, f"no section {sid}"
    return m.group(1)


def test_a_stored_day_reads_back_as_the_rows_made_from_it(network_day: DayResult, tmp_path: Path) -> None:
    """Summary, intervals, migrations and verdicts read back equal, in the same file as a simulated run."""
    r = network_day
    assert r.migrations and r.verdicts and r.monitor is not None
    db = tmp_path / "secmig.sqlite"
    _, spec = load_scenario_text(SCENARIO, "pair.yaml")
    save_run(db, Simulation(spec).run(), SCENARIO)  # a database a user already has from `simulate`
    run_id = save_consolidation(db, r)
    assert run_id == 2
    with open_tables(db, (*RUN_TABLES, *CONSOLIDATION_TABLES), "results") as conn:
        (run,) = RunRow.select(conn, "id = ?", (run_id,))
        assert run.name == consolidation_run_name(r.config) and "overload: \"thr:0.8\"" in run.scenario
        assert ConsolidationRunRow.select(conn, "run_id = ?", (run_id,)) == [ConsolidationRunRow.of(run_id, r)]
        for table, made in (
            (ConsolidationIntervalRow, list(consolidation_interval_rows(run_id, r))),
            (ConsolidationMigrationRow, list(consolidation_migration_rows(run_id, r))),
            (MonitorEventRow, list(monitor_event_rows(run_id, r.verdicts))),
        ):
            assert made, table.table.name
            assert table.select(conn, "run_id = ?", (run_id,), order_by="rowid") == made
    (summary,) = ConsolidationRunRow.select(sqlite3.connect(db), "run_id = ?", (run_id,))
    s = r.summary()
    for key in ("energy_kwh", "migrations", "slatah", "pdm", "slav", "esv", "shutdowns", "total_downtime_s"):
        assert getattr(summary, key) == s[key], key
    assert summary.monitor_verdicts == len(r.verdicts) and summary.vms == 20
    assert load_run(db, 1).consolidation is None  # the simulated run is not a consolidation day


def test_the_report_shows_the_day(network_day: DayResult, tmp_path: Path) -> None:
    """The consolidation sections, each with its figures and a non-empty chart; nothing remote."""
    db = tmp_path / "secmig.sqlite"
    run_id = save_consolidation(db, network_day)
    page = write_report(db, run_id, tmp_path / "report.html").read_text()
    for sid, title in CONSOLIDATION_SECTIONS:
        assert f"<h2>{title}</h2>" in section(page, sid)
    summary = section(page, "summary")
    for figure in ("SLATAH", "PDM", "SLAV", "ESV", "host shutdowns", "kWh", "total migration downtime",
                   "bytes moved", "monitor verdicts"):
        assert figure in summary, figure
    charts = {sid: section(page, sid).count('src="data:image/png;base64,') for sid in
              ("energy", "consolidation-migrations", "monitor")}
    assert charts == {"energy": 1, "consolidation-migrations": 2, "monitor": 1}
    for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        assert len(uri) > 10_000  # a drawn chart, not an empty frame
    assert "overload" in section(page, "consolidation-migrations")
    assert not re.search(r'(src|href)="(?!data:|#)', page), "a reference that is not inline"


def test_consolidate_out_writes_db_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``secmig consolidate --out`` stores the run, writes the exports and report.html and says where;
    ``secmig report`` renders it again from the database."""
    day = write_traces(tmp_path / "day", 12)
    out = tmp_path / "out"
    args = ["consolidate", str(day), "--hosts", "8", "--duration", "3600", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    export = out / "consolidate-day-thr0.8-mmt-cloudsim-run1"
    for name in ("summary.json", "intervals.csv", "migrations.csv", "report.html"):
        assert (export / name).is_file(), name
    assert str(out / "secmig.sqlite") in printed and str(export / "report.html") in printed.replace("\n", "")
    assert "Consolidation summary" in (export / "report.html").read_text()
    for source in (["--db", str(out / "secmig.sqlite")], [str(out)]):  # the database, or the --out folder
        again = tmp_path / "again.html"
        assert main(["report", *source, "--out", str(again)]) == 0
        page = again.read_text()
        assert section(page, "energy").count("data:image/png") == 1
        again.unlink()
    assert "did not run" in section(page, "summary")  # the cloudsim model moves no bytes to monitor


def test_consolidate_out_an_existing_file_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out`` naming a file: exit 2, one line on stderr, before any work, nothing written."""
    day = write_traces(tmp_path / "day", 4)
    target = tmp_path / "taken"
    target.write_text("mine\n")
    assert main(["consolidate", str(day), "--hosts", "4", "--duration", "600", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a directory" in err
    assert target.read_text() == "mine\n"
