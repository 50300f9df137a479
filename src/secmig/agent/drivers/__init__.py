"""The agent's VM drivers, one module each, behind :class:`secmig.agent.driver.VMDriver`, and the default set.

Each driver module is imported on first use: a host with in-memory VMs only never loads the QEMU harness.
"""

from __future__ import annotations

from typing import Any

from secmig.agent.driver import DriverContext, DriverFactory, VMDriver
from secmig.agent.vocab import DriverKind


def _memory(ctx: DriverContext) -> VMDriver[Any]:
    from secmig.agent.drivers.memory import MemoryDriver

    return MemoryDriver(ctx)


def _qemu(ctx: DriverContext) -> VMDriver[Any]:
    from secmig.agent.drivers.qemu import QemuDriver

    return QemuDriver(ctx)


def default_drivers() -> dict[DriverKind, DriverFactory]:
    """Every driver this package has, by name."""
    return {DriverKind.MEMORY: _memory, DriverKind.QEMU: _qemu}
