"""What a sweep's rows add up to: flat tables, Parquet, aggregates over seeds, the heat map's cells."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from secmig.errors import ConfigError
from secmig.sweep.grid import Grid, value_label
from secmig.sweep.store import FIGURES, PointRow


def table_rows(grid: Grid, rows: Sequence[PointRow]) -> list[dict[str, Any]]:
    """Flat records, one per point: key, one column per parameter (as written), seed, the figures."""
    out = []
    for r in rows:
        rec: dict[str, Any] = {"key": r.key}
        for path, _ in grid.parameters:
            rec[path] = value_label(r.params[path]) if path in r.params else None
        rec["seed"] = r.seed
        rec.update(zip(FIGURES, r.result.figures(), strict=True))
        out.append(rec)
    return out


def write_parquet(grid: Grid, rows: Sequence[PointRow], path: Path) -> Path:
    """The grid's rows as a Parquet file (needs pyarrow: ``pip install 'secmig[parquet]'``)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("--parquet needs pyarrow: pip install 'secmig[parquet]'") from None
    arrow = {int: pa.int64(), float: pa.float64(), str: pa.string()}
    figures = [(c.name, arrow[c.py_type]) for c in PointRow.columns() if c.name in FIGURES]
    schema = pa.schema(
        [("key", pa.string()), *((p, pa.string()) for p, _ in grid.parameters), ("seed", pa.int64()), *figures]
    )
    records = table_rows(grid, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Points sharing the values of some parameters, averaged over seeds (and the other parameters)."""

    values: tuple[Any, ...]
    points: int
    completed: int
    aborted: int
    errors: int
    mean_total_time_s: float
    """Mean over points of their mean total time (NaN if no migration completed)."""
    max_total_time_s: float
    mean_max_downtime_s: float
    """Mean over points of their max downtime."""
    max_downtime_s: float
    mean_bytes_sent: float


def _nanmean(xs: Sequence[float | None]) -> float:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(vals)) if vals else math.nan


def _nanmax(xs: Sequence[float | None]) -> float:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return max(vals) if vals else math.nan


def aggregate(grid: Grid, rows: Sequence[PointRow], over: Sequence[str] | None = None) -> list[Aggregate]:
    """Group the rows by the values of the parameters ``over`` (default: all), in grid order."""
    names = list(over) if over is not None else [p for p, _ in grid.parameters]
    values = dict(grid.parameters)
    groups: dict[tuple[str, ...], list[PointRow]] = {}
    for r in rows:
        groups.setdefault(tuple(value_label(r.params.get(n)) for n in names), []).append(r)
    out = []
    for combo in product(*(values[n] for n in names)):
        g = groups.get(tuple(value_label(v) for v in combo), [])
        res = [r.result for r in g]
        out.append(
            Aggregate(
                values=tuple(combo),
                points=len(g),
                completed=sum(x.completed for x in res),
                aborted=sum(x.aborted for x in res),
                errors=sum(1 for x in res if x.error),
                mean_total_time_s=_nanmean([x.mean_total_time_s for x in res]),
                max_total_time_s=_nanmax([x.max_total_time_s for x in res]),
                mean_max_downtime_s=_nanmean([x.max_downtime_s for x in res]),
                max_downtime_s=_nanmax([x.max_downtime_s for x in res]),
                mean_bytes_sent=_nanmean([float(x.bytes_sent) for x in res]),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class HeatmapData:
    """Two parameters' values and, per cell, the mean total time and the mean max downtime (NaN: none)."""

    xname: str
    yname: str
    xlabels: tuple[str, ...]
    ylabels: tuple[str, ...]
    total_time_s: np.ndarray[Any, np.dtype[np.float64]]
    downtime_s: np.ndarray[Any, np.dtype[np.float64]]


def heatmap_data(grid: Grid, rows: Sequence[PointRow]) -> HeatmapData | None:
    """Cells over the first two parameters (one row when there is one; ``None`` when there is none)."""
    if not grid.parameters:
        return None
    xname, xs = grid.parameters[0]
    yname, ys = grid.parameters[1] if len(grid.parameters) > 1 else ("", ("",))
    over = [xname] + ([yname] if yname else [])
    cells = {a.values: a for a in aggregate(grid, rows, over)}
    tt = np.full((len(ys), len(xs)), math.nan)
    dt = np.full((len(ys), len(xs)), math.nan)
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            a = cells[(x, y) if yname else (x,)]
            tt[j, i], dt[j, i] = a.mean_total_time_s, a.mean_max_downtime_s
    return HeatmapData(
        xname, yname, tuple(value_label(v) for v in xs), tuple(value_label(v) for v in ys) if yname else ("",), tt, dt
    )
