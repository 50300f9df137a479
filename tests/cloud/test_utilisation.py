"""Utilisation models: PlanetLab trace interpolation, parsing errors, seeded stochastic values."""

from __future__ import annotations

import numpy as np
import pytest

from secmig.cloud.utilisation import (
    ConstantUtilisation,
    StochasticUtilisation,
    TraceSet,
    TraceUtilisation,
    parse_planetlab,
)
from secmig.errors import ConfigError


def test_trace_is_linear_between_samples() -> None:
    """Halfway between the 20 % and 60 % samples the trace asks 40 %; past the last, the last sample."""
    m = TraceUtilisation((0.2, 0.6), interval_s=300)
    assert m.utilisation(0.0) == pytest.approx(0.2)
    assert m.utilisation(150.0) == pytest.approx(0.4)
    assert m.utilisation(450.0) == pytest.approx(0.6)


def test_trace_set_matches_single_traces() -> None:
    """The vectorised trace set answers as each trace alone."""
    s = TraceSet.from_samples(("a", "b"), np.array([[0.1, 0.3, 0.2], [0.5, 0.0, 1.0]]))
    for t in (0.0, 300.1, 450.0, 899.0):
        want = [TraceUtilisation(tuple(row), 300).utilisation(t) for row in ([0.1, 0.3, 0.2], [0.5, 0.0, 1.0])]
        assert s.at(t) == pytest.approx(want)


def test_parse_planetlab_errors_name_file_and_line() -> None:
    """A malformed trace names the file and the line; a short one says how many samples it had."""
    with pytest.raises(ConfigError, match=r"vmA:2: not an integer"):
        parse_planetlab("5\nfoo\n", "vmA", samples=3)
    with pytest.raises(ConfigError, match=r"vmB:1: utilisation 140"):
        parse_planetlab("140\n", "vmB", samples=1)
    with pytest.raises(ConfigError, match=r"vmC: 2 samples, 3 needed"):
        parse_planetlab("1\n2\n", "vmC", samples=3)
    assert parse_planetlab("1\n50\n100\n", "ok", samples=3) == pytest.approx([0.01, 0.5, 1.0])


def test_stochastic_is_seeded_and_constant_within_an_interval() -> None:
    """The same seed gives the same values; one value holds for a whole interval."""
    a, b = StochasticUtilisation(7), StochasticUtilisation(7)
    assert a.utilisation(10) == b.utilisation(200) == a.utilisation(299)
    assert a.utilisation(10) != a.utilisation(310)
    assert 0 <= a.utilisation(1000) < 1


def test_constant_range_is_checked() -> None:
    """A constant utilisation outside [0, 1] is refused."""
    with pytest.raises(ConfigError):
        ConstantUtilisation(1.5)
