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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from secmig.agent.admission import Admission
from secmig.agent.channel import READ_CHUNK, SecureChannel
from secmig.agent.config import HostConfig, parse_address
from secmig.agent.driver import DriverContext, DriverRegistry, SendRequest, VMDriver
from secmig.agent.drivers import default_drivers
from secmig.agent.macverify import BindingCheck, reverify_mac
from secmig.agent.manifest import Manifest, check_manifest, receive_manifest, send_manifest
from secmig.agent.monitoring import MonitorHook, RulesMonitor
from secmig.agent.nicmonitor import NicMonitor
from secmig.agent.report import MigrationHandle, MigrationReport
from secmig.agent.vmdef import definition_from_json
from secmig.agent.vmstate import Recovery, VMRecord, VMStore, crash_point, decide
from secmig.agent.vocab import DataPlane, DriverKind, parse_data_plane, parse_driver
from secmig.errors import (
    AgentError,
    AuthorizationError,
    ChannelClosed,
    ConfigError,
    DocumentFormatError,
    MigrationAborted,
    MigrationError,
    RegisterConflict,
    RegisterUnavailable,
    RemoteProtocolError,
    SecmigError,
    StateError,
    VMNotFound,
)
from secmig.monitor import load_rules
from secmig.security.audit import AuditLog, Decision
from secmig.security.cluster import Cluster, ClusterTrust, HostIdentity
from secmig.security.credentials import LocationBinding
from secmig.security.events import (
    Abort,
    AbortCode,
    Aborted,
    Authorized,
    Committed,
    Confirm,
    MigrationRequest,
    Role,
)
from secmig.security.grants import Grant, check_binding_signature
from secmig.security.handshake import GrantAuthorizer
from secmig.security.location import verify_location
from secmig.security.policy import Operation, parse_operation
from secmig.security.protocol import MigrationConnection
from secmig.security.register import LocationRegister, Move, MoveOutcome, RegisterAuthorizer, open_register
from secmig.security.state import AFTER_COMMIT, State
from secmig.security.store import SqliteHostState

_LOG = logging.getLogger("secmig.agent")
T = TypeVar("T")
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
        if self.stored and row.get("state") != "template":
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


def _after_commit_point(channel: SecureChannel) -> bool:
    """True when this source sent COMMIT and the outcome is not known: the register must decide."""
    state = channel.conn.state
    return state in AFTER_COMMIT[Role.SOURCE] or state is State.IN_DOUBT


