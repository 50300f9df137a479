"""One round of dynamic consolidation: which VMs move where. CloudSim's ``optimizeAllocation``, faithfully.

Given where VMs run and what they ask now, :func:`plan` returns the migrations of one scheduling
interval, in the order CloudSim issues them:

1. **Overload**: every over-utilised host (:mod:`secmig.cloud.overload`) gives up VMs chosen by the
   selection policy (:mod:`secmig.cloud.selection`) until it no longer is.
2. **Placement** of those VMs, by decreasing CPU demand, each on the host whose power grows least
   (power-aware best-fit decreasing): it must have a PE large enough and the MIPS free, and must not
   become over-utilised by it (hosts that are idle now are not asked). Over-utilised hosts are excluded.
3. **Underload**: the least utilised active host is emptied if *all* its VMs find a place on other active
   hosts (never on an idle, switched-off one); otherwise nothing moves from it. Then the next least
   utilised, until none is left; an emptied host is switched off by having no work.

Only hosts marked ``eligible`` (in secmig: holding a valid Vsignature) are destinations. CloudSim's
quirks are kept on purpose, because its published figures come from them: host utilisation used for
power and for "is it idle" is the one measured at the start of the round, not updated as VMs are
tentatively placed; hosts that received VMs from overloaded hosts may still be chosen as underloaded
(and their new VMs moved once more). Pure: arrays in, a list of migrations out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from secmig.cloud.fleet import MIGRATION_DESTINATION_SHARE, MIGRATION_SOURCE_SHARE, Allocation, Fleet
from secmig.cloud.overload import (
    HISTORY_LENGTH,
    MIN_HISTORY_LR,
    MIN_HISTORY_MAD_IQR,
    HostView,
    OverloadKind,
    OverloadPolicy,
    iqr_rows,
    is_overloaded,
    mad_rows,
)
from secmig.cloud.power import clamp_utilisation
from secmig.cloud.selection import SelectionKind, select

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


class MigrationReason(enum.StrEnum):
    OVERLOAD = "overload"
    UNDERLOAD = "underload"


@dataclass(frozen=True, slots=True)
class ConsolidationPolicy:
    """Overload detection, VM selection, and the details of placement."""

    overload: OverloadPolicy
    selection: SelectionKind
    interval_s: float = 300.0
    ram_check: bool = False
    """Refuse a destination without the VM's RAM free. CloudSim's PlanetLab VMs ask no RAM once created
    (their RAM utilisation model is null), so CloudSim only checks RAM at creation: False reproduces it."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the manager sees at a decision instant."""

    requested_mips: FloatArray
    """Per VM, uncapped (utilisation × MIPS)."""
    history: FloatArray
    """(VMs, HISTORY_LENGTH) utilisation histories, newest first, zeros where there is none yet."""
    host_used_mips: FloatArray
    host_incoming_mips: FloatArray
    eligible: BoolArray
    """Hosts allowed as destinations."""
    ram_used_mb: FloatArray | None = None
    history_length: int = HISTORY_LENGTH
    """How many of the history's values are real (a VM's history may hold zeros of its own)."""


@dataclass(frozen=True, slots=True)
class PlannedMigration:
    vm: int
    source: int
    destination: int
    reason: MigrationReason


@dataclass(frozen=True, slots=True)
class Plan:
    migrations: tuple[PlannedMigration, ...]
    overloaded: tuple[int, ...]
    underloaded: tuple[int, ...]
    """Hosts emptied by the round."""
    idle: int
    """Hosts idle (switched off) at the start of the round."""
    failed_placements: int = 0
    """VMs of overloaded hosts for which no destination was found."""


