"""A real Linux guest: Debian's kernel, a busybox initramfs and a workload at set rates, built and booted.

:func:`build_linux_guest` fetches Debian's cloud kernel package and ``busybox-static`` with
``apt-get download`` (nothing is installed), unpacks them with ``dpkg-deb``, takes the kernel image and
the virtio modules (virtio-net, virtio-blk, virtio-pci and whatever they depend on, read from each
module's ``.modinfo``), compiles ``guest/linux/workload.c`` statically, and writes a gzip'd newc cpio
initramfs itself. The result is cached under :func:`linux_guest_cache_dir` in a folder named after a hash
of the package versions and the sources; a second build only reads a manifest.

:class:`LinuxGuestParams` turns the workload's rates and the NIC's addresses into kernel command line
parameters (``secmig.*``); :class:`GuestImage` makes the :class:`MachineConfig` that boots it with a
virtio-net NIC (:class:`GuestNic`: a tap on a host bridge, or QEMU's user-mode network);
:func:`wait_linux_guest_ready` waits for the guest's ready line on the serial console, and
:func:`measure_dirty_rate` asks QEMU (``calc-dirty-rate``) how fast the guest really dirties its memory.

It creates no host network devices (taps, bridges): the caller does.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secmig.agent.qemu.guest import find_guest_source
from secmig.agent.qemu.machine import Accel, MachineConfig, QemuMachine
from secmig.errors import ConfigError, GuestBuildError, GuestError, GuestFetchError, QemuError
from secmig.model.units import PAGE_SIZE

KERNEL_PACKAGE = "linux-image-cloud-amd64"
"""Debian's kernel for VMs: virtio drivers as modules, no hardware drivers, a small image."""
BUSYBOX_PACKAGE = "busybox-static"
ROOT_MODULES = ("virtio_pci", "virtio_net", "virtio_blk")
"""Modules the initramfs loads (with their dependencies) when the kernel has them as modules."""
LINUX_GUEST_SOURCES = ("workload.c", "init")
"""Files of ``guest/linux/`` the image is built from (part of the cache key)."""
WORKLOAD_CFLAGS = ("-static", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-s")
BUILD_FORMAT = 1
"""Bumped when this builder lays the image out differently (part of the cache key)."""
BASE_APPEND = "console=ttyS0 quiet"
READY_PREFIX = "secmig-guest: ready"
ERROR_PREFIX = "secmig-guest: error"
DEFAULT_MAC = "52:54:00:5e:c0:01"
USER_NET_GUEST_IP = "10.0.2.15/24"
USER_NET_HOST_IP = "10.0.2.2"
"""QEMU's user-mode network: the guest's usual address, and the address where it reaches the host."""

_APT_LISTS = Path("/var/lib/apt/lists")
_TIMEOUT_S = 600


# ---- what the guest does ----


@dataclass(frozen=True, slots=True)
class LinuxGuestParams:
    """The workload's rates and eth0's addresses, as kernel command line parameters."""

    working_set_bytes: int = 64 << 20
    dirty_pages_per_s: int | None = 5000
    """Pages written per second, sequentially over the working set; 0 = none, None = flat out."""
    udp_dest: tuple[str, int] | None = None
    """Where the UDP traffic goes (host, port); None = no traffic."""
    udp_rate_bytes_per_s: int = 0
    udp_payload_bytes: int = 1024
    ip: str | None = None
    """eth0's address with its prefix length (``10.0.2.15/24``); None leaves eth0 down."""
    gateway: str | None = None
    mac: str | None = None
    """A MAC for eth0 to announce instead of the NIC's own (None: QEMU's, from :class:`GuestNic`)."""
    report_interval_s: int = 0
    """Print the workload's counters on the console every this many seconds (0 = never)."""
    pattern: str = "seq"
    """Which pages the workload writes: ``seq`` (a cyclic sweep), ``rand`` (uniformly random) or ``hot``
    (90 % of the writes on the first eighth of the working set, the rest uniformly on all of it)."""

    def __post_init__(self) -> None:
        if self.working_set_bytes < 1 << 20 or self.working_set_bytes % (1 << 20):
            raise ConfigError(f"Linux guest working set: {self.working_set_bytes} bytes is not a whole MiB")
        if self.dirty_pages_per_s is not None and self.dirty_pages_per_s < 0:
            raise ConfigError(f"Linux guest dirty rate: {self.dirty_pages_per_s} pages/s is negative")
        if self.udp_rate_bytes_per_s < 0:
            raise ConfigError(f"Linux guest UDP rate: {self.udp_rate_bytes_per_s} bytes/s is negative")
        if not 32 <= self.udp_payload_bytes <= 65507:
            raise ConfigError(f"Linux guest UDP payload: {self.udp_payload_bytes} bytes is not in 32..65507")
        if self.udp_dest is not None and not 0 < self.udp_dest[1] < 65536:
            raise ConfigError(f"Linux guest UDP port: {self.udp_dest[1]} is not in 1..65535")
        for what, value in (("address", self.ip), ("gateway", self.gateway), ("MAC", self.mac)):
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise ConfigError(f"Linux guest {what}: {value!r} is empty or has spaces")
        if self.pattern not in ("seq", "rand", "hot"):
            raise ConfigError(f"Linux guest write pattern: {self.pattern!r} is not seq, rand or hot")
        if self.report_interval_s < 0:
            raise ConfigError(f"Linux guest report interval: {self.report_interval_s} s is negative")

    def min_ram_bytes(self) -> int:
        """Guest RAM that holds the kernel, the unpacked initramfs and the working set."""
        return self.working_set_bytes + (128 << 20)

    def append_params(self) -> str:
        """The ``secmig.*`` kernel parameters the initramfs and the workload read."""
        dirty = "max" if self.dirty_pages_per_s is None else str(self.dirty_pages_per_s)
        words = [f"secmig.ws={self.working_set_bytes >> 20}", f"secmig.dirty={dirty}"]
        if self.udp_dest is not None and self.udp_rate_bytes_per_s > 0:
            words += [
                f"secmig.udp={self.udp_dest[0]}:{self.udp_dest[1]}",
                f"secmig.udp_rate={self.udp_rate_bytes_per_s}",
                f"secmig.udp_size={self.udp_payload_bytes}",
            ]
        for key, value in (("ip", self.ip), ("gw", self.gateway), ("mac", self.mac)):
            if value is not None:
                words.append(f"secmig.{key}={value}")
        if self.report_interval_s:
            words.append(f"secmig.report={self.report_interval_s}")
        if self.pattern != "seq":
            words.append(f"secmig.pattern={self.pattern}")
        return " ".join(words)


@dataclass(frozen=True, slots=True)
class GuestNic:
    """The guest's virtio-net NIC: on a host tap (that the caller made and put on a bridge) or on QEMU's
    user-mode network (``tap=None``: no root needed; the guest is 10.0.2.15 and reaches the host's
    loopback at 10.0.2.2)."""

    mac: str = DEFAULT_MAC
    tap: str | None = None

    def qemu_args(self, index: int = 0) -> tuple[str, ...]:
        netdev = (
            f"tap,id=net{index},ifname={self.tap},script=no,downscript=no"
            if self.tap is not None
            else f"user,id=net{index}"
        )
        # romfile= : no PXE option ROM (the kernel is loaded directly), so none has to be installed.
        return ("-netdev", netdev, "-device", f"virtio-net-pci,netdev=net{index},mac={self.mac},romfile=")


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built Linux guest: the kernel, its initramfs and what they were made from."""

    kernel: Path
    initrd: Path
    append: str
    """The default command line; :meth:`append_for` adds the workload's parameters."""
    kernel_package: str
    kernel_version: str
    kernel_release: str
    busybox_version: str
    modules: tuple[str, ...]
    """The modules /init loads, in load order."""

    @classmethod
    def load(cls, folder: Path) -> GuestImage:
        """The image in a cache folder (raises GuestBuildError if it is not a complete build)."""
        try:
            meta = json.loads((folder / "manifest.json").read_text())
            image = cls(
                kernel=folder / meta["kernel"],
                initrd=folder / meta["initrd"],
                append=str(meta["append"]),
                kernel_package=str(meta["kernel_package"]),
                kernel_version=str(meta["kernel_version"]),
                kernel_release=str(meta["kernel_release"]),
                busybox_version=str(meta["busybox_version"]),
                modules=tuple(meta["modules"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise GuestBuildError(f"{folder}: not a complete Linux guest build: {err}") from err
        if not (image.kernel.is_file() and image.initrd.is_file()):
            raise GuestBuildError(f"{folder}: the kernel or the initramfs is missing")
        return image

    def append_for(self, params: LinuxGuestParams) -> str:
        return f"{self.append} {params.append_params()}"

    def machine_config(
        self,
        params: LinuxGuestParams,
        *,
        ram_bytes: int,
        accel: Accel,
        qemu_binary: str,
        nics: Iterable[GuestNic] = (GuestNic(),),
        incoming: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> MachineConfig:
        """A config that boots this image running ``params``, with one virtio-net NIC per ``nics``."""
        if ram_bytes < params.min_ram_bytes():
            raise ConfigError(
                f"Linux guest RAM: {ram_bytes >> 20} MiB is too small for a "
                f"{params.working_set_bytes >> 20} MiB working set (give {params.min_ram_bytes() >> 20} MiB)"
            )
        nic_args = tuple(arg for i, nic in enumerate(nics) for arg in nic.qemu_args(i))
        return MachineConfig(
            kernel=self.kernel,
            append=self.append_for(params),
            ram_bytes=ram_bytes,
            accel=accel,
            qemu_binary=qemu_binary,
            incoming=incoming,
            extra_args=("-initrd", str(self.initrd), *nic_args, *extra_args),
        )


# ---- waiting for it and measuring it ----


@dataclass(frozen=True, slots=True)
class GuestReady:
    """The guest's ready line, parsed: eth0 is configured and the workload runs."""

    fields: Mapping[str, str]
    """Every ``key=value`` of the line: ip, mac, ws_mib, dirty_pages_per_s, udp, udp_bytes_per_s, …"""
    ready_after_s: float
    """Seconds from the call of :func:`wait_linux_guest_ready` to the line (from QEMU's start if the
    call came right after it)."""

    @property
    def mac(self) -> str:
        return self.fields.get("mac", "none")

    @property
    def ip(self) -> str:
        return self.fields.get("ip", "none")


def parse_ready_line(text: str) -> GuestReady | None:
    """The first ready line in console text, or None."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(READY_PREFIX):
            pairs = (w.split("=", 1) for w in line[len(READY_PREFIX) :].split() if "=" in w)
            return GuestReady(fields={k: v for k, v in pairs}, ready_after_s=0.0)
    return None


def _console_tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


async def wait_linux_guest_ready(vm: QemuMachine, timeout_s: float = 60.0) -> GuestReady:
    """Wait for the ready line on the guest's serial console (QEMU writes it to ``vm.serial_path``).

    An error line from /init or the workload, or QEMU exiting, raises at once (GuestError/QemuError).
    """
    start = time.monotonic()
    text = ""
    while time.monotonic() - start < timeout_s:
        with contextlib.suppress(OSError):
            text = vm.serial_path.read_text(errors="replace")
        ready = parse_ready_line(text)
        if ready is not None:
            return GuestReady(fields=ready.fields, ready_after_s=time.monotonic() - start)
        errors = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(ERROR_PREFIX)]
        if errors:
            raise GuestError(f"{vm.name}: {errors[0]}")
        if not vm.running:
            tail = vm.log_tail()
            raise QemuError(f"{vm.name}: QEMU exited before the guest was ready" + (f": {tail}" if tail else ""))
        await asyncio.sleep(0.1)
    raise GuestError(f"{vm.name}: the Linux guest was not ready in {timeout_s:.0f} s (console: {_console_tail(text)})")


@contextlib.asynccontextmanager
async def boot_linux_guest(
    name: str, config: MachineConfig, workdir: Path, timeout_s: float = 60.0
) -> AsyncIterator[tuple[QemuMachine, GuestReady]]:
    """Start QEMU on ``config`` (from :meth:`GuestImage.machine_config`) and wait until the guest is
    ready; QEMU is shut down (or killed, on an error) when the block ends."""
    async with QemuMachine(name, config, workdir) as vm:
        ready = await wait_linux_guest_ready(vm, timeout_s)
        yield vm, ready


async def measure_dirty_rate(vm: QemuMachine, calc_time_s: int = 2, sample_pages_per_gib: int = 10_000) -> float:
    """The guest's dirty rate in pages/s, measured by QEMU's ``calc-dirty-rate`` in page-sampling mode:
    QEMU hashes ``sample_pages_per_gib`` random pages per GiB of RAM, waits ``calc_time_s`` and counts
    the changed ones, so a page written twice counts once and the answer is an estimate (whole MiB/s,
    i.e. multiples of 256 pages/s). The exact dirty-bitmap mode crashes QEMU 7.2 under TCG.
    """
    await vm.execute(
        "calc-dirty-rate", {"calc-time": calc_time_s, "mode": "page-sampling", "sample-pages": sample_pages_per_gib}
    )
    deadline = time.monotonic() + calc_time_s + 30.0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        info = await vm.execute("query-dirty-rate")
        if isinstance(info, dict) and info.get("status") == "measured":
            return float(info["dirty-rate"]) * (1 << 20) / PAGE_SIZE
    raise QemuError(f"{vm.name}: calc-dirty-rate did not finish in {calc_time_s + 30} s")


@dataclass(frozen=True, slots=True)
class UdpArrivals:
    """The guest's datagrams that reached a host socket in a window."""

    payload_bytes: int
    datagrams: int
    lost: int
    """Gaps in the guest's sequence numbers over the window."""
    window_s: float

    @property
    def rate_bytes_per_s(self) -> float:
        return self.payload_bytes / self.window_s if self.window_s > 0 else 0.0


async def count_udp_arrivals(sock: socket.socket, window_s: float) -> UdpArrivals:
    """Drop what already waits in ``sock`` (a bound UDP socket), then count the guest's datagrams
    (those starting ``SMGU``) that arrive in the next ``window_s`` seconds."""
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.recv(65536)
    loop = asyncio.get_running_loop()
    total = count = 0
    first_seq: int | None = None
    last_seq = 0
    start = time.monotonic()
    deadline = start + window_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout=left)
        except TimeoutError:
            break
        if len(data) < 12 or data[:4] != b"SMGU":
            continue
        (seq,) = struct.unpack_from("<Q", data, 4)
        first_seq = seq if first_seq is None else first_seq
        last_seq = max(last_seq, seq)
        total += len(data)
        count += 1
    lost = 0 if first_seq is None else max(last_seq - first_seq + 1 - count, 0)
    return UdpArrivals(payload_bytes=total, datagrams=count, lost=lost, window_s=time.monotonic() - start)


# ---- the cache ----


def linux_guest_cache_dir() -> Path:
    """``$SECMIG_CACHE/linux-guest``, else ``$XDG_CACHE_HOME/secmig/linux-guest`` (``~/.cache/…``)."""
    root = os.environ.get("SECMIG_CACHE")
    if root:
        return Path(root) / "linux-guest"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "secmig" / "linux-guest"


def find_linux_guest_source() -> Path:
    """``guest/linux/`` of this checkout (or ``$SECMIG_GUEST_SRC/linux``)."""
    src = find_guest_source() / "linux"
    missing = [name for name in LINUX_GUEST_SOURCES if not (src / name).is_file()]
    if missing:
        raise GuestBuildError(f"the Linux guest's source {', '.join(missing)} is not in {src}")
    return src


# ---- Debian packages ----


@dataclass(frozen=True, slots=True)
class DebPackage:
    name: str
    version: str

    @property
    def file_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64.deb"


def _run(cmd: list[str], what: str, error: type[GuestBuildError], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False,
            env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
    except FileNotFoundError as err:
        raise error(f"{what}: {cmd[0]} is not installed (a Debian machine is needed)") from err
    except OSError as err:
        raise error(f"{what}: {err}") from err
    except subprocess.TimeoutExpired as err:
        raise error(f"{what}: took over {_TIMEOUT_S} s") from err
    if proc.returncode != 0:
        detail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if not ln.startswith("W:")]
        raise error(f"{what}: " + (" | ".join(detail[-3:]) if detail else f"exit {proc.returncode}"))
    return proc.stdout


def _apt_show(package: str) -> dict[str, str]:
    out = _run(["apt-cache", "show", "--no-all-versions", package], f"looking up {package}", GuestFetchError)
    fields: dict[str, str] = {}
    for line in out.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0].isspace() or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields[key] = value.strip()
    if "Version" not in fields:
        raise GuestFetchError(f"looking up {package}: apt knows no version of it")
    return fields


def _apt_lists_stamp() -> str:
    try:
        newest = max((p.stat().st_mtime_ns for p in _APT_LISTS.iterdir() if p.is_file()), default=0)
    except OSError:
        newest = 0
    return str(newest)


def _resolve_now(kernel_package: str) -> tuple[DebPackage, DebPackage]:
    meta = _apt_show(kernel_package)
    kernel = DebPackage(kernel_package, meta["Version"])
    # A metapackage (linux-image-cloud-amd64) depends on the versioned image package that holds the files.
    for dep in meta.get("Depends", "").split(","):
        m = re.match(r"\s*(linux-image-[^\s(|]+)\s*\(=\s*([^)\s]+)\)", dep)
        if m:
            kernel = DebPackage(m.group(1), m.group(2))
            break
    busybox = DebPackage(BUSYBOX_PACKAGE, _apt_show(BUSYBOX_PACKAGE)["Version"])
    return kernel, busybox


def resolve_packages(kernel_package: str, cache: Path) -> tuple[DebPackage, DebPackage]:
    """The kernel image package and busybox-static versions apt would fetch now.

    Remembered until apt's package lists change, so a warm build asks apt nothing. When apt does not
    know the packages (a fresh machine whose lists were never downloaded), runs ``apt-get update`` once
    if we are root.
    """
    stamp_file = cache / "resolved.json"
    stamp = _apt_lists_stamp()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        old = json.loads(stamp_file.read_text())
        if old["stamp"] == stamp and old["package"] == kernel_package:
            return DebPackage(*old["kernel"]), DebPackage(*old["busybox"])
    try:
        kernel, busybox = _resolve_now(kernel_package)
    except GuestFetchError:
        if os.geteuid() != 0:
            raise
        _run(["apt-get", "update", "-qq"], "apt-get update", GuestFetchError)
        kernel, busybox = _resolve_now(kernel_package)
        stamp = _apt_lists_stamp()
    record = {"stamp": stamp, "package": kernel_package, "kernel": [kernel.name, kernel.version],
              "busybox": [busybox.name, busybox.version]}  # fmt: skip
    _write_atomic(stamp_file, json.dumps(record).encode())
    return kernel, busybox


def fetch_deb(package: DebPackage, cache: Path) -> Path:
    """The package's .deb in ``cache/debs``, downloaded with ``apt-get download`` if not there yet."""
    debs = cache / "debs"
    target = debs / package.file_name
    if target.is_file():
        return target
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=debs) as tmp:
        # As root apt drops to the _apt user, who cannot write here: download as ourselves.
        _run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package.name}={package.version}"],
            f"downloading {package.name} {package.version}", GuestFetchError, cwd=Path(tmp),
        )  # fmt: skip
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise GuestFetchError(f"downloading {package.name}: apt-get download left {len(got)} .deb files")
        os.replace(got[0], target)
    return target


