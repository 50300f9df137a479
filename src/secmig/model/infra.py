"""The datacenter as data: VMs, hypervisor hosts with their NIC and vSwitch, datacenters, WAN links.

Pure description, validated on construction; the simulator turns it into links and flows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from secmig.errors import ConfigError
from secmig.model.dirty import DirtyModel, NoDirtying
from secmig.model.units import PAGE_SIZE


@dataclass(frozen=True, slots=True)
class VM:
    """A virtual machine: its memory, how it dirties it, and where it runs."""

    name: str
    host: str
    ram_bytes: int
    used_bytes: int
    vcpus: int = 1
    mac: str = "52:54:00:00:00:01"
    dirty: DirtyModel = field(default_factory=NoDirtying)
    dirty_noise: float = 0.0
    """Standard deviation of a log-normal factor on each round's dirty pages (0: the expectation)."""
    device_state_bytes: int = 0
    """CPU and device state sent during the stop-and-copy."""
    transfer_rate_bytes_per_s: float | None = None
    """The preset transfer rate the monitor compares this VM's traffic with (the paper's Table 6.1)."""

    def __post_init__(self) -> None:
        if self.ram_bytes <= 0:
            raise ConfigError(f"vm {self.name}: ram must be positive")
        if not 0 <= self.used_bytes <= self.ram_bytes:
            raise ConfigError(
                f"vm {self.name}: used ({self.used_bytes}) must be between 0 and ram ({self.ram_bytes})"
            )

    @property
    def pages(self) -> int:
        return math.ceil(self.ram_bytes / PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Host:
    """A hypervisor host: a full-duplex NIC into its datacenter's core, and a vSwitch for its VMs."""

    name: str
    datacenter: str
    nic_bytes_per_s: float
    vswitch_bytes_per_s: float = math.inf
    nic_latency_s: float = 0.0
    macs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Datacenter:
    """A datacenter: its hosts hang off one core switch of the given switching capacity."""

    name: str
    core_bytes_per_s: float = math.inf
    core_latency_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WanLink:
    """A full-duplex link between two datacenters' cores."""

    a: str
    b: str
    bandwidth_bytes_per_s: float
    latency_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Infrastructure:
    """Everything the network is built from."""

    datacenters: tuple[Datacenter, ...]
    hosts: tuple[Host, ...]
    wan: tuple[WanLink, ...] = ()

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ConfigError(f"unknown host {name!r}")
