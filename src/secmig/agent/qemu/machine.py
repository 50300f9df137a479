"""One ``qemu-system-x86_64`` process booting the reference guest, driven over QMP.

:class:`QemuMachine` owns the process and its QMP connection (``qemu.qmp``'s :class:`QMPClient`): it
starts QEMU with the monitor on a Unix socket in a private work directory, connects, runs commands and
shuts QEMU down with ``quit``. Whatever goes wrong — QEMU exits, a command fails, the caller is
cancelled — the process is killed before the error leaves :meth:`QemuMachine.__aexit__`; nothing is left
running. Each machine logs through a child logger named after it, every QMP command at DEBUG.

It knows nothing about migration; :mod:`secmig.agent.qemu.migration` drives two of these.

Two ways to run QEMU (issue 12, crash safety):

- **standalone** (no ``owner``; calibration, the lab, tests): QEMU dies with the process that started it,
  even by kill -9 (``PR_SET_PDEATHSIG``, :func:`die_with_parent`).
- **owned by an agent** (``owner``: the agent's token, see :meth:`secmig.agent.vmstate.VMStore.owner`):
  QEMU runs detached from the agent's life — its own session and process group, no parent-death signal —
  with ``SECMIG_QEMU_OWNER=<token>`` in its environment. A restarted agent re-adopts it from its state file
  (:meth:`QemuMachine.adopt`: the pid must still be a QEMU carrying that token and that ``-name``, read
  from ``/proc/PID/cmdline`` and ``/proc/PID/environ``), or kills it when nothing records it
  (:func:`owned_qemus`, :func:`kill_pid`). An adopted QEMU is no child of the agent: it is watched and
  killed by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from qemu.qmp import ExecuteError, QMPClient, QMPError

from secmig.agent import hostnet
from secmig.agent.qemu.guest import GuestState, GuestStatus, parse_xp_words, xp_command
from secmig.errors import ConfigError, GuestError, QemuError, QemuNotFound, ScrubError

QEMU_BINARY = "qemu-system-x86_64"
INSTALL_HINT = "install it with: apt-get install qemu-system-x86"
Accel = Literal["kvm", "tcg"]
AccelChoice = Literal["auto", "kvm", "tcg"]

_LOG = logging.getLogger(__name__)
_LOG_TAIL_LINES = 5


def find_qemu(binary: str | None = None) -> str:
    """Absolute path of the QEMU binary (``binary`` as given, or ``qemu-system-x86_64`` on PATH)."""
    name = binary or QEMU_BINARY
    path = shutil.which(name)
    if path is None:
        raise QemuNotFound(f"{name} not found; {INSTALL_HINT}")
    return path


def kvm_usable() -> bool:
    """Whether this process may open /dev/kvm (read and write)."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def kvm_is_pvm() -> bool:
    """Whether /dev/kvm is PVM (``kvm_pvm``: page-table-based nested virtualization, no VT-x/AMD-V).

    PVM runs only enlightened 64-bit guests natively; it emulates the reference guest's 32-bit
    non-paged code instruction by instruction (about 60 000 page writes/s against TCG's millions), so
    ``auto`` does not pick it.
    """
    return os.path.isdir("/sys/module/kvm_pvm")


def choose_accel(choice: AccelChoice) -> Accel:
    """KVM when asked for, or for ``auto`` when /dev/kvm is usable hardware KVM; TCG otherwise."""
    if choice == "tcg":
        return "tcg"
    if choice == "kvm":
        if not kvm_usable():
            raise ConfigError("accelerator kvm: /dev/kvm is missing or not writable (use --accel tcg)")
        return "kvm"
    if choice != "auto":
        raise ConfigError(f"accelerator {choice!r}: give auto, kvm or tcg")
    return "kvm" if kvm_usable() and not kvm_is_pvm() else "tcg"


@dataclass(frozen=True, slots=True)
class DiskConfig:
    """A disk image on virtio-blk."""

    path: Path
    format: Literal["qcow2", "raw"] = "qcow2"


