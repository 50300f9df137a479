"""``sweep.sqlite``: one row per point of a grid, committed as it lands, so that a sweep can resume.

The table ``sweep_points`` is the record :class:`PointRow` (its figures, :class:`PointResult`, flattened
into columns), declared once with :mod:`secmig.results.records`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from secmig.results.records import Record, Table, column, open_tables
from secmig.sweep.grid import SweepPoint

DB_NAME = "sweep.sqlite"


@dataclass(frozen=True, slots=True)
class PointResult:
    """The summary figures of one simulated point (``error`` set and figures empty if it could not run)."""

    migrations: int
    completed: int
    aborted: int
    mean_total_time_s: float | None = field(
        metadata=column(doc="over completed migrations; NULL when none completed")
    )
    max_total_time_s: float | None
    mean_downtime_s: float | None
    max_downtime_s: float | None
    bytes_sent: int = field(metadata=column(doc="by all migrations, completed or not"))
    sim_time_s: float
    wall_time_s: float = field(metadata=column(doc="the simulation alone, on its worker"))
    error: str | None = field(
        default=None, metadata=column(doc="why the point could not be simulated; NULL when it was")
    )

    def figures(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in FIGURES)


FIGURES = [f.name for f in fields(PointResult)]
"""The summary figures of a point, in ``sweep_points`` column order."""


@dataclass(frozen=True, slots=True)
class PointRow(Record):
    """A row of ``sweep_points``: a point's values, its seed and its figures."""

    table: ClassVar[Table] = Table("sweep_points", primary_key=("key",))
    key: str = field(metadata=column(doc="hash of the base scenario, the parameter values and the seed"))
    sweep: str = field(default="", kw_only=True, metadata=column(doc="name of the grid that computed it"))
    """Keyword-only: readers rarely need it, and its column comes second."""
    params: Mapping[str, Any] = field(
        metadata=column(doc="JSON object: dotted path -> value as written in the grid")
    )
    seed: int
    result: PointResult
    finished_at: float


def open_db(db_path: Path) -> AbstractContextManager[sqlite3.Connection]:
    """The sweep database, created if needed, in WAL mode so that readers see each point as it lands."""
    return open_tables(db_path, (PointRow,), "sweep", wal=True)


def finished_keys(conn: sqlite3.Connection, keys: Iterable[str]) -> set[str]:
    """Which of ``keys`` already have a row."""
    have = {r[0] for r in conn.execute(f"SELECT key FROM {PointRow.table.name}")}
    return have & set(keys)


def record_points(
    conn: sqlite3.Connection, sweep: str, points: Sequence[SweepPoint], results: Sequence[PointResult]
) -> None:
    """Commit points' rows in one transaction (a point already there is left as it is)."""
    now = time.time()
    with conn:
        PointRow.insert(
            conn,
            (
                PointRow(p.key, p.params_dict(), p.seed, r, now, sweep=sweep)
                for p, r in zip(points, results, strict=True)
            ),
            or_ignore=True,
        )


def read_points(db_path: Path, keys: Sequence[str] | None = None) -> list[PointRow]:
    """Rows of ``sweep_points`` (those of ``keys`` in that order, or all of them)."""
    with open_db(db_path) as conn:
        by_key = {r.key: r for r in PointRow.select(conn)}
    if keys is None:
        return list(by_key.values())
    return [by_key[k] for k in keys if k in by_key]