# ---- kernel modules ----


def modinfo(ko: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of a kernel module (an ELF64 relocatable), as key → value."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise ValueError("not an ELF64 file")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    names = ko[str_off : str_off + str_size]
    for i in range(shnum):
        name, offset, size = section(i)
        if names[name : names.index(b"\0", name)] == b".modinfo":
            info: dict[str, str] = {}
            for entry in ko[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    return {}


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise GuestBuildError(f"{path.name}: compressed kernel modules other than .xz are not supported")


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


def select_modules(module_dir: Path, roots: Iterable[str]) -> list[tuple[str, bytes]]:
    """The modules ``roots`` need (built-in ones skipped), dependencies first, as (name, ELF bytes)."""
    files = {_module_name(p): p for p in module_dir.rglob("*.ko*") if re.search(r"\.ko(\.xz|\.zst)?$", p.name)}
    builtin_file = module_dir / "modules.builtin"
    builtin = set()
    if builtin_file.is_file():
        builtin = {_module_name(Path(line.strip())) for line in builtin_file.read_text().splitlines() if line}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise GuestBuildError(f"kernel modules: a dependency cycle through {' → '.join((*chain, name))}")
        path = files.get(name)
        if path is None:
            raise GuestBuildError(f"kernel modules: {name} is neither built in nor in {module_dir}")
        data = _read_module(path)
        try:
            deps = [d for d in modinfo(data).get("depends", "").split(",") if d]
        except (ValueError, struct.error) as err:
            raise GuestBuildError(f"kernel modules: cannot read {path.name}: {err}") from err
        for dep in deps:
            visit(dep.replace("-", "_"), (*chain, name))
        seen.add(name)
        order.append((name, data))

    for root in roots:
        visit(root, ())
    return order


# ---- the initramfs ----


@dataclass(frozen=True, slots=True)
class CpioEntry:
    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """A newc ("070701") cpio archive, as the kernel unpacks an initramfs: owned by root, mtime 0."""
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    def put(ino: int, path: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        name = path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        pad()
        out.write(data)
        pad()

    for ino, entry in enumerate(entries, start=1):
        put(ino, entry.path.lstrip("/"), entry.mode, entry.data, entry.rdev)
    put(0, "TRAILER!!!", 0, b"", (0, 0))
    return out.getvalue()


def _initramfs(busybox: bytes, workload: bytes, init: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    dirs = ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp")
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755) for d in dirs]
    entries += [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("init", stat.S_IFREG | 0o755, init),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("bin/secmig-workload", stat.S_IFREG | 0o755, workload),
        CpioEntry("etc/secmig-modules", stat.S_IFREG | 0o644, "".join(f"{n}\n" for n, _ in modules).encode()),
    ]
    entries += [CpioEntry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data) for name, data in modules]
    raw = newc_archive(entries)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()


# ---- building ----


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile_workload(src: Path, out: Path) -> None:
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise GuestBuildError("no C compiler to build the Linux guest's workload: apt-get install gcc libc6-dev")
    try:
        _run([cc, *WORKLOAD_CFLAGS, "-o", str(out), str(src / "workload.c")],
             "compiling the Linux guest's workload", GuestBuildError)  # fmt: skip
    except GuestBuildError as err:
        hint = " (static linking needs libc6-dev: apt-get install libc6-dev)" if "-lc" in str(err) else ""
        raise GuestBuildError(f"{err}{hint}") from err


def _extract(deb: Path, into: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(into)], f"unpacking {deb.name}", GuestBuildError)


