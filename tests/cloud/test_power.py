"""Power models against CloudSim's SPECpower tables, and the energy of an interval."""

from __future__ import annotations

import numpy as np
import pytest

from secmig.cloud.power import (
    HP_PROLIANT_ML110_G4,
    HP_PROLIANT_ML110_G5,
    LinearPowerModel,
    SpecPowerModel,
    interval_energy_j,
)
from secmig.errors import ConfigError


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # 0 % and 100 % are the table's ends; 35 % is halfway between the 30 % and 40 % points.
        (HP_PROLIANT_ML110_G4, (86.0, (96.0 + 99.5) / 2, 117.0)),
        (HP_PROLIANT_ML110_G5, (93.7, (105.0 + 110.0) / 2, 135.0)),
    ],
)
def test_spec_power_at_0_35_100(model: SpecPowerModel, expected: tuple[float, float, float]) -> None:
    """The G4 and G5 tables give their own points at 0 % and 100 % and interpolate linearly at 35 %."""
    got = model.power_w(np.array([0.0, 0.35, 1.0]))
    assert got == pytest.approx(expected, abs=1e-9)


def test_linear_power_model() -> None:
    """A linear model is idle + (max − idle) × u."""
    m = LinearPowerModel("lin", 100.0, 200.0)
    assert m.power_w(np.array([0.0, 0.35, 1.0])) == pytest.approx([100.0, 135.0, 200.0])


def test_power_refuses_utilisation_above_one() -> None:
    """A utilisation above 100 % is an error, as in CloudSim."""
    with pytest.raises(ConfigError):
        HP_PROLIANT_ML110_G4.power_w(np.array([1.2]))


def test_spec_model_needs_eleven_points() -> None:
    """A SPECpower model without 11 points is refused."""
    with pytest.raises(ConfigError, match="11 points"):
        SpecPowerModel("short", (1.0, 2.0))


def test_interval_energy_trapezoid_and_idle_host() -> None:
    """An interval's energy is the mean of both powers × time; a host idle at the start counts nothing."""
    e = interval_energy_j(np.array([100.0, 100.0]), np.array([120.0, 120.0]), np.array([0.5, 0.0]), 300.0)
    assert e[0] == pytest.approx(110.0 * 300.0)
    assert e[1] == 0.0
