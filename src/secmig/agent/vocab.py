"""The agents' vocabularies as enums: which driver runs a VM, and how a migration's memory travels."""

from __future__ import annotations

import enum

from secmig.errors import ConfigError


class DriverKind(enum.StrEnum):
    """Which driver runs a VM (``secmig vm start --driver``)."""

    MEMORY = "memory"
    """The embedded in-memory VM (a numpy buffer and a workload thread)."""
    QEMU = "qemu"
    """A QEMU process running the reference guest, driven over QMP."""


class DataPlane(enum.StrEnum):
    """How a migration's memory travels."""

    CHANNEL = "channel"
    """In-memory VMs: pages straight over the authenticated channel, as protocol page batches."""
    RELAY = "relay"
    """QEMU: its migration stream relayed by the agents over the authenticated channel."""
    QEMU_TLS = "qemu-tls"
    """QEMU: its own TLS migration between the hosts' cluster certificates, authorized by the channel."""


def parse_data_plane(text: str) -> DataPlane:
    """A data plane name, or ConfigError naming the choices."""
    try:
        return DataPlane(text)
    except ValueError:
        raise ConfigError(f"data plane {text!r}: give relay or qemu-tls") from None


def parse_driver(text: str) -> DriverKind:
    """A driver name, or ConfigError naming the choices."""
    try:
        return DriverKind(text)
    except ValueError:
        raise ConfigError(f"driver {text!r}: give memory or qemu") from None
