"""The QEMU driver: QEMU VMs on an agent's host behind :class:`~secmig.agent.driver.VMDriver`, and their
migration over the two data planes.

The manifest (round 0, slot 0; see :mod:`secmig.agent.manifest`) carries the VM's RAM, accelerator and
guest parameters; the stream follows from round 1.

- **relay**: the source QEMU migrates into a UNIX socket of the source agent, which streams the bytes
  over the authenticated channel as PAGE_BATCH "pages" of :data:`STREAM_CHUNK` bytes from slot 1, the
  tail in DEVICE_STATE; the destination agent feeds
  them to a QEMU started with ``-incoming defer -S``. QEMU is told to migrate only once the channel is
  AUTHORIZED, so not one byte of its stream leaves the host before; every byte is counted for the monitor.
- **qemu-tls**: the agents authenticate and authorize over their channel as above (manifest only), then
  each configures its QEMU's own TLS — ``tls-creds-x509`` from the hosts' cluster-CA certificates,
  ``tls-authz`` on the destination admitting only the authorized source's certificate name, and
  ``tls-hostname`` on the source naming the authorized destination — and QEMU carries the pages itself,
  to the destination's ``qemu.tls_port`` (by default its agent's port + 1; the source asks for that port
  in the manifest, and the destination refuses a request for another).

Crash safety (issue 12): with the agent's :class:`~secmig.agent.vmstate.VMStore`, every QEMU runs
detached from the agent (its own session, no parent-death signal, the store's owner token in its
environment) and has a state file rewritten before each step a restart must know of — RUNNING,
SENDING, COMMITTING (before COMMIT goes out), RECEIVING (once the incoming QEMU runs), PREPARED (before
the vote), STORED — with QEMU's pid, work directory (QMP socket), RAM file and definition. A restarted
agent re-adopts it (:meth:`QemuDriver.adopt`) or kills and scrubs it (:meth:`QemuDriver.wipe`) as
:func:`~secmig.agent.vmstate.decide` says; a clean stop quits every QEMU but a copy in doubt. The
``source.transfer``, ``source.commit``, ``destination.transfer``, ``destination.commit`` and
``destination.prepared`` crash points (test hook) are here, as in the in-memory driver.

Either way the destination resumes its QEMU (``cont``) only on COMMIT, after QEMU has loaded the whole
stream, and the source quits its QEMU only on COMMITTED; before that any failure resumes the source
(``cont`` from postmigrate) and kills the destination QEMU. Figures come from ``query-migrate``, polled
as QEMU's own harness does: its rounds (one per dirty-bitmap sync) become the same
:class:`~secmig.migration.RoundRecord` the simulator and the in-memory driver report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from secmig.agent.channel import SecureChannel
from secmig.agent.driver import DriverContext, SendRequest
from secmig.agent.manifest import FIRST_DATA_ROUND, MANIFEST_SLOT, Manifest
from secmig.agent.nicmonitor import NicSpec, self_destruct
from secmig.agent.qemu.guest import GuestParams, build_guest
from secmig.agent.qemu.machine import (
    Accel,
    DiskConfig,
    MachineConfig,
    NicConfig,
    QemuMachine,
    bridge_exists,
    choose_accel,
    find_qemu,
    kill_pid,
    owned_qemu_name,
    scrub_ram,
)
from secmig.agent.report import MigrationHandle, MigrationReport
from secmig.agent.vmdef import ReferenceGuest, VMDefinition, definition_from_json, reference_definition
from secmig.agent.vmstate import IN_DOUBT_PHASES, VMPhase, VMRecord, VMStore, crash_point
from secmig.agent.vocab import DataPlane, DriverKind
from secmig.errors import ChannelClosed, ConfigError, MigrationAborted, MigrationError, QemuError, StateError
from secmig.migration import RoundRecord
from secmig.migration.result import MigrationResult
from secmig.model.units import PAGE_SIZE
from secmig.security import frames
from secmig.security.audit import Decision
from secmig.security.cluster import HostIdentity
from secmig.security.credentials import LocationBinding
from secmig.security.events import (
    Abort,
    AbortCode,
    Aborted,
    Authorized,
    Commit,
    Committed,
    DeviceState,
    PageBatch,
    Prepared,
    Role,
    RoundEnd,
    RoundStart,
    StopAndCopy,
)
from secmig.security.pki import certificate_pem
from secmig.security.policy import Operation
from secmig.security.register import Move
from secmig.security.state import RUNNER, State

STREAM_CHUNK = 256 * 1024
"""Bytes of QEMU's stream per protocol "page" (a batch carries up to 16 of them: 4 MiB)."""
BATCH_CHUNKS = 16
MAX_STREAM_FACTOR = 6
"""A stream longer than this × RAM (+ 64 MiB) is refused: it bounds the destination's digest table."""
POLL_S = 0.1
"""How often query-migrate is polled: every query takes QEMU's big lock (QEMU's own harness polls so)."""
_MIB = 1 << 20
_ACTIVE = ("active", "setup", "device", "pre-switchover")
_CRASH_AFTER_BYTES = 1 << 20
"""Test hook: the ``*.transfer`` crash points fire once this much of QEMU's stream crossed."""
RAM_DIR = Path("/dev/shm")
"""Where a QEMU VM's RAM backing file lives (tmpfs: RAM, never a disk), so that a destroy can scrub it."""


def ram_file(host_id: str, vm: str) -> Path | None:
    """The RAM backing file of ``vm`` on ``host_id`` (both are checked ids); None without /dev/shm."""
    return RAM_DIR / f"secmig-{host_id}-{vm}.ram" if RAM_DIR.is_dir() else None


class QemuVM:
    """A QEMU process running a VM definition (a user's VM, or the reference guest), owned by the agent."""

    def __init__(self, name: str, machine: QemuMachine, definition: VMDefinition, workdir: Path) -> None:
        self.name = name
        self.machine = machine
        self.definition = definition
        rg = definition.boot.reference_guest
        self.params = None if rg is None else _guest_params(rg)
        """The reference guest's parameters (None for any other guest)."""
        self.workdir = workdir
        self.paused = False
        self.nic_swap_pending = False
        """A clone whose first NIC still carries the source's device state (and MAC): the daemon swaps it
        (:func:`swap_first_nic`) once the clone runs, before the MAC re-verification."""

    @property
    def ram_bytes(self) -> int:
        return self.machine.config.ram_bytes

    @property
    def memory_path(self) -> Path | None:
        """The guest's RAM backing file (scrubbed when the VM is stopped or destroyed)."""
        return self.machine.config.memory_path

    def describe(self) -> dict[str, object]:
        """One row of ``secmig vm list``."""
        state = "running" if self.machine.running and not self.paused else ("paused" if self.paused else "dead")
        return {
            "name": self.name,
            "driver": DriverKind.QEMU.value,
            "state": state,
            "ram_bytes": self.ram_bytes,
            "nic_macs": [n.mac for n in self.machine.config.nics],
            "taps": [n.tap for n in self.machine.config.nics],
        }

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """``quit`` QEMU, scrub its RAM backing file, remove its work directory."""
        await self.machine.shutdown(timeout_s=timeout_s)
        await self.discard()

    async def discard(self) -> None:
        """Once QEMU is gone: scrub its RAM backing file and remove its work directory."""
        if self.memory_path is not None:
            await asyncio.to_thread(scrub_ram, self.memory_path)
        shutil.rmtree(self.workdir, ignore_errors=True)


