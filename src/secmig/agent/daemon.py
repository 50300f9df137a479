"""The per-host agent: an asyncio daemon that holds the host's cluster identity and migrates its VMs.

One :class:`Agent` per hypervisor host. It listens on TCP for migrations (the security core's protocol:
TLS 1.3 with mutual authentication, Vsignature proofs, a grant for every operation, no page before
AUTHORIZED), serves a local control API (JSON lines on a UNIX socket, see :mod:`.control`) behind
``secmig vm …`` and ``secmig migrate``, feeds the traffic monitor from its byte counters and carries out
its verdicts (abort the migration, destroy the VM), and shuts down cleanly on SIGTERM: migrations in
flight are aborted (each VM stays on its source), VMs are stopped, sockets removed.

Every connection gets a child logger (``secmig.agent.HOST.in3``); decisions go to the host's
hash-chained audit log (``STATE_DIR/audit.db``), grant nonces and binding epochs to ``STATE_DIR/state.db``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from secmig.agent.channel import SecureChannel
from secmig.agent.config import HostConfig, parse_address
from secmig.agent.driver import DriverContext, DriverRegistry, SendRequest, VMDriver
from secmig.agent.drivers import default_drivers
from secmig.agent.manifest import Manifest, receive_manifest, send_manifest
from secmig.agent.monitoring import MonitorHook, RulesMonitor
from secmig.agent.report import MigrationHandle, MigrationReport
from secmig.agent.vocab import DataPlane, DriverKind, parse_data_plane, parse_driver
from secmig.errors import (
    AgentError,
    ChannelClosed,
    ConfigError,
    DocumentFormatError,
    MigrationAborted,
    MigrationError,
    RemoteProtocolError,
    SecmigError,
    StateError,
    VMNotFound,
)
from secmig.monitor import load_rules
from secmig.security.audit import AuditLog, Decision
from secmig.security.cluster import Cluster, ClusterTrust, HostIdentity
from secmig.security.credentials import LocationBinding
from secmig.security.events import Abort, AbortCode, Authorized, MigrationRequest, Role
from secmig.security.grants import Grant
from secmig.security.location import verify_location
from secmig.security.policy import parse_operation
from secmig.security.protocol import MigrationConnection
from secmig.security.store import SqliteHostState

_LOG = logging.getLogger("secmig.agent")
CONTROL_LINE_LIMIT = 1 << 20


class AgentState(enum.Enum):
    """The daemon's runstate."""

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class VMEntry:
    """A VM this host runs (or stores, after a copy), with its driver and location binding."""

    name: str
    driver: VMDriver[Any]
    vm: Any
    """The driver's VM object (a :class:`~secmig.agent.memvm.MemoryVM`, a QEMU VM, …)."""
    binding: LocationBinding | None
    stored: bool = False
    handle: MigrationHandle | None = None
    history: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        row: dict[str, Any] = dict(self.driver.describe(self.vm))
        if self.stored:
            row["state"] = "stored"
        if self.handle is not None:
            row["state"] = f"migrating ({self.handle.role})"
        row["binding_epoch"] = None if self.binding is None else self.binding.epoch
        row["mac"] = None if self.binding is None else self.binding.vm_mac
        return row


def _binding(doc: Any) -> LocationBinding | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ConfigError("binding: expected a JSON object")
    try:
        return LocationBinding.from_json(doc)
    except DocumentFormatError as err:
        raise ConfigError(f"binding: {err}") from err


def _grant(doc: Any) -> Grant | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ConfigError("grant: expected a JSON object")
    try:
        return Grant.from_json(doc)
    except DocumentFormatError as err:
        raise ConfigError(f"grant: {err}") from err