@dataclass(slots=True)
class _Work:
    fleet: Fleet
    alloc: Allocation
    snap: Snapshot
    policy: ConsolidationPolicy
    lists: list[list[int]] = field(init=False)
    incoming: list[set[int]] = field(init=False)
    in_migration: BoolArray = field(init=False)
    sum_ask: FloatArray = field(init=False)
    sum_req: FloatArray = field(init=False)
    avail: FloatArray = field(init=False)
    ram_used: FloatArray = field(init=False)
    used: FloatArray = field(init=False)
    extra: FloatArray = field(init=False)
    power_now: FloatArray = field(init=False)

    def __post_init__(self) -> None:
        f, a = self.fleet, self.alloc
        self.lists = [list(vms) for vms in a.vms_on]
        self.in_migration = a.in_migration()
        self.incoming = [set() for _ in a.vms_on]
        for v in np.flatnonzero(self.in_migration):
            for h in a.targets[v]:
                self.incoming[h].add(int(v))
        n = f.n_hosts
        pv, ph, pk = a.placements()
        req = self.snap.requested_mips[pv]
        capped = np.minimum(req, f.pe_mips[ph])
        ask = np.where(pk == 2, capped * MIGRATION_DESTINATION_SHARE, capped)
        self.sum_ask = np.bincount(ph, weights=ask, minlength=n).astype(np.float64)
        self.sum_req = np.bincount(ph, weights=req, minlength=n).astype(np.float64)
        self.avail = np.where(self.sum_ask > f.total_mips, 0.0, f.total_mips - self.sum_ask)
        self.ram_used = np.zeros(n) if self.snap.ram_used_mb is None else self.snap.ram_used_mb.copy()
        self.used = self.snap.host_used_mips
        self.extra = self.snap.host_incoming_mips * MIGRATION_SOURCE_SHARE / MIGRATION_DESTINATION_SHARE
        self.power_now = f.power_w(np.minimum(clamp_utilisation(self.used / f.total_mips), 1.0))

    def _ask(self, v: int, h: int) -> float:
        c = min(float(self.snap.requested_mips[v]), float(self.fleet.pe_mips[h]))
        return c * MIGRATION_DESTINATION_SHARE if v in self.incoming[h] else c

    def _recompute(self, h: int) -> None:
        vms = self.lists[h]
        if not vms:
            ask = total = 0.0
        else:
            idx = np.asarray(vms, dtype=np.int64)
            req = self.snap.requested_mips[idx]
            c = np.minimum(req, self.fleet.pe_mips[h])
            if self.incoming[h]:
                c = np.where([v in self.incoming[h] for v in vms], c * MIGRATION_DESTINATION_SHARE, c)
            # Sequential sums, as the scheduler adds VM after VM.
            ask = float(np.cumsum(c)[-1])
            total = float(np.cumsum(req)[-1])
        self.sum_ask[h] = ask
        self.sum_req[h] = total
        cap = float(self.fleet.total_mips[h])
        self.avail[h] = 0.0 if ask > cap else cap - ask

    def create(self, v: int, h: int) -> None:
        self.lists[h].append(v)
        c = self._ask(v, h)
        self.sum_ask[h] += c
        self.sum_req[h] += float(self.snap.requested_mips[v])
        # The scheduler's admission: what is asked comes off what is free, or the host is over-subscribed.
        self.avail[h] = self.avail[h] - c if self.avail[h] >= c else 0.0
        if self.policy.ram_check:
            self.ram_used[h] += self.fleet.vm_ram_mb[v]

    def destroy(self, v: int, h: int) -> None:
        self.lists[h].remove(v)
        self._recompute(h)
        if self.policy.ram_check:
            self.ram_used[h] -= self.fleet.vm_ram_mb[v]

    # --- overload detection -----------------------------------------------------------------------------

    def view(self, h: int, extra_vm: int | None = None) -> HostView:
        vms = self.lists[h] if extra_vm is None else [*self.lists[h], extra_vm]
        f = self.fleet
        total = float(f.total_mips[h])
        if vms:
            idx = np.asarray(vms, dtype=np.int64)
            hist = ((self.snap.history[idx] * f.vm_mips[idx][:, None]) / total).sum(axis=0)
            max_ram = float(f.vm_ram_mb[idx].max())
        else:
            hist = np.zeros(HISTORY_LENGTH)
            max_ram = 0.0
        req = self.sum_req[h] + (float(self.snap.requested_mips[extra_vm]) if extra_vm is not None else 0.0)
        return HostView(req, total, hist, max_ram, float(f.bandwidth_bits_per_s[h]))

    def overloaded(self, h: int, extra_vm: int | None = None) -> bool:
        p = self.policy.overload
        if p.kind is OverloadKind.THR:
            req = self.sum_req[h] + (float(self.snap.requested_mips[extra_vm]) if extra_vm is not None else 0.0)
            return bool(req / self.fleet.total_mips[h] > p.parameter)
        return is_overloaded(p, self.view(h, extra_vm), self.policy.interval_s)

    def overloaded_all(self) -> BoolArray:
        """Every host's verdict at once (the same arithmetic as :meth:`overloaded`, vectorised)."""
        f = self.fleet
        p = self.policy.overload
        util = self.sum_req / f.total_mips
        if p.kind is OverloadKind.THR:
            out: BoolArray = util > p.parameter
            return out
        hv, hh, _ = self.alloc.placements()
        hist = np.zeros((f.n_hosts, HISTORY_LENGTH))
        np.add.at(hist, hh, (self.snap.history[hv] * f.vm_mips[hv][:, None]) / f.total_mips[hh][:, None])
        nz = hist != 0
        last = np.where(nz.any(axis=1), HISTORY_LENGTH - np.argmax(nz[:, ::-1], axis=1), 0)
        result = np.zeros(f.n_hosts, dtype=bool)
        if p.kind in (OverloadKind.MAD, OverloadKind.IQR):
            short = last < MIN_HISTORY_MAD_IQR
            result[short] = util[short] > p.fallback_threshold
            for n in np.unique(last[~short]):
                rows = np.flatnonzero(last == n)
                data = hist[rows, :n]
                stat = mad_rows(data) if p.kind is OverloadKind.MAD else iqr_rows(data)
                result[rows] = util[rows] > 1 - p.parameter * stat
            return result
        short = last < MIN_HISTORY_LR
        result[short] = util[short] > p.fallback_threshold
        for h in np.flatnonzero(~short):
            result[h] = self.overloaded(int(h))
        return result

    # --- placement ----------------------------------------------------------------------------------------

    def find_host(self, v: int, excluded: BoolArray) -> int | None:
        """CloudSim's ``findHostForVm``: the least power increase among hosts that fit and stay below overload."""
        f = self.fleet
        r = float(self.snap.requested_mips[v])
        ok = ~excluded & self.snap.eligible & (f.pe_mips >= r) & (self.avail >= r)
        if self.policy.ram_check:
            ok &= f.host_ram_mb - self.ram_used >= f.vm_ram_mb[v]
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return None
        u_after = (self.used[idx] + self.extra[idx] + r) / f.total_mips[idx]
        keep = u_after <= 1.0
        idx, u_after = idx[keep], u_after[keep]
        if idx.size == 0:
            return None
        diff = f.power_w_unchecked(u_after, idx * 11) - self.power_now[idx]
        p = self.policy.overload
        if p.kind is OverloadKind.THR:
            over = (self.used[idx] != 0) & ((self.sum_req[idx] + r) / f.total_mips[idx] > p.parameter)
            idx, diff = idx[~over], diff[~over]
            return int(idx[int(np.argmin(diff))]) if idx.size else None
        for j in np.argsort(diff, kind="stable"):
            h = int(idx[j])
            if self.used[h] != 0 and self.overloaded(h, v):
                continue
            return h
        return None

    def all_out_or_any_in(self, h: int) -> bool:
        for v in self.lists[h]:
            if not self.in_migration[v]:
                return False
            if v in self.incoming[h]:
                return True
        return True


