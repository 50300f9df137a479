"""Overload detection: is a host over-utilised now, or about to be? CloudSim's five policies.

- ``thr:T`` — static threshold: requested MIPS ÷ host MIPS > T.
- ``mad:S`` — median absolute deviation: upper threshold 1 − S × MAD(host history).
- ``iqr:S`` — interquartile range: upper threshold 1 − S × IQR(host history).
- ``lr:S`` — local regression: a line fitted to the last 10 history values, extrapolated over the time
  the largest VM takes to migrate, times S, ≥ 1.
- ``lrr:S`` — robust local regression: the same with bisquare re-weighting.

MAD and IQR need 12 history values, LR/LRR 10; with fewer, as in CloudSim, a static threshold of 0.7
decides (``fallback``). A host's history is the sum of its VMs' histories, each scaled by the VM's MIPS
over the host's (:func:`host_history`), newest first, zeros at the end trimmed.

CloudSim's LR/LRR weights (tricube, bisquare) never take effect: its weighted regression only applies
weights when 40 % of them are zero, which tricube and bisquare weights never are, so both fit an ordinary
least-squares line to the 10 points. We reproduce that (``weighted=False``, the default) and also offer
the weighted fit the paper describes (``weighted=True``). Pure, vectorised over hosts where it matters.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secmig.errors import ConfigError

FloatArray = npt.NDArray[np.float64]

HISTORY_LENGTH = 30
"""Utilisation values a VM keeps (CloudSim's ``PowerVm.HISTORY_LENGTH``)."""
MIN_HISTORY_MAD_IQR = 12
MIN_HISTORY_LR = 10
LR_WINDOW = 10
FALLBACK_THRESHOLD = 0.7


class OverloadKind(enum.StrEnum):
    THR = "thr"
    MAD = "mad"
    IQR = "iqr"
    LR = "lr"
    LRR = "lrr"


_DEFAULTS = {
    OverloadKind.THR: 0.8,
    OverloadKind.MAD: 2.5,
    OverloadKind.IQR: 1.5,
    OverloadKind.LR: 1.2,
    OverloadKind.LRR: 1.2,
}


@dataclass(frozen=True, slots=True)
class OverloadPolicy:
    """One detection policy and its parameter (threshold for THR, safety parameter for the others)."""

    kind: OverloadKind
    parameter: float
    fallback_threshold: float = FALLBACK_THRESHOLD
    weighted: bool = False
    """LR/LRR only: apply the tricube (and bisquare) weights instead of CloudSim's effective plain fit."""

    @property
    def spec(self) -> str:
        return f"{self.kind.value}:{self.parameter:g}"


def parse_overload(spec: str) -> OverloadPolicy:
    """``thr:0.8``, ``mad:2.5``, ``iqr:1.5``, ``lr:1.2``, ``lrr:1.2`` (a bare name takes CloudSim's default)."""
    name, _, value = spec.strip().partition(":")
    try:
        kind = OverloadKind(name.lower())
    except ValueError:
        known = ", ".join(k.value for k in OverloadKind)
        raise ConfigError(f"--overload {spec!r}: unknown policy {name!r} (one of {known})") from None
    if not value:
        return OverloadPolicy(kind, _DEFAULTS[kind])
    try:
        p = float(value)
    except ValueError:
        raise ConfigError(f"--overload {spec!r}: parameter {value!r} is not a number") from None
    if not math.isfinite(p) or p < 0:
        raise ConfigError(f"--overload {spec!r}: parameter must be a finite number ≥ 0")
    if kind is OverloadKind.THR and not 0 < p <= 1:
        raise ConfigError(f"--overload {spec!r}: a static threshold must be within (0, 1]")
    return OverloadPolicy(kind, p)


# --- statistics with CloudSim's conventions ---------------------------------------------------------------


def trimmed_length(history: FloatArray) -> int:
    """Length of a newest-first history once its trailing zeros are cut (``MathUtil.countNonZeroBeginning``)."""
    nz = np.flatnonzero(history != 0)
    return int(nz[-1]) + 1 if nz.size else 0


def median_rows(rows: FloatArray) -> FloatArray:
    """Median of each row, as Apache Commons' ``Percentile(50)``: lower + (pos − ⌊pos⌋)(upper − lower)."""
    s = np.sort(rows, axis=-1)
    n = s.shape[-1]
    pos = 0.5 * (n + 1)
    k = math.floor(pos)
    if n == 1 or k >= n:
        out: FloatArray = s[..., n - 1 if k >= n else 0]
        return out
    lower = s[..., k - 1]
    upper = s[..., k]
    out = lower + (pos - k) * (upper - lower)
    return out


def mad_rows(rows: FloatArray) -> FloatArray:
    """Median absolute deviation of each row (CloudSim's ``MathUtil.mad``)."""
    med = median_rows(rows)
    return median_rows(np.abs(med[..., None] - rows))


def iqr_rows(rows: FloatArray) -> FloatArray:
    """CloudSim's IQR of each row: sorted values at round(0.25 (n + 1)) − 1 and round(0.75 (n + 1)) − 1."""
    s = np.sort(rows, axis=-1)
    n = s.shape[-1]
    q1 = math.floor(0.25 * (n + 1) + 0.5) - 1  # Java's Math.round
    q3 = math.floor(0.75 * (n + 1) + 0.5) - 1
    out: FloatArray = s[..., q3] - s[..., q1]
    return out


def mad(data: FloatArray) -> float:
    """Median absolute deviation of one series (0 for none)."""
    return float(mad_rows(data)) if data.size else 0.0


def iqr(data: FloatArray) -> float:
    """CloudSim's interquartile range of one series."""
    return float(iqr_rows(data))


def _tricube(n: int) -> FloatArray:
    w = np.zeros(n)
    top = n - 1.0
    for i in range(2, n):
        k = (1 - ((top - i) / top) ** 3) ** 3
        w[i] = 1 / k if k > 0 else np.finfo(np.float64).max
    w[0] = w[1] = w[2]
    return w


def _ols(x: FloatArray, y: FloatArray) -> tuple[float, float]:
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum()) / sxx
    return float(ym - slope * xm), slope


