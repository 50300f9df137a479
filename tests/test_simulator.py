"""The simulator against the closed form, and the behaviours the issue pins down."""

import math
from pathlib import Path

import pytest

from secmig.migration.policy import policy_preset
from secmig.model import analytic
from secmig.model.analytic import PAGE_WIRE_BYTES, first_round_bytes
from secmig.model.dirty import Uniform
from secmig.model.infra import VM, Datacenter, Host, Infrastructure
from secmig.sim.engine import MigrationSpec, Simulation, SimulationSpec
from secmig.sim.predict import predict

GiB = 2**30
BW = 125e6  # 1 Gbit/s


def test_no_dirtying_takes_used_memory_over_bandwidth_plus_latency() -> None:
    """An idle VM: total time = used ÷ bandwidth (+ latency), within 1 %."""
    r = predict(
        ram_bytes=4 * GiB,
        used_bytes=3 * GiB,
        dirty_rate_pages_per_s=0,
        working_set_bytes=None,
        pattern="uniform",
        bandwidth_bytes_per_s=BW,
        latency_s=0.001,
    )
    assert r.total_time_s == pytest.approx(3 * GiB / BW + 0.001, rel=0.01)
    assert r.converged and r.outcome == "completed"
    # QEMU stops once what is left fits the budget: at most 300 ms of (mostly used) pages, plus latency.
    assert 0.001 < r.downtime_s <= 0.3 + 0.001


