"""One ``qemu-system-x86_64`` process booting the reference guest, driven over QMP.

:class:`QemuMachine` owns the process and its QMP connection (``qemu.qmp``'s :class:`QMPClient`): it
starts QEMU with the monitor on a Unix socket in a private work directory, connects, runs commands and
shuts QEMU down with ``quit``. Whatever goes wrong — QEMU exits, a command fails, the caller is
cancelled — the process is killed before the error leaves :meth:`QemuMachine.__aexit__`; nothing is left
running. Each machine logs through a child logger named after it, every QMP command at DEBUG.

It knows nothing about migration; :mod:`secmig.agent.qemu.migration` drives two of these.
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

from secmig.agent.qemu.guest import GuestState, GuestStatus, parse_xp_words, xp_command
from secmig.errors import ConfigError, GuestError, QemuError, QemuNotFound

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
class MachineConfig:
    """What to boot. Source and destination of a migration must get equal configs but ``incoming``."""

    kernel: Path
    append: str
    ram_bytes: int
    accel: Accel
    qemu_binary: str
    incoming: bool = False
    extra_args: tuple[str, ...] = ()
    """More QEMU arguments (the agents add ``-S`` so that a destination stays paused until COMMIT)."""

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
            "-smp", "1",
            "-m", f"{self.ram_bytes >> 20}M",
            "-kernel", str(self.kernel),
            "-append", self.append,
            "-display", "none", "-vga", "none",
            "-serial", f"file:{workdir / (name + '.serial')}",
            "-chardev", f"socket,id=qmp,path={workdir / (name + '.qmp')},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip
        if self.incoming:
            args += ["-incoming", "defer"]
        return args + list(self.extra_args)


class QemuMachine:
    """A QEMU process and its QMP client. Use as ``async with QemuMachine(...) as vm:``."""

    def __init__(self, name: str, config: MachineConfig, workdir: Path) -> None:
        self.name = name
        self.config = config
        self.workdir = workdir
        self.logger = _LOG.getChild(name)
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QMPClient | None = None

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
        with open(self.log_path, "wb") as log:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
                )
            except FileNotFoundError as err:
                raise QemuNotFound(f"{argv[0]} not found; {INSTALL_HINT}") from err
            except OSError as err:
                raise QemuError(f"{self.name}: cannot start {argv[0]}: {err}") from err
        try:
            await self._connect(timeout_s)
        except BaseException:
            await self.kill()
            raise

    async def _connect(self, timeout_s: float) -> None:
        sock = str(self.workdir / f"{self.name}.qmp")
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while True:
            assert self._proc is not None
            if self._proc.returncode is not None:
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
        if self._proc is None:
            return
        if self.running and self._qmp is not None:
            # QEMU may close the socket before its answer to quit arrives: either way it is going.
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                await asyncio.wait_for(self._qmp.execute("quit"), timeout=timeout_s)
        try:
            await asyncio.wait_for(self._proc.wait(), timeout=timeout_s)
        except TimeoutError:
            self.logger.warning("did not quit in %.0f s; killing it", timeout_s)
        await self.kill()

    async def kill(self) -> None:
        """Kill the process (if it still runs) and drop the QMP connection. Safe to call twice."""
        proc, self._proc = self._proc, None
        qmp, self._qmp = self._qmp, None
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
            if self._proc is None:
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
