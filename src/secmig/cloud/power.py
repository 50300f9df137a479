"""Host power models: watts drawn at a CPU utilisation, and the energy of an interval between two samples.

:class:`SpecPowerModel` is CloudSim's ``PowerModelSpecPower``: eleven measured points (SPECpower_ssj2008)
at 0 %, 10 %, …, 100 % load, linear in between. :data:`HP_PROLIANT_ML110_G4` and
:data:`HP_PROLIANT_ML110_G5` are the two servers of Beloglazov & Buyya's PlanetLab experiments.
:class:`LinearPowerModel` is CloudSim's ``PowerModelLinear``: idle + (max − idle) × u.

:func:`interval_energy_j` is CloudSim's ``PowerHost.getEnergyLinearInterpolation``: the mean of the powers
at both ends times the interval, and nothing at all for a host that was idle (utilisation 0) at the start
of the interval — CloudSim's reading of "an idle host is switched off". Everything is vectorised over hosts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from secmig.errors import ConfigError

FloatArray = npt.NDArray[np.float64]


class PowerModel(Protocol):
    """Watts drawn at a CPU utilisation in [0, 1]."""

    @property
    def name(self) -> str: ...

    def power_w(self, utilisation: FloatArray) -> FloatArray:
        """Power in watts at each utilisation (fractions of the host's total MIPS)."""
        ...


@dataclass(frozen=True, slots=True)
class SpecPowerModel:
    """Eleven SPECpower points at 0 %, 10 %, …, 100 % load, linear in between (CloudSim's formula)."""

    name: str
    watts: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.watts) != 11:
            raise ConfigError(f"power model {self.name}: needs 11 points (0 %, 10 %, …, 100 %), got {len(self.watts)}")
        if any(w < 0 for w in self.watts):
            raise ConfigError(f"power model {self.name}: watts must not be negative")

    def power_w(self, utilisation: FloatArray) -> FloatArray:
        u = np.asarray(utilisation, dtype=np.float64)
        if np.any((u < 0) | (u > 1)):
            raise ConfigError(f"power model {self.name}: utilisation must be within [0, 1]")
        table = np.asarray(self.watts)
        # CloudSim: power1 + (power2 − power1)/10 × (u − lo/10) × 100, with lo, hi = floor, ceil of 10u.
        lo = np.floor(u * 10).astype(np.int64)
        hi = np.ceil(u * 10).astype(np.int64)
        p1 = table[lo]
        p2 = table[hi]
        out: FloatArray = p1 + (p2 - p1) / 10 * (u - lo / 10) * 100
        return out


@dataclass(frozen=True, slots=True)
class LinearPowerModel:
    """idle + (max − idle) × u."""

    name: str
    idle_w: float
    max_w: float

    def __post_init__(self) -> None:
        if not 0 <= self.idle_w <= self.max_w:
            raise ConfigError(f"power model {self.name}: need 0 ≤ idle ≤ max (got {self.idle_w}, {self.max_w})")

    def power_w(self, utilisation: FloatArray) -> FloatArray:
        u = np.asarray(utilisation, dtype=np.float64)
        if np.any((u < 0) | (u > 1)):
            raise ConfigError(f"power model {self.name}: utilisation must be within [0, 1]")
        out: FloatArray = self.idle_w + (self.max_w - self.idle_w) * u
        return out


HP_PROLIANT_ML110_G4 = SpecPowerModel(
    "HP ProLiant ML110 G4 (Xeon 3040)", (86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0)
)
HP_PROLIANT_ML110_G5 = SpecPowerModel(
    "HP ProLiant ML110 G5 (Xeon 3075)", (93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0)
)


def clamp_utilisation(u: FloatArray) -> FloatArray:
    """CloudSim's ``getUtilizationOfCpu``: a host a hair above 100 % (< 101 %) counts as 100 %."""
    out: FloatArray = np.where((u > 1) & (u < 1.01), 1.0, u)
    return out


def interval_energy_j(p_from_w: FloatArray, p_to_w: FloatArray, u_from: FloatArray, dt_s: float) -> FloatArray:
    """Energy of each host over ``dt_s``: the trapezoid of its power, zero for a host idle at the start."""
    out: FloatArray = np.where(u_from == 0, 0.0, (p_from_w + (p_to_w - p_from_w) / 2) * dt_s)
    return out
