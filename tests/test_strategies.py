"""Post-copy, hybrid, auto-converge and QEMU's in-round rule, through the simulator."""

import pytest

from secmig.migration.policy import StopPolicy
from secmig.model.analytic import PAGE_WIRE_BYTES
from secmig.model.dirty import Uniform
from secmig.model.infra import VM, Datacenter, Host, Infrastructure
from secmig.sim.engine import MigrationSpec, Simulation, SimulationSpec
from secmig.sim.predict import predict

GiB = 2**30
MiB = 2**20
BW = 125e6


def one(ram: int, rate: float, strategy: str = "precopy", **kw: object):  # type: ignore[no-untyped-def]
    return predict(
        ram_bytes=ram,
        used_bytes=ram,
        dirty_rate_pages_per_s=rate,
        working_set_bytes=ram // 4,
        pattern="uniform",
        bandwidth_bytes_per_s=BW,
        latency_s=0.001,
        strategy=strategy,  # type: ignore[arg-type]
        device_state_bytes=256 * 1024,
        **kw,
    )  # type: ignore[arg-type]


def test_postcopy_downtime_does_not_grow_with_ram_but_total_time_does() -> None:
    """Post-copy pauses only for the CPU/device state; the push that follows grows with RAM."""
    small, large = one(1 * GiB, 20000, "postcopy"), one(8 * GiB, 20000, "postcopy")
    assert small.downtime_s == pytest.approx(large.downtime_s, rel=1e-6)
    assert small.downtime_s < 0.01
    assert large.total_time_s > 6 * small.total_time_s
    assert large.extra["remote_faults"] > 0 and large.extra["degraded_s"] > small.extra["degraded_s"]
    assert large.bytes_sent == pytest.approx(8 * small.bytes_sent, rel=0.01)


def test_postcopy_sends_each_page_once_where_precopy_cannot_finish() -> None:
    """A λ > 1 guest: pre-copy under qemu gives up, post-copy finishes with one copy of memory."""
    rate = 1.5 * BW / PAGE_WIRE_BYTES
    pre = one(2 * GiB, rate, max_time_s=120)
    post = one(2 * GiB, rate, "postcopy")
    assert pre.outcome == "aborted" and post.outcome == "completed"
    assert post.bytes_sent < 1.01 * 2 * GiB


def test_hybrid_switches_after_its_precopy_rounds() -> None:
    """Hybrid: one pre-copy round, then post-copy of what is dirty; fewer remote faults than pure post-copy."""
    rate = 1.5 * BW / PAGE_WIRE_BYTES
    hybrid = one(2 * GiB, rate, "hybrid", postcopy_after_rounds=1)
    post = one(2 * GiB, rate, "postcopy")
    assert hybrid.outcome == "completed" and hybrid.live_rounds == 2  # one pre-copy round + the push
    assert hybrid.downtime_s < 0.01
    assert hybrid.extra["remote_faults"] < post.extra["remote_faults"]


def test_auto_converge_makes_a_lambda_above_one_case_converge() -> None:
    """Dirtying 1.4× faster than the link: auto-converge throttles until it converges, and says how far."""
    rate = 1.4 * BW / PAGE_WIRE_BYTES
    kw = dict(
        ram_bytes=2 * GiB,
        used_bytes=2 * GiB,
        dirty_rate_pages_per_s=rate,
        working_set_bytes=2 * GiB,
        pattern="sequential",
        bandwidth_bytes_per_s=BW,
        max_time_s=600,
    )
    plain = predict(**kw)  # type: ignore[arg-type]
    throttled = predict(**kw, auto_converge=True)  # type: ignore[arg-type]
    assert not plain.converged and plain.outcome == "aborted"
    assert throttled.converged and throttled.outcome == "completed"
    assert 0.2 <= throttled.extra["throttle"] <= 0.99
    # 1.4 × (1 − throttle) must have fallen below 1 for the rounds to shrink
    assert 1.4 * (1 - throttled.extra["throttle"]) < 1


def test_qemu_checks_the_budget_as_pages_are_sent() -> None:
    """QEMU's in-round check converges a saturating workload that round-end checks never converge."""
    ram, ws = 256 * MiB, 64 * MiB
    rate = 30000.0  # pages/s over a 64 MiB working set, on a 100 MB/s cap: 1.23 × the link

    def run(in_round: bool) -> object:
        pol = StopPolicy(
            name="q", downtime_limit_s=0.2, max_time_s=20, on_nonconvergence="abort", check_in_round=in_round
        )
        hosts = (Host("a", "dc", 1e9), Host("b", "dc", 1e9))
        vm = VM("vm", "a", ram, ws + MiB, dirty=Uniform(rate, ws // 4096))
        spec = SimulationSpec(
            "q",
            Infrastructure((Datacenter("dc"),), hosts),
            (vm,),
            (MigrationSpec("vm", "b", 0.0, "precopy", pol, max_bandwidth_bytes_per_s=100e6),),
        )
        return Simulation(spec).run().migrations[0]

    in_round, per_round = run(True), run(False)
    assert in_round.converged and in_round.outcome == "completed"  # type: ignore[attr-defined]
    assert not per_round.converged  # type: ignore[attr-defined]


def test_switchover_bandwidth_sets_the_downtime() -> None:
    """A capped migration on a fast link: the stop-and-copy runs at link speed, so downtime shrinks."""
    kw = dict(
        ram_bytes=GiB,
        used_bytes=GiB,
        dirty_rate_pages_per_s=5000,
        working_set_bytes=256 * MiB,
        pattern="uniform",
        bandwidth_bytes_per_s=100e6,
    )
    capped = predict(**kw)  # type: ignore[arg-type]
    fast = predict(**kw, switchover_bandwidth_bytes_per_s=1e9, budget_with_switchover_bandwidth=False)  # type: ignore[arg-type]
    assert fast.downtime_s < capped.downtime_s / 5
    # With QEMU ≥ 8.2's avail-switchover-bandwidth the budget grows too: it stops earlier, same downtime bound.
    budgeted = predict(**kw, switchover_bandwidth_bytes_per_s=1e9)  # type: ignore[arg-type]
    assert budgeted.total_time_s <= fast.total_time_s
    assert budgeted.downtime_s <= 0.3 + 1e-3
