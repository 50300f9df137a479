"""What a host offers and what a VM asks: PEs × MIPS, RAM, bandwidth; whether one fits on the other.

A host has ``pes`` processing elements of ``mips_per_pe`` each, RAM, a NIC and a power model; a VM has
PEs × MIPS and RAM. :func:`fits` is the admission check of a placement: every virtual PE must fit on one
physical PE, the MIPS must fit in what the host has left unless over-subscription is explicitly allowed,
and the RAM must fit. :func:`cloudlet_capacity` is the paper's "capacity of a cloudlet = Σ C(i) / Nvm":
the MIPS a host offers divided among the VMs it runs. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from secmig.cloud.power import PowerModel
from secmig.errors import ConfigError


@dataclass(frozen=True, slots=True)
class HostSpec:
    """A physical host: PEs × MIPS, RAM, NIC bandwidth and its power model."""

    name: str
    pes: int
    mips_per_pe: float
    ram_mb: int
    bandwidth_bits_per_s: float
    power: PowerModel

    def __post_init__(self) -> None:
        if self.pes <= 0 or self.mips_per_pe <= 0:
            raise ConfigError(f"host {self.name}: PEs and MIPS must be positive")
        if self.ram_mb <= 0 or self.bandwidth_bits_per_s <= 0:
            raise ConfigError(f"host {self.name}: RAM and bandwidth must be positive")

    @property
    def total_mips(self) -> float:
        return self.pes * self.mips_per_pe


@dataclass(frozen=True, slots=True)
class VmSpec:
    """A VM type: PEs × MIPS and RAM."""

    name: str
    pes: int
    mips_per_pe: float
    ram_mb: int

    def __post_init__(self) -> None:
        if self.pes <= 0 or self.mips_per_pe <= 0 or self.ram_mb <= 0:
            raise ConfigError(f"vm {self.name}: PEs, MIPS and RAM must be positive")

    @property
    def total_mips(self) -> float:
        return self.pes * self.mips_per_pe


@dataclass(frozen=True, slots=True)
class Fit:
    """The outcome of an admission check: ``ok`` or the first reason it fails."""

    ok: bool
    reason: str = ""


def fits(
    host: HostSpec,
    vm: VmSpec,
    *,
    used_mips: float,
    used_ram_mb: int,
    requested_mips: float | None = None,
    oversubscription: bool = False,
) -> Fit:
    """Can ``vm`` (asking ``requested_mips`` now, its full MIPS by default) join ``host`` as it is used now?"""
    want = vm.total_mips if requested_mips is None else requested_mips
    per_pe = want / vm.pes
    if per_pe > host.mips_per_pe:
        return Fit(False, f"a virtual PE of {per_pe:g} MIPS exceeds the host's PE of {host.mips_per_pe:g} MIPS")
    if vm.pes > host.pes:
        return Fit(False, f"{vm.pes} virtual PEs on a host of {host.pes}")
    if not oversubscription and used_mips + want > host.total_mips:
        return Fit(False, f"{want:g} MIPS asked, {host.total_mips - used_mips:g} MIPS free")
    if used_ram_mb + vm.ram_mb > host.ram_mb:
        return Fit(False, f"{vm.ram_mb} MB of RAM asked, {host.ram_mb - used_ram_mb} MB free")
    return Fit(True)


def cloudlet_capacity(host_total_mips: float, vms_on_host: int) -> float:
    """The paper's capacity of a cloudlet, Σ C(i) / Nvm: the host's MIPS shared by its VMs (0 with no VM)."""
    if vms_on_host < 0:
        raise ConfigError("a host cannot run a negative number of VMs")
    return host_total_mips / vms_on_host if vms_on_host else 0.0