def _wls(x: FloatArray, y: FloatArray, sd: FloatArray) -> tuple[float, float]:
    # Weights given as standard deviations (Flanagan's convention): each point counts 1/sd².
    w = 1.0 / np.square(np.minimum(sd, 1e150))
    sw = w.sum()
    xm, ym = (w * x).sum() / sw, (w * y).sum() / sw
    slope = float((w * (x - xm) * (y - ym)).sum() / (w * (x - xm) ** 2).sum())
    return float(ym - slope * xm), slope


def loess_estimates(y: FloatArray, *, weighted: bool = False, robust: bool = False) -> tuple[float, float]:
    """(intercept, slope) of the line through ``y`` at x = 1 … n, CloudSim's way or truly weighted."""
    n = y.size
    x = np.arange(1, n + 1, dtype=np.float64)
    if not weighted:
        return _ols(x, y)  # what CloudSim's createWeigthedLinearRegression ends up doing, robust or not
    w = _tricube(n)
    a, b = _wls(x, y, w)
    if not robust:
        return a, b
    res = y - (a + b * x)
    s6 = float(np.median(np.abs(res))) * 6
    w2 = np.zeros(n)
    for i in range(2, n):
        k = (1 - (res[i] / s6) ** 2) ** 2 if s6 > 0 else 0.0
        w2[i] = (1 / k) * w[i] if k > 0 else np.finfo(np.float64).max
    w2[0] = w2[1] = w2[2]
    return _wls(x, y, w2)


# --- the decision -----------------------------------------------------------------------------------------


def host_history(vm_histories: FloatArray, vm_mips: FloatArray, host_mips: float) -> FloatArray:
    """A host's newest-first utilisation history from its VMs' (rows), each scaled by its MIPS share."""
    out: FloatArray = (vm_histories * (vm_mips / host_mips)[:, None]).sum(axis=0)
    return out


@dataclass(frozen=True, slots=True)
class HostView:
    """What a detector looks at for one host, with a given set of VMs on it."""

    requested_mips: float
    total_mips: float
    history: FloatArray
    """Newest-first host utilisation history (untrimmed, length ``HISTORY_LENGTH``)."""
    max_vm_ram_mb: float
    bandwidth_bits_per_s: float


def is_overloaded(policy: OverloadPolicy, host: HostView, interval_s: float) -> bool:
    """CloudSim's ``isHostOverUtilized`` for ``policy``."""
    utilisation = host.requested_mips / host.total_mips
    if policy.kind is OverloadKind.THR:
        return utilisation > policy.parameter
    n = trimmed_length(host.history)
    data = host.history[:n]
    if policy.kind in (OverloadKind.MAD, OverloadKind.IQR):
        if n < MIN_HISTORY_MAD_IQR:
            return utilisation > policy.fallback_threshold
        stat = mad(data) if policy.kind is OverloadKind.MAD else iqr(data)
        return utilisation > 1 - policy.parameter * stat
    if n < MIN_HISTORY_LR:
        return utilisation > policy.fallback_threshold
    window = data[:LR_WINDOW][::-1].copy()  # oldest first
    a, b = loess_estimates(window, weighted=policy.weighted, robust=policy.kind is OverloadKind.LRR)
    migration_s = host.max_vm_ram_mb / (host.bandwidth_bits_per_s / 1000 / (2 * 8000))
    intervals = math.ceil(migration_s / interval_s)
    predicted = (a + b * (LR_WINDOW + intervals)) * policy.parameter
    return predicted >= 1
