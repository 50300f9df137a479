"""Hosts and VMs as arrays, where each VM runs, and how each host's CPU is shared right now.

:class:`Fleet` is the fixed description (capacities, power tables). :class:`Allocation` is where each VM
is: its host, and the hosts it is migrating to; each host keeps its VM list in arrival order, migrating-in
VMs included, as CloudSim's ``Host.getVmList()`` does. :func:`share_cpu` is CloudSim's
``VmSchedulerTimeSharedOverSubscription`` with the migration rule of ``HostDynamicWorkload``, vectorised
over every host at once:

- a virtual PE never gets more than a physical PE;
- a VM migrating out gets 90 % of what it asks (10 % lost to the migration), a VM migrating in costs its
  destination 10 % of what it asks;
- when the asks exceed the host, every VM is scaled down by the same factor (and floored to whole MIPS);
- a host's utilisation counts a migrating-out VM at its full share and a migrating-in VM at its 10 %.

Pure: utilisations in, shares out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from secmig.cloud.capacity import HostSpec, VmSpec
from secmig.cloud.power import PowerModel
from secmig.errors import ConfigError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

MIGRATION_SOURCE_SHARE = 0.9
"""A migrating VM keeps 90 % of its MIPS at its source (CloudSim)."""
MIGRATION_DESTINATION_SHARE = 0.1
"""A migrating VM costs its destination 10 % of its MIPS (CloudSim)."""


def tabulate(model: PowerModel) -> FloatArray:
    """A power model at 0 %, 10 %, …, 100 %: exact for SPECpower tables and linear models."""
    out: FloatArray = np.asarray(model.power_w(np.linspace(0.0, 1.0, 11)), dtype=np.float64)
    return out


@dataclass(frozen=True, slots=True)
class Fleet:
    """Every host and VM as arrays (index = position in ``hosts`` / ``vms``)."""

    hosts: tuple[HostSpec, ...]
    vms: tuple[VmSpec, ...]
    total_mips: FloatArray = field(init=False)
    pe_mips: FloatArray = field(init=False)
    bandwidth_bits_per_s: FloatArray = field(init=False)
    host_ram_mb: FloatArray = field(init=False)
    power_table_w: FloatArray = field(init=False)
    vm_mips: FloatArray = field(init=False)
    vm_ram_mb: FloatArray = field(init=False)

    def __post_init__(self) -> None:
        if not self.hosts or not self.vms:
            raise ConfigError("a fleet needs at least one host and one VM")
        for vm in self.vms:
            if vm.pes != 1:
                raise ConfigError(f"vm {vm.name}: consolidation supports single-PE VMs (CloudSim's PlanetLab setup)")
        tables = {id(h.power): tabulate(h.power) for h in self.hosts}
        object.__setattr__(self, "total_mips", np.array([h.total_mips for h in self.hosts]))
        object.__setattr__(self, "pe_mips", np.array([h.mips_per_pe for h in self.hosts], dtype=np.float64))
        object.__setattr__(self, "bandwidth_bits_per_s", np.array([h.bandwidth_bits_per_s for h in self.hosts]))
        object.__setattr__(self, "host_ram_mb", np.array([h.ram_mb for h in self.hosts], dtype=np.float64))
        object.__setattr__(self, "power_table_w", np.stack([tables[id(h.power)] for h in self.hosts]))
        object.__setattr__(self, "vm_mips", np.array([v.mips_per_pe for v in self.vms], dtype=np.float64))
        object.__setattr__(self, "vm_ram_mb", np.array([v.ram_mb for v in self.vms], dtype=np.float64))

    @property
    def n_hosts(self) -> int:
        return len(self.hosts)

    @property
    def n_vms(self) -> int:
        return len(self.vms)

    def power_w(self, utilisation: FloatArray, hosts: IntArray | None = None) -> FloatArray:
        """Watts of each host (or of ``hosts``) at its utilisation, CloudSim's interpolation."""
        u = np.asarray(utilisation, dtype=np.float64)
        if np.any((u < 0) | (u > 1)):
            raise ConfigError("host utilisation outside [0, 1]")
        base = (np.arange(self.n_hosts) if hosts is None else hosts) * 11
        return self.power_w_unchecked(u, base)

    def power_w_unchecked(self, u: FloatArray, base: IntArray) -> FloatArray:
        """:meth:`power_w` for utilisations known to be in [0, 1]; ``base`` = host index × 11."""
        x = u * 10
        lo = x.astype(np.int64)  # floor, for x ≥ 0
        hi = lo + (x > lo)  # ceil
        flat = self.power_table_w.reshape(-1)
        p1 = flat[base + lo]
        p2 = flat[base + hi]
        out: FloatArray = p1 + (p2 - p1) / 10 * (u - lo / 10) * 100
        return out


