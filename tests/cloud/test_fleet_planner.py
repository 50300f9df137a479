"""CPU sharing with migration costs and over-subscription; one consolidation round on a small fleet."""

from __future__ import annotations

import numpy as np
import pytest

from secmig.cloud.capacity import HostSpec, VmSpec
from secmig.cloud.fleet import Allocation, Fleet, share_cpu
from secmig.cloud.overload import HISTORY_LENGTH, parse_overload
from secmig.cloud.planner import ConsolidationPolicy, MigrationReason, Snapshot, initial_placement, plan
from secmig.cloud.power import HP_PROLIANT_ML110_G4, HP_PROLIANT_ML110_G5
from secmig.cloud.selection import SelectionKind


def _fleet(n_hosts: int, vm_mips: list[float], vm_ram: list[int] | None = None) -> Fleet:
    hosts = tuple(HostSpec(f"h{i}", 2, 2660, 4096, 1e9, HP_PROLIANT_ML110_G5) for i in range(n_hosts))
    ram = vm_ram or [613] * len(vm_mips)
    return Fleet(hosts, tuple(VmSpec(f"v{i}", 1, m, r) for i, (m, r) in enumerate(zip(vm_mips, ram, strict=True))))


def _alloc(fleet: Fleet, where: list[int]) -> Allocation:
    a = Allocation.empty(fleet.n_hosts, fleet.n_vms)
    for v, h in enumerate(where):
        a.place(v, h)
    return a


def test_pe_cap_and_oversubscription_scaling() -> None:
    """A VM never gets more than a PE; asks above the host are scaled by one factor and floored."""
    f = _fleet(2, [3000, 3000, 2000, 2000, 2000])
    a = _alloc(f, [0, 0, 1, 1, 1])
    s = share_cpu(f, a, np.array([3000.0, 3000.0, 2000.0, 2000.0, 2000.0]))
    assert s.vm_allocated_mips[:2] == pytest.approx([2660, 2660])  # capped at the PE, 5320 fits exactly
    assert s.host_requested_mips[0] == 6000 and s.host_used_mips[0] == 5320
    assert s.vm_allocated_mips[2:] == pytest.approx([1773.0] * 3)  # floor(2000 × 5320/6000)
    assert s.host_available_mips[1] == 0.0


def test_migration_costs_ten_percent_on_both_ends() -> None:
    """A migrating VM gets 90 % at its source, which still counts it whole; its destination pays 10 %."""
    f = _fleet(2, [2000])
    a = _alloc(f, [0])
    a.start_migration(0, 1)
    s = share_cpu(f, a, np.array([1000.0]))
    assert s.vm_allocated_mips[0] == pytest.approx(900.0)
    assert s.vm_migrating_out[0]
    assert s.host_used_mips == pytest.approx([1000.0, 100.0])
    assert s.host_requested_mips == pytest.approx([1000.0, 1000.0])
    a.finish_migration(0, 1)
    s = share_cpu(f, a, np.array([1000.0]))
    assert s.host_used_mips == pytest.approx([0.0, 1000.0]) and not s.vm_migrating_out[0]


def _snapshot(f: Fleet, a: Allocation, req: list[float], eligible: list[bool] | None = None) -> Snapshot:
    r = np.asarray(req, dtype=np.float64)
    s = share_cpu(f, a, r)
    return Snapshot(
        r,
        np.zeros((f.n_vms, HISTORY_LENGTH)),
        s.host_used_mips,
        s.host_incoming_mips,
        np.asarray(eligible if eligible is not None else [True] * f.n_hosts),
    )


THR = ConsolidationPolicy(parse_overload("thr:0.8"), SelectionKind.MMT)


def test_overloaded_host_sheds_smallest_vm_to_an_eligible_host() -> None:
    """Host 0 at 94 % sheds its smallest-RAM VM; host 1 is revoked, so the VM goes to host 2."""
    f = _fleet(3, [2000, 2000, 1000, 1000], [1740, 1740, 870, 613])
    a = _alloc(f, [0, 0, 0, 2])
    p = plan(f, a, _snapshot(f, a, [2000, 2000, 1000, 500], [True, False, True]), THR, np.random.default_rng(0))
    over = [m for m in p.migrations if m.reason is MigrationReason.OVERLOAD]
    assert p.overloaded == (0,)
    assert [(m.vm, m.source, m.destination) for m in over] == [(2, 0, 2)]
    assert all(m.destination != 1 for m in p.migrations)


def test_underloaded_host_is_emptied_onto_an_active_host() -> None:
    """Host 1 (one small VM) is the least utilised: its VM joins host 0; host 2 is idle and stays off."""
    f = _fleet(3, [2000, 500])
    a = _alloc(f, [0, 1])
    p = plan(f, a, _snapshot(f, a, [2000, 200]), THR, np.random.default_rng(0))
    assert [(m.vm, m.source, m.destination, m.reason) for m in p.migrations] == [(1, 1, 0, MigrationReason.UNDERLOAD)]
    assert p.underloaded == (1,) and p.idle == 1


def test_underload_moves_nothing_unless_every_vm_fits() -> None:
    """Host 1's two VMs cannot both join host 0 below the threshold: neither moves."""
    f = _fleet(2, [2660, 2000, 2000])
    a = _alloc(f, [0, 1, 1])
    p = plan(f, a, _snapshot(f, a, [2400, 1000, 1000]), THR, np.random.default_rng(0))
    assert p.migrations == ()


def test_initial_placement_respects_pe_size_and_prefers_the_cheaper_power_step() -> None:
    """A 2500-MIPS VM cannot go on a 1860-MIPS PE (G4); smaller VMs go where power grows least (G5)."""
    hosts = (
        HostSpec("g4", 2, 1860, 4096, 1e9, HP_PROLIANT_ML110_G4),
        HostSpec("g5", 2, 2660, 4096, 1e9, HP_PROLIANT_ML110_G5),
    )
    f = Fleet(hosts, (VmSpec("big", 1, 2500, 870), VmSpec("small", 1, 500, 613)))
    a = initial_placement(f, THR)
    assert list(a.host_of) == [1, 1]