@dataclass(frozen=True, slots=True)
class NicConfig:
    """A NIC: its MAC and the tap (on a host bridge, the vSwitch) that is its backend."""

    mac: str
    tap: str
    bridge: str
    model: str = "virtio-net-pci"


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """What to boot. Source and destination of a migration must get equal configs but ``incoming``."""

    kernel: Path | None
    """None: boot from the first disk."""
    append: str
    ram_bytes: int
    accel: Accel
    qemu_binary: str
    incoming: bool = False
    extra_args: tuple[str, ...] = ()
    """More QEMU arguments (the agents add ``-S`` so that a destination stays paused until COMMIT)."""
    initrd: Path | None = None
    vcpus: int = 1
    disks: tuple[DiskConfig, ...] = ()
    nics: tuple[NicConfig, ...] = ()
    memory_path: Path | None = None
    """Back the guest's RAM with this shared file (e.g. ``/dev/shm/secmig-<vm>``) so that the agent can
    scrub it with :func:`scrub_ram` once QEMU is gone; None: QEMU's anonymous RAM."""

    def __post_init__(self) -> None:
        if self.ram_bytes <= 0 or self.ram_bytes % (1 << 20):
            raise ConfigError(f"guest RAM: {self.ram_bytes} bytes is not a whole number of MiB")

    def argv(self, name: str, workdir: Path) -> list[str]:
        args = [
            self.qemu_binary,
            "-name", name,
            "-nodefaults", "-no-user-config",
            "-machine", "pc",
            "-accel", self.accel,
            "-smp", str(self.vcpus),
            "-m", f"{self.ram_bytes >> 20}M",
            "-display", "none", "-vga", "none",
            "-serial", f"file:{workdir / (name + '.serial')}",
            "-chardev", f"socket,id=qmp,path={workdir / (name + '.qmp')},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip
        if self.kernel is not None:
            args += ["-kernel", str(self.kernel), "-append", self.append]
            if self.initrd is not None:
                args += ["-initrd", str(self.initrd)]
        for i, d in enumerate(self.disks):
            args += ["-blockdev", f"driver=file,node-name=file{i},filename={d.path},cache.direct=off"]
            args += ["-blockdev", f"driver={d.format},node-name=disk{i},file=file{i}"]
            args += ["-device", f"virtio-blk-pci,drive=disk{i},id=blk{i}" + (",bootindex=1" if i == 0 else "")]
        for i, n in enumerate(self.nics):
            args += ["-netdev", f"tap,id=net{i},ifname={n.tap},script=no,downscript=no"]
            args += ["-device", f"{n.model},netdev=net{i},mac={n.mac},id=nic{i}"]
        if self.incoming:
            args += ["-incoming", "defer"]
        if self.memory_path is not None:
            size = f"{self.ram_bytes >> 20}M"
            args += ["-object", f"memory-backend-file,id=mem,size={size},mem-path={self.memory_path},share=on"]
            args += ["-machine", "memory-backend=mem"]
        return args + list(self.extra_args)


def bridge_exists(bridge: str) -> bool:
    """Whether ``bridge`` is a Linux bridge on this host."""
    return os.path.isdir(f"/sys/class/net/{bridge}/bridge")


_PR_SET_PDEATHSIG = 1
OWNER_ENV = "SECMIG_QEMU_OWNER"
"""In an owned QEMU's environment: the token of the agent (state folder) that owns it."""


def _proc_file(pid: int, what: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{what}", "rb") as fh:
            return fh.read()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    stat = _proc_file(pid, "stat")
    if stat is None:
        return False
    fields = stat.rsplit(b")", 1)[-1].split()
    return bool(fields) and fields[0] != b"Z"


def _cmdline(pid: int) -> list[str]:
    raw = _proc_file(pid, "cmdline") or b""
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def owned_qemu_name(pid: int, owner: str) -> str | None:
    """The ``-name`` of the QEMU running as ``pid`` when it carries ``owner``'s token (else None)."""
    if not pid_alive(pid):
        return None
    env = _proc_file(pid, "environ") or b""
    if f"{OWNER_ENV}={owner}".encode() not in env.split(b"\0"):
        return None
    argv = _cmdline(pid)
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return None
    for i, a in enumerate(argv[:-1]):
        if a == "-name":
            return argv[i + 1].split(",", 1)[0]
    return None


def qemu_memory_path(pid: int) -> Path | None:
    """The RAM backing file on ``pid``'s command line (``mem-path=``), if any."""
    for a in _cmdline(pid):
        for part in a.split(","):
            if part.startswith("mem-path="):
                return Path(part[len("mem-path=") :])
    return None


def owned_qemus(owner: str) -> dict[int, str]:
    """Every live QEMU carrying ``owner``'s token: pid → ``-name``."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            name = owned_qemu_name(int(entry), owner)
            if name is not None:
                found[int(entry)] = name
    return found


def kill_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL ``pid`` and wait until it is gone (or a zombie: not ours to reap)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def die_with_parent() -> None:
    """In a forked child before exec: have the kernel SIGKILL it when the agent dies (even by kill -9),
    so that no QEMU outlives the agent that alone may decide whether it runs (issue 12, crash safety)."""
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    if os.getppid() != parent:  # the agent died between fork and prctl
        os._exit(127)


class QemuMachine:
    """A QEMU process and its QMP client. Use as ``async with QemuMachine(...) as vm:``."""

    def __init__(self, name: str, config: MachineConfig, workdir: Path, *, owner: str | None = None) -> None:
        self.name = name
        self.config = config
        self.workdir = workdir
        self.owner = owner
        """The owning agent's token: QEMU then runs detached from the agent's life (see the module)."""
        self.logger = _LOG.getChild(name)
        self._proc: asyncio.subprocess.Process | None = None
        self._adopted: int | None = None
        """The pid of a QEMU adopted from a previous agent (no child of this process)."""
        self._qmp: QMPClient | None = None

    @classmethod
    async def adopt(
        cls, name: str, config: MachineConfig, workdir: Path, pid: int, owner: str, timeout_s: float = 10.0
    ) -> QemuMachine:
        """Re-adopt a QEMU a previous agent (with the same ``owner`` token) started: verify the pid is that
        QEMU (/proc/PID/cmdline and environ), reconnect to its monitor. QemuError when it is not."""
        if owned_qemu_name(pid, owner) != name:
            raise QemuError(f"{name}: pid {pid} is not this agent's QEMU {name} (gone?)")
        machine = cls(name, config, workdir, owner=owner)
        machine._adopted = pid
        try:
            await machine._connect(timeout_s)
        except BaseException:
            machine._adopted = None  # not killed here: the caller decides (it may be in doubt)
            raise
        machine.logger.debug("adopted pid %d", pid)
        return machine

    @property
    def pid(self) -> int | None:
        """QEMU's pid (None when not running under this object)."""
        if self._proc is not None:
            return self._proc.pid
        return self._adopted

    async def detach(self) -> None:
        """Leave QEMU running (a copy in doubt, for a restarted agent) and drop the monitor connection, so
        that QEMU accepts the next agent's client."""
        self._proc, self._adopted = None, None
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await qmp.disconnect()

    # ---- lifecycle ----

    async def __aenter__(self) -> QemuMachine:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.shutdown()
        else:
            await self.kill()

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def serial_path(self) -> Path:
        return self.workdir / f"{self.name}.serial"

    @property
    def running(self) -> bool:
        if self._adopted is not None:
            return pid_alive(self._adopted)
        return self._proc is not None and self._proc.returncode is None

    def log_tail(self) -> str:
        """The last lines QEMU printed, for error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        lines = [ln for ln in lines if "host doesn't support requested feature" not in ln]
        return " | ".join(lines[-_LOG_TAIL_LINES:])

    def _died(self, what: str) -> QemuError:
        rc = self._proc.returncode if self._proc else None
        tail = self.log_tail()
        return QemuError(f"{self.name}: QEMU exited (code {rc}) {what}" + (f": {tail}" if tail else ""))

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start QEMU and connect to its monitor; on any failure the process is killed."""
        if self._proc is not None:
            raise QemuError(f"{self.name}: already started")
        argv = self.config.argv(self.name, self.workdir)
        self.logger.debug("starting: %s", " ".join(argv))
        detached: dict[str, Any] = (
            {"preexec_fn": die_with_parent}
            if self.owner is None
            else {"start_new_session": True, "env": {**os.environ, OWNER_ENV: self.owner}}
        )
        with open(self.log_path, "wb") as log:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, **detached
                )
            except FileNotFoundError as err:
                raise QemuNotFound(f"{argv[0]} not found; {INSTALL_HINT}") from err
            except OSError as err:
                raise QemuError(f"{self.name}: cannot start {argv[0]}: {err}") from err
        try:
            await self._connect(timeout_s)
            for nic in self.config.nics:  # QEMU made the tap (it is gone with QEMU); plug it into the vSwitch
                await asyncio.to_thread(hostnet.create_tap, nic.tap, nic.bridge)
        except BaseException:
            await self.kill()
            raise

    async def _connect(self, timeout_s: float) -> None:
        sock = str(self.workdir / f"{self.name}.qmp")
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while True:
            assert self._proc is not None or self._adopted is not None
            if not self.running:
                raise self._died("before its monitor answered")
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: QMP monitor did not answer in {timeout_s:.0f} s") from last
            if os.path.exists(sock):
                client = QMPClient(self.name)
                try:
                    left = max(deadline - time.monotonic(), 0.1)
                    await asyncio.wait_for(client.connect(sock), timeout=left)
                except (QMPError, OSError, TimeoutError) as err:
                    last = err
                    with contextlib.suppress(QMPError, OSError):
                        await client.disconnect()
                else:
                    self._qmp = client
                    self.logger.debug("QMP connected on %s", sock)
                    return
            await asyncio.sleep(0.05)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask QEMU to quit, wait for it, and kill it if it does not go in time."""
        if self._proc is None and self._adopted is None:
            return
        if self.running and self._qmp is not None:
            # QEMU may close the socket before its answer to quit arrives: either way it is going.
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                await asyncio.wait_for(self._qmp.execute("quit"), timeout=timeout_s)
        try:
            if self._proc is not None:
                await asyncio.wait_for(self._proc.wait(), timeout=timeout_s)
            else:
                deadline = time.monotonic() + timeout_s
                while self.running:
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    await asyncio.sleep(0.02)
        except TimeoutError:
            self.logger.warning("did not quit in %.0f s; killing it", timeout_s)
        await self.kill()

    async def kill(self) -> None:
        """Kill the process (if it still runs) and drop the QMP connection. Safe to call twice."""
        proc, self._proc = self._proc, None
        adopted, self._adopted = self._adopted, None
        qmp, self._qmp = self._qmp, None
        if adopted is not None:
            await asyncio.shield(asyncio.to_thread(kill_pid, adopted))
            self.logger.debug("killed (adopted pid %d)", adopted)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            # Reap it even when we are being cancelled, so no zombie is left behind.
            await asyncio.shield(proc.wait())
            self.logger.debug("killed")
        if qmp is not None:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await qmp.disconnect()

    # ---- commands ----

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
        """Run a QMP command and return its answer; a refusal or a dead QEMU raises QemuError."""
        if self._qmp is None or not self.running:
            if self._proc is None and self._adopted is None:
                raise QemuError(f"{self.name}: not started")
            raise self._died(f"before {cmd}")
        self.logger.debug("-> %s %s", cmd, args or "")
        try:
            result = await asyncio.wait_for(self._qmp.execute(cmd, args), timeout=timeout_s)
        except ExecuteError as err:
            raise QemuError(f"{self.name}: {cmd} refused: {err.error.error.desc}") from err
        except TimeoutError as err:
            raise QemuError(f"{self.name}: {cmd} got no answer in {timeout_s:.0f} s") from err
        except (QMPError, OSError, EOFError) as err:
            if not self.running:
                raise self._died(f"during {cmd}") from err
            raise QemuError(f"{self.name}: {cmd} failed: {err}") from err
        self.logger.debug("<- %s", result)
        return result

    async def hmp(self, command_line: str) -> str:
        """Run a human-monitor command and return its text."""
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        return str(out)

    async def read_status(self) -> GuestStatus:
        """The guest's status block; raises GuestError while the guest has not written it yet."""
        text = await self.hmp(xp_command())
        try:
            return GuestStatus.from_words(parse_xp_words(text))
        except ValueError as err:
            raise GuestError(f"{self.name}: {err}") from err

    async def wait_guest_running(self, timeout_s: float = 30.0) -> GuestStatus:
        """Wait until the guest has filled its working set and runs its workload."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                status = await self.read_status()
            except GuestError as err:
                last = err
            else:
                if status.state == GuestState.ERROR:
                    raise GuestError(f"{self.name}: the guest stopped: {status.error_text}")
                if status.state == GuestState.RUNNING:
                    return status
            await asyncio.sleep(0.05)
        serial = ""
        with contextlib.suppress(OSError):
            serial = " | ".join(self.serial_path.read_text(errors="replace").strip().splitlines()[-3:])
        raise GuestError(
            f"{self.name}: the guest did not start its workload in {timeout_s:.0f} s"
            + (f" (console: {serial})" if serial else "")
        ) from last

    async def accelerator(self) -> Accel:
        """The accelerator QEMU really uses (``query-kvm``)."""
        info = await self.execute("query-kvm")
        return "kvm" if isinstance(info, dict) and info.get("enabled") else "tcg"


_SCRUB_CHUNK = 4 << 20


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the parts of a file that hold data (a hole reads as zeros and holds nothing)."""
    extents: list[tuple[int, int]] = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off (or no SEEK_DATA here: the caller falls back)
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, min(end, size) - start))
        off = end
    return extents


