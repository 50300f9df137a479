"""One migration between two hosts, no scenario file: what ``secmig predict`` answers.

The same simulator as for scenarios, on a two-host platform whose NICs have the given bandwidth and
whose path has the given latency, so a prediction and a scenario run can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from secmig.errors import ConfigError
from secmig.migration.policy import NonConvergence, policy_preset
from secmig.migration.result import MigrationResult
from secmig.model.dirty import DirtyModel, Hotspot, NoDirtying, Sequential, Uniform
from secmig.model.infra import VM, Datacenter, Host, Infrastructure
from secmig.model.units import PAGE_SIZE
from secmig.sim.engine import MigrationSpec, Simulation, SimulationSpec, Strategy

PATTERNS = ("sequential", "uniform", "hotspot")


def dirty_model(
    pattern: str,
    rate_pages_per_s: float,
    working_set_bytes: int,
    ram_bytes: int,
    hot_share: float = 0.9,
) -> DirtyModel:
    """The dirty-page model called ``pattern``; for ``hotspot`` the working set is the hot set."""
    if rate_pages_per_s < 0:
        raise ConfigError(f"dirty rate {rate_pages_per_s} is negative")
    if rate_pages_per_s == 0:
        return NoDirtying()
    w = max(math.ceil(working_set_bytes / PAGE_SIZE), 1)
    if pattern == "sequential":
        return Sequential(rate_pages_per_s, w)
    if pattern == "uniform":
        return Uniform(rate_pages_per_s, w)
    if pattern == "hotspot":
        return Hotspot(rate_pages_per_s, w, math.ceil(ram_bytes / PAGE_SIZE), hot_share)
    raise ConfigError(f"unknown dirty pattern {pattern!r} (choose from {', '.join(PATTERNS)})")


def predict(
    *,
    ram_bytes: int,
    used_bytes: int | None,
    dirty_rate_pages_per_s: float,
    working_set_bytes: int | None,
    pattern: str,
    bandwidth_bytes_per_s: float,
    latency_s: float = 0.0,
    downtime_limit_s: float = 0.3,
    policy: str = "qemu",
    strategy: Strategy = "precopy",
    on_nonconvergence: NonConvergence | None = None,
    max_time_s: float | None = None,
    device_state_bytes: int = 0,
    auto_converge: bool = False,
    switchover_bandwidth_bytes_per_s: float | None = None,
    budget_with_switchover_bandwidth: bool = True,
    postcopy_after_rounds: int = 1,
    hot_share: float = 0.9,
    link_bytes_per_s: float | None = None,
) -> MigrationResult:
    """Simulate one migration of a VM with these parameters and return its result.

    ``bandwidth_bytes_per_s`` caps the live rounds (QEMU's max-bandwidth). The stop-and-copy and the
    post-copy push are not capped (QEMU lifts its rate limit there, in every version) and run at the
    link's speed: ``link_bytes_per_s``, else ``switchover_bandwidth_bytes_per_s``, else the cap. With
    ``budget_with_switchover_bandwidth`` the downtime budget uses ``switchover_bandwidth_bytes_per_s``,
    as QEMU ≥ 8.2 does when avail-switchover-bandwidth is set; otherwise the budget uses the measured,
    capped speed, as QEMU 7.2 does.
    """
    if ram_bytes <= 0:
        raise ConfigError(f"--ram: {ram_bytes} must be positive")
    used = ram_bytes if used_bytes is None else used_bytes
    if not 0 <= used <= ram_bytes:
        raise ConfigError(f"--used: {used} bytes is more than --ram ({ram_bytes} bytes)")
    if bandwidth_bytes_per_s <= 0:
        raise ConfigError("--bandwidth must be positive")
    ws = used if working_set_bytes is None else working_set_bytes
    if not 0 < ws <= ram_bytes:
        raise ConfigError(f"--working-set: {ws} bytes must be positive and at most --ram ({ram_bytes} bytes)")
    pol = policy_preset(policy).with_overrides(
        downtime_limit_s=downtime_limit_s, on_nonconvergence=on_nonconvergence, max_time_s=max_time_s
    )
    if switchover_bandwidth_bytes_per_s is not None and switchover_bandwidth_bytes_per_s <= 0:
        raise ConfigError("--switchover-bandwidth must be positive")
    if link_bytes_per_s is not None and link_bytes_per_s <= 0:
        raise ConfigError("--link must be positive")
    link = link_bytes_per_s or switchover_bandwidth_bytes_per_s or bandwidth_bytes_per_s
    hosts = tuple(Host(name, "dc", link, math.inf, latency_s) for name in ("source", "destination"))
    vm = VM(
        name="vm",
        host="source",
        ram_bytes=ram_bytes,
        used_bytes=used,
        dirty=dirty_model(pattern, dirty_rate_pages_per_s, ws, ram_bytes, hot_share),
        device_state_bytes=device_state_bytes,
    )
    spec = SimulationSpec(
        name="predict",
        infra=Infrastructure((Datacenter("dc"),), hosts),
        vms=(vm,),
        migrations=(
            MigrationSpec(
                "vm",
                "destination",
                0.0,
                strategy,
                pol,
                max_bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                auto_converge=auto_converge,
                switchover_bandwidth_bytes_per_s=(
                    switchover_bandwidth_bytes_per_s if budget_with_switchover_bandwidth else None
                ),
                postcopy_after_rounds=postcopy_after_rounds,
            ),
        ),
    )
    result = Simulation(spec, record_usage=False, record_flows=False).run()
    return result.migrations[0]


def min_converging_bandwidth(
    predict_at: Callable[[float], MigrationResult],
    downtime_limit_s: float,
    *,
    low_bytes_per_s: float = 1e5,
    high_bytes_per_s: float = 1e11,
    rel_precision: float = 0.02,
) -> float | None:
    """The smallest cap at which ``predict_at(cap)`` converges with a downtime within the limit.

    Bisection on a log scale between the bounds (convergence only gets easier with more bandwidth);
    None when even ``high_bytes_per_s`` does not converge.
    """

    def ok(cap: float) -> bool:
        r = predict_at(cap)
        return r.converged and r.outcome == "completed" and r.downtime_s <= downtime_limit_s * 1.0001

    if not ok(high_bytes_per_s):
        return None
    lo, hi = low_bytes_per_s, high_bytes_per_s
    if ok(lo):
        return lo
    while hi / lo > 1 + rel_precision:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
