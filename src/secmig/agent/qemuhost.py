"""QEMU VMs on an agent's host, and their migration over the two data planes.

- **relay**: the source QEMU migrates into a UNIX socket of the source agent, which streams the bytes
  over the authenticated channel as PAGE_BATCH "pages" of :data:`STREAM_CHUNK` bytes (slot 0 carries a
  manifest: the VM's RAM and guest parameters), the tail in DEVICE_STATE; the destination agent feeds
  them to a QEMU started with ``-incoming defer -S``. QEMU is told to migrate only once the channel is
  AUTHORIZED, so not one byte of its stream leaves the host before; every byte is counted for the monitor.
- **qemu-tls**: the agents authenticate and authorize over their channel as above (manifest only), then
  each configures its QEMU's own TLS — ``tls-creds-x509`` from the hosts' cluster-CA certificates,
  ``tls-authz`` on the destination admitting only the authorized source's certificate name, and
  ``tls-hostname`` on the source naming the authorized destination — and QEMU carries the pages itself,
  to the destination agent's port + 1.

Either way the destination resumes its QEMU (``cont``) only on COMMIT, after QEMU has loaded the whole
stream, and the source quits its QEMU only on COMMITTED; before that any failure resumes the source
(``cont`` from postmigrate) and kills the destination QEMU. Figures come from ``query-migrate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from secmig.agent.channel import SecureChannel
from secmig.agent.config import HostConfig
from secmig.agent.qemu.guest import GuestParams, build_guest
from secmig.agent.qemu.machine import MachineConfig, QemuMachine, choose_accel, find_qemu
from secmig.agent.report import MigrationHandle, MigrationReport
from secmig.errors import ChannelClosed, ConfigError, MigrationAborted, MigrationError, QemuError, StateError
from secmig.security import frames
from secmig.security.audit import Decision
from secmig.security.cluster import HostIdentity
from secmig.security.events import (
    Abort,
    AbortCode,
    Aborted,
    Authorized,
    Commit,
    Committed,
    DeviceState,
    MigrationRequest,
    PageBatch,
    RoundEnd,
    RoundStart,
    StopAndCopy,
)
from secmig.security.grants import Grant
from secmig.security.pki import certificate_pem
from secmig.security.policy import Operation

if TYPE_CHECKING:
    from secmig.agent.daemon import Agent, VMEntry

STREAM_CHUNK = 256 * 1024
"""Bytes of QEMU's stream per protocol "page" (a batch carries up to 16 of them: 4 MiB)."""
BATCH_CHUNKS = 16
MAX_STREAM_FACTOR = 6
"""A stream longer than this × RAM (+ 64 MiB) is refused: it bounds the destination's digest table."""
DATA_PLANES = ("relay", "qemu-tls")
_MIB = 1 << 20


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
        return {"name": self.name, "driver": "qemu", "state": state, "ram_bytes": self.ram_bytes}

    async def shutdown(self) -> None:
        """``quit`` QEMU and remove its work directory."""
        await self.machine.shutdown()
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def destroy(self) -> None:
        """Self-destruction: QEMU ``quit`` (its memory goes with the process), no grace period."""
        await self.machine.shutdown(timeout_s=2.0)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def manifest(self, data_plane: str, tls_port: int | None) -> dict[str, Any]:
        cfg = self.machine.config
        return {
            "driver": "qemu",
            "data_plane": data_plane,
            "ram_bytes": cfg.ram_bytes,
            "accel": cfg.accel,
            "guest": asdict(self.params),
            "tls_port": tls_port,
        }


def _stream_slots(ram_bytes: int) -> int:
    return (MAX_STREAM_FACTOR * ram_bytes + 64 * _MIB) // STREAM_CHUNK + 1


def _write_tls_dir(identity: HostIdentity, ca_pem: bytes, endpoint: str) -> Path:
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


async def _query(machine: QemuMachine) -> dict[str, Any]:
    info = await machine.execute("query-migrate")
    return info if isinstance(info, dict) else {}


async def _wait_status(machine: QemuMachine, want: set[str], timeout_s: float, poll_s: float = 0.02) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = await _query(machine)
        status = str(info.get("status", ""))
        if status in want or status == "failed":
            return info
        if time.monotonic() > deadline:
            raise MigrationError(f"{machine.name}: migration still {status or 'idle'} after {timeout_s:.0f} s")
        await asyncio.sleep(poll_s)


