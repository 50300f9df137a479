"""VM selection: which VM leaves an over-utilised host. CloudSim's four policies.

- ``mmt`` — minimum migration time: the smallest RAM (migration time is RAM ÷ bandwidth).
- ``mc`` — maximum correlation: the VM whose utilisation history is best explained (highest R² of a
  multiple linear regression) by the others' on the same host; MMT when the histories are too short.
- ``mu`` — minimum utilisation: the lowest current CPU utilisation.
- ``rs`` — random selection, from a seeded generator.

Ties go to the first candidate in the host's VM order, as CloudSim's strict comparisons do. Pure: the
candidates are given as arrays.
"""

from __future__ import annotations

import enum

import numpy as np
import numpy.typing as npt

from secmig.errors import ConfigError

FloatArray = npt.NDArray[np.float64]


class SelectionKind(enum.StrEnum):
    MMT = "mmt"
    MC = "mc"
    MU = "mu"
    RS = "rs"


def parse_selection(spec: str) -> SelectionKind:
    """``mmt``, ``mc``, ``mu`` or ``rs``."""
    try:
        return SelectionKind(spec.strip().lower())
    except ValueError:
        known = ", ".join(k.value for k in SelectionKind)
        raise ConfigError(f"--selection {spec!r}: unknown policy (one of {known})") from None


def minimum_migration_time(ram_mb: FloatArray) -> int:
    """Index of the smallest RAM (first on ties)."""
    return int(np.argmin(ram_mb))


def minimum_utilisation(utilisation: FloatArray) -> int:
    """Index of the lowest utilisation (first on ties)."""
    return int(np.argmin(utilisation))


def r_squared_each(histories: list[FloatArray]) -> FloatArray | None:
    """R² of each history regressed (with intercept) on all the others, over their common newest span.

    None when the regression has no degrees of freedom (CloudSim then falls back to MMT).
    """
    n = len(histories)
    if n < 2:
        return None
    m = min(h.size for h in histories)
    if m <= n:  # observations must exceed the regressors plus the intercept
        return None
    data = np.stack([h[:m] for h in histories])
    out = np.zeros(n)
    for i in range(n):
        y = data[i]
        x = np.column_stack([np.ones(m), np.delete(data, i, axis=0).T])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        resid = y - x @ coef
        ss_tot = float(((y - y.mean()) ** 2).sum())
        out[i] = 1 - float(resid @ resid) / ss_tot if ss_tot > 0 else np.nan
    return out


def maximum_correlation(histories: list[FloatArray], ram_mb: FloatArray) -> int:
    """Index of the highest R² (first on ties; NaN never wins); MMT when there is too little history."""
    r2 = r_squared_each(histories)
    if r2 is None:
        return minimum_migration_time(ram_mb)
    best: float = float(np.finfo(np.float64).tiny)  # CloudSim starts from Double.MIN_VALUE
    best_i = 0
    for i, v in enumerate(r2):
        if v > best:
            best, best_i = float(v), i
    return best_i


def select(
    kind: SelectionKind,
    *,
    ram_mb: FloatArray,
    utilisation: FloatArray,
    histories: list[FloatArray],
    rng: np.random.Generator,
) -> int:
    """Index, among the candidates, of the VM to migrate."""
    if ram_mb.size == 0:
        raise ConfigError("no VM to select from")
    if kind is SelectionKind.MMT:
        return minimum_migration_time(ram_mb)
    if kind is SelectionKind.MU:
        return minimum_utilisation(utilisation)
    if kind is SelectionKind.MC:
        return maximum_correlation(histories, ram_mb)
    return int(rng.integers(ram_mb.size))
