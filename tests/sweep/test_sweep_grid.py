"""Grid files: dotted paths, points and their keys, validation, aggregation (no Dask here)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from secmig.cli import main
from secmig.errors import ConfigError
from secmig.sweep import (
    PointResult,
    PointRow,
    aggregate,
    heatmap_data,
    load_grid,
    parse_grid,
    parse_path,
    set_path,
)
from secmig.yamlfile import read_yaml


def test_parse_path_reads_names_indexes_and_selectors() -> None:
    """``a[0].b``, ``vms[name=db-1].ram`` and plain names parse; malformed paths are refused."""
    assert parse_path("vms[0].dirty.rate") == ["vms", 0, "dirty", "rate"]
    assert parse_path("vms[name=db-1].ram") == ["vms", ("name", "db-1"), "ram"]
    assert parse_path("seed") == ["seed"]
    for bad in ("", ".seed", "vms..ram", "vms[x]", "[0].ram", "vms[0]ram", "vms."):
        with pytest.raises(ConfigError):
            parse_path(bad)


def test_set_path_sets_creates_mappings_and_refuses_missing_items() -> None:
    """Values land at the path; missing mapping keys are created; a missing list item is an error."""
    data = {"vms": [{"name": "a", "ram": "1GiB"}, {"name": "b"}]}
    set_path(data, "vms[1].ram", "2GiB")
    set_path(data, "vms[name=a].dirty.rate", "5000pages/s")
    set_path(data, "defaults.policy", "xen")
    assert data == {
        "vms": [{"name": "a", "ram": "1GiB", "dirty": {"rate": "5000pages/s"}}, {"name": "b", "ram": "2GiB"}],
        "defaults": {"policy": "xen"},
    }
    with pytest.raises(ConfigError, match=r"index 5 is out of range \(vms has 2 items\)"):
        set_path(data, "vms[5].ram", "1GiB")
    with pytest.raises(ConfigError, match="0 items of vms have name = 'zz'"):
        set_path(data, "vms[name=zz].ram", "1GiB")
    with pytest.raises(ConfigError, match="is not a list"):
        set_path(data, "defaults[0]", 1)


def test_points_cover_the_product_and_keys_are_stable(sweep_dir: Path) -> None:
    """200 points (5 × 4 × 2 × 5 seeds), distinct keys that a second load reproduces exactly."""
    grid = load_grid(sweep_dir / "grid.yaml")
    points = grid.points()
    assert grid.size == len(points) == 200
    assert len({p.key for p in points}) == 200
    assert [p.key for p in load_grid(sweep_dir / "grid.yaml").points()] == [p.key for p in points]
    first = points[0]
    assert first.params_dict() == {
        "vms[name=a].dirty.rate": "5000pages/s",
        "datacenters[0].hosts[0].nic": "1Gbit/s",
        "defaults.policy": "qemu",
    }
    assert first.seed == 0 and first.spec.seed == 0
    assert first.spec.vms[0].dirty.rate_pages_per_s == 5000  # type: ignore[attr-defined]
    assert first.spec.infra.hosts[0].nic_bytes_per_s == 125e6


def test_keys_change_with_the_base_scenario_not_with_its_comments(sweep_dir: Path) -> None:
    """Editing the base scenario changes every key; a comment does not (the key hashes the data)."""
    before = [p.key for p in load_grid(sweep_dir / "grid.yaml").points()]
    base = sweep_dir / "base.yaml"
    base.write_text("# a comment\n" + base.read_text())
    assert [p.key for p in load_grid(sweep_dir / "grid.yaml").points()] == before
    base.write_text(base.read_text().replace("core: 20Gbit/s", "core: 40Gbit/s"))
    after = [p.key for p in load_grid(sweep_dir / "grid.yaml").points()]
    assert not set(before) & set(after)


def test_seeds_count_list_and_default(sweep_dir: Path) -> None:
    """``seeds: N`` is 0 … N-1, a list is taken as is, and without it the scenario's own seed is used."""
    base = read_yaml(sweep_dir / "base.yaml") | {"seed": 9}
    assert parse_grid({"scenario": base, "seeds": 3}, "g.yaml", sweep_dir).seeds == (0, 1, 2)
    assert parse_grid({"scenario": base, "seeds": [7, 11]}, "g.yaml", sweep_dir).seeds == (7, 11)
    grid = parse_grid({"scenario": base}, "g.yaml", sweep_dir)
    assert grid.seeds == (9,) and grid.size == 1 and grid.points()[0].spec.seed == 9
    for bad in (0, [1, 1], "many", [1.5]):
        with pytest.raises(ConfigError, match="seeds"):
            parse_grid({"scenario": base, "seeds": bad}, "g.yaml", sweep_dir)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"vms[0].ram": ["4 GB"]}, r'g.yaml \(point 0: vms\[0\].ram=4 GB\): vms\[0\].ram: .*"4 GB" is not a size'),
        ({"vms[0].host": ["nowhere"]}, r"vms\[0\].host: unknown host 'nowhere'"),
        ({"vms[9].ram": ["1GiB"]}, r"g.yaml: parameters: vms\[9\].ram: index 9 is out of range"),
        ({"defaults.policy": []}, r"parameters.defaults.policy: expected a non-empty list"),
        ({"defaults.policy": ["xen", "xen"]}, r"a value is listed twice"),
        ({"vms[0]..ram": ["1GiB"]}, r"is not a dotted path"),
    ],
)
def test_bad_points_are_refused_before_anything_runs(
    sweep_dir: Path, parameters: dict[str, list[str]], message: str
) -> None:
    """A grid value the scenario would refuse is one ConfigError naming the point, the field and the value."""
    data = {"scenario": "base.yaml", "parameters": parameters}
    with pytest.raises(ConfigError, match=message):
        parse_grid(data, "g.yaml", sweep_dir).points()


