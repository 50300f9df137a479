"""VM selection: MMT, MU, MC (with its MMT fallback) and seeded RS."""

from __future__ import annotations

import numpy as np
import pytest

from secmig.cloud.selection import SelectionKind, parse_selection, r_squared_each, select
from secmig.errors import ConfigError

RAM = np.array([1740.0, 613.0, 870.0, 613.0])
UTIL = np.array([0.4, 0.9, 0.1, 0.3])


def _pick(kind: SelectionKind, histories: list[np.ndarray] | None = None, seed: int = 0) -> int:
    return select(kind, ram_mb=RAM, utilisation=UTIL, histories=histories or [], rng=np.random.default_rng(seed))


def test_mmt_takes_the_smallest_ram_first_on_ties() -> None:
    """Two VMs of 613 MB: the first in the host's order goes."""
    assert _pick(SelectionKind.MMT) == 1


def test_mu_takes_the_least_utilised() -> None:
    """Minimum utilisation picks 10 %."""
    assert _pick(SelectionKind.MU) == 2


def test_mc_falls_back_to_mmt_without_enough_history() -> None:
    """Four VMs with 3 values each leave no degree of freedom: MMT decides."""
    short = [np.array([0.1, 0.2, 0.3])] * 4
    assert _pick(SelectionKind.MC, short) == 1


def test_r_squared_of_two_is_the_squared_correlation() -> None:
    """With two VMs each one's R² is their squared Pearson correlation."""
    rng = np.random.default_rng(1)
    a, b = rng.random(20), rng.random(20)
    r2 = r_squared_each([a, b])
    assert r2 is not None
    assert r2 == pytest.approx([np.corrcoef(a, b)[0, 1] ** 2] * 2)


def test_mc_picks_the_best_explained_vm() -> None:
    """VM 2 is a mix of VMs 0 and 1 plus little noise; VM 3 is noise: VM 3 is never chosen, the others are."""
    rng = np.random.default_rng(3)
    x0, x1, x3 = rng.random(30), rng.random(30), rng.random(30)
    x2 = 0.5 * x0 + 0.5 * x1 + 0.001 * rng.random(30)
    r2 = r_squared_each([x0, x1, x2, x3])
    assert r2 is not None
    assert int(np.argmax(r2)) == 2
    assert _pick(SelectionKind.MC, [x0, x1, x2, x3]) == 2


def test_rs_is_seeded() -> None:
    """Random selection repeats with the same seed and stays within the candidates."""
    picks = [_pick(SelectionKind.RS, seed=s) for s in range(20)]
    assert picks == [_pick(SelectionKind.RS, seed=s) for s in range(20)]
    assert set(picks) <= {0, 1, 2, 3} and len(set(picks)) > 1


def test_unknown_selection_is_refused() -> None:
    """An unknown selection name is a ConfigError."""
    with pytest.raises(ConfigError, match="unknown policy"):
        parse_selection("best")