def scrub_ram(path: Path, *, unlink: bool = True) -> int:
    """Zero a dead guest's RAM backing file (its data written over, synced, the whole file read back), then
    unlink it.

    Only the parts that hold data are written (a hole of a sparse file holds nothing), so a guest that
    touched little of its RAM is scrubbed fast. Call it only once QEMU is gone: a live QEMU would keep
    writing. Returns the file's size (every byte of it now reads as zero); raises ScrubError when the file
    cannot be written or does not read back as zeros.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    except OSError as err:
        raise ScrubError(f"scrub {path}: {err.strerror or err}") from err
    zeros = bytes(_SCRUB_CHUNK)
    try:
        size = os.fstat(fd).st_size
        for start, length in _data_extents(fd, size) if hasattr(os, "SEEK_DATA") else [(0, size)]:
            for off in range(start, start + length, _SCRUB_CHUNK):
                n = min(_SCRUB_CHUNK, start + length - off)
                if os.pwrite(fd, zeros[:n], off) != n:
                    raise ScrubError(f"scrub {path}: short write at offset {off}")
        os.fsync(fd)
        for off in range(0, size, _SCRUB_CHUNK):
            n = min(_SCRUB_CHUNK, size - off)
            if os.pread(fd, n, off) != zeros[:n]:
                raise ScrubError(f"scrub {path}: non-zero bytes remain near offset {off}")
    except OSError as err:
        raise ScrubError(f"scrub {path}: {err.strerror or err}") from err
    finally:
        os.close(fd)
    if unlink:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return size