def test_sweep_cli_bad_grid_is_one_line_exit_2(sweep_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``secmig sweep`` on a grid with an unknown field or a missing scenario: exit 2, one line, no database."""
    bad = sweep_dir / "bad.yaml"
    bad.write_text("scenario: base.yaml\nparameter: {}\n")
    assert main(["sweep", str(bad), "--out", str(sweep_dir / "out")]) == 2
    assert "bad.yaml: parameter: unknown field" in capsys.readouterr().err
    bad.write_text("scenario: nope.yaml\n")
    assert main(["sweep", str(bad), "--out", str(sweep_dir / "out")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (sweep_dir / "out").exists()


def test_aggregate_and_heatmap_average_over_seeds(sweep_dir: Path) -> None:
    """Cells of the heat map are means over seeds; a cell where nothing completed is NaN."""
    grid = parse_grid(
        {"scenario": "base.yaml", "seeds": 2, "parameters": {"defaults.policy": ["qemu", "xen"]}}, "g.yaml", sweep_dir
    )
    pts = grid.points()

    def row(i: int, total: float | None, down: float | None) -> PointRow:
        res = PointResult(4, 4 if total else 0, 0 if total else 4, total, total, down, down, 10, 1.0, 0.01)
        return PointRow(pts[i].key, pts[i].params_dict(), pts[i].seed, res, 0.0)

    rows = [row(0, 2.0, 0.1), row(1, 4.0, 0.3), row(2, None, None), row(3, None, None)]
    aggs = aggregate(grid, rows)
    assert [a.values for a in aggs] == [("qemu",), ("xen",)]
    assert aggs[0].points == 2 and aggs[0].mean_total_time_s == 3.0 and aggs[0].max_downtime_s == 0.3
    assert aggs[1].aborted == 8 and math.isnan(aggs[1].mean_total_time_s)
    hm = heatmap_data(grid, rows)
    assert hm is not None and hm.total_time_s.shape == (1, 2) and hm.ylabels == ("",)
    assert hm.total_time_s[0, 0] == 3.0 and math.isnan(hm.total_time_s[0, 1])
    assert math.isclose(hm.downtime_s[0, 0], 0.2)


def test_chunks_are_small_and_leave_every_worker_several() -> None:
    """Points per task: 1 for tiny sweeps, at most 16, and at least 8 tasks per worker when possible."""
    from secmig.sweep import MAX_CHUNK, chunk_size

    assert chunk_size(5, 2) == 1
    assert chunk_size(200, 1) == MAX_CHUNK == 16
    assert chunk_size(200, 4) == 6
    assert chunk_size(100_000, 2) == MAX_CHUNK
