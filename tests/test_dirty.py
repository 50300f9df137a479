"""Dirty-page models answer "how many distinct pages are dirty t seconds after the sync"."""

import math

import pytest

from secmig.errors import ConfigError
from secmig.model.dirty import Hotspot, Sequential, Trace, Uniform, parse_trace_csv


def test_sequential_is_linear_then_saturates() -> None:
    """min(W, r·t)."""
    m = Sequential(1000, 5000)
    assert m.dirty_pages(2.0) == 2000
    assert m.dirty_pages(10.0) == 5000


def test_uniform_matches_the_coupon_collector_expectation() -> None:
    """W·(1 − e^(−r·t/W)): nearly r·t early, W late."""
    m = Uniform(1000, 100_000)
    assert m.dirty_pages(1.0) == pytest.approx(100_000 * (1 - math.exp(-0.01)))
    assert m.dirty_pages(1.0) < 1000
    assert m.dirty_pages(1e4) == pytest.approx(100_000)


def test_hotspot_saturates_the_hot_set_first() -> None:
    """The hot set fills quickly; the cold rest grows slowly."""
    m = Hotspot(10_000, hot_pages=1000, total_pages=1_000_000, hot_share=0.9)
    early = m.dirty_pages(1.0)
    assert 1000 < early < 2100  # hot set ~full, ~1000 cold pages
    assert m.dirty_pages(1.0) > Uniform(10_000, 1_000_000).dirty_pages(1.0) * 0.1


def test_trace_interpolates_and_holds() -> None:
    """Linear between samples, 0 at the sync, the last value past the end."""
    t = parse_trace_csv("time_s,dirty_pages\n1,100\n2,150\n", "t.csv")
    assert t.dirty_pages(0.5) == pytest.approx(50)
    assert t.dirty_pages(1.5) == pytest.approx(125)
    assert t.dirty_pages(10) == pytest.approx(150)
    assert t.write_rate_pages_per_s == 100


def test_bad_trace_names_the_line() -> None:
    """A row that is not two numbers is reported with its file and line."""
    with pytest.raises(ConfigError, match=r"t.csv:3"):
        parse_trace_csv("time_s,dirty_pages\n1,100\n2,lots\n", "t.csv")
    with pytest.raises(ConfigError, match="increase"):
        Trace((1.0, 1.0), (1.0, 2.0))