def plan(
    fleet: Fleet, alloc: Allocation, snap: Snapshot, policy: ConsolidationPolicy, rng: np.random.Generator
) -> Plan:
    """The migrations of one consolidation round (see the module docstring for the rules)."""
    w = _Work(fleet, alloc, snap, policy)
    n = fleet.n_hosts
    req = snap.requested_mips
    over_mask = w.overloaded_all()
    overloaded = [int(h) for h in np.flatnonzero(over_mask)]

    # 1. VMs leave the overloaded hosts, one at a time until each host is fine.
    leaving: list[tuple[int, int]] = []
    for h in overloaded:
        while True:
            cands = [v for v in w.lists[h] if not w.in_migration[v]]
            if not cands:
                break
            ci = np.asarray(cands, dtype=np.int64)
            k = select(
                policy.selection,
                ram_mb=fleet.vm_ram_mb[ci],
                utilisation=req[ci] / fleet.vm_mips[ci],
                histories=[snap.history[v][: snap.history_length] for v in cands]
                if policy.selection is SelectionKind.MC
                else [],
                rng=rng,
            )
            v = cands[k]
            leaving.append((v, h))
            w.destroy(v, h)
            if not w.overloaded(h):
                break

    # 2. Best-fit decreasing placement of those VMs, away from every overloaded host.
    migrations: list[PlannedMigration] = []
    failed = 0
    order = sorted(range(len(leaving)), key=lambda i: -float(req[leaving[i][0]]))
    for i in order:
        v, src = leaving[i]
        dst = w.find_host(v, over_mask)
        if dst is None:
            failed += 1
            continue
        w.create(v, dst)
        migrations.append(PlannedMigration(v, src, dst, MigrationReason.OVERLOAD))

    # 3. Underloaded hosts, least utilised first, emptied only when all their VMs fit elsewhere.
    util = w.used / fleet.total_mips
    idle = util == 0
    ex_under = over_mask | idle
    ex_place = over_mask | idle
    ranked = [int(h) for h in np.lexsort((np.arange(n), util)) if 0 < util[h] < 1]
    pos = 0
    deferred: list[int] = []
    emptied: list[int] = []
    while not ex_under.all():
        chosen: int | None = None
        for h in deferred:
            if not ex_under[h] and not w.all_out_or_any_in(h):
                chosen = h
                break
        if chosen is not None:
            deferred.remove(chosen)
        else:
            while pos < len(ranked):
                h = ranked[pos]
                pos += 1
                if ex_under[h]:
                    continue
                if w.all_out_or_any_in(h):
                    deferred.append(h)
                    continue
                chosen = h
                break
        if chosen is None:
            break
        h = chosen
        ex_under[h] = True
        ex_place[h] = True
        vms = [v for v in w.lists[h] if not w.in_migration[v]]
        if not vms:
            continue
        vms.sort(key=lambda v: -float(req[v]))
        placed: list[tuple[int, int]] = []
        for v in vms:
            dst = w.find_host(v, ex_place)
            if dst is None:
                for v2, d2 in placed:
                    w.destroy(v2, d2)
                placed = []
                break
            w.create(v, dst)
            placed.append((v, dst))
        if placed:
            emptied.append(h)
        for v, dst in placed:
            ex_under[dst] = True
            migrations.append(PlannedMigration(v, h, dst, MigrationReason.UNDERLOAD))
    return Plan(tuple(migrations), tuple(overloaded), tuple(emptied), int(idle.sum()), failed)