async def _final_word(channel: SecureChannel, timeout_s: float = 5.0) -> None:
    """Wait briefly for the destination's final COMMITTED (a courtesy: the outcome is already known)."""
    with contextlib.suppress(SecmigError, TimeoutError):
        await channel.next_event(timeout_s)


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
        self._register: LocationRegister | None = None
        self._register_trust: ClusterTrust | None = None
        self._vm_store: VMStore | None = None
        self._recovering: list[VMRecord] = []
        self._admission: Admission | None = None
        self._server: asyncio.Server | None = None
        self._control: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._monitor_task: asyncio.Task[None] | None = None
        self.nic_monitor: NicMonitor | None = None
        """The monitor on the VMs' real NICs (taps on the vSwitch bridge), when ``monitor.nic_monitor`` is on."""
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
            # Trust material only moves forward from here: an older signed list or policy is refused.
            self._cluster.floor = self._host_state
            self.trust()
            self._register_trust = self.trust()
            # Register calls run in worker threads: they see a snapshot of the trust material taken in
            # this thread before each call (the floor that checks it is this thread's SQLite).
            self._register = open_register(cfg.cluster, self.identity, self._trust_snapshot)
            self._admission = Admission(self.audit, logger=self.logger.getChild("admission"))
            self._vm_store = VMStore(cfg.state_dir / "vms")
            self._drivers = DriverRegistry(
                DriverContext(
                    cfg.host_id,
                    self.logger,
                    self.audit,
                    cfg,
                    self.identity,
                    self.trust,
                    lambda: self.address[1],
                    self._vm_store,
                ),
                default_drivers(),
            )
            self._recover_on_disk()
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
        if cfg.monitor.nic_monitor:
            self.nic_monitor = NicMonitor(
                load_rules(cfg.monitor.rules),
                self,
                self.audit,
                identity=self._binding_check(),
                interval_s=cfg.monitor.interval,
                vswitch_capacity_bytes_per_s=cfg.monitor.vswitch_capacity,
            )
            self.nic_monitor.start()
        self.state = AgentState.RUNNING
        self.audit.record("agent.started", Decision.INFO, cfg.host_id, {"listen": "{}:{}".format(*self.address)})
        if self._recovering:
            self._spawn(self._recover_with_register(), "recover VMs")
        self.logger.info("listening on %s:%d, control on %s", *self.address, cfg.control_socket)

    # -- crash recovery (see secmig.agent.vmstate) -----------------------------------------------------

    def _recover_on_disk(self) -> None:
        """Start-up, before listening: sweep what a killed agent left that needs no one's answer — QEMU
        credential copies, RAM files never recorded, unreadable state files, QEMUs of this agent (its owner
        token) that no state file records — and queue every recorded VM for :meth:`_recover_with_register`."""
        from secmig.agent.drivers.qemu import sweep_tls_dirs
        from secmig.agent.qemu.machine import kill_pid, owned_qemus, qemu_memory_path, scrub_ram

        assert self._vm_store is not None and self.audit is not None
        swept = sweep_tls_dirs(self.config.state_dir)
        if swept:
            self.audit.record("agent.swept", Decision.INFO, self.host_id, {"qemu_tls_dirs": swept})
        store = self._vm_store
        for name in store.orphan_ram():
            store.remove(name, zero=True)
        for rec in store.records():
            if isinstance(rec, str):  # unreadable: nobody can say what it was, so nobody may run it
                self.logger.error("VM %s: unreadable state file; its copy is wiped", rec)
                store.remove(rec, zero=True)
                self.audit.record("vm.recovered", Decision.DESTROY, rec, {"outcome": "wipe", "why": "unreadable"})
            else:
                self._recovering.append(rec)
        known = {r.spec.get("pid") for r in self._recovering if r.driver == DriverKind.QEMU.value}
        for pid, name in owned_qemus(store.owner()).items():
            if pid in known:
                continue
            ram = qemu_memory_path(pid)
            kill_pid(pid)
            scrubbed = 0 if ram is None else scrub_ram(ram)
            self.logger.warning("QEMU %s (pid %d): no state file records it; killed, RAM scrubbed", name, pid)
            self.audit.record(
                "vm.recovered",
                Decision.DESTROY,
                name,
                {"outcome": "wipe", "why": "orphan QEMU", "bytes_zeroed": scrubbed},
            )

    async def _recover_with_register(self) -> None:
        """Re-adopt or wipe each recorded VM as :func:`~secmig.agent.vmstate.decide` says (asking the register
        where a move may have happened); a VM waits, not running, until the register answers."""
        assert self._register is not None and self._vm_store is not None and self.audit is not None
        while self._recovering:
            rec = self._recovering[0]
            delay = 0.05
            while True:
                try:
                    action = await self._in_register(decide, rec, self._register, self.host_id)
                    break
                except RegisterUnavailable as err:
                    self.logger.warning("%s: location register unavailable, it stays paused: %s", rec.name, err)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            self._recovering.pop(0)
            qemu = rec.driver == DriverKind.QEMU.value
            drv = self.driver(DriverKind.QEMU if qemu else DriverKind.MEMORY)
            if action is Recovery.WIPE:
                if qemu:
                    await drv.wipe(rec)  # type: ignore[attr-defined]
                else:
                    self._vm_store.remove(rec.name, zero=True)
            else:
                try:
                    vm = await drv.adopt(rec) if qemu else drv.adopt(rec)  # type: ignore[attr-defined]
                except SecmigError as err:
                    if not qemu:
                        raise
                    if drv.alive(rec):  # type: ignore[attr-defined]
                        # It runs but cannot be driven (its QMP, a missing bridge): left as it is, recorded.
                        self.logger.error("%s: cannot re-adopt its QEMU, left untouched: %s", rec.name, err)
                        self.audit.record("vm.recovered", Decision.REFUSE, rec.name, {"outcome": "not adopted"})
                        continue
                    self.logger.error("%s: its QEMU is gone, nothing to recover: %s", rec.name, err)
                    await drv.wipe(rec)  # type: ignore[attr-defined]
                    self.audit.record("vm.recovered", Decision.DESTROY, rec.name, {"outcome": "lost", "why": str(err)})
                    continue
                stored = action is Recovery.KEEP_STORED
                entry = VMEntry(rec.name, drv, vm, rec.binding, stored=stored)
                self.vms[rec.name] = entry
                if not stored:
                    await drv.resume(vm)
                    self._watch_nics(entry)
            self.audit.record(
                "vm.recovered",
                Decision.DESTROY if action is Recovery.WIPE else Decision.ALLOW,
                rec.name,
                {"outcome": action.value, "phase": rec.phase.value},
            )
            self.logger.info("recovered %s (%s): %s", rec.name, rec.phase.value, action.value)

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
        if self.nic_monitor is not None:
            await self.nic_monitor.stop()
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
        close_register = getattr(self._register, "close", None)
        if close_register is not None:
            close_register()
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

    def _definitions_dir(self) -> Path:
        d = self.config.state_dir / "definitions"
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    def define_vm(self, doc: Any, source: str = "definition") -> dict[str, Any]:
        """Store a QEMU VM definition on this host (``secmig vm define``); ``vm start NAME`` boots it."""
        defn = definition_from_json(doc, source)
        defn.check_files(source)
        path = self._definitions_dir() / f"{defn.name}.json"
        path.write_text(json.dumps(defn.to_json(), indent=2), encoding="utf-8")
        assert self.audit is not None
        self.audit.record("vm.defined", Decision.INFO, defn.name, {"mac": defn.mac, "nics": len(defn.nics)})
        return defn.to_json()

    def definition_of(self, name: str) -> dict[str, Any] | None:
        """The stored definition of ``name`` (None when there is none)."""
        path = self._definitions_dir() / f"{name}.json"
        if not path.is_file():
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
        return definition_from_json(doc, path.name).to_json()

    def list_definitions(self) -> list[dict[str, Any]]:
        """Every stored definition."""
        return [d for p in sorted(self._definitions_dir().glob("*.json")) if (d := self.definition_of(p.stem))]

    async def start_vm(self, name: str, driver: str, spec: dict[str, Any], binding: Any = None) -> dict[str, Any]:
        """Start a VM here: ``memory`` (the embedded default) or ``qemu`` (a definition stored with
        :meth:`define_vm`, one given in ``spec["definition"]``, or the reference guest). A stored copy is
        resumed (with a binding placing it here); a template cannot be started."""
        self._need_running()
        bound = _binding(binding)
        if bound is not None and (bound.vm_id != name or bound.host_id != self.host_id):
            raise ConfigError(f"binding places VM {bound.vm_id!r} on {bound.host_id!r}, not {name!r} here")
        existing = self.vms.get(name)
        if existing is not None:
            if existing.driver.describe(existing.vm).get("state") == "template":
                raise StateError(f"{name!r} is a template: it cannot be started, only cloned from (--from-template)")
            if not existing.stored:
                raise StateError(f"VM {name!r} already exists on {self.host_id}")
            await existing.driver.resume(existing.vm)
            existing.stored, existing.binding = False, bound
            self._persist_binding(name, bound)
            self._watch_nics(existing)
            assert self.audit is not None
            self.audit.record("vm.started", Decision.INFO, name, {"from": "stored copy", "bound": bound is not None})
            return existing.describe()
        if driver == DriverKind.QEMU.value and "definition" not in spec and not spec:
            stored = self.definition_of(name)
            if stored is None:
                raise VMNotFound(f"no VM definition {name!r} on {self.host_id} (secmig vm define FILE)")
            spec = {"definition": stored}
        kind = parse_driver(driver)
        drv = self.driver(kind)
        vm = await drv.start(name, spec)
        entry = VMEntry(name, drv, vm, bound)
        self.vms[name] = entry
        self._persist_binding(name, bound)
        self._watch_nics(entry)
        assert self.audit is not None
        self.audit.record("vm.started", Decision.INFO, name, {"driver": kind.value, "bound": bound is not None})
        return entry.describe()

    def _persist_binding(self, name: str, binding: LocationBinding | None) -> None:
        """The binding a VM runs under, into its state file (when its driver keeps one)."""
        if self._vm_store is not None:
            self._vm_store.update(name, binding=binding)

    async def _stop_vm(self, entry: VMEntry) -> None:
        # The driver keeps a copy in doubt (after COMMIT, after the vote) for the register to decide at restart.
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
        self._unwatch_nics(name)
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
        """The identity check: is this VM's flow authorized, not merely "is the peer a member"?

        Source: the grant presented for the flow must verify now, for this VM, this host, this destination
        and this operation (and still be valid); the peer must not be revoked; the VM's binding must place
        it here. Destination: the handshake verified the grant and consumed its nonce before any page came
        in; the peer must still not be revoked. A VM with no flow must be where its binding says.
        """
        from secmig.security.grants import check_grant

        handle = self.migrations.get(vm)
        trust = self.trust()
        entry = self.vms.get(vm)
        if handle is None:
            if entry is None:
                return False, f"VM {vm!r} is not on {self.host_id}"
            b = entry.binding
            verdict = verify_location(b, trust.roots(), vm_id=vm, vm_mac=b.vm_mac if b else "", host_id=self.host_id)
            return verdict.ok, f"location binding: {verdict.reason}"
        peer = handle.peer or ""
        if not peer or trust.revocations.is_revoked(peer):
            return False, f"peer {peer or '?'} is revoked" if peer else "flow with no peer"
        op = handle.operation
        if op is None:
            return False, f"flow of {vm} with {peer}: no operation recorded for it"
        if handle.role is Role.DESTINATION:
            return True, f"incoming {op.value} of {vm} from {peer} authorized at the handshake; peer not revoked"
        if entry is None:
            return False, f"VM {vm!r} is not on {self.host_id}"
        try:
            check_grant(
                handle.grant,
                trust.roots(),
                now=time.time(),
                operation=op,
                vm_id=vm,
                source_host=self.host_id,
                destination_host=peer,
                current_binding=entry.binding,
                # The manifest is this host's own, built for this grant; binding it is the destination's check.
                manifest_digest=getattr(handle.grant, "manifest_digest", None),
            )
        except SecmigError as err:
            return False, f"flow {vm} {self.host_id}→{peer} is not authorized: {err}"
        b = entry.binding
        verdict = verify_location(b, trust.roots(), vm_id=vm, vm_mac=b.vm_mac if b else "", host_id=self.host_id)
        if not verdict.ok:
            return False, verdict.reason
        return True, f"grant for {op.value} of {vm} {self.host_id}→{peer} verifies; peer not revoked; binding valid"

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
        from secmig.security.policy import Operation  # here, so that this loop depends on nothing else of the file

        # The last byte count of each migration (its handle's flow id), not of each VM name: a VM sent onward
        # right after it arrived is a new migration, whose count starts again from zero.
        last: dict[str, int] = {}
        interval = self.config.monitor.interval
        while True:
            await asyncio.sleep(interval)
            mon = self.monitor
            if mon is None:
                continue
            now = time.monotonic() - self._t0
            for vm, handle in list(self.migrations.items()):
                if handle.role is Role.SOURCE and vm not in self.vms:
                    mon.unwatch(vm)  # released at the commit (or destroyed): no stream of it is left here
                    continue
                delta = handle.bytes - last.get(handle.flow, 0)
                last[handle.flow] = handle.bytes
                paused = 0.0 if handle.paused_at is None else time.monotonic() - handle.paused_at
                # A cold move is paused by design from its first page: the monitor judges its progress.
                live = handle.operation is not Operation.MOVE
                if delta or paused:
                    mon.sample(vm, now, delta, flow=handle.flow, paused_s=paused, dst=handle.peer or "", live=live)
            live_flows = {h.flow for h in self.migrations.values()}
            for flow in [f for f in last if f not in live_flows]:
                del last[flow]
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
        crash_point("source.handshake")
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
        clone_binding: Any = None,
        from_template: bool = False,
        auto_converge: bool = False,
        postcopy: bool = False,
    ) -> MigrationReport:
        """Migrate (or copy, move, clone, template) VM ``name`` to host ``to``, presenting ``grant``.

        ``clone_binding`` is the new VM's signed binding (clone, template); ``from_template`` clones a
        template stored here. The grant should bind the manifest (:meth:`manifest_for`).
        """
        self._need_running()
        op = parse_operation(operation)
        entry = self._entry(name)
        self._check_source(entry, op, from_template)
        if entry.handle is not None:
            raise StateError(f"VM {name!r} is already migrating")
        handle = MigrationHandle(name, Role.SOURCE, to)
        handle.authorize(op, _grant(grant))  # what the monitor's identity check re-verifies
        self._track(handle, entry.driver.ram_bytes(entry.vm))
        entry.handle = handle
        task = asyncio.current_task()
        if task is not None:  # so that stop() waits for this migration to unwind
            self._tasks.add(task)
        try:
            request = self._send_request(
                entry, op, to, address, data_plane, downtime_limit_s, clone_binding, auto_converge, postcopy
            )
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

    def _check_source(self, entry: VMEntry, op: Operation, from_template: bool) -> None:
        is_template = entry.driver.describe(entry.vm).get("state") == "template"
        if from_template and not is_template:
            raise StateError(f"{entry.name!r} is not a template (clone it without --from-template)")
        if is_template and not (from_template and op is Operation.CLONE):
            raise StateError(
                f"{entry.name!r} is a template: it cannot be started or moved, only cloned from "
                "(--op clone --from-template)"
            )
        if entry.stored and not is_template:
            raise StateError(f"VM {entry.name!r} is a stored image here, not a running VM")
        if entry.handle is not None:
            raise StateError(f"VM {entry.name!r} is already migrating")

    def _send_request(
        self,
        entry: VMEntry,
        op: Operation,
        to: str,
        address: tuple[str, int] | None,
        data_plane: str,
        downtime_limit_s: float | None,
        clone_binding: Any,
        auto_converge: bool,
        postcopy: bool,
    ) -> SendRequest:
        target = address or self.config.peer_address(to)
        plane = parse_data_plane(data_plane) if entry.driver.kind is DriverKind.QEMU else DataPlane.CHANNEL
        new = _binding(clone_binding)
        if op in (Operation.CLONE, Operation.TEMPLATE) and entry.driver.kind is DriverKind.QEMU and new is None:
            raise ConfigError(f"{op.value} of a QEMU VM needs the new VM's binding (new id, new MAC, on {to})")
        if new is not None:
            if op not in (Operation.CLONE, Operation.TEMPLATE) or entry.driver.kind is not DriverKind.QEMU:
                raise ConfigError(f"a new VM binding goes with a clone or template of a QEMU VM, not {op.value}")
            if new.host_id != to or new.epoch != 0 or new.vm_id == entry.name:
                raise ConfigError(f"the new binding must place a new VM id on {to} at epoch 0")
        request = SendRequest(op, to, target, plane, downtime_limit_s, auto_converge, postcopy, new)
        manifest = Manifest(
            entry.driver.kind,
            plane,
            entry.driver.manifest(entry.vm, request),
            None if new is None else new.to_json(),
        )
        return replace(request, manifest=manifest)

    def manifest_for(
        self,
        name: str,
        to: str,
        operation: str = "migrate",
        *,
        address: tuple[str, int] | None = None,
        data_plane: str = "relay",
        clone_binding: Any = None,
        from_template: bool = False,
        auto_converge: bool = False,
        postcopy: bool = False,
    ) -> Manifest:
        """The manifest :meth:`migrate` would send with these arguments: a grant binds its digest."""
        op = parse_operation(operation)
        entry = self._entry(name)
        self._check_source(entry, op, from_template)
        request = self._send_request(entry, op, to, address, data_plane, None, clone_binding, auto_converge, postcopy)
        entry.driver.check_send(entry.vm, request)
        assert request.manifest is not None
        return request.manifest

    async def _send(
        self, entry: VMEntry, request: SendRequest, grant: Grant | None, handle: MigrationHandle
    ) -> MigrationReport:
        """Handshake (announcing the manifest's digest), manifest, the driver's transfer, then the source
        side of the commit (here, once)."""
        drv = entry.driver
        page_size, page_count = drv.geometry(entry.vm)
        manifest = request.manifest
        assert manifest is not None
        mig = MigrationRequest(
            request.operation, entry.name, page_size, page_count, grant, entry.binding, manifest.digest()
        )
        channel, auth = await self.open_channel(mig, request.destination, request.destination_address, handle)
        try:
            await send_manifest(channel, manifest, page_size)
            try:
                report = await drv.send(entry.vm, channel, auth, handle, request)
            except Exception as err:
                if _after_commit_point(channel):  # the VM stays paused here: the register decides
                    await self._source_in_doubt(entry, request, channel, auth, err)
                raise
            await self._commit_source(entry, request, channel, auth)
        except ChannelClosed as err:
            raise MigrationAborted(f"connection to {request.destination} lost: {err}") from err
        finally:
            await channel.close()
        return report

    # -- the commit (see secmig.security.state for the table, secmig.security.register for the register) --

    async def _commit_source(
        self, entry: VMEntry, request: SendRequest, channel: SecureChannel, auth: Authorized
    ) -> None:
        """The destination voted (PREPARED): the register moves the VM, then it is released here and the
        destination told (CONFIRM). A copy, clone or template moves nothing: confirm, run on."""
        move = Move.of(auth) if request.operation.relocates else None
        crash_point("source.prepared")
        if move is None:
            await channel.send(Confirm())
            await entry.driver.resume(entry.vm)
            await _final_word(channel)
            return
        assert self._register is not None and self.audit is not None
        try:
            await self._in_register(self._register.commit, move, self.host_id)
        except RegisterConflict as err:
            # The register refused (a stale binding, a move decided otherwise): it will never happen.
            with contextlib.suppress(SecmigError, OSError):  # the link may be gone: the VM runs here anyway
                await channel.send(Abort(f"location register: {err}"[:300], AbortCode.AUTHORIZATION))
            await entry.driver.resume(entry.vm)
            self.audit.record("migration.refused", Decision.REFUSE, entry.name, {"by": "register", "reason": str(err)})
            raise MigrationAborted(f"the location register refused the move of {entry.name}: {err}") from err
        except RegisterUnavailable as err:
            channel.conn.link_lost(f"register: {err}")
            await self._source_in_doubt(entry, request, channel, auth, err)
            return
        crash_point("source.registered")
        await self._release_source(entry, request)
        if channel.conn.state is State.IN_DOUBT:  # the link went while the register answered
            channel.conn.register_decided(True)
            return
        with contextlib.suppress(SecmigError, OSError):
            await channel.send(Confirm())
            crash_point("source.confirmed")
            await _final_word(channel)

    async def _source_in_doubt(
        self, entry: VMEntry, request: SendRequest, channel: SecureChannel, auth: Authorized, err: BaseException
    ) -> None:
        """COMMIT is out and the link (or the register) failed: nothing runs until the register answers.
        Returns when the VM moved (released here); raises when it stayed (running here again)."""
        move = Move.of(auth) if request.operation.relocates else None
        channel.conn.link_lost(str(err)[:200])
        if move is None:
            await entry.driver.resume(entry.vm)
            if channel.conn.state is State.IN_DOUBT:
                channel.conn.register_decided(False)
            raise MigrationAborted(f"{request.operation.value} of {entry.name} failed: {err}") from err
        outcome = await self._ask_register(move, channel.conn, entry.name)
        if outcome is MoveOutcome.MOVED:
            await self._release_source(entry, request)
            return
        await entry.driver.resume(entry.vm)
        raise MigrationAborted(
            f"link to {request.destination} lost after COMMIT; the location register kept {entry.name} here: {err}"
        ) from err

    async def _ask_register(self, move: Move, conn: MigrationConnection, vm: str) -> MoveOutcome:
        """The register's answer about ``move`` (recording STAYED when undecided); retried until it answers."""
        assert self._register is not None and self.audit is not None
        delay = 0.05
        while True:
            try:
                outcome = await self._in_register(self._register.resolve, move, self.host_id)
                break
            except RegisterUnavailable as err:
                if self.state is not AgentState.RUNNING:  # shutting down: the copy stays for the next start
                    raise MigrationError(f"{vm}: in doubt at shutdown; the register decides at restart") from err
                self.logger.warning("%s: location register unavailable, %s stays paused: %s", vm, vm, err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if conn.state is State.IN_DOUBT:
            conn.register_decided(outcome is MoveOutcome.MOVED)
        self.audit.record("migration.resolved", Decision.INFO, vm, {"outcome": outcome.value, "epoch": move.next.epoch})
        return outcome

    def _trust_snapshot(self) -> ClusterTrust:
        assert self._register_trust is not None  # taken at start
        return self._register_trust

    async def _in_register(self, call: Callable[..., T], *args: Any) -> T:
        """A register call in a worker thread (a file lock or a TLS round trip), with fresh trust material."""
        self._register_trust = self.trust()
        return await asyncio.to_thread(call, *args)

    async def _release_source(self, entry: VMEntry, request: SendRequest) -> None:
        """The register holds the new epoch: a relocated VM is released here (wiped)."""
        self.vms.pop(entry.name, None)
        self._unwatch_nics(entry.name)
        await entry.driver.destroy(entry.vm)
        assert self.audit is not None
        self.audit.record(
            "vm.released", Decision.INFO, entry.name, {"to": request.destination, "driver": entry.driver.kind.value}
        )

    async def _finish_incoming(
        self, channel: SecureChannel, auth: Authorized, driver: VMDriver[Any], vm: Any, manifest: Manifest
    ) -> None:
        """The destination voted (PREPARED) and holds ``vm`` loaded and paused: it runs only once the source
        confirmed and the register holds the new epoch here; a lost link asks the register. On STAYED (or
        the source's abort) the copy is wiped."""
        move = Move.of(auth) if auth.operation.relocates else None
        try:
            event = await channel.next_event(self.config.migration.idle_timeout)
        except (SecmigError, TimeoutError) as err:
            event = Aborted(AbortCode.PROTOCOL, f"no CONFIRM: {err}", by_peer=False)
        confirmed = isinstance(event, Confirm)
        if confirmed:
            crash_point("destination.confirmed")
        if isinstance(event, Aborted) and event.by_peer:
            await driver.destroy(vm)
            raise event.as_error()
        if move is None and not confirmed:
            await driver.destroy(vm)
            raise MigrationAborted(f"{auth.operation.value} of {auth.vm_id}: no CONFIRM from {auth.peer_host}")
        if move is not None:
            if not confirmed:
                channel.conn.link_lost(str(getattr(event, "reason", event))[:200])
            # Even on CONFIRM the destination asks the register itself: a source cannot make it run a VM.
            if await self._ask_register(move, channel.conn, auth.vm_id) is MoveOutcome.STAYED:
                await driver.destroy(vm)
                raise MigrationAborted(f"the location register kept {auth.vm_id} on {auth.peer_host}")
            crash_point("destination.registered")
        if not self._received_is_stored(auth, manifest):
            await driver.resume(vm)
        entry = self.install_vm(auth, driver, vm, manifest)
        crash_point("destination.resumed")
        if channel.conn.state is State.CONFIRMED:
            with contextlib.suppress(SecmigError, OSError):
                await channel.send(Committed())
        if not entry.stored and auth.operation in (Operation.MIGRATE, Operation.MOVE, Operation.CLONE):
            self._spawn(self._reverify_mac(entry), f"reverify {entry.name}")  # the connection ends meanwhile

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
        assert self._admission is not None
        log.debug("connection from %s", peer)
        # A slot under the pre-authorization cap; until authenticated, its audit rows are rate-limited.
        first = bytearray()
        ticket = self._admission.admit(str(peer), writer.transport.abort, lambda: len(first))
        timeout_s = min(self.config.migration.handshake_timeout, self._admission.handshake_timeout_s)
        t0 = time.monotonic()
        # Nothing is built for a peer that has sent nothing: an idle connection costs a descriptor only.
        with contextlib.suppress(TimeoutError, OSError, ConnectionError):
            first += await asyncio.wait_for(reader.read(READ_CHUNK), timeout_s)
        if not first:
            ticket.release()
            ticket.audit.record("connection.idle", Decision.REFUSE, str(peer), {"waited_s": round(timeout_s, 3)})
            writer.transport.abort()
            return
        assert self._register is not None
        conn = MigrationConnection.destination(
            self.identity,
            self.trust,
            audit=ticket.audit,
            authorizer=RegisterAuthorizer(GrantAuthorizer(self._host_state, self._host_state), self._register),
        )
        channel = SecureChannel(conn, reader, writer, log, idle_timeout_s=self.config.migration.idle_timeout)
        channel.bytes_in += len(first)
        conn.receive_data(first)
        channel.start()
        crash_point("destination.handshake")
        handle: MigrationHandle | None = None
        try:
            auth = await channel.authorized(max(0.1, timeout_s - (time.monotonic() - t0)))
            ticket.mark_authenticated()
            log.info("%s of %s from %s authorized", auth.operation.value, auth.vm_id, auth.peer_host)
            if auth.vm_id in self.vms or auth.vm_id in self.migrations:
                raise StateError(f"VM {auth.vm_id!r} already exists on {self.host_id}")
            handle = MigrationHandle(auth.vm_id, Role.DESTINATION, auth.peer_host)
            handle.authorize(auth.operation, None)  # the handshake checked the grant and consumed it
            self._track(handle, auth.page_size * auth.page_count)
            manifest = await receive_manifest(channel, self.config.migration.idle_timeout)
            self._admit_manifest(auth, manifest)
            assert self._drivers is not None
            drv = self._drivers.lookup(manifest.driver)
            vm = await drv.receive(channel, auth, handle, manifest)
            await self._finish_incoming(channel, auth, drv, vm, manifest)
            self.stats["payload_bytes_received"] += handle.bytes
        except asyncio.CancelledError:
            log.info("cancelled: incoming migration discarded")
            raise
        except Exception as err:  # anything (not only our tree) ends this connection only, audited
            self.stats["refused"] += 1
            if handle is not None:
                self.stats["payload_bytes_received"] += handle.bytes
            expected = isinstance(err, SecmigError)
            if expected:
                log.warning("incoming migration dropped: %s", err)
            else:
                log.error("incoming migration failed unexpectedly", exc_info=err)
            with contextlib.suppress(Exception):  # the driver may have said so already
                await channel.send(Abort(str(err)[:300] or type(err).__name__, AbortCode.REQUESTED))
            with contextlib.suppress(Exception):
                subject = handle.vm if handle else str(peer)
                detail: dict[str, str | int | float | bool | None] = {"reason": str(err)[:300]}
                if not expected:
                    detail["error"] = type(err).__name__
                event = "migration.discarded" if expected else "connection.error"
                ticket.audit.record(event, Decision.REFUSE, subject, detail)
        finally:
            ticket.release()
            if handle is not None:
                self._untrack(handle)
                if handle.destroy_requested and handle.vm in self.vms:
                    await self.destroy_vm(handle.vm, handle.abort_reason or "destroy requested")
            await channel.close()

    def _admit_manifest(self, auth: Authorized, manifest: Manifest) -> None:
        """Round 0 is in: the manifest the grant binds (or one that needs none), and a new VM's binding
        that is signed, new and places it here. Refused before the first page of the VM."""
        check_manifest(manifest, auth)
        if manifest.clone_binding is None:
            if manifest.driver is DriverKind.QEMU and auth.operation in (Operation.CLONE, Operation.TEMPLATE):
                raise AuthorizationError(f"{auth.operation.value} of {auth.vm_id!r}: no binding for the new VM")
            return
        if auth.operation not in (Operation.CLONE, Operation.TEMPLATE) or manifest.driver is not DriverKind.QEMU:
            raise AuthorizationError("a new VM binding goes with a clone or template of a QEMU VM only")
        try:
            new = LocationBinding.from_json(manifest.clone_binding)
        except DocumentFormatError as err:
            raise AuthorizationError(f"new VM binding: {err}") from err
        check_binding_signature(new, self.trust().roots())
        if new.host_id != self.host_id or new.epoch != 0 or new.vm_id == auth.vm_id:
            raise AuthorizationError(f"new VM binding places {new.vm_id!r} on {new.host_id!r} at epoch {new.epoch}")
        if new.vm_id in self.vms or new.vm_id in self.migrations:
            raise StateError(f"VM {new.vm_id!r} already exists on {self.host_id}")
        defn = manifest.vm.get("definition")
        old_macs = {n.get("mac") for n in defn.get("nics", [])} if isinstance(defn, dict) else set()
        if auth.operation is Operation.CLONE and new.vm_mac in old_macs:
            raise AuthorizationError(f"clone {new.vm_id!r}: its MAC {new.vm_mac} is not new")

    @staticmethod
    def _received_is_stored(auth: Authorized, manifest: Manifest | None) -> bool:
        """Whether a received VM is kept paused (a copy, a template) rather than run here."""
        if manifest is not None and manifest.clone_binding is not None:
            return auth.operation is not Operation.CLONE
        return not auth.operation.relocates

    def install_vm(self, auth: Authorized, driver: VMDriver[Any], vm: Any, manifest: Manifest | None = None) -> VMEntry:
        """COMMITTED is sent: register the received VM, running with its new binding when relocated or
        cloned (under the clone's id), else a stored image — a paused copy, a template (the destination
        side of the commit, here once for every driver)."""
        name, binding, stored = auth.vm_id, auth.next_binding, not auth.operation.relocates
        if manifest is not None and manifest.clone_binding is not None:
            new = LocationBinding.from_json(manifest.clone_binding)
            name, binding = new.vm_id, new
            stored = auth.operation is not Operation.CLONE
        entry = VMEntry(name, driver, vm, binding, stored=stored)
        self.vms[name] = entry
        keep_stored = getattr(driver, "keep_stored", None)
        if stored and keep_stored is not None:
            keep_stored(vm)
        assert self.audit is not None
        detail: dict[str, Any] = {"from": auth.peer_host, "operation": auth.operation.value, "stored": entry.stored}
        if name != auth.vm_id:
            detail.update({"of": auth.vm_id, "mac": None if binding is None else binding.vm_mac})
        self.audit.record("vm.received", Decision.ALLOW, name, detail)
        self._watch_nics(entry)
        return entry

    # -- QEMU VMs' NICs: the NIC monitor and MAC re-verification, called from small hooks ------------------

    def _binding_check(self) -> BindingCheck:
        """The identity check of a VM here: its binding, the cluster's roots, the newest epoch this host saw."""
        return BindingCheck(
            self.host_id,
            lambda vm: self.vms[vm].binding if vm in self.vms else None,
            lambda: self.trust().roots(),
            lambda vm: self._host_state.latest_epoch(vm) if self._host_state is not None else None,
        )

    def _watch_nics(self, entry: VMEntry) -> None:
        """Hook: a QEMU VM runs here (started, resumed, received): the NIC monitor judges its NICs."""
        if self.nic_monitor is None or entry.stored or entry.driver.kind is not DriverKind.QEMU:
            return
        from secmig.agent.drivers.qemu import QemuVM, nic_specs

        if isinstance(entry.vm, QemuVM) and (nics := nic_specs(entry.vm, self.config.monitor.preset_rate)):
            self.nic_monitor.watch_vm(entry.name, nics, entry.vm.ram_bytes)

    def _unwatch_nics(self, name: str) -> None:
        """Hook: VM ``name`` leaves this host (stopped, destroyed, released): no longer judged, tc caps removed."""
        if self.nic_monitor is not None:
            self.nic_monitor.unwatch_vm(name)

    async def _reverify_mac(self, entry: VMEntry) -> None:
        """Hook, after a migrate, move or clone committed here: QEMU announces the guest, the MACs seen on its
        first NIC's tap are checked against its binding (audited); a mismatch destroys the VM. A clone's
        first NIC is swapped first (hot-unplug of the source's, hot-plug of one with the clone's MAC,
        audited as ``vm.nic_swapped``), so that its guest, whose kernel came from the source, takes the new MAC."""
        from secmig.agent.drivers.qemu import QemuVM, announce_self, swap_first_nic

        vm = entry.vm
        if not isinstance(vm, QemuVM) or not vm.machine.config.nics:
            return
        nic = vm.machine.config.nics[0]  # the binding names the first NIC's MAC
        if vm.nic_swap_pending:
            try:
                swapped = await swap_first_nic(vm)
            except SecmigError as err:  # the re-verification below judges whatever NIC the guest kept
                swapped = {"error": str(err)[:300]}
                self.logger.warning("%s: NIC swap failed: %s", entry.name, err)
            if self.audit is not None:
                event = "vm.nic_swap_failed" if "error" in swapped else "vm.nic_swapped"
                self.audit.record(event, Decision.INFO, entry.name, swapped)
        try:
            check = await reverify_mac(
                self._binding_check(),
                entry.name,
                nic.bridge,
                nic.tap,
                announce=lambda: announce_self(vm),
                audit=self.audit,
            )
        except SecmigError as err:
            reason = f"MAC re-verification impossible: {err}"
        else:
            if check.verdict.ok:
                return
            reason = f"MAC re-verification: {check.verdict.reason}"
        if self.vms.get(entry.name) is entry:  # not stopped meanwhile
            await self.destroy_vm(entry.name, reason)

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
        if op == "vm.define":
            return self.define_vm(args["definition"], str(args.get("source", "definition")))
        if op == "vm.definition":
            return self.definition_of(args["name"])
        if op == "vm.definitions":
            return self.list_definitions()
        if op == "vm.manifest":
            address = parse_address(str(args["address"])) if args.get("address") else None
            manifest = self.manifest_for(
                args["name"],
                args["to"],
                args.get("operation", "migrate"),
                address=address,
                data_plane=args.get("data_plane", "relay"),
                clone_binding=args.get("clone_binding"),
                from_template=bool(args.get("from_template", False)),
                auto_converge=bool(args.get("auto_converge", False)),
                postcopy=bool(args.get("postcopy", False)),
            )
            return {"manifest": manifest.document(), "digest": manifest.digest().hex()}
        if op == "vm.start":
            return await self.start_vm(
                args["name"], args.get("driver", "memory"), args.get("spec") or {}, args.get("binding")
            )
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
                clone_binding=args.get("clone_binding"),
                from_template=bool(args.get("from_template", False)),
                auto_converge=bool(args.get("auto_converge", False)),
                postcopy=bool(args.get("postcopy", False)),
            )
            return report.to_json()
        if op == "shutdown":
            self._stopped.set()
            return {"stopping": True}
        raise AgentError(f"unknown control request {op!r}")
