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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from secmig.agent.channel import SecureChannel
from secmig.agent.driver import DriverContext, SendRequest
from secmig.agent.manifest import FIRST_DATA_ROUND, MANIFEST_SLOT, Manifest
from secmig.agent.qemu.guest import GuestParams, build_guest
from secmig.agent.qemu.machine import MachineConfig, QemuMachine, choose_accel, find_qemu
from secmig.agent.report import MigrationHandle, MigrationReport
from secmig.agent.vocab import DataPlane, DriverKind
from secmig.errors import ChannelClosed, ConfigError, MigrationAborted, MigrationError, QemuError, StateError
from secmig.migration import RoundRecord
from secmig.migration.result import MigrationResult
from secmig.model.units import PAGE_SIZE
from secmig.security import frames
from secmig.security.cluster import HostIdentity
from secmig.security.events import (
    Abort,
    AbortCode,
    Aborted,
    Authorized,
    Commit,
    Committed,
    DeviceState,
    PageBatch,
    RoundEnd,
    RoundStart,
    StopAndCopy,
)
from secmig.security.pki import certificate_pem
from secmig.security.policy import Operation

STREAM_CHUNK = 256 * 1024
"""Bytes of QEMU's stream per protocol "page" (a batch carries up to 16 of them: 4 MiB)."""
BATCH_CHUNKS = 16
MAX_STREAM_FACTOR = 6
"""A stream longer than this × RAM (+ 64 MiB) is refused: it bounds the destination's digest table."""
POLL_S = 0.1
"""How often query-migrate is polled: every query takes QEMU's big lock (QEMU's own harness polls so)."""
_MIB = 1 << 20
_ACTIVE = ("active", "setup", "device", "pre-switchover")


class QemuVM:
    """A QEMU process running the reference guest, owned by the agent."""

    def __init__(self, name: str, machine: QemuMachine, params: GuestParams, workdir: Path) -> None:
        self.name = name
        self.machine = machine
        self.params = params
        self.workdir = workdir
        self.paused = False

    @property
    def ram_bytes(self) -> int:
        return self.machine.config.ram_bytes

    def describe(self) -> dict[str, object]:
        """One row of ``secmig vm list``."""
        state = "running" if self.machine.running and not self.paused else ("paused" if self.paused else "dead")
        return {"name": self.name, "driver": DriverKind.QEMU.value, "state": state, "ram_bytes": self.ram_bytes}

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """``quit`` QEMU and remove its work directory."""
        await self.machine.shutdown(timeout_s=timeout_s)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _stream_slots(ram_bytes: int) -> int:
    return (MAX_STREAM_FACTOR * ram_bytes + 64 * _MIB) // STREAM_CHUNK + 1


