"""Dirty-page models: how many distinct pages are dirty ``t`` seconds after the last bitmap sync.

Every model is a function of the number of page writes since the sync (``rate × t``), so throttling the
vCPUs by a factor (auto-converge) is the same as asking for a shorter ``t``. The values are expectations;
the simulator may add seeded noise on top. Pure: the trace model is built from rows, not from a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from secmig.errors import ConfigError


class DirtyModel(Protocol):
    """Anything that answers "how many distinct pages are dirty t seconds after the last sync"."""

    @property
    def write_rate_pages_per_s(self) -> float:
        """Page writes per second (not distinct pages): the rate QEMU's dirty-rate probe reports."""
        ...

    def dirty_pages(self, t_s: float) -> float:
        """Expected number of distinct dirty pages ``t_s`` seconds after the last sync."""
        ...


@dataclass(frozen=True, slots=True)
class NoDirtying:
    """An idle VM: nothing is ever dirtied."""

    @property
    def write_rate_pages_per_s(self) -> float:
        return 0.0

    def dirty_pages(self, t_s: float) -> float:
        return 0.0


@dataclass(frozen=True, slots=True)
class Sequential:
    """A cyclic sweep over a working set of W pages at r page writes/s: ``min(W, r·t)``."""

    rate_pages_per_s: float
    working_set_pages: int

    @property
    def write_rate_pages_per_s(self) -> float:
        return self.rate_pages_per_s

    def dirty_pages(self, t_s: float) -> float:
        return min(float(self.working_set_pages), self.rate_pages_per_s * max(t_s, 0.0))


@dataclass(frozen=True, slots=True)
class Uniform:
    """Random writes spread evenly over W pages: expected ``W·(1 − e^(−r·t/W))`` distinct pages."""

    rate_pages_per_s: float
    working_set_pages: int

    @property
    def write_rate_pages_per_s(self) -> float:
        return self.rate_pages_per_s

    def dirty_pages(self, t_s: float) -> float:
        w = float(self.working_set_pages)
        if w <= 0:
            return 0.0
        return w * -math.expm1(-self.rate_pages_per_s * max(t_s, 0.0) / w)


@dataclass(frozen=True, slots=True)
class Hotspot:
    """A hot set of H pages takes ``hot_share`` of the writes; the rest fall uniformly on the other pages.

    Each part saturates on its own: ``H·(1 − e^(−s·r·t/H)) + C·(1 − e^(−(1−s)·r·t/C))`` with C the cold pages.
    """

    rate_pages_per_s: float
    hot_pages: int
    total_pages: int
    hot_share: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.hot_share <= 1.0:
            raise ConfigError(f"hotspot hot_share: {self.hot_share} is not between 0 and 1")

    @property
    def write_rate_pages_per_s(self) -> float:
        return self.rate_pages_per_s

    def dirty_pages(self, t_s: float) -> float:
        writes = self.rate_pages_per_s * max(t_s, 0.0)
        hot = float(self.hot_pages)
        cold = float(max(self.total_pages - self.hot_pages, 0))
        d = 0.0
        if hot > 0:
            d += hot * -math.expm1(-self.hot_share * writes / hot)
        if cold > 0:
            d += cold * -math.expm1(-(1.0 - self.hot_share) * writes / cold)
        return d


@dataclass(frozen=True, slots=True)
class Trace:
    """Replay of measured samples: distinct dirty pages at ``t`` seconds after a sync.

    Linear interpolation between samples; 0 at t = 0; past the last sample the count stays at the last
    value (the working set is saturated). The write rate is the initial slope.
    """

    times_s: tuple[float, ...]
    pages: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.times_s:
            raise ConfigError("dirty trace: no samples")
        if any(b <= a for a, b in zip(self.times_s, self.times_s[1:], strict=False)):
            raise ConfigError("dirty trace: times must increase strictly")
        if any(p < 0 for p in self.pages):
            raise ConfigError("dirty trace: dirty page counts must not be negative")

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[float, float]]) -> Trace:
        pts = sorted((float(t), float(p)) for t, p in rows if float(t) > 0)
        return cls(tuple(t for t, _ in pts), tuple(p for _, p in pts))

    @property
    def write_rate_pages_per_s(self) -> float:
        return self.pages[0] / self.times_s[0]

    def dirty_pages(self, t_s: float) -> float:
        return float(np.interp(max(t_s, 0.0), (0.0, *self.times_s), (0.0, *self.pages)))


def parse_trace_csv(text: str, source: str) -> Trace:
    """A trace from CSV text with columns time_s, dirty_pages (a header line is allowed)."""
    rows: list[tuple[float, float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2:
            raise ConfigError(f"{source}:{lineno}: expected 'time_s,dirty_pages', got {line!r}")
        try:
            rows.append((float(parts[0]), float(parts[1])))
        except ValueError:
            if lineno == 1 or not rows:
                continue  # header
            raise ConfigError(f"{source}:{lineno}: {line!r} is not two numbers") from None
    if not rows:
        raise ConfigError(f"{source}: no (time_s, dirty_pages) samples")
    try:
        return Trace.from_rows(rows)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
