"""Quantities with units: sizes, rates and durations, parsed from text and printed back.

Sizes are bytes (``4GiB``, ``512MiB``, ``1.5GB``, ``4096``); rates are bytes per second (``10Gbit/s``,
``120MB/s``) or pages per second (``20000pages/s``); durations are seconds (``300ms``, ``2s``, ``1min``).
Binary prefixes (KiB, MiB, GiB) are powers of 1024, SI prefixes (kB, MB, GB) powers of 1000, as in
QEMU's and iperf's output. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from secmig.errors import UnitError

PAGE_SIZE = 4096
"""Bytes in one guest page (x86 small page), as QEMU's RAM migration counts them."""

_BYTE_PREFIX = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)"
_SIZE_RE = re.compile(
    rf"^{_NUMBER}(?:(?P<prefix>Ki|Mi|Gi|Ti|k|K|M|G|T)?(?P<unit>B|bit|b)|(?P<pages>pages?))?$"
)
_RATE_RE = re.compile(
    rf"^{_NUMBER}(?:(?P<prefix>Ki|Mi|Gi|Ti|k|K|M|G|T)?(?P<unit>B|bit|b|bps|Bps)|(?P<pages>pages?))"
    r"(?:/s|ps)?$"
)
_DURATION_RE = re.compile(rf"^{_NUMBER}(?P<unit>ns|us|µs|ms|s|sec|min|h)?$")
_DURATION_FACTOR = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "min": 60.0,
    "h": 3600.0,
    None: 1.0,
}


@dataclass(frozen=True, slots=True)
class Rate:
    """A rate, in bytes per second or in pages per second (exactly one is set)."""

    bytes_per_s: float | None = None
    pages_per_s: float | None = None

    def in_pages_per_s(self, page_size: int = PAGE_SIZE) -> float:
        if self.pages_per_s is not None:
            return self.pages_per_s
        assert self.bytes_per_s is not None
        return self.bytes_per_s / page_size

    def in_bytes_per_s(self, page_size: int = PAGE_SIZE) -> float:
        if self.bytes_per_s is not None:
            return self.bytes_per_s
        assert self.pages_per_s is not None
        return self.pages_per_s * page_size


def _hint_size(text: str) -> str:
    m = re.match(rf"^{_NUMBER}\s*(?P<prefix>[kKMGT])i?B$", text)
    if m:
        return f" (try {m.group('num')}{m.group('prefix').upper()}iB)"
    return " (try e.g. 4GiB, 512MiB, 1.5GB)"


def parse_size(value: str | int | float) -> int:
    """Bytes from ``4GiB``, ``1.5GB``, ``100pages``, ``64Mbit`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a size")
    if isinstance(value, int | float):
        if value < 0:
            raise UnitError(f"{value!r} is not a size: negative")
        return int(value)
    text = value.strip()
    m = _SIZE_RE.match(text)
    if not m:
        raise UnitError(f'"{value}" is not a size{_hint_size(text)}')
    num = float(m.group("num"))
    if m.group("pages"):
        return round(num * PAGE_SIZE)
    factor = _BYTE_PREFIX[m.group("prefix") or ""]
    if m.group("unit") in ("bit", "b"):
        return round(num * factor / 8)
    return round(num * factor)


def parse_rate(value: str | int | float) -> Rate:
    """A rate from ``10Gbit/s``, ``120MB/s``, ``1Gbps``, ``20000pages/s`` or a number of bytes/s."""
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a rate")
    if isinstance(value, int | float):
        if value < 0:
            raise UnitError(f"{value!r} is not a rate: negative")
        return Rate(bytes_per_s=float(value))
    text = value.strip()
    m = _RATE_RE.match(text)
    if not m:
        raise UnitError(f'"{value}" is not a rate (try e.g. 10Gbit/s, 120MB/s, 20000pages/s)')
    num = float(m.group("num"))
    if m.group("pages"):
        return Rate(pages_per_s=num)
    factor = _BYTE_PREFIX[m.group("prefix") or ""]
    if m.group("unit") in ("bit", "b", "bps"):
        return Rate(bytes_per_s=num * factor / 8)
    return Rate(bytes_per_s=num * factor)


def parse_bandwidth(value: str | int | float) -> float:
    """Bytes per second from a rate that must not be in pages (a link's or a NIC's speed)."""
    rate = parse_rate(value)
    if rate.bytes_per_s is None:
        raise UnitError(f'"{value}" is not a bandwidth: give bytes or bits per second, e.g. 10Gbit/s')
    return rate.bytes_per_s


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``300ms``, ``2s``, ``1.5min`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise UnitError(f"{value!r} is not a duration: negative")
        return float(value)
    m = _DURATION_RE.match(value.strip())
    if not m:
        raise UnitError(f'"{value}" is not a duration (try e.g. 300ms, 2s, 1min)')
    return float(m.group("num")) * _DURATION_FACTOR[m.group("unit")]


def format_bytes(n: float) -> str:
    """``3.00 GiB`` style, binary prefixes."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n:.0f} B"


def format_rate(bytes_per_s: float) -> str:
    """``1.00 Gbit/s`` style, SI prefixes on bits, as network people read them."""
    bits = bytes_per_s * 8
    for unit, factor in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if abs(bits) >= factor:
            return f"{bits / factor:.2f} {unit}"
    return f"{bits:.0f} bit/s"


def format_duration(seconds: float) -> str:
    """``1.23 s`` or ``45.6 ms``."""
    if abs(seconds) >= 0.9995:
        return f"{seconds:.2f} s"
    if abs(seconds) >= 0.9995e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"
