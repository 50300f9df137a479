"""The consolidation day in the lab: small generated days, both migration models, security, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from secmig.cli import main
from secmig.cloud.overload import parse_overload
from secmig.cloud.selection import SelectionKind
from secmig.errors import ConfigError
from secmig.lab.consolidation import DayConfig, MigrationModel, load_workload, planetlab_fleet, run_day

PLANETLAB_DAY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "planetlab" / "20110303"


def _day(path: Path, **kw: object) -> DayConfig:
    base: dict[str, object] = {"hosts": 12, "duration_s": 4 * 3600.0, "secure": False}
    base.update(kw)
    return DayConfig(path, **base)  # type: ignore[arg-type]


def test_fleet_follows_cloudsims_planetlab_setup() -> None:
    """Hosts alternate G4/G5; VM types come in blocks of ⌈n/4⌉ in file order."""
    f = planetlab_fleet(10, 4)
    assert list(f.pe_mips) == [1860, 2660, 1860, 2660]
    assert list(f.vm_mips) == [2500, 2500, 2500, 2000, 2000, 2000, 1000, 1000, 1000, 500]
    assert list(f.vm_ram_mb[:4]) == [870, 870, 870, 1740]


def test_cloudsim_model_day_consolidates(small_day: Path) -> None:
    """VMs migrate, hosts are switched off, energy sums the intervals, records match the count."""
    r = run_day(_day(small_day))
    m = r.metrics
    assert m.migrations > 0 and m.migrations == len(r.migrations)
    assert m.shutdowns > 0
    assert sum(iv.energy_kwh for iv in r.intervals) == pytest.approx(m.energy_kwh)
    # 12 hosts all on at full power for 4 h would be 12 × 135 W × 4 h; consolidation uses much less.
    assert 0 < m.energy_kwh < 12 * 0.135 * 4 * 0.8
    assert 0 <= m.slatah <= 1 and 0 <= m.pdm <= 0.1
    assert m.slav == pytest.approx(m.slatah * m.pdm) and m.esv == pytest.approx(m.energy_kwh * m.slav)
    # CloudSim's delay: RAM ÷ (1 Gbit/s ÷ 2), e.g. 1740 MB in 27.84 s, 613 MB in 9.808 s.
    durations = {round(x.end_s - x.start_s, 3) for x in r.migrations}
    assert durations <= {13.92, 27.84, 9.808}
    assert max(iv.active_hosts for iv in r.intervals) <= 12


def test_same_seed_same_day(small_day: Path) -> None:
    """Random selection with a seed repeats exactly."""
    a = run_day(_day(small_day, selection=SelectionKind.RS, seed=5, duration_s=3600.0))
    b = run_day(_day(small_day, selection=SelectionKind.RS, seed=5, duration_s=3600.0))
    assert a.metrics == b.metrics


@pytest.mark.parametrize("spec", ["iqr:1.5", "mad:2.5", "lr:1.2", "lrr:1.2"])
def test_every_detector_runs_past_its_history_warm_up(small_day: Path, spec: str) -> None:
    """The statistical detectors run beyond 12 intervals (their fallback phase) and still consolidate."""
    r = run_day(_day(small_day, overload=parse_overload(spec), selection=SelectionKind.MC))
    assert r.metrics.migrations > 0 and r.metrics.energy_kwh > 0


def test_secure_day_grants_every_migration_and_never_targets_a_revoked_host(small_day: Path) -> None:
    """Every migration carries a verified grant; a revoked host never receives a VM."""
    r = run_day(_day(small_day, secure=True, revoked=(1, 3), duration_s=2 * 3600.0))
    assert r.grants_issued == r.metrics.migrations > 0 and r.grants_refused == 0
    assert r.eligible_hosts == 10
    assert not {x.destination for x in r.migrations} & {"host-1", "host-3"}


def test_network_model_moves_memory_and_the_monitor_destroys_no_honest_vm(small_day: Path) -> None:
    """Pre-copy over the shared network: bytes ≥ RAM, some downtime, no honest VM destroyed."""
    r = run_day(_day(small_day, secure=True, migration_model=MigrationModel.NETWORK, duration_s=2 * 3600.0))
    done = [x for x in r.migrations if x.outcome == "completed"]
    assert done
    f = planetlab_fleet(20, 12)
    ram = {v.name: v.ram_mb * 2**20 for v in f.vms}
    assert all(x.bytes_moved >= ram[x.vm] for x in done)
    assert all(0 <= x.downtime_s < 2.0 for x in done) and any(x.downtime_s > 0 for x in done)
    assert r.monitor is not None and r.monitor.destroyed == 0 and r.monitor.vm_hours_watched > 0


def test_bad_workloads_are_config_errors(tmp_path: Path) -> None:
    """A missing directory, an empty one and a malformed file each name what is wrong."""
    with pytest.raises(ConfigError, match="no such workload directory"):
        load_workload(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no trace files"):
        load_workload(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vm1").write_text("10\nten\n", encoding="ascii")
    with pytest.raises(ConfigError, match=r"vm1:2: not an integer"):
        load_workload(bad)


def test_cli_json_and_bad_input_exit_codes(small_day: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` prints one object of plain fractions; bad input exits 2 with one line."""
    code = main(["consolidate", str(small_day), "--hosts", "12", "--duration", "3600", "--no-secure", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("energy_kwh", "migrations", "slav", "pdm", "slatah", "esv", "shutdowns"):
        assert isinstance(doc[key], int | float)
    assert main(["consolidate", str(small_day), "--overload", "thr:abc"]) == 2
    assert "thr:abc" in capsys.readouterr().err
    assert main(["consolidate", str(small_day.parent / "missing")]) == 2
    assert main(["consolidate", str(small_day), "--selection", "xyz"]) == 2
    assert main(["consolidate", str(small_day), "--migration-model", "teleport"]) == 2


@pytest.mark.skipif(not PLANETLAB_DAY.is_dir(), reason=f"PlanetLab traces not found at {PLANETLAB_DAY}")
def test_full_planetlab_day_thr_mmt() -> None:
    """The whole 2011-03-03 day, THR 0.8 + MMT, CloudSim's migration model: bounds that can fail."""
    r = run_day(DayConfig(PLANETLAB_DAY, secure=False))
    m = r.metrics
    # 300.1 s … 86,100.1 s (CloudSim stops at 86,400 s), and the migrations that end after the last one
    assert [round(iv.t_s, 1) for iv in r.intervals[:287]] == [round(300.1 + 300 * k, 1) for k in range(287)]
    # CloudSim's completion rule, straight from the traces: a VM leaves at the first instant it asks 0 MIPS,
    # i.e. two zero samples in a row (the instants are 0.1 s past a sample).
    traces = load_workload(PLANETLAB_DAY)
    mips = planetlab_fleet(len(traces.names)).vm_mips
    data = traces.data
    zero = (data[:, 1:-1] == 0) & (data[:, 2:] == 0)  # instants k = 1 … 287
    leaves = np.where(zero.any(axis=1), zero.argmax(axis=1) + 1, 10**6)
    assert r.vms_retired == int((leaves < 10**6).sum())
    # Power floor: what is still running must be served, ≥ 93.7 W per 5,320 MIPS (the G5 at idle, best case).
    demand = [(data[:, k] * mips)[leaves > k].sum() for k in range(1, 288)]
    assert m.overall_sla_violation < 0.01
    floor_kwh = sum(d * 0.99 / 5320 * 93.7 * 300 for d in demand) / 3.6e6
    # Every one of the 800 hosts idle all day would cost ≈ 1,725 kWh; consolidation needs far less.
    idle_all_day = 400 * (86.0 + 93.7) * 24 / 1000
    assert floor_kwh < m.energy_kwh < 0.2 * idle_all_day
    assert m.migrations == len(r.migrations) > 1052
    assert 0 < m.slatah < 0.5 and 0 < m.pdm < 0.01 and m.shutdowns > 0
    assert np.isfinite(m.mean_time_before_shutdown_s)
    assert r.wall_time_s < 60


def test_manager_grants_are_single_use_and_tamper_evident(tmp_path: Path) -> None:
    """A grant admitted once is refused the second time; a grant to a revoked host or altered is refused."""
    from dataclasses import replace

    from secmig.lab.consolidation import ConsolidationSecurity

    sec = ConsolidationSecurity(tmp_path / "c", ["h0", "h1", "h2"], ["h2"], ["vm-0"])
    sec.bind("vm-0", "h0")
    g = sec.grant("vm-0", "h0", "h1", None, 10.0)
    assert sec.admit(g, sec.bindings["vm-0"], 10.0) == (True, "granted")
    assert sec.admit(g, sec.bindings["vm-0"], 11.0) == (False, "grant nonce already used")
    to_revoked = sec.grant("vm-0", "h0", "h2", None, 12.0)
    ok, why = sec.admit(to_revoked, sec.bindings["vm-0"], 12.0)
    assert not ok and "h2" in why
    forged = replace(sec.grant("vm-0", "h0", "h1", None, 13.0), destination_host="h0")
    ok, why = sec.admit(forged, sec.bindings["vm-0"], 13.0)
    assert not ok and "signature" in why
    assert sec.check_member("h1") == (True, "h1's Vsignature verifies")
    assert not sec.check_member("h2")[0] and not sec.check_member("nobody")[0]