class Agent:
    """One host's daemon. ``await agent.start()`` … ``await agent.stop()``, or ``await agent.run()``."""

    def __init__(self, config: HostConfig, *, monitor: MonitorHook | None = None) -> None:
        self.config = config
        self.host_id = config.host_id
        self.logger = _LOG.getChild(config.host_id)
        self.state = AgentState.IDLE
        self.vms: dict[str, VMEntry] = {}
        self.migrations: dict[str, MigrationHandle] = {}
        self.stats: dict[str, int] = {"connections": 0, "refused": 0, "payload_bytes_received": 0}
        self._monitor_override = monitor
        self.monitor: MonitorHook | None = None
        self._cluster: Cluster | None = None
        self.identity: HostIdentity | None = None
        self.audit: AuditLog | None = None
        self._host_state: SqliteHostState | None = None
        self._server: asyncio.Server | None = None
        self._control: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._monitor_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._conn_ids = itertools.count(1)
        self._drivers: DriverRegistry | None = None
        self._t0 = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """Where the migration listener is bound (the real port when the config said 0)."""
        if self._server is None or not self._server.sockets:
            raise StateError(f"agent {self.host_id} is not listening")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def trust(self) -> ClusterTrust:
        """The cluster's trust material, read afresh (a revocation applies to the next handshake)."""
        assert self._cluster is not None
        return self._cluster.trust()

    async def start(self) -> None:
        """Load the identity, open the audit log and host state, start listening."""
        if self.state is not AgentState.IDLE:
            raise StateError(f"agent {self.host_id} is {self.state.value}, cannot start")
        self.state = AgentState.STARTING
        cfg = self.config
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._cluster = Cluster(cfg.cluster)
            self.identity = self._cluster.host_identity(cfg.host_id)
            self.trust()  # fail now, not at the first handshake, on unreadable trust material
            self.audit = AuditLog(cfg.state_dir / "audit.db", self.identity.key, actor=cfg.host_id)
            self._host_state = SqliteHostState(cfg.state_dir / "state.db")
            self._drivers = DriverRegistry(
                DriverContext(
                    cfg.host_id,
                    self.logger,
                    self.audit,
                    cfg,
                    self.identity,
                    self.trust,
                    lambda: self.address[1],
                ),
                default_drivers(),
            )
            if self._monitor_override is not None:
                self.monitor = self._monitor_override
            elif cfg.monitor.enabled:
                self.monitor = RulesMonitor(
                    load_rules(cfg.monitor.rules),
                    self,
                    self.audit,
                    preset_rate_bytes_per_s=cfg.monitor.preset_rate,
                    vswitch=cfg.monitor.vswitch,
                )
            host, port = cfg.listen_address
            try:
                self._server = await asyncio.start_server(self._on_connection, host, port)
            except OSError as err:
                raise ConfigError(f"listen {cfg.listen}: {err.strerror or err}") from err
            await self._start_control()
        except BaseException:
            await self._close_resources()
            self.state = AgentState.STOPPED
            raise
        self._monitor_task = asyncio.get_running_loop().create_task(self._monitor_loop(), name="monitor")
        self.state = AgentState.RUNNING
        self.audit.record("agent.started", Decision.INFO, cfg.host_id, {"listen": "{}:{}".format(*self.address)})
        self.logger.info("listening on %s:%d, control on %s", *self.address, cfg.control_socket)

    async def _start_control(self) -> None:
        path = self.config.control_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            # A stale socket of a killed agent; refuse to steal a live one.
            try:
                _r, w = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
            except (OSError, TimeoutError):
                path.unlink()
            else:
                w.close()
                raise StateError(f"{path}: another agent is running on this control socket")
        self._control = await asyncio.start_unix_server(self._on_control, str(path), limit=CONTROL_LINE_LIMIT)
        os.chmod(path, 0o600)

    async def stop(self) -> None:
        """Abort migrations (VMs stay on their source), stop VMs, close everything. Safe to call twice."""
        if self.state in (AgentState.STOPPING, AgentState.STOPPED, AgentState.IDLE):
            self.state = AgentState.STOPPED
            self._stopped.set()
            return
        self.state = AgentState.STOPPING
        self.logger.info("stopping")
        for srv in (self._server, self._control):
            if srv is not None:
                srv.close()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        for handle in self.migrations.values():
            handle.request_abort(f"agent {self.host_id} is shutting down")
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=5.0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for entry in list(self.vms.values()):
            with contextlib.suppress(SecmigError, OSError):
                await self._stop_vm(entry)
        if self.audit is not None:
            with contextlib.suppress(SecmigError):
                self.audit.record("agent.stopped", Decision.INFO, self.host_id, {"vms": len(self.vms)})
        await self._close_resources()
        self.state = AgentState.STOPPED
        self._stopped.set()
        self.logger.info("stopped")

    async def _close_resources(self) -> None:
        for srv in (self._server, self._control):
            if srv is not None:
                srv.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(srv.wait_closed(), 2.0)
        with contextlib.suppress(OSError):
            if self._control is not None:
                self.config.control_socket.unlink()
        if self._drivers is not None:
            await self._drivers.close()
        if self._host_state is not None:
            self._host_state.close()
        if self.audit is not None:
            self.audit.close()

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT (or a ``shutdown`` request), then stop cleanly."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        try:
            await self._stopped.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _need_running(self) -> None:
        if self.state is not AgentState.RUNNING:
            raise StateError(f"agent {self.host_id} is {self.state.value}")

    # -- VMs --------------------------------------------------------------------------------------------

    def _entry(self, name: str) -> VMEntry:
        try:
            return self.vms[name]
        except KeyError:
            raise VMNotFound(f"no VM {name!r} on {self.host_id}") from None

    def list_vms(self) -> list[dict[str, Any]]:
        """Every VM on this host."""
        return [e.describe() for e in sorted(self.vms.values(), key=lambda e: e.name)]

    def driver(self, kind: DriverKind) -> VMDriver[Any]:
        """This host's driver of ``kind`` (created on first use: in-memory hosts never load QEMU's)."""
        if self._drivers is None:
            raise StateError(f"agent {self.host_id} is {self.state.value}")
        return self._drivers.get(kind)

    async def start_vm(self, name: str, driver: str, spec: dict[str, Any], binding: Any = None) -> dict[str, Any]:
        """Start a VM here: ``memory`` (the embedded default) or ``qemu`` (the reference guest)."""
        self._need_running()
        if name in self.vms:
            raise StateError(f"VM {name!r} already exists on {self.host_id}")
        bound = _binding(binding)
        if bound is not None and (bound.vm_id != name or bound.host_id != self.host_id):
            raise ConfigError(f"binding places VM {bound.vm_id!r} on {bound.host_id!r}, not {name!r} here")
        kind = parse_driver(driver)
        drv = self.driver(kind)
        vm = await drv.start(name, spec)
        entry = VMEntry(name, drv, vm, bound)
        self.vms[name] = entry
        assert self.audit is not None
        self.audit.record("vm.started", Decision.INFO, name, {"driver": kind.value, "bound": bound is not None})
        return entry.describe()

    async def _stop_vm(self, entry: VMEntry) -> None:
        await entry.driver.stop(entry.vm)

    async def stop_vm(self, name: str) -> dict[str, Any]:
        """Stop a VM and forget it (its memory is wiped)."""
        entry = self._entry(name)
        if entry.handle is not None:
            raise StateError(f"VM {name!r} is migrating; abort the migration first")
        await self.destroy_vm(name, "stopped by the operator", event="vm.stopped")
        return {"name": name, "state": "stopped"}

    async def destroy_vm(self, name: str, reason: str, *, event: str = "vm.destroyed") -> None:
        """Self-destruction: stop the VM and wipe its memory (QEMU: ``quit``); audited."""
        entry = self.vms.pop(name, None)
        if entry is None:
            return
        await entry.driver.destroy(entry.vm)
        assert self.audit is not None
        self.audit.record(event, Decision.INFO if event == "vm.stopped" else Decision.DESTROY, name, {"reason": reason})
        if self.monitor is not None:
            self.monitor.unwatch(name)
        if event != "vm.stopped":
            self.logger.warning("%s %s: %s", event, name, reason)

    def binding_of(self, name: str) -> dict[str, Any] | None:
        """The VM's current location binding document."""
        b = self._entry(name).binding
        return None if b is None else b.to_json()

    # -- the monitor's Responder ------------------------------------------------------------------------

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        """The identity check: the peer is a current member and the VM's binding is valid."""
        handle = self.migrations.get(vm)
        trust = self.trust()
        if handle is not None and handle.peer is not None and trust.revocations.is_revoked(handle.peer):
            return False, f"peer {handle.peer} is revoked"
        entry = self.vms.get(vm)
        if entry is not None and handle is not None and handle.role is Role.SOURCE:
            b = entry.binding
            verdict = verify_location(b, trust.roots(), vm_id=vm, vm_mac=b.vm_mac if b else "", host_id=self.host_id)
            if not verdict.ok:
                return False, verdict.reason
        return True, "peer is a current member; binding valid"

    def throttle(self, vm: str, now_s: float, rate_bytes_per_s: float) -> None:
        """Cap the VM's migration stream (the in-memory sender paces to it; QEMU gets max-bandwidth)."""
        handle = self.migrations.get(vm)
        if handle is not None and rate_bytes_per_s > 0:
            handle.rate_cap_bytes_per_s = rate_bytes_per_s

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        """Stop the VM's migration at its next step; the VM stays on its source."""
        handle = self.migrations.get(vm)
        if handle is not None:
            handle.request_abort(f"monitor: {reason}")

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        """Destroy the VM: at once when idle, or when its migration has unwound."""
        handle = self.migrations.get(vm)
        if handle is not None:
            handle.request_abort(f"monitor: {reason}", destroy=True)
        elif vm in self.vms:
            self._spawn(self.destroy_vm(vm, f"monitor: {reason}"), f"destroy {vm}")

    async def _monitor_loop(self) -> None:
        last: dict[str, int] = {}
        interval = self.config.monitor.interval
        while True:
            await asyncio.sleep(interval)
            mon = self.monitor
            if mon is None:
                continue
            now = time.monotonic() - self._t0
            for vm, handle in list(self.migrations.items()):
                delta = handle.bytes - last.get(vm, 0)
                last[vm] = handle.bytes
                paused = 0.0 if handle.paused_at is None else time.monotonic() - handle.paused_at
                if delta or paused:
                    mon.sample(vm, now, delta, flow=handle.flow, paused_s=paused)
            for vm in [v for v in last if v not in self.migrations]:
                del last[vm]
            try:
                mon.tick(now)
            except SecmigError as err:
                self.logger.error("monitor: %s", err)

    def _track(self, handle: MigrationHandle, ram_bytes: int) -> None:
        if handle.vm in self.migrations:
            raise StateError(f"VM {handle.vm!r} is already migrating on {self.host_id}")
        self.migrations[handle.vm] = handle
        if self.monitor is not None:
            self.monitor.watch(handle.vm, ram_bytes)

    def _untrack(self, handle: MigrationHandle) -> None:
        if self.migrations.get(handle.vm) is handle:
            del self.migrations[handle.vm]
        if self.monitor is not None:
            self.monitor.unwatch(handle.vm)

    # -- outgoing migrations ------------------------------------------------------------------------------

    async def open_channel(
        self, request: MigrationRequest, to: str, address: tuple[str, int] | None, handle: MigrationHandle
    ) -> tuple[SecureChannel, Authorized]:
        """Connect to ``to``'s agent and run the handshake; raises the refusal as an exception."""
        assert self.identity is not None and self.audit is not None
        host, port = address or self.config.peer_address(to)
        n = next(self._conn_ids)
        log = self.logger.getChild(f"out{n}")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10.0)
        except (OSError, TimeoutError) as err:
            raise MigrationError(f"cannot reach {to} at {host}:{port}: {err}") from err
        conn = MigrationConnection.source(self.identity, self.trust, request, audit=self.audit)
        channel = SecureChannel(
            conn, reader, writer, log, idle_timeout_s=self.config.migration.idle_timeout, on_bytes=None
        )
        log.info("migrating %s (%s) to %s at %s:%d", request.vm_id, request.operation.value, to, host, port)
        channel.start()
        try:
            auth = await channel.authorized(self.config.migration.handshake_timeout)
        except BaseException:
            await channel.close()
            raise
        return channel, auth

    async def migrate(
        self,
        name: str,
        to: str,
        operation: str = "migrate",
        grant: Any = None,
        *,
        address: tuple[str, int] | None = None,
        data_plane: str = "relay",
        downtime_limit_s: float | None = None,
    ) -> MigrationReport:
        """Migrate (or copy, move, clone, template) VM ``name`` to host ``to``, presenting ``grant``."""
        self._need_running()
        op = parse_operation(operation)
        entry = self._entry(name)
        if entry.stored:
            raise StateError(f"VM {name!r} is a stored image here, not a running VM")
        if entry.handle is not None:
            raise StateError(f"VM {name!r} is already migrating")
        handle = MigrationHandle(name, Role.SOURCE, to)
        self._track(handle, entry.driver.ram_bytes(entry.vm))
        entry.handle = handle
        task = asyncio.current_task()
        if task is not None:  # so that stop() waits for this migration to unwind
            self._tasks.add(task)
        try:
            target = address or self.config.peer_address(to)
            plane = parse_data_plane(data_plane) if entry.driver.kind is DriverKind.QEMU else DataPlane.CHANNEL
            request = SendRequest(op, to, target, plane, downtime_limit_s)
            entry.driver.check_send(entry.vm, request)
            report = await self._send(entry, request, _grant(grant), handle)
        except RemoteProtocolError as err:
            assert self.audit is not None
            self.audit.record("migration.failed", Decision.REFUSE, name, {"to": to, "reason": str(err)[:300]})
            raise MigrationAborted(f"migration of {name} to {to} failed, VM still here: {err}") from err
        except BaseException as err:
            assert self.audit is not None
            self.audit.record(
                "migration.failed", Decision.REFUSE, name, {"to": to, "operation": op.value, "reason": str(err)[:300]}
            )
            raise
        finally:
            if task is not None:
                self._tasks.discard(task)
            entry.handle = None
            self._untrack(handle)
            if handle.destroy_requested and name in self.vms:
                await self.destroy_vm(name, handle.abort_reason or "destroy requested")
        assert self.audit is not None
        self.audit.record(
            "migration.completed",
            Decision.ALLOW,
            name,
            {"to": to, "operation": op.value, "downtime_s": report.downtime_s, "bytes": report.wire_bytes},
        )
        return report

    async def _send(
        self, entry: VMEntry, request: SendRequest, grant: Grant | None, handle: MigrationHandle
    ) -> MigrationReport:
        """Handshake, manifest, the driver's transfer, then the source side of the commit (here, once)."""
        drv = entry.driver
        page_size, page_count = drv.geometry(entry.vm)
        mig = MigrationRequest(request.operation, entry.name, page_size, page_count, grant, entry.binding)
        channel, auth = await self.open_channel(mig, request.destination, request.destination_address, handle)
        try:
            await send_manifest(
                channel, Manifest(drv.kind, request.data_plane, drv.manifest(entry.vm, request)), page_size
            )
            report = await drv.send(entry.vm, channel, auth, handle, request)
        except ChannelClosed as err:
            raise MigrationAborted(f"connection to {request.destination} lost: {err}") from err
        finally:
            await channel.close()
        await self._after_commit_source(entry, request)
        return report

    async def _after_commit_source(self, entry: VMEntry, request: SendRequest) -> None:
        """COMMITTED is in: a relocated VM is released here (wiped), a copied one runs on."""
        if request.operation.relocates:
            self.vms.pop(entry.name, None)
            await entry.driver.destroy(entry.vm)
            assert self.audit is not None
            self.audit.record(
                "vm.released", Decision.INFO, entry.name, {"to": request.destination, "driver": entry.driver.kind.value}
            )
        else:
            await entry.driver.resume(entry.vm)

    # -- incoming migrations ----------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        peer = writer.get_extra_info("peername")
        n = next(self._conn_ids)
        log = self.logger.getChild(f"in{n}")
        self.stats["connections"] += 1
        if self.state is not AgentState.RUNNING:
            writer.close()
            return
        assert self.identity is not None and self.audit is not None and self._host_state is not None
        log.debug("connection from %s", peer)
        conn = MigrationConnection.destination(
            self.identity, self.trust, nonces=self._host_state, bindings=self._host_state, audit=self.audit
        )
        channel = SecureChannel(conn, reader, writer, log, idle_timeout_s=self.config.migration.idle_timeout)
        channel.start()
        handle: MigrationHandle | None = None
        try:
            auth = await channel.authorized(self.config.migration.handshake_timeout)
            log.info("%s of %s from %s authorized", auth.operation.value, auth.vm_id, auth.peer_host)
            if auth.vm_id in self.vms or auth.vm_id in self.migrations:
                raise StateError(f"VM {auth.vm_id!r} already exists on {self.host_id}")
            handle = MigrationHandle(auth.vm_id, Role.DESTINATION, auth.peer_host)
            self._track(handle, auth.page_size * auth.page_count)
            manifest = await receive_manifest(channel, self.config.migration.idle_timeout)
            assert self._drivers is not None
            drv = self._drivers.lookup(manifest.driver)
            vm = await drv.receive(channel, auth, handle, manifest)
            self.install_vm(auth, drv, vm)
            self.stats["payload_bytes_received"] += handle.bytes
        except asyncio.CancelledError:
            log.info("cancelled: incoming migration discarded")
            raise
        except SecmigError as err:
            self.stats["refused"] += 1
            if handle is not None:
                self.stats["payload_bytes_received"] += handle.bytes
            log.warning("incoming migration dropped: %s", err)
            with contextlib.suppress(Exception):  # the driver may have said so already
                await channel.send(Abort(str(err)[:300] or type(err).__name__, AbortCode.REQUESTED))
            with contextlib.suppress(SecmigError):
                subject = handle.vm if handle else str(peer)
                self.audit.record("migration.discarded", Decision.REFUSE, subject, {"reason": str(err)[:300]})
        finally:
            if handle is not None:
                self._untrack(handle)
                if handle.destroy_requested and handle.vm in self.vms:
                    await self.destroy_vm(handle.vm, handle.abort_reason or "destroy requested")
            await channel.close()

    def install_vm(self, auth: Authorized, driver: VMDriver[Any], vm: Any) -> None:
        """COMMITTED is sent: register the received VM, running with its new binding when relocated, else a
        stored image (the destination side of the commit, here once for every driver)."""
        entry = VMEntry(auth.vm_id, driver, vm, auth.next_binding, stored=not auth.operation.relocates)
        self.vms[auth.vm_id] = entry
        assert self.audit is not None
        self.audit.record(
            "vm.received",
            Decision.ALLOW,
            auth.vm_id,
            {"from": auth.peer_host, "operation": auth.operation.value, "stored": entry.stored},
        )

    # -- control API ------------------------------------------------------------------------------------

    async def _on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        log = self.logger.getChild("control")
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                        raise ConfigError('control request: expected {"op": ..., "args": {...}}')
                    args = request.get("args") or {}
                    if not isinstance(args, dict):
                        raise ConfigError("control request: args must be an object")
                    log.debug("-> %s", request["op"])
                    result = await self.dispatch(request["op"], args)
                    response: dict[str, Any] = {"ok": True, "result": result}
                except ValueError as err:
                    response = {"ok": False, "error": {"kind": "ConfigError", "message": f"bad request: {err}"}}
                except SecmigError as err:
                    response = {"ok": False, "error": {"kind": type(err).__name__, "message": str(err)}}
                except (TypeError, KeyError) as err:
                    response = {"ok": False, "error": {"kind": "ConfigError", "message": f"bad arguments: {err}"}}
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except (OSError, ConnectionError, asyncio.LimitOverrunError) as err:
            log.debug("control connection ended: %s", err)
        finally:
            writer.close()

    async def dispatch(self, op: str, args: dict[str, Any]) -> Any:
        """One control request (what the CLI and tests call)."""
        if op == "status":
            host, port = self.address
            return {
                "host_id": self.host_id,
                "state": self.state.value,
                "listen": f"{host}:{port}",
                "vms": len(self.vms),
                "migrations": sorted(self.migrations),
                "stats": dict(self.stats),
            }
        if op == "vm.list":
            return self.list_vms()
        if op == "vm.start":
            return await self.start_vm(args["name"], args.get("driver", "memory"), args["spec"], args.get("binding"))
        if op == "vm.stop":
            return await self.stop_vm(args["name"])
        if op == "vm.binding":
            return self.binding_of(args["name"])
        if op == "migrate":
            address = parse_address(str(args["address"])) if args.get("address") else None
            report = await self.migrate(
                args["name"],
                args["to"],
                args.get("operation", "migrate"),
                args.get("grant"),
                address=address,
                data_plane=args.get("data_plane", "relay"),
                downtime_limit_s=args.get("downtime_limit_s"),
            )
            return report.to_json()
        if op == "shutdown":
            self._stopped.set()
            return {"stopping": True}
        raise AgentError(f"unknown control request {op!r}")
