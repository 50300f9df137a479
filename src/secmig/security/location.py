"""The verification module: is this VM allowed to be on this host, with this MAC?

The paper's verification module recomputes a hash over the MAC a moved VM announces. Here it checks the
VM's signed :class:`~secmig.security.credentials.LocationBinding` against what is observed (VM id, MAC,
host) and against the newest epoch this host has seen for the VM, and returns a verdict. A VM without a
valid binding must be destroyed; carrying that out belongs to the monitor, this module only decides.
Pure, apart from the injected registry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from secmig.errors import AuthenticationError
from secmig.security.credentials import LocationBinding
from secmig.security.grants import TrustRoots, check_binding_signature


class LocationAction(enum.StrEnum):
    """What to do with a VM after its location check."""

    CONTINUE = "continue"
    DESTROY = "destroy"


@dataclass(frozen=True, slots=True)
class LocationVerdict:
    """The outcome of a location check, with the reason when the VM must go."""

    action: LocationAction
    reason: str

    @property
    def ok(self) -> bool:
        """True when the VM may keep running."""
        return self.action is LocationAction.CONTINUE


class BindingRegistry(Protocol):
    """The newest binding epoch a host has accepted per VM, so an older binding cannot be replayed."""

    def latest_epoch(self, vm_id: str) -> int | None:
        """The newest accepted epoch for ``vm_id``, if any."""
        ...

    def record(self, binding: LocationBinding) -> None:
        """Remember ``binding`` as accepted (only ever raises the epoch)."""
        ...


class MemoryBindingRegistry:
    """An in-process registry, for the simulator and tests."""

    def __init__(self) -> None:
        self._epochs: dict[str, int] = {}

    def latest_epoch(self, vm_id: str) -> int | None:
        """The newest accepted epoch for ``vm_id``, if any."""
        return self._epochs.get(vm_id)

    def record(self, binding: LocationBinding) -> None:
        """Remember ``binding``'s epoch if it is newer."""
        self._epochs[binding.vm_id] = max(binding.epoch, self._epochs.get(binding.vm_id, binding.epoch))


def verify_location(
    binding: LocationBinding | None,
    roots: TrustRoots,
    *,
    vm_id: str,
    vm_mac: str,
    host_id: str,
    latest_epoch: int | None = None,
) -> LocationVerdict:
    """Check a VM found on ``host_id`` announcing ``vm_mac``; DESTROY unless its binding proves it belongs there."""

    def destroy(reason: str) -> LocationVerdict:
        return LocationVerdict(LocationAction.DESTROY, f"VM {vm_id!r} on {host_id!r}: {reason}")

    if binding is None:
        return destroy("no location binding")
    try:
        check_binding_signature(binding, roots)
    except AuthenticationError as err:
        return destroy(str(err))
    if binding.vm_id != vm_id:
        return destroy(f"binding is for VM {binding.vm_id!r}")
    if binding.host_id != host_id:
        return destroy(f"binding places it on {binding.host_id!r}")
    if binding.vm_mac != vm_mac.lower():
        return destroy(f"announced MAC {vm_mac} differs from the bound {binding.vm_mac}")
    if latest_epoch is not None and binding.epoch < latest_epoch:
        return destroy(f"binding epoch {binding.epoch} is older than the accepted epoch {latest_epoch}")
    return LocationVerdict(LocationAction.CONTINUE, f"VM {vm_id!r} on {host_id!r}: binding epoch {binding.epoch} valid")
