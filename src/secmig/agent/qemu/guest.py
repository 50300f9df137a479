"""The reference guest: its parameters, its status block, and building its ELF from the C source.

The guest (``guest/`` at the top of the repository) is a 32-bit multiboot kernel that QEMU boots with
``-kernel``. It dirties a working set at a paced rate and counts its writes in a status block at the fixed
guest-physical address :data:`STATUS_ADDR`. This module builds the ELF with the machine's gcc into a
cache directory keyed by a hash of the sources and flags (nothing binary is committed), turns
:class:`GuestParams` into the ``-append`` line, and parses the status block from HMP ``xp`` output.

No processes are driven here except the compiler.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import ClassVar, Literal

from secmig.errors import ConfigError, GuestBuildError
from secmig.model.units import PAGE_SIZE

STATUS_ADDR = 0x101000
"""Guest-physical address of the status block (``GUEST_STATUS_ADDR`` in guest.c, pinned by linker.ld)."""
GUEST_MAGIC = 0x314747494D434553
"""``"SECMIGG1"`` read as a little-endian 64-bit word: the status block is there and valid."""
GUEST_VERSION = 1
WS_BASE = 4 << 20
"""The working set starts at 4 MiB of guest-physical memory."""

GUEST_SOURCES = ("boot.S", "guest.c", "linker.ld")
GUEST_CFLAGS = (
    "-m32", "-march=i686", "-O2", "-std=c11", "-ffreestanding", "-fno-pic", "-fno-pie",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-mno-sse", "-mno-mmx", "-mno-80387",
    "-Wall", "-Wextra", "-Werror",
)  # fmt: skip
GUEST_LDFLAGS = (
    "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments", "-T", "linker.ld",
)  # fmt: skip
"""Kept in step with guest/Makefile (a test checks it)."""

Pattern = Literal["seq", "rand", "hot"]
PATTERNS: tuple[Pattern, ...] = ("seq", "rand", "hot")
PATTERN_TO_MODEL: dict[Pattern, str] = {"seq": "sequential", "rand": "uniform", "hot": "hotspot"}
"""The guest's pattern names and the dirty-page models of :mod:`secmig.model.dirty` they realise."""


class GuestState(IntEnum):
    BOOTING = 0
    FILLING = 1
    RUNNING = 2
    ERROR = 3


_GUEST_ERRORS = {
    1: "not started by a multiboot loader",
    2: "no memory information from the loader",
    3: "the working set does not fit in the guest's RAM (it starts at 4 MiB)",
    4: "bad command line",
}


@dataclass(frozen=True, slots=True)
class GuestParams:
    """What the guest does: dirty ``working_set_bytes`` at ``rate_pages_per_s`` (0 = flat out)."""

    working_set_bytes: int = 64 << 20
    rate_pages_per_s: int = 20_000
    pattern: Pattern = "seq"
    hot_share_percent: int = 90
    """hot pattern: percent of the writes that land in the working set (the hot set); the others fall
    uniformly on all the RAM above it — :class:`secmig.model.dirty.Hotspot` with the working set as
    its hot set, as ``secmig predict`` reads ``--pattern hotspot``."""
    seed: int = 1

    def __post_init__(self) -> None:
        if self.working_set_bytes < PAGE_SIZE or self.working_set_bytes % PAGE_SIZE:
            raise ConfigError(f"working set: {self.working_set_bytes} bytes is not a whole number of pages")
        if self.rate_pages_per_s < 0:
            raise ConfigError(f"guest write rate: {self.rate_pages_per_s} is negative")
        if self.pattern not in PATTERNS:
            raise ConfigError(f"guest pattern: {self.pattern!r} is not one of {', '.join(PATTERNS)}")
        if not 0 <= self.hot_share_percent <= 100:
            raise ConfigError(f"hot pattern: hot share {self.hot_share_percent} is not a percentage")

    @property
    def working_set_pages(self) -> int:
        return self.working_set_bytes // PAGE_SIZE

    def min_ram_bytes(self) -> int:
        """The smallest guest RAM this working set fits in (with room for the BIOS's tables at the top)."""
        return WS_BASE + self.working_set_bytes + (2 << 20)

    def append_line(self) -> str:
        """The kernel command line for QEMU's ``-append``."""
        ws_kib = self.working_set_bytes // 1024
        return (
            f"ws={ws_kib}K rate={self.rate_pages_per_s} pattern={self.pattern} "
            f"hotshare={self.hot_share_percent} seed={self.seed}"
        )