def initial_placement(fleet: Fleet, policy: ConsolidationPolicy) -> Allocation:
    """Every VM placed at creation: full MIPS and RAM asked, every host idle (CloudSim's first allocation)."""
    alloc = Allocation.empty(fleet.n_hosts, fleet.n_vms)
    snap = Snapshot(
        requested_mips=fleet.vm_mips.copy(),
        history=np.zeros((fleet.n_vms, HISTORY_LENGTH)),
        host_used_mips=np.zeros(fleet.n_hosts),
        host_incoming_mips=np.zeros(fleet.n_hosts),
        eligible=np.ones(fleet.n_hosts, dtype=bool),
        ram_used_mb=np.zeros(fleet.n_hosts),
    )
    creating = ConsolidationPolicy(policy.overload, policy.selection, policy.interval_s, ram_check=True)
    w = _Work(fleet, alloc, snap, creating)
    none = np.zeros(fleet.n_hosts, dtype=bool)
    for v in range(fleet.n_vms):
        h = w.find_host(v, none)
        if h is None:
            continue  # CloudSim's broker leaves a VM that fits nowhere uncreated
        w.create(v, h)
        alloc.place(v, h)
    return alloc


__all__ = [
    "ConsolidationPolicy",
    "MigrationReason",
    "Plan",
    "PlannedMigration",
    "Snapshot",
    "initial_placement",
    "plan",
]
