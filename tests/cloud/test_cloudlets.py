"""Cloudlet schedulers against finish times computed by hand."""

from __future__ import annotations

import pytest

from secmig.cloud.capacity import HostSpec, VmSpec, cloudlet_capacity, fits
from secmig.cloud.cloudlets import Cloudlet, SchedulerKind, schedule
from secmig.cloud.power import HP_PROLIANT_ML110_G5
from secmig.errors import ConfigError

TWO = [Cloudlet("c1", 10_000), Cloudlet("c2", 20_000)]


def _times(kind: SchedulerKind, cloudlets: list[Cloudlet], pes: int) -> dict[str, tuple[float, float]]:
    return {r.name: (r.start_s, r.finish_s) for r in schedule(cloudlets, vm_pes=pes, mips_per_pe=1000, kind=kind)}


def test_time_shared_one_pe() -> None:
    """Two cloudlets share 1000 MIPS: c1 ends at 10000/500 = 20 s, c2 then runs alone to 30 s."""
    t = _times(SchedulerKind.TIME_SHARED, TWO, 1)
    assert t["c1"] == pytest.approx((0.0, 20.0))
    assert t["c2"] == pytest.approx((0.0, 30.0))


def test_space_shared_one_pe() -> None:
    """Space-shared: c1 holds the PE for 10 s, c2 waits and ends at 10 + 20 = 30 s."""
    t = _times(SchedulerKind.SPACE_SHARED, TWO, 1)
    assert t["c1"] == pytest.approx((0.0, 10.0))
    assert t["c2"] == pytest.approx((10.0, 30.0))


MIXED = [Cloudlet("a", 10_000, 1), Cloudlet("b", 30_000, 2), Cloudlet("c", 5_000, 1, submit_s=5.0)]


def test_time_shared_two_pes_late_arrival() -> None:
    """2 × 1000 MIPS, 3 then 4 PEs asked: c ends at 15 s, a at 17.5 s, b at 22.5 s (worked by hand)."""
    # [0, 5): 2000/3 per PE: a 3333.3, b 6666.7 done. [5, 15): 500 per PE: c done, a 1666.7 left, b 13333.3.
    # [15, 17.5): 2000/3 per PE: a done, b 10000 left. [17.5, 22.5): b alone at 2000.
    t = _times(SchedulerKind.TIME_SHARED, MIXED, 2)
    assert t["c"][1] == pytest.approx(15.0)
    assert t["a"][1] == pytest.approx(17.5)
    assert t["b"][1] == pytest.approx(22.5)


def test_space_shared_two_pes_late_arrival() -> None:
    """b (2 PEs) waits for a; c arrives at 5 s, takes the free PE; b starts at 10 s and ends at 25 s."""
    t = _times(SchedulerKind.SPACE_SHARED, MIXED, 2)
    assert t["a"] == pytest.approx((0.0, 10.0))
    assert t["c"] == pytest.approx((5.0, 10.0))
    assert t["b"] == pytest.approx((10.0, 25.0))


def test_space_shared_refuses_a_cloudlet_wider_than_the_vm() -> None:
    """A cloudlet asking more PEs than the VM has could never start: refused."""
    with pytest.raises(ConfigError, match="could never start"):
        schedule([Cloudlet("w", 1.0, 3)], vm_pes=2, mips_per_pe=1000, kind=SchedulerKind.SPACE_SHARED)


def test_fits_refuses_mips_pe_and_ram() -> None:
    """Placement refuses a too-wide PE, too many MIPS (unless over-subscribing) and too much RAM."""
    host = HostSpec("h", 2, 2660, 4096, 1e9, HP_PROLIANT_ML110_G5)
    assert not fits(host, VmSpec("big", 1, 3000, 512), used_mips=0, used_ram_mb=0).ok
    vm = VmSpec("v", 1, 2000, 1740)
    assert fits(host, vm, used_mips=3000, used_ram_mb=0).ok
    assert not fits(host, vm, used_mips=4000, used_ram_mb=0).ok
    assert fits(host, vm, used_mips=4000, used_ram_mb=0, oversubscription=True).ok
    assert not fits(host, vm, used_mips=0, used_ram_mb=3000).ok


def test_cloudlet_capacity_is_host_mips_over_vms() -> None:
    """The paper's capacity of a cloudlet: Σ C(i) / Nvm."""
    assert cloudlet_capacity(5320, 4) == pytest.approx(1330)
    assert cloudlet_capacity(5320, 0) == 0.0