class QemuTemplate:
    """A template (Table 4.1): a VM's migration stream stored in a file with its definition. No process
    runs it and nothing can start it; ``clone --from-template`` relays the stream into a new QEMU."""

    def __init__(self, name: str, definition: VMDefinition, stream_path: Path, accel: str) -> None:
        self.name = name
        self.definition = definition
        self.stream_path = stream_path
        self.accel = accel
        self.paused = True

    @property
    def ram_bytes(self) -> int:
        return self.definition.memory

    @property
    def stream_bytes(self) -> int:
        return self.stream_path.stat().st_size

    def describe(self) -> dict[str, object]:
        """One row of ``secmig vm list``."""
        return {
            "name": self.name,
            "driver": DriverKind.QEMU.value,
            "state": "template",
            "ram_bytes": self.ram_bytes,
            "stream_bytes": self.stream_bytes,
        }

    def remove(self) -> None:
        """Delete the stored stream (zeroed first: it is the guest's memory)."""
        with contextlib.suppress(OSError):
            size = self.stream_path.stat().st_size
            with open(self.stream_path, "r+b") as fh:
                for off in range(0, size, STREAM_CHUNK):
                    fh.write(bytes(min(STREAM_CHUNK, size - off)))
                fh.flush()
                os.fsync(fh.fileno())
            self.stream_path.unlink()


QemuItem = QemuVM | QemuTemplate


def nic_specs(vm: QemuVM, default_preset_bytes_per_s: float) -> list[NicSpec]:
    """What the NIC monitor watches of a VM: each NIC's tap and bridge, its preset (the definition's, else
    the host's), its MAC and the guest's address on it (for RTT probes)."""
    return [
        NicSpec(vm.name, cfg.tap, cfg.bridge, nic.rate or default_preset_bytes_per_s, mac=nic.mac, ip=nic.ip)
        for nic, cfg in zip(vm.definition.nics, vm.machine.config.nics, strict=True)
    ]


async def announce_self(vm: QemuVM, rounds: int = 5, step_ms: int = 50) -> None:
    """QEMU's ``announce-self``: RARP frames from every NIC's MAC (a virtio-net guest that negotiated it is
    also asked to announce itself, with whatever MAC it uses)."""
    await vm.machine.execute("announce-self", {"initial": step_ms, "max": step_ms, "rounds": rounds, "step": 0})


NIC_SWAP_TIMEOUT_S = 10.0
"""How long the guest has to let go of its NIC (ACPI eject) when a clone's NIC is swapped."""


async def _peripherals(machine: QemuMachine) -> set[str]:
    return {str(c["name"]) for c in await machine.execute("qom-list", {"path": "/machine/peripheral"})}


async def _pci_address(machine: QemuMachine, qdev_id: str) -> tuple[str, int] | None:
    """(bus id, slot) of the PCI device ``qdev_id`` on the root bus; None elsewhere (QEMU then picks)."""
    for bus in await machine.execute("query-pci"):
        for dev in bus.get("devices", []):
            if dev.get("qdev_id") == qdev_id and dev.get("function", 0) == 0 and bus.get("bus", 0) == 0:
                return "pci.0", int(dev["slot"])  # the root bus of QEMU's pc and q35 machines
    return None