@pytest.mark.parametrize("lam", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
def test_uniform_dirtying_matches_the_closed_form(lam: float) -> None:
    """One flow, no contention, QEMU's rule: simulator and closed form agree within 2 % on time and data."""
    ram = 4 * GiB
    rate = lam * BW / PAGE_WIRE_BYTES
    r = predict(ram_bytes=ram, used_bytes=3 * GiB, dirty_rate_pages_per_s=rate, working_set_bytes=ram,
                pattern="uniform", bandwidth_bytes_per_s=BW, policy="qemu")
    est = analytic.qemu_precopy(
        ram, 3 * GiB, Uniform(rate, ram // 4096).dirty_pages, BW, 0.3, working_set_pages=ram // 4096
    )
    assert r.converged and est.converged
    assert r.total_time_s == pytest.approx(est.total_time_s, rel=0.02)
    assert r.bytes_sent == pytest.approx(est.total_bytes, rel=0.02)
    assert r.downtime_s == pytest.approx(est.downtime_s, rel=0.02)


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
def test_downtime_lies_within_one_check_period_of_qemus_periodic_rule(lam: float) -> None:
    """QEMU checks only between 100 ms send periods: its downtime is known to one period, the rest to 1 %."""
    ram = 4 * GiB
    rate = lam * BW / PAGE_WIRE_BYTES
    r = predict(ram_bytes=ram, used_bytes=3 * GiB, dirty_rate_pages_per_s=rate, working_set_bytes=ram,
                pattern="uniform", bandwidth_bytes_per_s=BW, policy="qemu")
    est = analytic.qemu_precopy(
        ram, 3 * GiB, Uniform(rate, ram // 4096).dirty_pages, BW, 0.3, working_set_pages=ram // 4096,
        whole_intervals=True,
    )
    assert r.total_time_s == pytest.approx(est.total_time_s, rel=0.01)
    assert r.bytes_sent == pytest.approx(est.total_bytes, rel=0.01)
    assert abs(r.downtime_s - est.downtime_s) <= 0.1 * PAGE_WIRE_BYTES / 4096
    assert est.downtime_s <= 0.3 * PAGE_WIRE_BYTES / 4096


@pytest.mark.parametrize("lam", [0.2, 0.4, 0.6])
def test_sequential_dirtying_matches_the_geometric_series(lam: float) -> None:
    """Below its working set the sequential sweep is linear: under xen round i sends V·λ^i exactly."""
    ram = 2 * GiB
    rate = lam * BW / PAGE_WIRE_BYTES
    r = predict(ram_bytes=ram, used_bytes=ram, dirty_rate_pages_per_s=rate, working_set_bytes=ram,
                pattern="sequential", bandwidth_bytes_per_s=BW, policy="xen")
    # Xen stops below 50 dirty pages, or forces the copy after 30 rounds.
    est = analytic.geometric_precopy(
        first_round_bytes(ram, ram), rate * PAGE_WIRE_BYTES, BW, 49.5 * PAGE_WIRE_BYTES, max_rounds=30
    )
    assert r.live_rounds == est.live_rounds
    assert r.converged == est.converged
    assert r.total_time_s == pytest.approx(est.total_time_s, rel=0.01)
    assert r.bytes_sent == pytest.approx(est.total_bytes, rel=0.01)


@pytest.mark.parametrize("lam", [1.0, 1.5])
def test_lambda_at_least_one_does_not_converge_under_qemu(lam: float) -> None:
    """λ ≥ 1 never fits the downtime limit: qemu gives up, says so, the VM stays on the source."""
    rate = lam * BW / PAGE_WIRE_BYTES
    r = predict(
        ram_bytes=GiB,
        used_bytes=GiB,
        dirty_rate_pages_per_s=rate,
        working_set_bytes=GiB,
        pattern="sequential",
        bandwidth_bytes_per_s=BW,
        max_time_s=120,
    )
    assert not r.converged and r.outcome == "aborted"
    assert "did not converge" in r.stop_reason


def test_lambda_above_one_under_xen_stops_at_three_times_ram() -> None:
    """Under xen, λ > 1 is forced to stop-and-copy at 3 × RAM (or 30 rounds)."""
    rate = 1.3 * BW / PAGE_WIRE_BYTES
    r = predict(
        ram_bytes=GiB,
        used_bytes=GiB,
        dirty_rate_pages_per_s=rate,
        working_set_bytes=GiB,
        pattern="sequential",
        bandwidth_bytes_per_s=BW,
        policy="xen",
    )
    assert not r.converged and r.outcome == "completed"
    assert "3 ×" in r.stop_reason or "30 rounds" in r.stop_reason
    live_bytes = sum(x.bytes for x in r.rounds if x.live)
    assert live_bytes >= 3 * GiB or r.live_rounds == 30


def _shared_bottleneck(n: int) -> list[float]:
    hosts = tuple(Host(f"h{i}", "dc", 10 * BW) for i in range(2 * n))
    infra = Infrastructure((Datacenter("dc", core_bytes_per_s=BW),), hosts)
    vms = tuple(VM(f"vm{i}", f"h{i}", GiB, GiB) for i in range(n))
    migs = tuple(
        MigrationSpec(f"vm{i}", f"h{n + i}", 0.0, "precopy", policy_preset("qemu")) for i in range(n)
    )
    run = Simulation(SimulationSpec("shared", infra, vms, migs)).run()
    return [m.total_time_s for m in run.migrations]


def test_two_migrations_sharing_a_bottleneck_each_take_twice_as_long() -> None:
    """Two migrations through one core link each take about twice as long as one alone."""
    (alone,) = _shared_bottleneck(1)
    both = _shared_bottleneck(2)
    for t in both:
        assert t == pytest.approx(2 * alone, rel=0.02)


def test_same_seed_same_results_and_the_seed_matters() -> None:
    """Dirty-page noise is seeded: the same seed repeats a run exactly; another seed changes it."""

    def one(seed: int) -> list[tuple[float, float, int]]:
        hosts = (Host("a", "dc", BW), Host("b", "dc", BW))
        vm = VM("vm", "a", GiB, GiB, dirty=Uniform(8000, 2**18), dirty_noise=0.3)
        spec = SimulationSpec(
            "s",
            Infrastructure((Datacenter("dc"),), hosts),
            (vm,),
            (MigrationSpec("vm", "b", 0.0, "precopy", policy_preset("qemu")),),
            seed=seed,
        )
        run = Simulation(spec).run()
        return [(m.total_time_s, m.downtime_s, m.bytes_sent) for m in run.migrations]

    assert one(1) == one(1)
    assert one(1) != one(2)


def test_latency_is_paid_in_the_downtime_and_the_total() -> None:
    """A WAN latency adds to both downtime and total time, once."""
    a = predict(
        ram_bytes=GiB,
        used_bytes=GiB // 2,
        dirty_rate_pages_per_s=0,
        working_set_bytes=None,
        pattern="uniform",
        bandwidth_bytes_per_s=BW,
        latency_s=0.0,
    )
    b = predict(
        ram_bytes=GiB,
        used_bytes=GiB // 2,
        dirty_rate_pages_per_s=0,
        working_set_bytes=None,
        pattern="uniform",
        bandwidth_bytes_per_s=BW,
        latency_s=0.05,
    )
    assert b.total_time_s - a.total_time_s == pytest.approx(0.05)
    assert b.downtime_s - a.downtime_s == pytest.approx(0.05)
    assert math.isfinite(b.total_time_s)


def test_monitor_checks_credentials_at_simulated_time(tmp_path: Path) -> None:
    """A grant's lifetime runs in simulated time: valid at t = 30 s of the run, expired at t = 120 s."""
    from secmig.security.policy import Operation
    from secmig.sim.monitoring import SimSecurity, new_cluster

    cluster = new_cluster(tmp_path / "c", ["a", "b"])
    security = SimSecurity(cluster)
    binding = cluster.issue_binding("vm", "52:54:00:00:00:01", "a", 0, now=security.epoch_s)
    security.bindings["vm"] = binding
    security.grants[("vm", "a", "b")] = cluster.issue_grant(
        Operation.MIGRATE, "vm", "a", "b", current_binding=binding, ttl_s=60, now=security.epoch_s
    )
    assert security.check_move("vm", "a", "b", 30.0)[0]
    ok, why = security.check_move("vm", "a", "b", 120.0)
    assert not ok and "expired" in why
