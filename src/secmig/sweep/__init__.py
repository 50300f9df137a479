"""Parameter sweeps: a grid of scenario variants × seeds, run on Dask, gathered into one SQLite table.

- :mod:`~secmig.sweep.grid` — the grid language: dotted paths into a scenario (``vms[name=db-1].ram``),
  grid files, the points they expand to (each validated as a scenario, keyed by a hash).
- :mod:`~secmig.sweep.runner` — simulating a point and summarising it; running a grid's missing points on
  Dask (a local cluster or a scheduler) in chunks, committing each chunk as it lands: restartable.
- :mod:`~secmig.sweep.store` — ``sweep.sqlite``: the ``sweep_points`` record (:class:`PointRow` with its
  :class:`PointResult` figures), declared once with :mod:`secmig.results.records`.
- :mod:`~secmig.sweep.aggregate` — flat tables, Parquet, aggregates over seeds, the heat map's cells.

Nothing here prints; ``secmig sweep`` (:mod:`secmig.cli.report`) shows progress and tables, and
:func:`secmig.report.charts.sweep_heatmaps` draws the heat maps.
"""

from secmig.sweep.aggregate import Aggregate, HeatmapData, aggregate, heatmap_data, table_rows, write_parquet
from secmig.sweep.grid import Grid, SweepPoint, load_grid, parse_grid, parse_path, set_path, value_label
from secmig.sweep.runner import MAX_CHUNK, SweepOutcome, chunk_size, run_point, run_points, run_sweep
from secmig.sweep.store import DB_NAME, FIGURES, PointResult, PointRow, read_points

__all__ = [
    "DB_NAME",
    "FIGURES",
    "MAX_CHUNK",
    "Aggregate",
    "Grid",
    "HeatmapData",
    "PointResult",
    "PointRow",
    "SweepOutcome",
    "SweepPoint",
    "aggregate",
    "chunk_size",
    "heatmap_data",
    "load_grid",
    "parse_grid",
    "parse_path",
    "read_points",
    "run_point",
    "run_points",
    "run_sweep",
    "set_path",
    "table_rows",
    "value_label",
    "write_parquet",
]
