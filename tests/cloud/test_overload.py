"""Overload detection: THR, MAD, IQR, LR/LRR with CloudSim's safety parameters and 0.7 fallback."""

from __future__ import annotations

import numpy as np
import pytest

from secmig.cloud.overload import (
    HISTORY_LENGTH,
    HostView,
    OverloadKind,
    iqr,
    is_overloaded,
    loess_estimates,
    mad,
    parse_overload,
)
from secmig.errors import ConfigError


def _view(req: float, newest_first: list[float], max_ram: float = 1740.0) -> HostView:
    h = np.zeros(HISTORY_LENGTH)
    h[: len(newest_first)] = newest_first
    return HostView(req, 5320.0, h, max_ram, 1e9)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("thr:abc", "parameter 'abc' is not a number"),
        ("foo:1", "unknown policy 'foo'"),
        ("thr:1.5", "within \\(0, 1\\]"),
        ("mad:-1", "≥ 0"),
    ],
)
def test_bad_specs_are_refused(spec: str, message: str) -> None:
    """An unknown policy or a bad parameter is a ConfigError naming the option."""
    with pytest.raises(ConfigError, match=message):
        parse_overload(spec)


def test_bare_names_take_cloudsim_defaults() -> None:
    """``thr``, ``iqr``, ``mad``, ``lr`` alone mean 0.8, 1.5, 2.5, 1.2."""
    assert [parse_overload(s).parameter for s in ("thr", "iqr", "mad", "lr", "lrr")] == [0.8, 1.5, 2.5, 1.2, 1.2]
    assert parse_overload("LR:1.1").kind is OverloadKind.LR


def test_static_threshold() -> None:
    """THR 0.8 on 5320 MIPS: 4300 asked (80.8 %) is over, 4200 (78.9 %) is not."""
    p = parse_overload("thr:0.8")
    assert is_overloaded(p, _view(4300, []), 300)
    assert not is_overloaded(p, _view(4200, []), 300)


def test_mad_threshold_and_short_history_fallback() -> None:
    """MAD 0.1 gives 1 − 2.5 × 0.1 = 0.75; with 11 values the 0.7 fallback decides instead."""
    hist = [0.5] * 6 + [0.7] * 6
    assert mad(np.array(hist)) == pytest.approx(0.1)
    p = parse_overload("mad:2.5")
    assert is_overloaded(p, _view(0.76 * 5320, hist), 300)
    assert not is_overloaded(p, _view(0.72 * 5320, hist), 300)
    assert is_overloaded(p, _view(0.72 * 5320, hist[:11]), 300)  # fallback: 0.72 > 0.7


def test_iqr_uses_cloudsims_quartile_positions() -> None:
    """12 values 0.05 … 0.6: quartiles at sorted positions 2 and 9, IQR 0.35, threshold 1 − 1.5 × 0.35."""
    data = np.array([0.05 * k for k in range(1, 13)])
    assert iqr(data) == pytest.approx(0.5 - 0.15)
    p = parse_overload("iqr:1.5")
    hist = list(data[::-1])
    assert is_overloaded(p, _view(0.48 * 5320, hist), 300)
    assert not is_overloaded(p, _view(0.47 * 5320, hist), 300)


def test_local_regression_extrapolates_over_the_migration_time() -> None:
    """A ramp 0.5, 0.52 … fits 0.48 + 0.02x; at x = 11 (one interval of migration) × 1.2 = 0.84 < 1."""
    slow = [0.5 + 0.02 * k for k in range(10)][::-1]
    fast = [0.5 + 0.05 * k for k in range(10)][::-1]
    a, b = loess_estimates(np.array(slow[::-1]))
    assert (a, b) == pytest.approx((0.48, 0.02))
    for kind in ("lr:1.2", "lrr:1.2"):
        p = parse_overload(kind)
        assert not is_overloaded(p, _view(0, slow), 300)
        assert is_overloaded(p, _view(0, fast), 300)  # (0.45 + 0.55) × 1.2 = 1.2 ≥ 1


def test_weighted_fit_of_an_exact_line_is_the_line() -> None:
    """Tricube (and bisquare) weights cannot move a fit through points on one line."""
    y = 0.3 + 0.04 * np.arange(1, 11)
    assert loess_estimates(y, weighted=True) == pytest.approx((0.3, 0.04))
    assert loess_estimates(y, weighted=True, robust=True) == pytest.approx((0.3, 0.04))