@dataclass(frozen=True, slots=True)
class GuestStatus:
    """One reading of the guest's status block (``struct guest_status`` in guest.c)."""

    writes: int
    passes: int
    ws_pages: int
    rate_pages_per_s: int
    pattern: int
    tsc_hz: int
    state: GuestState
    mem_bytes: int
    ws_base: int
    cold_pages: int
    hot_share_percent: int
    version: int
    lagged: int
    error: int

    WORDS: ClassVar[int] = 15
    """64-bit words in the block, magic included."""

    @classmethod
    def from_words(cls, words: list[int]) -> GuestStatus:
        """Decode the block; raises ValueError if the magic is missing (the guest has not booted yet)."""
        if len(words) < cls.WORDS:
            raise ValueError(f"status block: {len(words)} words, expected {cls.WORDS}")
        if words[0] != GUEST_MAGIC:
            raise ValueError(f"status block: magic {words[0]:#x}, the guest has not started")
        state = words[7]
        return cls(
            writes=words[1],
            passes=words[2],
            ws_pages=words[3],
            rate_pages_per_s=words[4],
            pattern=words[5],
            tsc_hz=words[6],
            state=GuestState(state) if state in GuestState._value2member_map_ else GuestState.ERROR,
            mem_bytes=words[8],
            ws_base=words[9],
            cold_pages=words[10],
            hot_share_percent=words[11],
            version=words[12],
            lagged=words[13],
            error=words[14],
        )

    @property
    def error_text(self) -> str:
        return _GUEST_ERRORS.get(self.error, f"error code {self.error}")


_XP_LINE = re.compile(r"^\s*[0-9a-fA-F]+:\s*(?P<words>(?:\s*0x[0-9a-fA-F]+)+)\s*$")


def parse_xp_words(text: str) -> list[int]:
    """The 64-bit words of an HMP ``xp /Ngx ADDR`` answer, in address order."""
    words: list[int] = []
    for line in text.splitlines():
        m = _XP_LINE.match(line)
        if m:
            words.extend(int(w, 16) for w in m.group("words").split())
    return words


def xp_command(words: int = GuestStatus.WORDS) -> str:
    """The HMP command that dumps the status block."""
    return f"xp /{words}gx {STATUS_ADDR:#x}"


# ---- building ----


def find_guest_source() -> Path:
    """The directory holding the guest's C source: ``$SECMIG_GUEST_SRC`` or ``guest/`` of this checkout."""
    env = os.environ.get("SECMIG_GUEST_SRC")
    candidates = [Path(env)] if env else [p / "guest" for p in Path(__file__).resolve().parents]
    for cand in candidates:
        if all((cand / name).is_file() for name in GUEST_SOURCES):
            return cand
    where = env if env else "guest/ above the installed package"
    raise GuestBuildError(
        f"the reference guest's source ({', '.join(GUEST_SOURCES)}) is not in {where}; "
        "run from a secmig checkout (pip install -e .) or set SECMIG_GUEST_SRC"
    )


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "secmig"


def _compiler() -> str:
    cc = os.environ.get("CC", "gcc")
    path = shutil.which(cc)
    if path is None:
        raise GuestBuildError(f"no C compiler {cc!r} to build the reference guest: apt-get install gcc")
    return path


def build_guest(source_dir: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Path to the guest ELF, compiling it first if this source and these flags were never built."""
    src = source_dir or find_guest_source()
    cc = _compiler()
    digest = hashlib.sha256()
    for name in GUEST_SOURCES:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    digest.update(" ".join((cc, *GUEST_CFLAGS, *GUEST_LDFLAGS)).encode())
    out_dir = (cache_dir or _cache_root()) / f"guest-{digest.hexdigest()[:16]}"
    elf = out_dir / "guest.elf"
    if elf.is_file():
        return elf
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix="guest.", suffix=".elf.tmp", dir=out_dir)
    os.close(fd)
    cmd = [cc, *GUEST_CFLAGS, *GUEST_LDFLAGS, "-o", tmp_name, "boot.S", "guest.c"]
    try:
        proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            tail = " | ".join(detail[-3:]) if detail else f"exit {proc.returncode}"
            raise GuestBuildError(f"building the reference guest failed: {tail}")
        os.replace(tmp_name, elf)  # atomic: a concurrent build of the same source writes the same bytes
    except OSError as err:
        raise GuestBuildError(f"building the reference guest failed: {err}") from err
    except subprocess.TimeoutExpired as err:
        raise GuestBuildError("building the reference guest took over 120 s") from err
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return elf