def _source_digest(src: Path) -> str:
    digest = hashlib.sha256()
    for name in LINUX_GUEST_SOURCES:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    digest.update(" ".join((*WORKLOAD_CFLAGS, *ROOT_MODULES, BASE_APPEND, str(BUILD_FORMAT))).encode())
    return digest.hexdigest()


def build_linux_guest(
    *, cache_dir: Path | None = None, kernel_package: str = KERNEL_PACKAGE, source_dir: Path | None = None
) -> GuestImage:
    """The Linux guest image, built first if these packages and sources were never built.

    Raises GuestFetchError when a package cannot be resolved or downloaded, GuestBuildError when
    anything else fails.
    """
    cache = cache_dir or linux_guest_cache_dir()
    src = source_dir or find_linux_guest_source()
    kernel_deb_pkg, busybox_pkg = resolve_packages(kernel_package, cache)
    key = hashlib.sha256(
        f"{kernel_deb_pkg.name}={kernel_deb_pkg.version} {busybox_pkg.name}={busybox_pkg.version} "
        f"{_source_digest(src)}".encode()
    ).hexdigest()[:16]
    out = cache / f"image-{key}"
    if (out / "manifest.json").is_file():
        return GuestImage.load(out)

    kernel_deb = fetch_deb(kernel_deb_pkg, cache)
    busybox_deb = fetch_deb(busybox_pkg, cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        _extract(kernel_deb, tmp / "kernel")
        _extract(busybox_deb, tmp / "busybox")
        vmlinuz = sorted((tmp / "kernel" / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise GuestBuildError(f"{kernel_deb.name}: expected one boot/vmlinuz-*, found {len(vmlinuz)}")
        release = vmlinuz[0].name.removeprefix("vmlinuz-")
        busybox = tmp / "busybox" / "bin" / "busybox"
        if not busybox.is_file():
            raise GuestBuildError(f"{busybox_deb.name}: no bin/busybox in it")
        modules = select_modules(tmp / "kernel" / "lib" / "modules" / release, ROOT_MODULES)
        _compile_workload(src, tmp / "workload")
        initrd = _initramfs(busybox.read_bytes(), (tmp / "workload").read_bytes(), (src / "init").read_bytes(), modules)
        stage = tmp / "image"
        stage.mkdir()
        shutil.copyfile(vmlinuz[0], stage / "vmlinuz")
        (stage / "initrd.gz").write_bytes(initrd)
        manifest: dict[str, Any] = {
            "kernel": "vmlinuz",
            "initrd": "initrd.gz",
            "append": BASE_APPEND,
            "kernel_package": kernel_deb_pkg.name,
            "kernel_version": kernel_deb_pkg.version,
            "kernel_release": release,
            "busybox_version": busybox_pkg.version,
            "modules": [name for name, _ in modules],
            "source_sha256": _source_digest(src),
        }
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(stage, out)
        except OSError:
            # A concurrent build of the same key got there first: its bytes are the same.
            if not (out / "manifest.json").is_file():
                raise
    return GuestImage.load(out)
