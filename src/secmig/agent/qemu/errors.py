"""Errors of the QEMU harness, as branches of secmig's one error tree.

::

    ConfigError
     ├── QemuNotFound        qemu-system-x86_64 is not installed (or not where it was said to be)
     └── GuestBuildError     the reference guest could not be built (no gcc, a compile error)
    MigrationError
     └── QemuError           a QEMU process died, refused a QMP command or did not answer in time
          └── GuestError     the reference guest reported an error or never started its workload

Wrapped errors keep their cause; ``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

from secmig.errors import ConfigError, MigrationError

INSTALL_HINT = "install it with: apt-get install qemu-system-x86"


class QemuNotFound(ConfigError):
    """No usable ``qemu-system-x86_64``: the message says how to install it."""


class GuestBuildError(ConfigError):
    """The reference guest kernel could not be built from its C source."""


class QemuError(MigrationError):
    """A QEMU process or its QMP monitor failed; the message carries the tail of QEMU's log."""


class GuestError(QemuError):
    """The reference guest did not reach its running state, or reported an error."""