@dataclass(slots=True)
class Allocation:
    """Where every VM runs and which hosts it is migrating to."""

    host_of: IntArray
    """Each VM's host (the source while it migrates); −1 for a VM not placed."""
    targets: list[list[int]]
    """Hosts each VM is migrating to (CloudSim may send one VM to two hosts in one round: it ends on the last)."""
    vms_on: list[list[int]]
    """Each host's VMs in arrival order, migrating-in VMs included."""
    _moving: dict[int, int] = field(default_factory=dict)

    @classmethod
    def empty(cls, n_hosts: int, n_vms: int) -> Allocation:
        return cls(np.full(n_vms, -1, dtype=np.int64), [[] for _ in range(n_vms)], [[] for _ in range(n_hosts)])

    def place(self, vm: int, host: int) -> None:
        self.host_of[vm] = host
        self.vms_on[host].append(vm)

    @property
    def migrating(self) -> list[int]:
        """VMs with a migration in progress, in index order."""
        return sorted(v for v, t in self._moving.items() if t)

    def remove(self, vm: int) -> None:
        """``vm`` leaves the datacenter (it has finished)."""
        h = int(self.host_of[vm])
        if h >= 0 and vm in self.vms_on[h]:
            self.vms_on[h].remove(vm)
        self.host_of[vm] = -1

    def in_migration(self) -> BoolArray:
        out = np.zeros(len(self.targets), dtype=bool)
        out[self.migrating] = True
        return out

    def start_migration(self, vm: int, target: int) -> None:
        """``target`` starts receiving ``vm`` (it joins the target's VM list as migrating in)."""
        if vm not in self.vms_on[target]:
            self.vms_on[target].append(vm)
        self.targets[vm].append(target)
        self._moving[vm] = len(self.targets[vm])

    def finish_migration(self, vm: int, target: int) -> None:
        """``vm`` arrived on ``target``: it leaves its source and runs on ``target``."""
        src = int(self.host_of[vm])
        if vm in self.vms_on[src]:
            self.vms_on[src].remove(vm)
        self.targets[vm].remove(target)
        self._moving[vm] = len(self.targets[vm])
        # It now lives on the target (CloudSim re-creates it there, at the end of the target's list).
        if vm in self.vms_on[target]:
            self.vms_on[target].remove(vm)
        self.vms_on[target].append(vm)
        self.host_of[vm] = target

    def abort_migration(self, vm: int, target: int) -> None:
        """The migration to ``target`` stopped: the VM stays on its source."""
        if target in self.targets[vm]:
            self.targets[vm].remove(target)
        self._moving[vm] = len(self.targets[vm])
        if vm in self.vms_on[target] and self.host_of[vm] != target:
            self.vms_on[target].remove(vm)

    def placements(self) -> tuple[IntArray, IntArray, IntArray]:
        """(vm, host, kind) of every VM-on-host pair; kind 0 = runs there, 1 = migrating out, 2 = in.

        Ordered by VM, its own host first, then the hosts it migrates to.
        """
        placed = np.flatnonzero(self.host_of >= 0)
        kind = np.zeros(placed.size, dtype=np.int64)
        moving = [v for v in self.migrating if self.host_of[v] >= 0]
        if not moving:
            return placed.astype(np.int64), self.host_of[placed].astype(np.int64), kind
        kind[np.searchsorted(placed, moving)] = 1
        extra_v = [v for v in moving for _ in self.targets[v]]
        extra_h = [h for v in moving for h in self.targets[v]]
        vm = np.concatenate((placed, np.asarray(extra_v, dtype=np.int64)))
        host = np.concatenate((self.host_of[placed], np.asarray(extra_h, dtype=np.int64)))
        kinds = np.concatenate((kind, np.full(len(extra_v), 2, dtype=np.int64)))
        order = np.argsort(vm, kind="stable")
        return vm[order].astype(np.int64), host[order].astype(np.int64), kinds[order]