async def _flush_fdb(tap: str) -> None:
    """Forget what the bridge learned on ``tap``'s port (the source's MAC, from the NIC before the swap)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "link", "set", "dev", tap, "type", "bridge_slave", "fdb_flush",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await proc.communicate()
    if proc.returncode != 0:
        raise QemuError(f"cannot flush the bridge's entries on {tap}: {err.decode(errors='replace').strip()}")


async def swap_first_nic(
    vm: QemuVM, timeout_s: float = NIC_SWAP_TIMEOUT_S
) -> dict[str, str | int | float | bool | None]:
    """Give a running clone's guest a new first NIC with the clone's MAC: PCI hot-unplug + hot-plug.

    A clone's RAM and device state are the source's, so its guest kernel keeps the source's MAC on its NIC
    (QEMU's migrated virtio-net state carries it too). This swaps the device under the guest, as a platform
    engineer can with an unmodified guest (no agent inside it): ``device_del`` of ``nic0`` (the guest's
    ACPI PCI hotplug ejects it; polled until QEMU removed it, i.e. DEVICE_DELETED), the bridge forgets what
    it learned on the tap's port, then ``device_add`` of the same model on the same bus and slot, on the same
    tap (``net0``, which stays plugged into the vSwitch), with the MAC of the clone's definition. The guest
    sees a new ethN appear and configures it as it would at boot. Returns timings for the audit log;
    QemuError when a step fails or the guest does not release its NIC within ``timeout_s``.
    """
    machine = vm.machine
    nic = machine.config.nics[0]
    t0 = time.monotonic()
    where = await _pci_address(machine, "nic0")
    await machine.execute("device_del", {"id": "nic0"})
    deadline = t0 + timeout_s
    while "nic0" in await _peripherals(machine):
        if time.monotonic() > deadline:
            raise QemuError(f"{vm.name}: the guest did not release its NIC in {timeout_s:.0f} s (no ACPI hotplug?)")
        await asyncio.sleep(0.02)
    t_gone = time.monotonic()
    await _flush_fdb(nic.tap)
    args: dict[str, Any] = {"driver": nic.model, "id": "nic0", "netdev": "net0", "mac": nic.mac}
    if where is not None:
        args.update({"bus": where[0], "addr": f"0x{where[1]:x}"})
    await machine.execute("device_add", args)
    t_done = time.monotonic()
    vm.nic_swap_pending = False
    return {
        "mac": nic.mac,
        "tap": nic.tap,
        "pci_slot": None if where is None else where[1],
        "unplug_s": round(t_gone - t0, 3),
        "total_s": round(t_done - t0, 3),
    }


def _guest_params(rg: ReferenceGuest) -> GuestParams:
    return GuestParams(
        working_set_bytes=rg.working_set, rate_pages_per_s=int(rg.rate), pattern=rg.pattern, seed=rg.seed
    )


def _stream_slots(ram_bytes: int) -> int:
    return (MAX_STREAM_FACTOR * ram_bytes + 64 * _MIB) // STREAM_CHUNK + 1


TLS_DIR = "qemu-tls"
"""Under the agent's state folder (0700): QEMU's per-migration credential folders, never in /tmp."""


def tls_parent(state_dir: Path) -> Path:
    """``STATE_DIR/qemu-tls``, created private (0700) if missing."""
    parent = state_dir / TLS_DIR
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(parent, 0o700)
    return parent


def sweep_tls_dirs(state_dir: Path) -> int:
    """Remove every credential folder a killed agent left (start-up); returns how many there were."""
    parent = state_dir / TLS_DIR
    if not parent.is_dir():
        return 0
    leftovers = [d for d in parent.iterdir() if d.is_dir() and not d.is_symlink()]
    for d in leftovers:
        shutil.rmtree(d, ignore_errors=True)
    return len(leftovers)


def write_tls_dir(identity: HostIdentity, ca_pem: bytes, endpoint: str, state_dir: Path) -> Path:
    """QEMU's tls-creds-x509 directory: ca-cert.pem and this host's cluster certificate and key.

    A private folder (0700) under ``STATE_DIR/qemu-tls`` (0700), every file created 0600 and exclusively:
    the caller removes it when the migration ends, and :func:`sweep_tls_dirs` at start-up when it did not
    (a killed agent)."""
    d = Path(tempfile.mkdtemp(prefix="secmig-tls-", dir=tls_parent(state_dir)))
    key = identity.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files = {"ca-cert.pem": ca_pem, f"{endpoint}-cert.pem": certificate_pem(identity.certificate)}
    files[f"{endpoint}-key.pem"] = key
    for name, data in files.items():
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return d


def _num(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, int | float) else None


@dataclass(frozen=True, slots=True)
class _Sample:
    t_s: float
    """Since the migrate command."""
    dirty_syncs: int
    transferred_bytes: int


class _Sampler:
    """query-migrate answers seen during one migration (the live rounds are read from them)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.samples: list[_Sample] = []

    def see(self, info: dict[str, Any]) -> None:
        ram = info.get("ram")
        if info.get("status") == "active" and isinstance(ram, dict):
            syncs, sent = _num(ram, "dirty-sync-count"), _num(ram, "transferred")
            if syncs is not None and sent is not None:
                self.samples.append(_Sample(time.monotonic() - self.t0, int(syncs), int(sent)))


def qemu_rounds(samples: list[_Sample], info: dict[str, Any], offset_s: float = 0.0) -> tuple[RoundRecord, ...]:
    """QEMU's rounds as :class:`RoundRecord`: one per dirty-bitmap sync, the last one the stop-and-copy.

    QEMU reports running totals, not rounds: a round starts at the first poll that saw its sync, and its
    bytes are the growth of ``transferred`` until the next round's start. A sync QEMU made between two
    polls shows as a zero-length round (its bytes go to the round the poll saw). Pages are bytes ÷ the
    guest's page size; QEMU does not say how many pages each round left dirty (0).
    """
    ram = info.get("ram") if isinstance(info.get("ram"), dict) else {}
    assert isinstance(ram, dict)
    n = int(_num(ram, "dirty-sync-count") or 0)
    total_ms, down_ms = _num(info, "total-time"), _num(info, "downtime")
    if n <= 0 or total_ms is None or down_ms is None:
        return ()
    transferred = int(_num(ram, "transferred") or 0)
    down_bytes = _num(ram, "downtime-bytes")
    stop_s = (total_ms - down_ms) / 1000
    last_live = samples[-1].transferred_bytes if samples else transferred
    live_end = (transferred - int(down_bytes)) if down_bytes is not None else last_live
    starts: list[tuple[float, int]] = [(0.0, 0)]
    for k in range(1, n - 1):  # live round k begins with the sync that makes the count k + 1
        hit = next(((x.t_s, x.transferred_bytes) for x in samples if x.dirty_syncs >= k + 1), (stop_s, live_end))
        starts.append((min(hit[0], stop_s), min(hit[1], live_end)))
    ends = [*starts[1:], (stop_s, live_end)]
    records = [
        RoundRecord(i, offset_s + t0, max(t1 - t0, 0.0), max(b1 - b0, 0) // PAGE_SIZE, 0, max(b1 - b0, 0), 0, True)
        for i, ((t0, b0), (t1, b1)) in enumerate(zip(starts, ends, strict=True))
    ]
    last = max(transferred - live_end, 0)
    records.append(RoundRecord(n - 1, offset_s + stop_s, down_ms / 1000, last // PAGE_SIZE, 0, last, 0, False))
    return tuple(records)


async def _query(machine: QemuMachine) -> dict[str, Any]:
    info = await machine.execute("query-migrate")
    return info if isinstance(info, dict) else {}


async def _wait_status(
    machine: QemuMachine, want: set[str], timeout_s: float, poll_s: float = 0.02, sampler: _Sampler | None = None
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = await _query(machine)
        if sampler is not None:
            sampler.see(info)
        status = str(info.get("status", ""))
        if status in want or status == "failed":
            return info
        if time.monotonic() > deadline:
            raise MigrationError(f"{machine.name}: migration still {status or 'idle'} after {timeout_s:.0f} s")
        await asyncio.sleep(poll_s)


async def _sample_until(machine: QemuMachine, sampler: _Sampler, done: asyncio.Event) -> None:
    # Stopped by the event, never cancelled: a QMP command cut off mid-way would upset the client.
    with contextlib.suppress(QemuError):
        while not done.is_set():
            sampler.see(await _query(machine))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), POLL_S)


def _capabilities(request: SendRequest) -> list[dict[str, Any]]:
    """QEMU's migration capabilities for this operation (set every time: a VM may be sent more than once)."""
    return [
        {"capability": "auto-converge", "state": request.auto_converge},
        {"capability": "postcopy-ram", "state": request.postcopy},
    ]


async def _start_postcopy(machine: QemuMachine, sampler: _Sampler, timeout_s: float = 600.0) -> None:
    """Switch an active migration to post-copy after its first full pass (when it ended before, nothing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = await _query(machine)
        sampler.see(info)
        ram = info.get("ram") if isinstance(info.get("ram"), dict) else {}
        if info.get("status") != "active" and info.get("status") not in ("setup", None, ""):
            return
        if isinstance(ram, dict) and int(_num(ram, "dirty-sync-count") or 0) >= 2:
            with contextlib.suppress(QemuError):  # it may just have completed
                await machine.execute("migrate-start-postcopy")
            return
        await asyncio.sleep(POLL_S / 2)


class QemuDriver:
    """This host's QEMU processes: start them, migrate them out, receive them."""

    kind = DriverKind.QEMU

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.logger = ctx.logger.getChild("qemu")
        self._elf: Path | None = None
        self.store: VMStore | None = ctx.vm_store
        self.owner: str | None = None if self.store is None else self.store.owner()
        """This agent's token in its QEMUs' environment (None without a store: QEMU dies with the agent)."""

    # -- crash safety (see secmig.agent.vmstate) -------------------------------------------------------

    def _record(self, vm: QemuItem, phase: VMPhase, **fields: Any) -> None:
        """Write ``vm``'s state file (before the step it describes); nothing for a template or without a store."""
        if self.store is None or not isinstance(vm, QemuVM) or vm.machine.pid is None:
            return
        old = self.store.get(vm.name)
        binding = fields.pop("binding", None if old is None else old.binding)
        spec = {
            "pid": vm.machine.pid,
            "workdir": str(vm.workdir),
            "ram_file": None if vm.memory_path is None else str(vm.memory_path),
            "accel": vm.machine.config.accel,
            "incoming": vm.machine.config.incoming,
            "definition": vm.definition.to_json(),
        }
        self.store.save(VMRecord(vm.name, phase, spec, binding=binding, move=fields.pop("move", None), driver="qemu"))

    def _forget(self, name: str) -> None:
        if self.store is not None:
            self.store.remove(name)

    def _check_free(self, name: str) -> None:
        if self.store is not None and self.store.get(name) is not None:
            raise StateError(f"VM {name!r} already has a copy on {self.ctx.host_id}")

    async def adopt(self, record: VMRecord) -> QemuVM:
        """The QEMU a crashed agent left running (paused here: the daemon resumes it if it should run);
        its interrupted outgoing migration, if any, is cancelled. QemuError when that QEMU is gone."""
        assert self.owner is not None
        spec = record.spec
        defn = definition_from_json(spec["definition"], f"state of {record.name}")
        accel: Accel = "kvm" if spec.get("accel") == "kvm" else "tcg"
        cfg = await self._machine_config(defn, accel, incoming=bool(spec.get("incoming")))
        workdir = Path(spec["workdir"])
        machine = await QemuMachine.adopt(record.name, cfg, workdir, int(spec["pid"]), self.owner)
        vm = QemuVM(record.name, machine, defn, workdir)
        vm.paused = True
        with contextlib.suppress(QemuError):
            info = await _query(machine)
            if info.get("status") in _ACTIVE:  # the relay or the peer went with the old agent
                await machine.execute("migrate_cancel")
                await _wait_status(machine, {"cancelled", "completed", "failed"}, 10.0)
            status = await machine.execute("query-status")
            vm.paused = not (isinstance(status, dict) and status.get("running"))
        return vm

    def alive(self, record: VMRecord) -> bool:
        """Whether the QEMU ``record`` names still runs (this agent's token and the VM's name checked)."""
        pid = record.spec.get("pid")
        return isinstance(pid, int) and self.owner is not None and owned_qemu_name(pid, self.owner) == record.name

    async def wipe(self, record: VMRecord) -> None:
        """Discard a recorded copy a restarted agent must not run: its QEMU killed (only if it is this
        agent's: pid, name and token checked), its RAM file zeroed, its work directory and record removed."""
        spec = record.spec
        if self.alive(record):
            await asyncio.to_thread(kill_pid, int(spec["pid"]))
        ram = spec.get("ram_file")
        if isinstance(ram, str):
            await asyncio.to_thread(scrub_ram, Path(ram))
        workdir = spec.get("workdir")
        if isinstance(workdir, str):
            shutil.rmtree(workdir, ignore_errors=True)
        self._forget(record.name)

    async def close(self) -> None:
        """Nothing to release beyond the VMs (the agent stops those)."""

    async def _kernel(self) -> Path:
        if self._elf is None:
            self._elf = await asyncio.to_thread(build_guest, None, self.config.qemu.guest_cache)
        return self._elf

    async def _machine_config(self, defn: VMDefinition, accel: Accel, *, incoming: bool) -> MachineConfig:
        """The QEMU command line of a definition on this host (its taps named after host, VM and NIC)."""
        source = f"VM {defn.name}"
        defn.check_files(source)
        for i, nic in enumerate(defn.nics):
            if not bridge_exists(nic.bridge):
                raise ConfigError(f"{source}: nics[{i}].bridge: {nic.bridge!r} is not a bridge on this host")
        rg = defn.boot.reference_guest
        if rg is not None:
            kernel: Path | None = await self._kernel()
            append = _guest_params(rg).append_line()
        else:
            kernel, append = defn.boot.kernel, defn.boot.append
        return MachineConfig(
            kernel,
            append,
            defn.memory,
            accel,
            find_qemu(self.config.qemu.binary),
            incoming=incoming,
            extra_args=(*defn.extra_args, *(("-S",) if incoming else ())),
            initrd=defn.boot.initrd,
            vcpus=defn.vcpus,
            disks=tuple(DiskConfig(d.path, d.format) for d in defn.disks),
            nics=tuple(
                NicConfig(n.mac, defn.tap_name(self.ctx.host_id, i), n.bridge, n.model) for i, n in enumerate(defn.nics)
            ),
            memory_path=ram_file(self.ctx.host_id, defn.name),
        )

    async def _boot(self, name: str, cfg: MachineConfig, defn: VMDefinition) -> QemuVM:
        if cfg.memory_path is not None:
            # Left by a QEMU that died with its agent: QEMU would reuse its bytes (and an incoming
            # migration assumes untouched RAM reads as zeros), so it goes first.
            await asyncio.to_thread(scrub_ram, cfg.memory_path)
        workdir = Path(tempfile.mkdtemp(prefix=f"sq-{name[:12]}-"))
        vm = QemuVM(name, QemuMachine(name, cfg, workdir, owner=self.owner), defn, workdir)
        try:
            await vm.machine.start()
            if not cfg.incoming and defn.boot.reference_guest is not None:
                await vm.machine.wait_guest_running()
        except BaseException:
            await vm.machine.kill()
            await vm.discard()
            raise
        return vm

    def _accel(self, defn: VMDefinition) -> Accel:
        # A definition's "auto" defers to the host's choice (host.yaml's qemu.accel).
        return choose_accel(self.config.qemu.accel if defn.accel == "auto" else defn.accel)

    # -- life cycle -----------------------------------------------------------------------------------

    async def start(self, name: str, spec: dict[str, Any]) -> QemuVM:
        """Boot a VM definition (``{"definition": {...}}``, see :mod:`secmig.agent.vmdef`), or the reference
        guest from ``ram_bytes``, ``working_set_bytes``, ``rate_pages_per_s``, ``pattern``, ``seed``."""
        if "definition" in spec:
            defn = definition_from_json(spec["definition"], f"VM {name}")
        else:
            defn = reference_definition(name, spec)
        if defn.name != name:
            raise ConfigError(f"VM {name}: its definition is named {defn.name!r}")
        self._check_free(name)
        vm = await self._boot(name, await self._machine_config(defn, self._accel(defn), incoming=False), defn)
        try:
            self._record(vm, VMPhase.RUNNING)
        except BaseException:
            await vm.machine.kill()
            await vm.discard()
            raise
        return vm

    def describe(self, vm: QemuItem) -> dict[str, object]:
        return vm.describe()

    def ram_bytes(self, vm: QemuItem) -> int:
        return vm.ram_bytes

    async def pause(self, vm: QemuItem) -> None:
        if isinstance(vm, QemuVM):
            await vm.machine.execute("stop")
            vm.paused = True

    async def resume(self, vm: QemuItem) -> None:
        if isinstance(vm, QemuTemplate):
            return  # a template stays a stored image (after a clone from it, too)
        await vm.machine.execute("cont")
        vm.paused = False
        self._record(vm, VMPhase.RUNNING)

    def keep_stored(self, vm: QemuItem) -> None:
        """A received copy stays here paused (a copy operation): a restart keeps it so."""
        self._record(vm, VMPhase.STORED)

    async def stop(self, vm: QemuItem) -> None:
        """``quit`` QEMU and remove its work directory (a template: its stored stream is deleted). A copy in
        doubt (after COMMIT, after the vote) is left running, paused, with its record: the register decides
        at the next start."""
        if isinstance(vm, QemuTemplate):
            vm.remove()
            return
        record = None if self.store is None else self.store.get(vm.name)
        if record is not None and record.phase in IN_DOUBT_PHASES and vm.machine.running:
            await vm.machine.detach()
            return
        await vm.shutdown()
        self._forget(vm.name)

    async def destroy(self, vm: QemuItem) -> None:
        """Self-destruction, or release after a commit: QEMU killed, then its RAM backing file zeroed and
        unlinked (audited ``vm.ram_scrubbed``; the daemon's own row says why), its work directory removed."""
        if isinstance(vm, QemuTemplate):
            vm.remove()
            return
        await self_destruct(
            vm.machine, vm.memory_path, vm.name, "QEMU killed by the agent", self.ctx.audit, decision=Decision.INFO
        )
        await vm.discard()
        self._forget(vm.name)

    # -- source ---------------------------------------------------------------------------------------

    def check_send(self, vm: QemuItem, request: SendRequest) -> None:
        op, plane = request.operation, request.data_plane
        if plane not in (DataPlane.RELAY, DataPlane.QEMU_TLS):
            raise ConfigError(f"data plane {plane.value!r}: give relay or qemu-tls")
        if isinstance(vm, QemuTemplate):
            if op is not Operation.CLONE:
                raise StateError(f"{vm.name} is a template: it cannot be started or {op.value}d, only cloned from")
            if plane is not DataPlane.RELAY:
                raise ConfigError("a clone from a template travels over the relay data plane only")
        elif vm.paused or not vm.machine.running:
            raise StateError(f"VM {vm.name} is not running")
        if op is Operation.TEMPLATE and plane is not DataPlane.RELAY:
            raise ConfigError("a template is stored from the relay data plane only (give --data-plane relay)")
        if request.postcopy and (op is not Operation.MIGRATE or plane is not DataPlane.QEMU_TLS):
            raise ConfigError("post-copy is an option of migrate over qemu-tls (it needs QEMU's return path)")
        if request.auto_converge and op not in (Operation.MIGRATE, Operation.COPY, Operation.CLONE):
            raise ConfigError(f"auto-converge is an option of a live operation, not of {op.value}")
        if op in (Operation.COPY, Operation.CLONE, Operation.TEMPLATE) and vm.definition.disks:
            raise ConfigError(
                f"{op.value} of a VM with disks is not supported yet: migrate or move it (its disks stay on "
                "the shared storage)"
            )

    def geometry(self, vm: QemuItem) -> tuple[int, int]:
        return STREAM_CHUNK, _stream_slots(vm.ram_bytes)

    def manifest(self, vm: QemuItem, request: SendRequest) -> dict[str, Any]:
        accel = vm.accel if isinstance(vm, QemuTemplate) else vm.machine.config.accel
        # The destination's QEMU listens on its agent's port + 1 unless its host.yaml says otherwise.
        tls_port = request.destination_address[1] + 1 if request.data_plane is DataPlane.QEMU_TLS else None
        return {
            "definition": vm.definition.to_json(),
            "accel": accel,
            "tls_port": tls_port,
            "postcopy": request.postcopy,
            "from_template": isinstance(vm, QemuTemplate),
        }

    async def send(
        self, vm: QemuItem, channel: SecureChannel, auth: Authorized, handle: MigrationHandle, request: SendRequest
    ) -> MigrationReport:
        """Migrate, move, copy, clone or template a QEMU VM (or clone a template); on any failure before
        COMMITTED the VM keeps (or resumes) running here. ``move`` pauses the guest first (non-live)."""
        if isinstance(vm, QemuTemplate):
            return await self._send_template(vm, channel, auth, handle, request)
        log = channel.logger
        machine = vm.machine
        plane = request.data_plane
        t0 = time.monotonic()
        tls_dir: Path | None = None
        started = False
        move = Move.of(auth) if auth.operation.relocates else None
        try:
            self._record(vm, VMPhase.SENDING, move=move)
            table = self._table(vm, auth, request)
            m = self.config.migration
            limit_ms = max(round((request.downtime_limit_s or m.downtime_limit) * 1000), 1)
            bw = m.max_bandwidth or 100e9
            params: dict[str, Any] = {"max-bandwidth": int(bw), "downtime-limit": limit_ms}
            if plane is DataPlane.QEMU_TLS:
                tls_dir = write_tls_dir(
                    self.ctx.identity, certificate_pem(self.ctx.trust().ca_certificate), "client", self.config.state_dir
                )
                await machine.execute(
                    "object-add",
                    {"qom-type": "tls-creds-x509", "id": "secmig-tls", "dir": str(tls_dir), "endpoint": "client"},
                )
                params.update({"tls-creds": "secmig-tls", "tls-hostname": auth.peer_host})
            await machine.execute("migrate-set-parameters", params)
            await machine.execute("migrate-set-capabilities", {"capabilities": _capabilities(request)})
            t_migrate = time.monotonic()
            started = True
            if request.operation is Operation.MOVE:  # non-live: the guest stops before the first byte
                await self.pause(vm)
                handle.paused_at = time.monotonic()
            sampler = _Sampler(t_migrate)
            if plane is DataPlane.RELAY:
                stream_bytes, info = await self._relay_out(vm, channel, handle, table, sampler, log)
            else:
                tls_port = int(self.manifest(vm, request)["tls_port"])
                info, t_migrate = await self._tls_out(
                    vm, handle, (request.destination_address[0], tls_port), sampler, log, postcopy=request.postcopy
                )
                stream_bytes = int(info.get("ram", {}).get("transferred", 0))
                await channel.send(StopAndCopy())
                await channel.send(DeviceState(b"{}"))
            digest = frames.memory_digest_from_table(table, STREAM_CHUNK)
            self._record(vm, VMPhase.COMMITTING, move=move)  # durable before COMMIT goes out
            await channel.send(Commit(digest))
            crash_point("source.commit")
            event = await channel.next_event(60.0)
            if isinstance(event, Aborted):
                raise event.as_error()
            if not isinstance(event, Prepared):  # the destination's vote; the daemon asks the register
                raise MigrationError(f"expected PREPARED, got {type(event).__name__}")
            t_done = time.monotonic()
        except BaseException as err:
            if RUNNER[channel.conn.state] is not Role.SOURCE:
                raise  # after COMMIT: the guest stays paused here until the location register decides
            if started:
                await self._recover_source(vm, log)
            self._record(vm, VMPhase.RUNNING)
            with contextlib.suppress(Exception):
                await channel.send(Abort(str(err) or type(err).__name__, AbortCode.REQUESTED))
            if isinstance(err, ChannelClosed):
                raise MigrationAborted(f"connection to {request.destination} lost: {err}") from err
            raise
        finally:
            if tls_dir is not None:
                shutil.rmtree(tls_dir, ignore_errors=True)
        return self._report(vm, auth, request, channel, info, sampler, stream_bytes, digest, t0, t_migrate, t_done)

    def _table(self, vm: QemuItem, auth: Authorized, request: SendRequest) -> bytearray:
        """The source's digest table; slot 0 held the manifest (round 0): both ends' tables carry it."""
        table = frames.zero_page_table(STREAM_CHUNK, auth.page_count)
        manifest = request.manifest or Manifest(self.kind, request.data_plane, self.manifest(vm, request))
        table[MANIFEST_SLOT * 32 : MANIFEST_SLOT * 32 + 32] = frames.page_digests(
            manifest.encode(STREAM_CHUNK), STREAM_CHUNK
        )
        return table

    async def _send_template(
        self,
        tmpl: QemuTemplate,
        channel: SecureChannel,
        auth: Authorized,
        handle: MigrationHandle,
        request: SendRequest,
    ) -> MigrationReport:
        """``clone --from-template``: relay the stored stream as a QEMU stream (no process runs here)."""
        t0 = time.monotonic()
        table = self._table(tmpl, auth, request)
        try:
            total = 0
            slot = MANIFEST_SLOT + 1
            round_no = FIRST_DATA_ROUND
            await channel.send(RoundStart(round_no))
            with open(tmpl.stream_path, "rb") as fh:
                while True:
                    chunk = await asyncio.to_thread(fh.read, STREAM_CHUNK * BATCH_CHUNKS)
                    n = len(chunk) // STREAM_CHUNK
                    if n == 0:
                        break
                    if slot + n > len(table) // 32:
                        raise MigrationError("the stored stream outgrew its bound")
                    body = chunk[: n * STREAM_CHUNK]
                    digests = frames.page_digests(body, STREAM_CHUNK)
                    table[slot * 32 : (slot + n) * 32] = digests
                    await channel.send(PageBatch(round_no, tuple(range(slot, slot + n)), body, digests))
                    slot += n
                    total += len(body)
                    handle.count(len(body))
                    handle.check()
                    if len(chunk) > len(body):  # the tail is the last, partial chunk
                        chunk = chunk[len(body) :]
                        break
            await channel.send(RoundEnd(round_no))
            await channel.send(StopAndCopy())
            await channel.send(DeviceState(chunk))
            total += len(chunk)
            handle.count(len(chunk))
            digest = frames.memory_digest_from_table(table, STREAM_CHUNK)
            await channel.send(Commit(digest))
            event = await channel.next_event(60.0)
            if isinstance(event, Aborted):
                raise event.as_error()
            if not isinstance(event, Prepared):
                raise MigrationError(f"expected PREPARED, got {type(event).__name__}")
        except BaseException as err:
            with contextlib.suppress(Exception):
                await channel.send(Abort(str(err) or type(err).__name__, AbortCode.REQUESTED))
            if isinstance(err, ChannelClosed):
                raise MigrationAborted(f"connection to {request.destination} lost: {err}") from err
            raise
        t_done = time.monotonic()
        result = MigrationResult(
            vm=tmpl.name,
            source=self.ctx.host_id,
            destination=auth.peer_host,
            strategy="template stream",
            policy="qemu",
            start_s=0.0,
            end_s=t_done - t0,
            downtime_s=0.0,
            converged=True,
            stop_reason="template relayed; destination committed",
            outcome="completed",
            rounds=(),
        )
        return MigrationReport(
            result,
            operation=request.operation.value,
            driver=self.kind.value,
            data_plane=request.data_plane.value,
            wire_bytes=channel.bytes_out,
            payload_bytes=total,
            memory_digest=digest.hex(),
            extra={"from_template": True},
        )

    def _report(
        self,
        vm: QemuVM,
        auth: Authorized,
        request: SendRequest,
        channel: SecureChannel,
        info: dict[str, Any],
        sampler: _Sampler,
        stream_bytes: int,
        digest: bytes,
        t0: float,
        t_migrate: float,
        t_done: float,
    ) -> MigrationReport:
        ram = info.get("ram", {}) if isinstance(info.get("ram"), dict) else {}
        total_ms, down_ms = _num(info, "total-time"), _num(info, "downtime")
        qemu_downtime = down_ms / 1000 if down_ms is not None else None
        # QEMU stopped the guest at (migrate + total-time − downtime); it runs again at the destination
        # before COMMITTED reaches us, so this end-to-end figure is an upper bound of the real pause.
        paused_at = None
        if total_ms is not None and down_ms is not None:
            paused_at = t_migrate + (total_ms - down_ms) / 1000
        downtime = (t_done - paused_at) if paused_at is not None else qemu_downtime
        strategy = "qemu post-copy" if request.postcopy else "qemu pre-copy"
        if request.operation is Operation.MOVE:  # paused from the migrate command on: all of it is downtime
            downtime, strategy = t_done - t_migrate, "qemu stop-and-copy"
        plane = request.data_plane
        reason = "QEMU completed; destination committed"
        result = MigrationResult(
            vm=vm.name,
            source=self.ctx.host_id,
            destination=auth.peer_host,
            strategy=strategy,
            policy="qemu",
            start_s=0.0,
            end_s=t_done - t0,
            downtime_s=downtime if downtime is not None else t_done - t_migrate,
            converged=True,
            stop_reason=reason,
            outcome="completed",
            rounds=qemu_rounds(sampler.samples, info, offset_s=t_migrate - t0),
        )
        return MigrationReport(
            result,
            operation=request.operation.value,
            driver=self.kind.value,
            data_plane=plane.value,
            wire_bytes=channel.bytes_out + (stream_bytes if plane is DataPlane.QEMU_TLS else 0),
            payload_bytes=stream_bytes,
            memory_digest=digest.hex(),
            extra={
                "qemu_total_time_s": total_ms / 1000 if total_ms is not None else None,
                "qemu_downtime_s": qemu_downtime,
                "qemu_transferred_bytes": int(ram.get("transferred", 0)),
                "qemu_throughput_mbps": ram.get("mbps"),
                "qemu_dirty_sync_count": int(ram.get("dirty-sync-count", 0)),
                "handshake_and_setup_s": t_migrate - t0,
            },
        )

    async def _recover_source(self, vm: QemuVM, log: logging.Logger) -> None:
        """After a failed or aborted migration: cancel QEMU's, and make sure the guest runs here."""
        with contextlib.suppress(QemuError):
            info = await _query(vm.machine)
            if info.get("status") in _ACTIVE:
                await vm.machine.execute("migrate_cancel")
                await _wait_status(vm.machine, {"cancelled", "completed"}, 10.0)
            status = await vm.machine.execute("query-status")
            if isinstance(status, dict) and not status.get("running"):
                await vm.machine.execute("cont")
                log.info("resumed %s on the source", vm.name)
        with contextlib.suppress(QemuError):  # let the next migration configure TLS afresh
            await vm.machine.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
            await vm.machine.execute("object-del", {"id": "secmig-tls"})

    async def _relay_out(
        self,
        vm: QemuVM,
        channel: SecureChannel,
        handle: MigrationHandle,
        table: bytearray,
        sampler: _Sampler,
        log: logging.Logger,
    ) -> tuple[int, dict[str, Any]]:
        sock_path = vm.workdir / "out.sock"
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        def on_qemu(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if not accepted.done():
                accepted.set_result((r, w))
            else:
                w.close()

        server = await asyncio.start_unix_server(on_qemu, str(sock_path), limit=4 * _MIB)
        writer: asyncio.StreamWriter | None = None
        polling: asyncio.Task[None] | None = None
        done = asyncio.Event()
        round_no = FIRST_DATA_ROUND
        try:
            await vm.machine.execute("migrate", {"uri": f"unix:{sock_path}"})
            polling = asyncio.get_running_loop().create_task(_sample_until(vm.machine, sampler, done))
            reader, writer = await asyncio.wait_for(accepted, 10.0)
            await channel.send(RoundStart(round_no))
            buf = bytearray()
            slot = MANIFEST_SLOT + 1
            total = 0
            batch = STREAM_CHUNK * BATCH_CHUNKS
            slots_max = len(table) // 32
            while True:
                data = await reader.read(batch)
                if data:
                    buf += data
                while len(buf) >= (batch if data else STREAM_CHUNK):
                    n = min(len(buf) // STREAM_CHUNK, BATCH_CHUNKS)
                    if slot + n > slots_max:
                        raise MigrationAborted("QEMU's stream outgrew its bound; not converging")
                    chunk = bytes(buf[: n * STREAM_CHUNK])
                    del buf[: n * STREAM_CHUNK]
                    digests = frames.page_digests(chunk, STREAM_CHUNK)
                    table[slot * 32 : (slot + n) * 32] = digests
                    await channel.send(PageBatch(round_no, tuple(range(slot, slot + n)), chunk, digests))
                    slot += n
                    total += len(chunk)
                    handle.count(len(chunk))
                    if total >= _CRASH_AFTER_BYTES:
                        crash_point("source.transfer")
                    handle.check()
                if not data:
                    break
            # QEMU closed its end: the stream is complete; the tail travels as the device state.
            await channel.send(RoundEnd(round_no))
            await channel.send(StopAndCopy())
            await channel.send(DeviceState(bytes(buf)))
            total += len(buf)
            handle.count(len(buf))
            done.set()
            await polling
            info = await _wait_status(vm.machine, {"completed"}, 30.0)
            if info.get("status") != "completed":
                raise MigrationError(f"QEMU failed the migration: {info.get('error-desc', 'no reason given')}")
            log.debug("relayed %d bytes of QEMU stream in %d chunks", total, slot - 1)
            return total, info
        finally:
            if polling is not None and not polling.done():
                done.set()
                await polling
            if writer is not None:
                writer.close()
            server.close()
            with contextlib.suppress(OSError):
                sock_path.unlink()

    async def _tls_out(
        self,
        vm: QemuVM,
        handle: MigrationHandle,
        dest: tuple[str, int],
        sampler: _Sampler,
        log: logging.Logger,
        *,
        postcopy: bool = False,
    ) -> tuple[dict[str, Any], float]:
        """Run QEMU's own TLS migration; returns query-migrate's answer and when the successful attempt began.

        With ``postcopy``, QEMU is switched to post-copy (``migrate-start-postcopy``) once its first pass
        over RAM is done (the second dirty-bitmap sync): the rest travels once each, on demand or pushed.
        """
        uri = f"tcp:{dest[0]}:{dest[1]}"
        deadline = time.monotonic() + 15.0
        while True:  # the destination starts its QEMU on the manifest: retry until it listens
            t_attempt = sampler.t0 = time.monotonic()
            sampler.samples.clear()
            await vm.machine.execute("migrate", {"uri": uri})
            if postcopy:
                await _start_postcopy(vm.machine, sampler)
            info = await _wait_status(vm.machine, {"completed", "cancelled"}, 600.0, poll_s=POLL_S, sampler=sampler)
            if info.get("status") == "completed":
                break
            err = str(info.get("error-desc", ""))
            if "refused" not in err.lower() or time.monotonic() > deadline:
                raise MigrationError(f"QEMU failed the TLS migration: {err or 'no reason given'}")
            await asyncio.sleep(0.05)
        handle.count(int(info.get("ram", {}).get("transferred", 0)))
        log.debug("QEMU migrated over its own TLS to %s", uri)
        return info, t_attempt

    # -- destination ------------------------------------------------------------------------------------

    def _incoming_definition(self, manifest: Manifest) -> VMDefinition:
        """What the destination runs: the manifest's definition; a clone's under its new id and MAC."""
        defn = definition_from_json(manifest.vm["definition"], "manifest")
        if manifest.clone_binding is not None:
            new = LocationBinding.from_json(manifest.clone_binding)
            defn = defn.with_identity(new.vm_id, new.vm_mac)
        return defn

    def templates_dir(self) -> Path:
        """Where this host stores templates (``STATE_DIR/templates``)."""
        d = self.config.state_dir / "templates"
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    async def _receive_template(
        self, channel: SecureChannel, auth: Authorized, handle: MigrationHandle, manifest: Manifest
    ) -> QemuTemplate:
        """Store the relayed stream in a file: the template. No QEMU runs it; COMMITTED once it is synced."""
        if manifest.data_plane is not DataPlane.RELAY:
            raise MigrationError("a template is stored from the relay data plane only")
        defn = self._incoming_definition(manifest)
        if defn.memory * MAX_STREAM_FACTOR + 64 * _MIB < (auth.page_count - 1) * STREAM_CHUNK:
            raise MigrationError("stream bound larger than the VM's RAM warrants")
        accel = str(manifest.vm.get("accel", "tcg"))
        final = self.templates_dir() / f"{defn.name}.stream"
        part = final.with_suffix(".part")
        tmpl = QemuTemplate(defn.name, defn, part, accel)
        done = False
        try:
            with open(part, "wb") as fh:
                os.chmod(part, 0o600)
                next_slot = MANIFEST_SLOT + 1
                while True:
                    event = await channel.next_event(self.config.migration.idle_timeout)
                    if isinstance(event, PageBatch):
                        if event.page_numbers[0] != next_slot:
                            raise MigrationError("stream chunks out of order")
                        next_slot += len(event.page_numbers)
                        await asyncio.to_thread(fh.write, event.data)
                        handle.count(len(event.data))
                        handle.check()
                    elif isinstance(event, DeviceState):
                        fh.write(event.data)
                        handle.count(len(event.data))
                    elif isinstance(event, RoundEnd | StopAndCopy | RoundStart):
                        pass
                    elif isinstance(event, Commit):
                        fh.flush()
                        os.fsync(fh.fileno())
                        break
                    elif isinstance(event, Aborted):
                        raise event.as_error()
                    else:
                        raise MigrationError(f"unexpected {type(event).__name__}")
            part.replace(final)
            tmpl.stream_path = final
            await channel.send(Committed())
            done = True
            return tmpl
        except BaseException as err:
            if not isinstance(err, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    await channel.send(Abort(str(err) or type(err).__name__, AbortCode.REQUESTED))
            raise
        finally:
            if not done:
                tmpl.remove()

    async def receive(
        self, channel: SecureChannel, auth: Authorized, handle: MigrationHandle, manifest: Manifest
    ) -> QemuItem:
        """Receive a QEMU VM into a QEMU started from the manifest's definition, resumed on COMMIT when the
        operation runs it here (migrate, move, clone), left paused for a copy; a template is stored as a
        stream file, with no QEMU. On any failure the destination QEMU is killed (the file deleted)."""
        if auth.page_size != STREAM_CHUNK:
            raise MigrationAborted(f"QEMU streams travel in {STREAM_CHUNK}-byte pages, not {auth.page_size}")
        if auth.operation is Operation.TEMPLATE:
            return await self._receive_template(channel, auth, handle, manifest)
        timeout = self.config.migration.idle_timeout
        log = channel.logger
        plane = manifest.data_plane
        doc = manifest.vm
        vm: QemuVM | None = None
        writer: asyncio.StreamWriter | None = None
        tls_dir: Path | None = None
        installed = False
        try:
            defn = self._incoming_definition(manifest)
            ram = defn.memory
            if ram * MAX_STREAM_FACTOR + 64 * _MIB < (auth.page_count - 1) * STREAM_CHUNK:
                raise MigrationError("stream bound larger than the VM's RAM warrants")
            tls_port = self.config.qemu_tls_port(self.ctx.listen_port())
            if plane is DataPlane.QEMU_TLS and doc.get("tls_port") != tls_port:
                raise MigrationError(
                    f"qemu-tls: the source would connect to port {doc.get('tls_port')}, but this host's "
                    f"QEMU listens on {tls_port} (qemu.tls_port)"
                )
            accel = doc["accel"] if doc.get("accel") in ("kvm", "tcg") else self._accel(defn)
            cfg = await self._machine_config(defn, accel, incoming=True)
            self._check_free(defn.name)
            vm = await self._boot(defn.name, cfg, defn)
            vm.paused = True
            self._record(vm, VMPhase.RECEIVING)
            # A clone's guest keeps the source's NIC until the daemon swaps it (the reference guest has no
            # network stack: nothing inside it would let go of the NIC).
            vm.nic_swap_pending = bool(
                manifest.clone_binding is not None and cfg.nics and defn.boot.reference_guest is None
            )
            if doc.get("postcopy") is True:
                await vm.machine.execute(
                    "migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True}]}
                )
            if plane is DataPlane.RELAY:
                in_path = vm.workdir / "in.sock"
                await vm.machine.execute("migrate-incoming", {"uri": f"unix:{in_path}"})
                _r, writer = await asyncio.open_unix_connection(str(in_path))
            elif plane is DataPlane.QEMU_TLS:
                tls_dir = write_tls_dir(
                    self.ctx.identity, certificate_pem(self.ctx.trust().ca_certificate), "server", self.config.state_dir
                )
                m = vm.machine
                await m.execute(
                    "object-add",
                    {
                        "qom-type": "tls-creds-x509",
                        "id": "secmig-tls",
                        "dir": str(tls_dir),
                        "endpoint": "server",
                        "verify-peer": True,
                    },
                )
                # Only the peer this very channel authenticated and the grant names may connect.
                await m.execute(
                    "object-add", {"qom-type": "authz-simple", "id": "secmig-authz", "identity": f"CN={auth.peer_host}"}
                )
                await m.execute("migrate-set-parameters", {"tls-creds": "secmig-tls", "tls-authz": "secmig-authz"})
                host = self.config.listen_address[0]
                await m.execute("migrate-incoming", {"uri": f"tcp:{host}:{tls_port}"})
            else:
                raise MigrationError(f"unknown data plane {plane.value!r}")
            log.info("receiving %s over %s", auth.vm_id, plane.value)
            next_slot = MANIFEST_SLOT + 1
            while True:
                event = await channel.next_event(timeout if plane is DataPlane.RELAY else 600.0)
                if isinstance(event, PageBatch):
                    if writer is None or event.page_numbers[0] != next_slot:
                        raise MigrationError("stream chunks out of order")
                    next_slot += len(event.page_numbers)
                    writer.write(event.data)
                    await writer.drain()
                    handle.count(len(event.data))
                    if handle.bytes >= _CRASH_AFTER_BYTES:
                        crash_point("destination.transfer")
                    handle.check()
                elif isinstance(event, DeviceState):
                    if writer is not None:
                        writer.write(event.data)
                        await writer.drain()
                        handle.count(len(event.data))
                        writer.close()
                elif isinstance(event, RoundEnd | StopAndCopy | RoundStart):
                    if isinstance(event, StopAndCopy):
                        handle.paused_at = time.monotonic()
                elif isinstance(event, Commit):
                    info = await _wait_status(vm.machine, {"completed"}, 60.0)
                    if info.get("status") != "completed":
                        raise MigrationError(f"destination QEMU failed to load: {info.get('error-desc', '?')}")
                    # Loaded and paused: the vote. The daemon resumes it (``cont``) only once the source
                    # confirmed and the location register holds the new epoch; a copy stays paused.
                    crash_point("destination.commit")
                    move = Move.of(auth) if auth.operation.relocates else None
                    self._record(vm, VMPhase.PREPARED, binding=auth.next_binding, move=move)
                    try:
                        await channel.send(Prepared())
                    except (ChannelClosed, OSError):
                        if channel.conn.state is not State.PREPARED:
                            raise
                        # The vote may have reached the source: the register decides (the daemon asks it).
                    installed = True
                    crash_point("destination.prepared")
                    return vm
                elif isinstance(event, Aborted):
                    raise event.as_error()
                else:
                    raise MigrationError(f"unexpected {type(event).__name__}")
        except BaseException as err:
            if not isinstance(err, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    await channel.send(Abort(str(err) or type(err).__name__, AbortCode.REQUESTED))
            if isinstance(err, KeyError | TypeError | ValueError):
                raise MigrationError(f"unusable QEMU manifest: {err}") from err
            raise
        finally:
            if writer is not None:
                writer.close()
            if tls_dir is not None:
                shutil.rmtree(tls_dir, ignore_errors=True)
            if vm is not None and not installed:
                await vm.machine.kill()  # discard: nothing half-applied
                await vm.discard()
                self._forget(vm.name)
