"""Scenario files, their error messages, and the simulator's CLI end to end."""

import csv
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from secmig.cli import main

SCENARIO = """
name: tiny
seed: 1
datacenters:
  - name: dc
    core: 10Gbit/s
    hosts:
      - {{name: "h{{i}}", count: 2, nic: 1Gbit/s}}
vms:
  - name: a
    host: h1
    ram: 1GiB
    used: 512MiB
    dirty: {{pattern: uniform, rate: 5000pages/s, working_set: 256MiB}}
  - {{name: b, host: h1, ram: {ram_b}}}
  - {{name: c, host: h2, ram: 1GiB}}
  - {{name: d, host: h2, ram: 1GiB}}
migrations:
  - {{vm: a, to: h2, at: 1s}}
  - {{vm: b, to: h2, at: 1s, policy: xen}}
traffic:
  - {{from: c, to: a, rate: 100Mbit/s, duration: 5s}}
"""


def write(tmp_path: Path, ram_b: str = "2GiB", name: str = "demo.yaml") -> Path:
    p = tmp_path / name
    p.write_text(SCENARIO.format(ram_b=ram_b))
    return p


def run_cli(*args: str) -> int:
    return main(list(args))


def test_simulate_writes_sqlite_json_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A scenario run lands in SQLite (one run, its migrations and rounds) and in JSON/CSV exports."""
    out = tmp_path / "out"
    assert run_cli("simulate", str(write(tmp_path)), "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "tiny: 2 migrations" in text and "completed" in text
    with sqlite3.connect(out / "secmig.sqlite") as db:
        assert db.execute("SELECT count(*) FROM runs").fetchone() == (1,)
        rows = db.execute("SELECT vm, outcome, rounds, bytes_sent FROM migrations ORDER BY vm").fetchall()
        assert [r[0] for r in rows] == ["a", "b"] and all(r[1] == "completed" for r in rows)
        n_rounds = db.execute("SELECT count(*) FROM rounds").fetchone()[0]
        assert n_rounds == sum(r[2] for r in rows)
        assert db.execute("SELECT count(*) FROM link_usage WHERE link = 'dc/core'").fetchone()[0] > 1
        assert db.execute("SELECT count(*) FROM flows WHERE kind = 'app'").fetchone()[0] >= 5
    export = out / "tiny-run1"
    data = json.loads((export / "run.json").read_text())
    assert {m["vm"] for m in data["migrations"]} == {"a", "b"}
    with (export / "migrations.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    with (export / "links.csv").open() as f:
        util = [float(r["utilization"]) for r in csv.DictReader(f) if r["link"] == "h1/nic-tx"]
        assert max(util) == pytest.approx(1.0, rel=1e-6)


def test_bad_unit_names_file_field_and_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`vms[1].ram: "4 GB"` gets one line naming file, field path and value; exit 2; nothing written."""
    out = tmp_path / "out"
    code = run_cli("simulate", str(write(tmp_path, ram_b='"4 GB"')), "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2
    assert 'demo.yaml: vms[1].ram: "4 GB" is not a size (try 4GiB)' in " ".join(err.split())
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("to: h2, at: 1s}\n  - {vm: b", "to: h9, at: 1s}\n  - {vm: b"),
            "migrations[0].to: unknown host 'h9'",
        ),
        (("policy: xen", "policy: kvm"), "migrations[1].policy: unknown policy 'kvm'"),
        (("rate: 100Mbit/s", "rate: 100 Mbit/s"), 'traffic[0].rate: "100 Mbit/s" is not a rate'),
        (("core: 10Gbit/s", "core: 10Gbit/s\n    colour: blue"), "datacenters[0].colour: unknown field"),
    ],
)
def test_other_bad_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], message: str
) -> None:
    """Unknown references, policies, units and fields are each named with their path."""
    p = write(tmp_path)
    p.write_text(p.read_text().replace(*edit))
    assert run_cli("validate", str(p)) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_validate_accepts_the_demo_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    """The bundled scenario is valid."""
    demo = Path(__file__).parents[1] / "src" / "secmig" / "data" / "demo.yaml"
    assert run_cli("validate", str(demo)) == 0
    assert "6 hosts, 18 VMs, 8 migrations" in capsys.readouterr().out


def test_predict_json_has_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """`predict --json` prints one object with total time, downtime, rounds, bytes, convergence, reason."""
    code = run_cli(
        "predict",
        "--ram",
        "4GiB",
        "--used",
        "3GiB",
        "--dirty-rate",
        "20000pages/s",
        "--working-set",
        "1GiB",
        "--bandwidth",
        "1Gbit/s",
        "--latency",
        "1ms",
        "--json",
    )
    assert code == 0
    obj = json.loads(capsys.readouterr().out)
    for key in ("total_time_s", "downtime_s", "rounds", "bytes_sent", "converged", "stop_reason"):
        assert key in obj
    assert obj["converged"] is True and obj["downtime_s"] <= 0.3 + 0.001


def test_predict_bad_option_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad option value names the option."""
    assert run_cli("predict", "--ram", "4 GB", "--dirty-rate", "1pages/s", "--bandwidth", "1Gbit/s") == 2
    assert '--ram: "4 GB" is not a size' in capsys.readouterr().err


def test_demo_from_the_installed_script(tmp_path: Path) -> None:
    """`secmig demo` runs as a user runs it and prints the migrations table and where results went."""
    proc = subprocess.run(
        [sys.executable, "-m", "secmig", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo: 8 migrations" in proc.stdout
    assert "aborted" in proc.stdout and "completed" in proc.stdout
    assert (tmp_path / "secmig.sqlite").exists()
