"""The closed form: the paper's equations and the geometric series of pre-copy."""

import pytest

from secmig.model import analytic as a


def test_paper_equations() -> None:
    """Eqs (1)–(6) compute what the paper writes."""
    assert a.migration_time(10.0, 0.2) == pytest.approx(10.2)
    assert a.service_downtime(10.2, 10.0) == pytest.approx(0.2)
    assert a.downtime_is_abnormal(0.5, 0.3) and not a.downtime_is_abnormal(0.2, 0.3)
    assert a.round_bytes(1000, 50, 100, 3) == pytest.approx(125)
    assert a.round_bytes(1000, 50, 100, 1) < 1000
    assert a.copy_time(1000, 100) == 10
    assert a.downtime_data_within_limit(1000, 50, 100, 4, 0.1)
    assert not a.downtime_data_within_limit(1000, 50, 100, 2, 0.1)


def test_geometric_series_sums() -> None:
    """Total data is V(1 − λ^(n+1))/(1 − λ); downtime is the last term over B."""
    est = a.geometric_precopy(1000.0, 50.0, 100.0, threshold_bytes=100.0)
    # rounds: 1000, 500, 250, 125, then 62.5 ≤ 100 is the stop-and-copy
    assert est.live_rounds == 4
    assert est.total_bytes == pytest.approx(1000 + 500 + 250 + 125 + 62.5)
    assert est.downtime_s == pytest.approx(0.625)
    assert est.converged


def test_geometric_never_converges_at_lambda_one() -> None:
    """λ ≥ 1 never reaches the threshold; with a round cap it is forced."""
    assert not a.geometric_precopy(1000.0, 100.0, 100.0, 10.0).converged
    forced = a.geometric_precopy(1000.0, 150.0, 100.0, 10.0, max_rounds=3)
    assert not forced.converged and forced.live_rounds == 3


def test_recurrence_equals_geometric_for_linear_dirtying() -> None:
    """The generic recurrence reduces to the geometric series when D(t) = r·t."""
    rate_pages = 10_000.0
    bw = 1e8
    v0 = 1e9
    geo = a.geometric_precopy(v0, rate_pages * a.PAGE_WIRE_BYTES, bw, 3e7)
    rec = a.precopy_rounds(v0, lambda t: rate_pages * t, bw, 3e7)
    assert rec.live_rounds == geo.live_rounds
    assert rec.total_time_s == pytest.approx(geo.total_time_s)
    assert rec.total_bytes == pytest.approx(geo.total_bytes)
