"""Utilisation models: what fraction of its MIPS a cloudlet asks for at a time.

- :class:`FullUtilisation` — always 1 (CloudSim's ``UtilizationModelFull``).
- :class:`ConstantUtilisation` — a fixed fraction.
- :class:`StochasticUtilisation` — a uniform draw per sampling interval from a seeded generator, the same
  value for every time inside one interval (``UtilizationModelStochastic`` with a seed).
- :class:`TraceUtilisation` — a sampled trace, linear between samples (``UtilizationModelPlanetLabInMemory``).

:class:`TraceSet` holds the traces of many VMs as one matrix and answers for all of them at once with
CloudSim's exact arithmetic (same operations in the same order, so the same floating-point results).
:func:`parse_planetlab` turns the text of one PlanetLab file (one integer percentage per line) into a
trace; reading the files is the caller's business: nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from secmig.errors import ConfigError

FloatArray = npt.NDArray[np.float64]

PLANETLAB_SAMPLES = 288
"""Samples in one PlanetLab day file: one every 5 minutes."""
PLANETLAB_INTERVAL_S = 300.0


class UtilisationModel(Protocol):
    """A fraction of the cloudlet's MIPS asked at time ``t_s``."""

    def utilisation(self, t_s: float) -> float: ...


@dataclass(frozen=True, slots=True)
class FullUtilisation:
    """Always everything."""

    def utilisation(self, t_s: float) -> float:
        return 1.0


@dataclass(frozen=True, slots=True)
class ConstantUtilisation:
    """Always the same fraction."""

    fraction: float

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ConfigError(f"constant utilisation must be within [0, 1], got {self.fraction}")

    def utilisation(self, t_s: float) -> float:
        return self.fraction


@dataclass(slots=True)
class StochasticUtilisation:
    """A uniform draw in [0, 1) per ``interval_s``, seeded: the same seed gives the same series."""

    seed: int
    interval_s: float = PLANETLAB_INTERVAL_S
    _values: dict[int, float] = field(default_factory=dict)

    def utilisation(self, t_s: float) -> float:
        k = int(t_s // self.interval_s)
        if k not in self._values:
            # One generator per interval index: the value never depends on the order of the questions.
            self._values[k] = float(np.random.default_rng([self.seed, k]).random())
        return self._values[k]


def _extend(samples: FloatArray) -> FloatArray:
    # CloudSim keeps one sample more than the file has, a copy of the last, so that the interpolation
    # between the last sample and "the next" is defined up to the end of the day.
    out: FloatArray = np.concatenate((samples, samples[-1:]))
    return out


@dataclass(frozen=True, slots=True)
class TraceUtilisation:
    """A trace sampled every ``interval_s`` (fractions), linear between samples."""

    samples: tuple[float, ...]
    interval_s: float = PLANETLAB_INTERVAL_S

    def utilisation(self, t_s: float) -> float:
        data = _extend(np.asarray(self.samples, dtype=np.float64))
        return float(trace_at(data[None, :], t_s, self.interval_s)[0])


def trace_at(data: FloatArray, t_s: float, interval_s: float = PLANETLAB_INTERVAL_S) -> FloatArray:
    """Every row's utilisation at ``t_s``, with ``UtilizationModelPlanetLabInMemory.getUtilization``'s arithmetic."""
    if t_s < 0:
        raise ConfigError(f"utilisation asked at negative time {t_s}")
    if math.fmod(t_s, interval_s) == 0:
        idx = int(t_s) // int(interval_s)
        out: FloatArray = data[:, idx].copy()
        return out
    k1 = math.floor(t_s / interval_s)
    k2 = math.ceil(t_s / interval_s)
    if k2 >= data.shape[1]:
        raise ConfigError(f"utilisation asked at {t_s:g} s, past the end of the traces")
    u1 = data[:, k1]
    u2 = data[:, k2]
    delta = (u2 - u1) / ((k2 - k1) * interval_s)
    out = u1 + delta * (t_s - k1 * interval_s)
    return out


@dataclass(frozen=True, slots=True)
class TraceSet:
    """The traces of many VMs (one row each, fractions), asked all at once."""

    names: tuple[str, ...]
    data: FloatArray
    """Shape (VMs, samples + 1): the last column repeats the last sample, as CloudSim does."""
    interval_s: float = PLANETLAB_INTERVAL_S

    @classmethod
    def from_samples(
        cls, names: tuple[str, ...], samples: FloatArray, interval_s: float = PLANETLAB_INTERVAL_S
    ) -> TraceSet:
        if samples.ndim != 2 or samples.shape[0] != len(names) or samples.shape[1] < 1:
            raise ConfigError("traces: one row of samples per name is needed")
        data = np.concatenate((samples, samples[:, -1:]), axis=1).astype(np.float64)
        return cls(names, data, interval_s)

    @property
    def duration_s(self) -> float:
        return float((self.data.shape[1] - 1) * self.interval_s)

    def at(self, t_s: float) -> FloatArray:
        return trace_at(self.data, t_s, self.interval_s)


def parse_planetlab(text: str, source: str, samples: int = PLANETLAB_SAMPLES) -> FloatArray:
    """One PlanetLab file's text: ``samples`` integers in [0, 100], one per line; fractions out."""
    try:  # the common case, fast; any doubt goes through the line-by-line check below
        fast = np.array(text.split()[:samples], dtype=np.int64)
        if fast.size == samples and fast.min() >= 0 and fast.max() <= 100:
            out: FloatArray = fast / 100.0
            return out
    except ValueError:
        pass
    values: list[float] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        try:
            v = int(s)
        except ValueError:
            raise ConfigError(f"{source}:{lineno}: not an integer percentage: {s[:40]!r}") from None
        if not 0 <= v <= 100:
            raise ConfigError(f"{source}:{lineno}: utilisation {v} % is outside 0–100")
        values.append(v / 100.0)
        if len(values) == samples:
            break
    if len(values) < samples:
        raise ConfigError(f"{source}: {len(values)} samples, {samples} needed (one per 5 minutes over a day)")
    return np.asarray(values, dtype=np.float64)
