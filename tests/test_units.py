"""Units: sizes, rates and durations parse from text and fail with a clear message."""

import pytest

from secmig.errors import UnitError
from secmig.model.units import PAGE_SIZE, parse_bandwidth, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("100pages", 100 * PAGE_SIZE),
        ("4096", 4096),
        ("64Mbit", 8_000_000),
        (1024, 1024),
    ],
)
def test_sizes(text: str | int, expected: int) -> None:
    """Binary and SI prefixes, pages and bits all land in bytes."""
    assert parse_size(text) == expected


def test_rates() -> None:
    """Bit and byte rates become bytes/s; page rates stay in pages/s and convert on demand."""
    assert parse_rate("10Gbit/s").bytes_per_s == 1.25e9
    assert parse_rate("1Gbps").bytes_per_s == 1.25e8
    assert parse_rate("120MB/s").bytes_per_s == 1.2e8
    r = parse_rate("20000pages/s")
    assert r.pages_per_s == 20000 and r.in_bytes_per_s() == 20000 * PAGE_SIZE
    assert parse_rate("80MB/s").in_pages_per_s() == pytest.approx(80e6 / PAGE_SIZE)


def test_durations() -> None:
    """Durations in ms, s and min."""
    assert parse_duration("300ms") == pytest.approx(0.3)
    assert parse_duration("2s") == 2.0
    assert parse_duration("1min") == 60.0


@pytest.mark.parametrize(
    ("fn", "text", "message"),
    [
        (parse_size, "4 GB", '"4 GB" is not a size (try 4GiB)'),
        (parse_size, "lots", '"lots" is not a size'),
        (parse_rate, "fast", '"fast" is not a rate'),
        (parse_bandwidth, "100pages/s", "is not a bandwidth"),
        (parse_duration, "soon", '"soon" is not a duration'),
    ],
)
def test_bad_units_name_the_value(fn: object, text: str, message: str) -> None:
    """A value that does not parse is named in the error, with a hint."""
    with pytest.raises(UnitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fn(text)  # type: ignore[operator]
