"""The reference guest's build, command line and status block, without running QEMU."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import pytest

from secmig.agent.qemu.guest import (
    GUEST_CFLAGS,
    GUEST_LDFLAGS,
    GUEST_MAGIC,
    STATUS_ADDR,
    GuestParams,
    GuestState,
    GuestStatus,
    build_guest,
    find_guest_source,
    parse_xp_words,
    xp_command,
)
from secmig.errors import ConfigError

MULTIBOOT_MAGIC = 0x1BADB002


def test_makefile_uses_the_harness_flags() -> None:
    """guest/Makefile builds with the same flags as the harness, so a hand build matches the cached one."""
    makefile = (find_guest_source() / "Makefile").read_text()
    cflags = re.search(r"^CFLAGS = (.*?)(?<!\\)$", makefile, re.M | re.S)
    ldflags = re.search(r"^LDFLAGS = (.*?)$", makefile, re.M)
    assert cflags and ldflags
    assert cflags.group(1).replace("\\\n", " ").split() == list(GUEST_CFLAGS)
    assert ldflags.group(1).split() == list(GUEST_LDFLAGS)


def test_linker_script_and_c_agree_on_the_status_address() -> None:
    """The status block address is the same in guest.c, linker.ld and the harness."""
    src = find_guest_source()
    assert f"GUEST_STATUS_ADDR {STATUS_ADDR:#x}u" in (src / "guest.c").read_text()
    assert f"guest_status == {STATUS_ADDR:#x}" in (src / "linker.ld").read_text()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_build_gives_a_multiboot_elf32_once(tmp_path: Path) -> None:
    """The build yields a 32-bit ELF with the multiboot header in its first 8 KiB, and is cached."""
    elf = build_guest(cache_dir=tmp_path)
    data = elf.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 1  # ELFCLASS32: QEMU's multiboot loader wants ELF32
    head = data[:8192]
    off = next(
        i for i in range(0, len(head) - 12, 4) if struct.unpack_from("<I", head, i)[0] == MULTIBOOT_MAGIC
    )
    magic, flags, checksum = struct.unpack_from("<III", head, off)
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    mtime = elf.stat().st_mtime_ns
    assert build_guest(cache_dir=tmp_path) == elf and elf.stat().st_mtime_ns == mtime


def test_append_line() -> None:
    """Parameters become the kernel command line the guest parses."""
    p = GuestParams(working_set_bytes=64 << 20, rate_pages_per_s=20_000, pattern="rand", seed=7)
    assert p.append_line() == "ws=65536K rate=20000 pattern=rand hotshare=90 seed=7"
    assert p.working_set_pages == 16384


@pytest.mark.parametrize(
    "kwargs",
    [
        {"working_set_bytes": 1000},
        {"rate_pages_per_s": -1},
        {"pattern": "zigzag"},
        {"hot_share_percent": 101},
    ],
)
def test_bad_params_are_refused(kwargs: dict[str, object]) -> None:
    """Nonsense guest parameters raise ConfigError before QEMU starts."""
    with pytest.raises(ConfigError):
        GuestParams(**kwargs)  # type: ignore[arg-type]


def _xp_text(words: list[int]) -> str:
    lines = []
    for i in range(0, len(words), 2):
        pair = " ".join(f"0x{w:016x}" for w in words[i : i + 2])
        lines.append(f"{STATUS_ADDR + 8 * i:016x}: {pair}")
    return "\r\n".join(lines) + "\r\n"


def test_status_block_decodes_from_xp() -> None:
    """An HMP xp dump of the block decodes field by field."""
    words = [GUEST_MAGIC, 123456, 3, 16384, 20000, 1, 2_600_000_000, 2, 268304384, 4 << 20, 0, 90, 1, 0, 0]
    text = _xp_text(words)
    assert xp_command() == f"xp /15gx {STATUS_ADDR:#x}"
    assert parse_xp_words(text) == words
    st = GuestStatus.from_words(parse_xp_words(text))
    assert (st.writes, st.ws_pages, st.rate_pages_per_s, st.state) == (
        123456,
        16384,
        20000,
        GuestState.RUNNING,
    )


def test_status_block_without_magic_is_not_trusted() -> None:
    """Before the guest has written its magic, the block is refused."""
    with pytest.raises(ValueError, match="magic"):
        GuestStatus.from_words([0] * GuestStatus.WORDS)