class QemuHost:
    """This host's QEMU processes: start them, migrate them out, receive them."""

    def __init__(self, config: HostConfig, logger: logging.Logger) -> None:
        self.config = config
        self.logger = logger
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

    async def start_vm(self, name: str, spec: dict[str, Any]) -> QemuVM:
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

    # -- source ---------------------------------------------------------------------------------------

    async def migrate(
        self,
        agent: Agent,
        entry: VMEntry,
        to: str,
        op: Operation,
        grant: Grant | None,
        address: tuple[str, int] | None,
        handle: MigrationHandle,
        data_plane: str,
        downtime_limit_s: float | None,
    ) -> MigrationReport:
        """Migrate a QEMU VM; on any failure before COMMITTED it keeps (or resumes) running here."""
        if data_plane not in DATA_PLANES:
            raise ConfigError(f"data plane {data_plane!r}: give relay or qemu-tls")
        if op is not Operation.MIGRATE:
            raise ConfigError(f"QEMU VMs support live migration only, not {op.value}")
        vm: QemuVM = entry.vm
        if vm.paused or not vm.machine.running:
            raise StateError(f"VM {vm.name} is not running")
        target = address or agent.config.peer_address(to)
        request = MigrationRequest(op, vm.name, STREAM_CHUNK, _stream_slots(vm.ram_bytes), grant, entry.binding)
        channel, auth = await agent.open_channel(request, to, address, handle)
        log = channel.logger
        machine = vm.machine
        t0 = time.monotonic()
        tls_dir: Path | None = None
        started = False
        try:
            table = frames.zero_page_table(STREAM_CHUNK, auth.page_count)
            tls_port = target[1] + 1 if data_plane == "qemu-tls" else None
            manifest = json.dumps(vm.manifest(data_plane, tls_port)).encode().ljust(STREAM_CHUNK, b"\0")
            await channel.send(RoundStart(0))
            digest0 = frames.page_digests(manifest, STREAM_CHUNK)
            table[0:32] = digest0
            await channel.send(PageBatch(0, (0,), manifest, digest0))
            limit_ms = max(round((downtime_limit_s or agent.config.migration.downtime_limit) * 1000), 1)
            bw = agent.config.migration.max_bandwidth or 100e9
            params: dict[str, Any] = {"max-bandwidth": int(bw), "downtime-limit": limit_ms}
            if data_plane == "qemu-tls":
                trust = agent.trust()
                assert agent.identity is not None
                tls_dir = _write_tls_dir(agent.identity, certificate_pem(trust.ca_certificate), "client")
                await machine.execute(
                    "object-add",
                    {"qom-type": "tls-creds-x509", "id": "secmig-tls", "dir": str(tls_dir), "endpoint": "client"},
                )
                params.update({"tls-creds": "secmig-tls", "tls-hostname": auth.peer_host})
            await machine.execute("migrate-set-parameters", params)
            t_migrate = time.monotonic()
            started = True
            if data_plane == "relay":
                stream_bytes, info = await self._relay_out(vm, channel, handle, table, log)
            else:
                info, t_migrate = await self._tls_out(vm, channel, handle, (target[0], tls_port or 0), log)
                stream_bytes = int(info.get("ram", {}).get("transferred", 0))
            if data_plane == "qemu-tls":
                await channel.send(RoundEnd(0))
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
                raise MigrationAborted(f"connection to {to} lost: {err}") from err
            raise
        finally:
            await channel.close()
            if tls_dir is not None:
                shutil.rmtree(tls_dir, ignore_errors=True)
        # The destination runs it: quit ours.
        agent.vms.pop(vm.name, None)
        await vm.shutdown()
        assert agent.audit is not None
        agent.audit.record("vm.released", Decision.INFO, vm.name, {"to": to, "driver": "qemu"})
        ram = info.get("ram", {}) if isinstance(info.get("ram"), dict) else {}
        total_ms, down_ms = info.get("total-time"), info.get("downtime")
        qemu_downtime = down_ms / 1000 if isinstance(down_ms, int | float) else None
        # QEMU stopped the guest at (migrate + total-time − downtime); it runs again at the destination
        # before COMMITTED reaches us, so this end-to-end figure is an upper bound of the real pause.
        paused_at = None
        if isinstance(total_ms, int | float) and isinstance(down_ms, int | float):
            paused_at = t_migrate + (total_ms - down_ms) / 1000
        return MigrationReport(
            vm=vm.name,
            source=agent.host_id,
            destination=auth.peer_host,
            operation=op.value,
            driver="qemu",
            data_plane=data_plane,
            outcome="completed",
            reason="QEMU completed; destination committed",
            total_time_s=t_done - t0,
            downtime_s=(t_done - paused_at) if paused_at is not None else qemu_downtime,
            wire_bytes=channel.bytes_out + (stream_bytes if data_plane == "qemu-tls" else 0),
            payload_bytes=stream_bytes,
            rounds=int(ram.get("dirty-sync-count", 0)),
            memory_digest=digest.hex(),
            extra={
                "qemu_total_time_s": total_ms / 1000 if isinstance(total_ms, int | float) else None,
                "qemu_downtime_s": qemu_downtime,
                "qemu_transferred_bytes": int(ram.get("transferred", 0)),
                "qemu_throughput_mbps": ram.get("mbps"),
                "handshake_and_setup_s": t_migrate - t0,
            },
        )

    async def _recover_source(self, vm: QemuVM, log: logging.Logger) -> None:
        """After a failed or aborted migration: cancel QEMU's, and make sure the guest runs here."""
        with contextlib.suppress(QemuError):
            info = await _query(vm.machine)
            if info.get("status") in ("active", "setup", "device", "pre-switchover"):
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
        self, vm: QemuVM, channel: SecureChannel, handle: MigrationHandle, table: bytearray, log: logging.Logger
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
        try:
            await vm.machine.execute("migrate", {"uri": f"unix:{sock_path}"})
            reader, writer = await asyncio.wait_for(accepted, 10.0)
            buf = bytearray()
            slot = 1
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
                    await channel.send(PageBatch(0, tuple(range(slot, slot + n)), chunk, digests))
                    slot += n
                    total += len(chunk)
                    handle.count(len(chunk))
                    handle.check()
                if not data:
                    break
            # QEMU closed its end: the stream is complete; the tail travels as the device state.
            await channel.send(RoundEnd(0))
            await channel.send(StopAndCopy())
            await channel.send(DeviceState(bytes(buf)))
            total += len(buf)
            handle.count(len(buf))
            info = await _wait_status(vm.machine, {"completed"}, 30.0)
            if info.get("status") != "completed":
                raise MigrationError(f"QEMU failed the migration: {info.get('error-desc', 'no reason given')}")
            log.debug("relayed %d bytes of QEMU stream in %d chunks", total, slot - 1)
            return total, info
        finally:
            if writer is not None:
                writer.close()
            server.close()
            with contextlib.suppress(OSError):
                sock_path.unlink()

    async def _tls_out(
        self, vm: QemuVM, channel: SecureChannel, handle: MigrationHandle, dest: tuple[str, int], log: logging.Logger
    ) -> tuple[dict[str, Any], float]:
        """Run QEMU's own TLS migration; returns query-migrate's answer and when the successful attempt began."""
        uri = f"tcp:{dest[0]}:{dest[1]}"
        deadline = time.monotonic() + 15.0
        while True:  # the destination starts its QEMU on the manifest: retry until it listens
            t_attempt = time.monotonic()
            await vm.machine.execute("migrate", {"uri": uri})
            # Every query-migrate takes QEMU's big lock: poll as gently as QEMU's own harness does.
            info = await _wait_status(vm.machine, {"completed", "cancelled"}, 600.0, poll_s=0.1)
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
        self, agent: Agent, channel: SecureChannel, auth: Authorized, handle: MigrationHandle, log: logging.Logger
    ) -> None:
        """Receive a QEMU VM; on any failure the destination QEMU is killed and nothing is installed."""
        if auth.page_size != STREAM_CHUNK:
            raise MigrationAborted(f"unknown memory geometry: {auth.page_size}-byte pages")
        timeout = agent.config.migration.idle_timeout
        vm: QemuVM | None = None
        writer: asyncio.StreamWriter | None = None
        tls_dir: Path | None = None
        installed = False
        try:
            event = await channel.next_event(timeout)
            if isinstance(event, RoundStart):
                event = await channel.next_event(timeout)
            if not isinstance(event, PageBatch) or event.page_numbers != (0,):
                raise MigrationError("expected the VM manifest in stream slot 0")
            manifest = json.loads(bytes(event.data).rstrip(b"\0"))
            ram = int(manifest["ram_bytes"])
            if ram * MAX_STREAM_FACTOR + 64 * _MIB < (auth.page_count - 1) * STREAM_CHUNK:
                raise MigrationError("stream bound larger than the VM's RAM warrants")
            params = GuestParams(**manifest["guest"])
            plane = manifest.get("data_plane")
            cfg = await self._machine_config(ram, params, incoming=True)
            if manifest.get("accel") in ("kvm", "tcg"):
                cfg = replace(cfg, accel=manifest["accel"])
            vm = await self._boot(auth.vm_id, cfg, params)
            vm.paused = True
            if plane == "relay":
                in_path = vm.workdir / "in.sock"
                await vm.machine.execute("migrate-incoming", {"uri": f"unix:{in_path}"})
                _r, writer = await asyncio.open_unix_connection(str(in_path))
            elif plane == "qemu-tls":
                trust = agent.trust()
                assert agent.identity is not None
                tls_dir = _write_tls_dir(agent.identity, certificate_pem(trust.ca_certificate), "server")
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
                host = agent.config.listen_address[0]
                await m.execute("migrate-incoming", {"uri": f"tcp:{host}:{int(manifest['tls_port'])}"})
            else:
                raise MigrationError(f"unknown data plane {plane!r}")
            log.info("receiving %s over %s", auth.vm_id, plane)
            next_slot = 1
            while True:
                event = await channel.next_event(timeout if plane == "relay" else 600.0)
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
                    agent.install_vm(auth, "qemu", vm)
                    installed = True
                    return
                elif isinstance(event, Aborted):
                    raise event.as_error()
                else:
                    raise MigrationError(f"unexpected {type(event).__name__}")
        except BaseException as err:
            if not isinstance(err, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    await channel.send(Abort(str(err) or type(err).__name__, AbortCode.REQUESTED))
            raise
        finally:
            if writer is not None:
                writer.close()
            if tls_dir is not None:
                shutil.rmtree(tls_dir, ignore_errors=True)
            if vm is not None and not installed:
                await vm.machine.kill()  # discard: nothing half-applied
                shutil.rmtree(vm.workdir, ignore_errors=True)
