"""Real QEMU, driven over QMP: boot the reference guest, measure it, migrate it between two processes.

- :mod:`.guest` — the reference guest's parameters, status block and build from C source;
- :mod:`.machine` — one QEMU process and its QMP client, always killed on error;
- :mod:`.migration` — write-rate measurement and a measured pre-copy migration on loopback;
- :mod:`.calibration` — a whole calibration run, and secmig's prediction for the same parameters.
"""

from secmig.agent.qemu.guest import GuestParams, GuestStatus, build_guest
from secmig.agent.qemu.machine import MachineConfig, QemuMachine, choose_accel, find_qemu
from secmig.agent.qemu.migration import (
    MigrationMeasurement,
    MigrationSettings,
    WriteRate,
    measure_write_rate,
    migrate,
)
from secmig.errors import GuestBuildError, GuestError, QemuError, QemuNotFound

__all__ = [
    "GuestBuildError",
    "GuestError",
    "GuestParams",
    "GuestStatus",
    "MachineConfig",
    "MigrationMeasurement",
    "MigrationSettings",
    "QemuError",
    "QemuMachine",
    "QemuNotFound",
    "WriteRate",
    "build_guest",
    "choose_accel",
    "find_qemu",
    "measure_write_rate",
    "migrate",
]