def write_tls_dir(identity: HostIdentity, ca_pem: bytes, endpoint: str) -> Path:
    """QEMU's tls-creds-x509 directory: ca-cert.pem and this host's cluster certificate and key (0600)."""
    d = Path(tempfile.mkdtemp(prefix="secmig-tls-"))
    (d / "ca-cert.pem").write_bytes(ca_pem)
    (d / f"{endpoint}-cert.pem").write_bytes(certificate_pem(identity.certificate))
    key = identity.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(d / f"{endpoint}-key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
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


class QemuDriver:
    """This host's QEMU processes: start them, migrate them out, receive them."""

    kind = DriverKind.QEMU

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.logger = ctx.logger.getChild("qemu")
        self._elf: Path | None = None

    async def close(self) -> None:
        """Nothing to release beyond the VMs (the agent stops those)."""

    async def _kernel(self) -> Path:
        if self._elf is None:
            self._elf = await asyncio.to_thread(build_guest, None, self.config.qemu.guest_cache)
        return self._elf

    async def _machine_config(self, ram_bytes: int, params: GuestParams, *, incoming: bool) -> MachineConfig:
        return MachineConfig(
            await self._kernel(),
            params.append_line(),
            ram_bytes,
            choose_accel(self.config.qemu.accel),
            find_qemu(self.config.qemu.binary),
            incoming=incoming,
            extra_args=("-S",) if incoming else (),
        )

    async def _boot(self, name: str, cfg: MachineConfig, params: GuestParams) -> QemuVM:
        workdir = Path(tempfile.mkdtemp(prefix=f"sq-{name[:12]}-"))
        machine = QemuMachine(name, cfg, workdir)
        try:
            await machine.start()
            if not cfg.incoming:
                await machine.wait_guest_running()
        except BaseException:
            await machine.kill()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return QemuVM(name, machine, params, workdir)

    # -- life cycle -----------------------------------------------------------------------------------

    async def start(self, name: str, spec: dict[str, Any]) -> QemuVM:
        """Boot the reference guest: ``ram_bytes``, ``working_set_bytes``, ``rate_pages_per_s``, ``pattern``."""
        try:
            ram = int(spec.get("ram_bytes", 128 * _MIB))
            params = GuestParams(
                working_set_bytes=int(spec.get("working_set_bytes", 16 * _MIB)),
                rate_pages_per_s=int(spec.get("rate_pages_per_s", 5000)),
                pattern=spec.get("pattern", "rand"),
                seed=int(spec.get("seed", 1)),
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"qemu VM spec: {err}") from err
        if ram < params.min_ram_bytes():
            raise ConfigError(f"qemu VM {name}: {ram >> 20} MiB of RAM is too small for its working set")
        return await self._boot(name, await self._machine_config(ram, params, incoming=False), params)

    def describe(self, vm: QemuVM) -> dict[str, object]:
        return vm.describe()

    def ram_bytes(self, vm: QemuVM) -> int:
        return vm.ram_bytes

    async def pause(self, vm: QemuVM) -> None:
        await vm.machine.execute("stop")
        vm.paused = True

    async def resume(self, vm: QemuVM) -> None:
        await vm.machine.execute("cont")
        vm.paused = False

    async def stop(self, vm: QemuVM) -> None:
        """``quit`` QEMU and remove its work directory."""
        await vm.shutdown()

    async def destroy(self, vm: QemuVM) -> None:
        """Self-destruction, or release after a commit: QEMU ``quit`` (its memory goes with the process)."""
        await vm.shutdown(timeout_s=2.0)

    # -- source ---------------------------------------------------------------------------------------

    def check_send(self, vm: QemuVM, request: SendRequest) -> None:
        if request.data_plane not in (DataPlane.RELAY, DataPlane.QEMU_TLS):
            raise ConfigError(f"data plane {request.data_plane.value!r}: give relay or qemu-tls")
        if request.operation is not Operation.MIGRATE:
            raise ConfigError(f"QEMU VMs support live migration only, not {request.operation.value}")
        if vm.paused or not vm.machine.running:
            raise StateError(f"VM {vm.name} is not running")

    def geometry(self, vm: QemuVM) -> tuple[int, int]:
        return STREAM_CHUNK, _stream_slots(vm.ram_bytes)

    def manifest(self, vm: QemuVM, request: SendRequest) -> dict[str, Any]:
        cfg = vm.machine.config
        # The destination's QEMU listens on its agent's port + 1 unless its host.yaml says otherwise.
        tls_port = request.destination_address[1] + 1 if request.data_plane is DataPlane.QEMU_TLS else None
        return {"ram_bytes": cfg.ram_bytes, "accel": cfg.accel, "guest": asdict(vm.params), "tls_port": tls_port}

    async def send(
        self, vm: QemuVM, channel: SecureChannel, auth: Authorized, handle: MigrationHandle, request: SendRequest
    ) -> MigrationReport:
        """Migrate a QEMU VM; on any failure before COMMITTED it keeps (or resumes) running here."""
        log = channel.logger
        machine = vm.machine
        plane = request.data_plane
        t0 = time.monotonic()
        tls_dir: Path | None = None
        started = False
        try:
            table = frames.zero_page_table(STREAM_CHUNK, auth.page_count)
            # Slot 0 held the manifest (round 0): both ends' digest tables carry it.
            manifest = Manifest(self.kind, plane, self.manifest(vm, request)).encode(STREAM_CHUNK)
            table[MANIFEST_SLOT * 32 : MANIFEST_SLOT * 32 + 32] = frames.page_digests(manifest, STREAM_CHUNK)
            m = self.config.migration
            limit_ms = max(round((request.downtime_limit_s or m.downtime_limit) * 1000), 1)
            bw = m.max_bandwidth or 100e9
            params: dict[str, Any] = {"max-bandwidth": int(bw), "downtime-limit": limit_ms}
            if plane is DataPlane.QEMU_TLS:
                tls_dir = write_tls_dir(self.ctx.identity, certificate_pem(self.ctx.trust().ca_certificate), "client")
                await machine.execute(
                    "object-add",
                    {"qom-type": "tls-creds-x509", "id": "secmig-tls", "dir": str(tls_dir), "endpoint": "client"},
                )
                params.update({"tls-creds": "secmig-tls", "tls-hostname": auth.peer_host})
            await machine.execute("migrate-set-parameters", params)
            t_migrate = time.monotonic()
            started = True
            sampler = _Sampler(t_migrate)
            if plane is DataPlane.RELAY:
                stream_bytes, info = await self._relay_out(vm, channel, handle, table, sampler, log)
            else:
                tls_port = int(self.manifest(vm, request)["tls_port"])
                info, t_migrate = await self._tls_out(
                    vm, handle, (request.destination_address[0], tls_port), sampler, log
                )
                stream_bytes = int(info.get("ram", {}).get("transferred", 0))
                await channel.send(StopAndCopy())
                await channel.send(DeviceState(b"{}"))
            digest = frames.memory_digest_from_table(table, STREAM_CHUNK)
            await channel.send(Commit(digest))
            event = await channel.next_event(60.0)
            if isinstance(event, Aborted):
                raise event.as_error()
            if not isinstance(event, Committed):
                raise MigrationError(f"expected COMMITTED, got {type(event).__name__}")
            t_done = time.monotonic()
        except BaseException as err:
            if started:
                await self._recover_source(vm, log)
            with contextlib.suppress(Exception):
                await channel.send(Abort(str(err) or type(err).__name__, AbortCode.REQUESTED))
            if isinstance(err, ChannelClosed):
                raise MigrationAborted(f"connection to {request.destination} lost: {err}") from err
            raise
        finally:
            if tls_dir is not None:
                shutil.rmtree(tls_dir, ignore_errors=True)
        return self._report(vm, auth, request, channel, info, sampler, stream_bytes, digest, t0, t_migrate, t_done)

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
        plane = request.data_plane
        reason = "QEMU completed; destination committed"
        result = MigrationResult(
            vm=vm.name,
            source=self.ctx.host_id,
            destination=auth.peer_host,
            strategy="qemu pre-copy",
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
    ) -> tuple[dict[str, Any], float]:
        """Run QEMU's own TLS migration; returns query-migrate's answer and when the successful attempt began."""
        uri = f"tcp:{dest[0]}:{dest[1]}"
        deadline = time.monotonic() + 15.0
        while True:  # the destination starts its QEMU on the manifest: retry until it listens
            t_attempt = sampler.t0 = time.monotonic()
            sampler.samples.clear()
            await vm.machine.execute("migrate", {"uri": uri})
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

    async def receive(
        self, channel: SecureChannel, auth: Authorized, handle: MigrationHandle, manifest: Manifest
    ) -> QemuVM:
        """Receive a QEMU VM, resumed on COMMIT; on any failure the destination QEMU is killed."""
        if auth.page_size != STREAM_CHUNK:
            raise MigrationAborted(f"QEMU streams travel in {STREAM_CHUNK}-byte pages, not {auth.page_size}")
        timeout = self.config.migration.idle_timeout
        log = channel.logger
        plane = manifest.data_plane
        doc = manifest.vm
        vm: QemuVM | None = None
        writer: asyncio.StreamWriter | None = None
        tls_dir: Path | None = None
        installed = False
        try:
            ram = int(doc["ram_bytes"])
            if ram * MAX_STREAM_FACTOR + 64 * _MIB < (auth.page_count - 1) * STREAM_CHUNK:
                raise MigrationError("stream bound larger than the VM's RAM warrants")
            params = GuestParams(**doc["guest"])
            tls_port = self.config.qemu_tls_port(self.ctx.listen_port())
            if plane is DataPlane.QEMU_TLS and doc.get("tls_port") != tls_port:
                raise MigrationError(
                    f"qemu-tls: the source would connect to port {doc.get('tls_port')}, but this host's "
                    f"QEMU listens on {tls_port} (qemu.tls_port)"
                )
            cfg = await self._machine_config(ram, params, incoming=True)
            if doc.get("accel") in ("kvm", "tcg"):
                cfg = replace(cfg, accel=doc["accel"])
            vm = await self._boot(auth.vm_id, cfg, params)
            vm.paused = True
            if plane is DataPlane.RELAY:
                in_path = vm.workdir / "in.sock"
                await vm.machine.execute("migrate-incoming", {"uri": f"unix:{in_path}"})
                _r, writer = await asyncio.open_unix_connection(str(in_path))
            elif plane is DataPlane.QEMU_TLS:
                tls_dir = write_tls_dir(self.ctx.identity, certificate_pem(self.ctx.trust().ca_certificate), "server")
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
                    await vm.machine.execute("cont")
                    vm.paused = False
                    await channel.send(Committed())
                    installed = True
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
                shutil.rmtree(vm.workdir, ignore_errors=True)