@dataclass(frozen=True, slots=True)
class CpuShare:
    """How every host's CPU is shared at one instant."""

    host_used_mips: FloatArray
    """What CloudSim calls the host's utilisation MIPS (its allocated MIPS, migrations counted as above)."""
    host_requested_mips: FloatArray
    host_available_mips: FloatArray
    """What the scheduler has left for a new VM (0 once over-subscribed)."""
    host_incoming_mips: FloatArray
    """MIPS allocated on each host to VMs migrating in (their 10 %)."""
    vm_allocated_mips: FloatArray
    """At each VM's own host (its source while it migrates)."""
    vm_requested_mips: FloatArray
    vm_migrating_out: BoolArray


def share_cpu(
    fleet: Fleet, alloc: Allocation, requested_mips: FloatArray, placements: Sequence[IntArray] | None = None
) -> CpuShare:
    """Every host's CPU shared among its VMs asking ``requested_mips`` (per VM, uncapped)."""
    p_vm, p_host, p_kind = alloc.placements() if placements is None else placements
    req = requested_mips[p_vm]
    capped = np.minimum(req, fleet.pe_mips[p_host])
    is_in = p_kind == 2
    is_out = p_kind == 1
    ask = np.where(is_in, capped * MIGRATION_DESTINATION_SHARE, capped)
    n = fleet.n_hosts
    asked = np.bincount(p_host, weights=ask, minlength=n).astype(np.float64)
    over = asked > fleet.total_mips
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(asked > 0, fleet.total_mips / asked, 1.0)
    s = scale[p_host]
    o = over[p_host]
    alloc_normal = np.where(o, np.floor(capped * s), capped)
    alloc_out = np.where(o, np.floor(capped * s * MIGRATION_SOURCE_SHARE), capped * MIGRATION_SOURCE_SHARE)
    alloc_in = np.where(o, np.floor(capped * MIGRATION_DESTINATION_SHARE * s), capped * MIGRATION_DESTINATION_SHARE)
    allocated = np.where(is_in, alloc_in, np.where(is_out, alloc_out, alloc_normal))
    counted = np.where(is_out, allocated / MIGRATION_SOURCE_SHARE, allocated)
    used = np.bincount(p_host, weights=counted, minlength=n).astype(np.float64)
    requested = np.bincount(p_host, weights=req, minlength=n).astype(np.float64)
    available = np.where(over, 0.0, fleet.total_mips - asked)
    own = ~is_in
    vm_alloc = np.zeros(fleet.n_vms)
    vm_alloc[p_vm[own]] = allocated[own]
    vm_out = np.zeros(fleet.n_vms, dtype=bool)
    vm_out[p_vm[own]] = is_out[own]
    incoming = np.bincount(p_host, weights=np.where(is_in, allocated, 0.0), minlength=n).astype(np.float64)
    return CpuShare(used, requested, available, incoming, vm_alloc, requested_mips.copy(), vm_out)
