"""The one interface every VM driver of the agent implements, the narrow context it gets, its registry.

A driver knows one kind of VM (the in-memory VM, a QEMU process): how to start it, pause and resume it,
destroy it, describe it, and how to move it over an already authorized
:class:`~secmig.agent.channel.SecureChannel` — ``send`` on the source, ``receive`` on the destination.
The daemon keeps everything else: the channel and its handshake, tracking, the audit log, the monitor,
and the bookkeeping after a commit (binding, ``vm.released``, untrack), in one place.

A driver never sees the daemon. It gets a :class:`DriverContext`: the host's id, a logger, where to
record decisions, the host's settings, and — for data planes that bring their own TLS — the host's
identity and trust material. Per migration it gets the channel, the :class:`~secmig.security.events.Authorized`
outcome and the :class:`~secmig.agent.report.MigrationHandle` (byte counters, abort requests).

The source names its driver in the migration's manifest (:mod:`.manifest`); the destination looks the
name up in the :class:`DriverRegistry`. Nothing is guessed from the memory geometry. The names are
:class:`~secmig.agent.vocab.DriverKind` values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from secmig.agent.channel import SecureChannel
from secmig.agent.config import HostConfig
from secmig.agent.manifest import Manifest
from secmig.agent.report import MigrationHandle, MigrationReport
from secmig.agent.vmstate import VMStore
from secmig.agent.vocab import DataPlane, DriverKind
from secmig.errors import MigrationError
from secmig.security.audit import AuditSink
from secmig.security.cluster import ClusterTrust, HostIdentity
from secmig.security.credentials import LocationBinding
from secmig.security.events import Authorized
from secmig.security.policy import Operation


@dataclass(frozen=True, slots=True)
class DriverContext:
    """What a driver may use of its host: no daemon, no registry, no other VM."""

    host_id: str
    logger: logging.Logger
    audit: AuditSink
    config: HostConfig
    identity: HostIdentity
    trust: Callable[[], ClusterTrust]
    """The cluster's trust material, read afresh (qemu-tls writes QEMU's CA from it)."""
    listen_port: Callable[[], int]
    """The port this host's migration listener is bound to (the config may say 0)."""
    vm_store: VMStore | None = None
    """Where a driver keeps what must survive the agent's crash (``STATE_DIR/vms``; see :mod:`.vmstate`)."""


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One outgoing migration as the driver sees it, after the handshake."""

    operation: Operation
    destination: str
    destination_address: tuple[str, int]
    data_plane: DataPlane
    downtime_limit_s: float | None
    """Overrides the host's configured downtime limit for this migration."""
    auto_converge: bool = False
    """QEMU: throttle the guest's vCPUs when pre-copy does not converge (QEMU's ``auto-converge``)."""
    postcopy: bool = False
    """QEMU: switch to post-copy after the first pass (QEMU's ``postcopy-ram``; qemu-tls only)."""
    clone_binding: LocationBinding | None = None
    """clone, template: the new VM's signed location binding (new id, new MAC, the destination)."""
    manifest: Manifest | None = None
    """The manifest sent in round 0 (set by the daemon once it is built; its digest is in the hello)."""


VM = TypeVar("VM")


class VMDriver(Protocol[VM]):
    """One kind of VM: its life cycle, and its two ends of a migration."""

    kind: DriverKind

    async def start(self, name: str, spec: dict[str, Any]) -> VM:
        """Boot a VM from a driver-specific spec (ConfigError on a bad one)."""
        ...

    def describe(self, vm: VM) -> dict[str, object]:
        """One row of ``secmig vm list``: name, driver, state, ram_bytes, …"""
        ...

    def ram_bytes(self, vm: VM) -> int:
        """The VM's RAM (what the monitor judges a migration's volume against)."""
        ...

    async def pause(self, vm: VM) -> None:
        """Stop the guest (no more dirty pages)."""
        ...

    async def resume(self, vm: VM) -> None:
        """Run the guest (again): a source after a copy, clone or template, or a move the register kept
        here; a received VM once the register moved it here."""
        ...

    async def stop(self, vm: VM) -> None:
        """Stop the guest for good (agent shutdown). A copy in doubt (after COMMIT, after the vote) is kept
        where a restarted agent finds it, for the register to decide; any other is gone."""
        ...

    async def destroy(self, vm: VM) -> None:
        """Self-destruction, or release after the register moved the VM: stopped, memory zeroed."""
        ...

    def check_send(self, vm: VM, request: SendRequest) -> None:
        """Refuse early (ConfigError, StateError) what this driver cannot send, before any handshake."""
        ...

    def geometry(self, vm: VM) -> tuple[int, int]:
        """(page size, page count) the handshake announces; slot 0 carries the manifest first."""
        ...

    def manifest(self, vm: VM, request: SendRequest) -> dict[str, Any]:
        """What the destination needs to prepare for this VM (travels in the manifest)."""
        ...

    async def send(
        self, vm: VM, channel: SecureChannel, auth: Authorized, handle: MigrationHandle, request: SendRequest
    ) -> MigrationReport:
        """Move ``vm`` over an authorized channel whose round 0 held the manifest, up to the destination's
        vote (PREPARED); the daemon then asks the location register and confirms (see
        :mod:`secmig.security.state`).

        On success the source copy is paused and intact: the daemon releases it once the register holds
        the new epoch, or resumes it (a copy, clone or template; a move the register kept here). On a
        failure before COMMIT went out the VM runs here again; after it, the VM stays paused and the
        error is raised: only the register's answer may resume or release it.
        """
        ...

    async def receive(
        self, channel: SecureChannel, auth: Authorized, handle: MigrationHandle, manifest: Manifest
    ) -> VM:
        """Take a VM in, up to and including its vote (PREPARED); returns it loaded and *not running*.

        The daemon resumes it only once the source confirmed and the location register holds the new
        epoch here (a copy, clone or template stays paused, stored); then it sends COMMITTED. On any
        failure before the vote nothing is installed and what was received is discarded (zeroed);
        after the vote the copy is kept for the register's answer.
        """
        ...

    async def close(self) -> None:
        """Release what the driver holds beyond its VMs (the daemon stops those)."""
        ...


DriverFactory = Callable[[DriverContext], "VMDriver[Any]"]


class DriverRegistry:
    """The drivers of one host, by name; each is created on first use with the host's context."""

    def __init__(self, ctx: DriverContext, factories: dict[DriverKind, DriverFactory]) -> None:
        self._ctx = ctx
        self._factories = dict(factories)
        self._drivers: dict[DriverKind, VMDriver[Any]] = {}

    def get(self, kind: DriverKind) -> VMDriver[Any]:
        """The driver called ``kind`` (created now if it was not yet)."""
        driver = self._drivers.get(kind)
        if driver is None:
            factory = self._factories.get(kind)
            if factory is None:
                raise MigrationError(f"no {kind.value} driver on {self._ctx.host_id}")
            driver = self._drivers[kind] = factory(self._ctx)
        return driver

    def lookup(self, name: str) -> VMDriver[Any]:
        """The driver a manifest names (MigrationError when this host has none of that name)."""
        try:
            kind = DriverKind(name)
        except ValueError:
            raise MigrationError(f"unknown VM driver {name!r} in the manifest") from None
        return self.get(kind)

    async def close(self) -> None:
        """Close every driver created so far."""
        for driver in self._drivers.values():
            await driver.close()
