"""Typed records of stored results: a table declared once, as a frozen slotted dataclass, and SQL made from it.

A stored kind of result subclasses :class:`Record` and names its table in a class-level :class:`Table`::

    @dataclass(frozen=True, slots=True)
    class EventRow(Record):
        table: ClassVar[Table] = Table("events", indexes=(("events_run", ("run_id", "t_s")),))
        run_id: int = field(metadata=column(references="runs(id)"))
        t_s: float
        evidence: Mapping[str, Any] = field(metadata=column(doc="JSON object"))

Its fields, in order, are the table's columns; from the annotations come the SQLite types (:data:`SQL_TYPES`;
``X | None`` drops ``NOT NULL``; a field that is itself a dataclass is flattened into its fields' columns).
Primary key, foreign references, indexes and column comments are declared once, in :class:`Table` and in
the fields' metadata (:func:`column`); the ``CREATE`` statements, the column list, the ``INSERT``, the CSV
export and reading rows back are all made from that declaration. No I/O but on a connection or file
handed in, and :func:`open_tables`, which opens a database holding some tables.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from enum import Enum
from pathlib import Path
from types import NoneType, UnionType
from typing import IO, Any, ClassVar, Self, Union, get_args, get_origin, get_type_hints

from secmig.errors import ConfigError

SQL_TYPES: dict[type, str] = {bool: "INTEGER", int: "INTEGER", float: "REAL", str: "TEXT", Mapping: "TEXT"}
"""Python type of a field → SQLite type of its column (a ``Mapping`` is stored as a JSON object text)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Table:
    """Where a record is stored: its table, its (composite) primary key, its indexes, what exports add."""

    name: str
    primary_key: tuple[str, ...] = ()
    """One column: declared on the column (``id INTEGER PRIMARY KEY`` is SQLite's rowid); more: a table constraint."""
    indexes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """``(index name, columns)`` pairs."""
    derived: tuple[str, ...] = ()
    """Properties of the record appended to its CSV export after the stored columns."""


def column(*, doc: str = "", references: str = "", export: bool = True) -> dict[str, Any]:
    """A column's storage metadata, for ``field(metadata=column(...))``: its SQL comment, a foreign key
    (``runs(id)``), whether exports carry it."""
    return {"doc": doc, "references": references, "export": export}


@dataclasses.dataclass(frozen=True, slots=True)
class Column:
    """One column as made from a field."""

    name: str
    py_type: type
    nullable: bool
    doc: str
    references: str
    export: bool

    @property
    def sql_type(self) -> str:
        return SQL_TYPES[self.py_type]


def canonical_json(obj: Any) -> str:
    """Compact, key-sorted JSON: the form hashed into sweep keys and stored in JSON columns."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _split_optional(hint: Any) -> tuple[Any, bool]:
    if get_origin(hint) in (Union, UnionType):
        args = [a for a in get_args(hint) if a is not NoneType]
        if len(args) == 1:
            return args[0], True
    return hint, False


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    """A record class's columns, and how its (possibly nested) fields map onto them."""

    cls: type
    fields: tuple[tuple[str, Column | _Layout], ...]
    """Per field: its column, or the layout of the dataclass it holds."""
    columns: tuple[Column, ...]


_LAYOUTS: dict[type, _Layout] = {}


def _layout(cls: type) -> _Layout:
    if cls in _LAYOUTS:
        return _LAYOUTS[cls]
    hints = get_type_hints(cls)
    fields: list[tuple[str, Column | _Layout]] = []
    for f in dataclasses.fields(cls):
        hint, nullable = _split_optional(hints[f.name])
        base = get_origin(hint) or hint
        if isinstance(base, type) and dataclasses.is_dataclass(base):
            fields.append((f.name, _layout(base)))
            continue
        if base not in SQL_TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: no SQLite type for {hint!r}")
        meta = f.metadata
        fields.append(
            (f.name, Column(f.name, base, nullable, meta.get("doc", ""), meta.get("references", ""),
                            meta.get("export", True)))
        )
    columns = tuple(c for _, k in fields for c in (k.columns if isinstance(k, _Layout) else (k,)))
    _LAYOUTS[cls] = layout = _Layout(cls, tuple(fields), columns)
    return layout


def _to_sql(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Mapping):
        return canonical_json(value)
    return value


def _from_sql(col: Column, value: Any) -> Any:
    if value is None:
        return math.nan if col.py_type is float and not col.nullable else None
    if col.py_type is Mapping:
        # A JSON-object column written by hand may hold anything: it reads as {column: what it held}.
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            return {col.name: str(value)}
        return parsed if isinstance(parsed, dict) else {col.name: parsed}
    return col.py_type(value)


def _flatten(layout: _Layout, values: Any, out: list[Any]) -> None:
    """Append the SQL values of ``values`` (a record, or a mapping of field name → value) to ``out``."""
    get = values.__getitem__ if isinstance(values, Mapping) else lambda name: getattr(values, name)
    for name, kind in layout.fields:
        if isinstance(kind, _Layout):
            _flatten(kind, get(name), out)
        else:
            out.append(_to_sql(get(name)))


def _build(layout: _Layout, it: Iterator[Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for name, kind in layout.fields:
        kwargs[name] = _build(kind, it) if isinstance(kind, _Layout) else _from_sql(kind, next(it))
    return layout.cls(**kwargs)


class Record:
    """Base of the stored records: frozen slotted dataclasses with a class-level :class:`Table`."""

    __slots__ = ()
    table: ClassVar[Table]

    @classmethod
    def columns(cls) -> tuple[Column, ...]:
        return _layout(cls).columns

    @classmethod
    def column_names(cls, *, exported: bool = False) -> list[str]:
        """The columns in table order (``exported``: only those the CSV export carries)."""
        return [c.name for c in cls.columns() if c.export or not exported]

    @classmethod
    def create_sql(cls) -> str:
        """``CREATE TABLE`` and ``CREATE INDEX`` statements (``IF NOT EXISTS``), one column a line."""
        t = cls.table
        lines = []
        for c in cls.columns():
            text = f"{c.name} {c.sql_type}"
            if t.primary_key == (c.name,):
                text += " PRIMARY KEY"
            elif not c.nullable:
                text += " NOT NULL"
            if c.references:
                text += f" REFERENCES {c.references}"
            lines.append([text, c.doc])
        if len(t.primary_key) > 1:
            lines.append([f"PRIMARY KEY ({', '.join(t.primary_key)})", ""])
        body = []
        for i, (text, doc) in enumerate(lines):
            comma = "," if i < len(lines) - 1 else ""
            body.append(f"    {text}{comma}" + (f"  -- {doc}" if doc else ""))
        out = [f"CREATE TABLE IF NOT EXISTS {t.name} (\n" + "\n".join(body) + "\n);"]
        out += [f"CREATE INDEX IF NOT EXISTS {name} ON {t.name}({', '.join(cols)});" for name, cols in t.indexes]
        return "\n".join(out) + "\n"

    @classmethod
    def insert_sql(cls, *, or_ignore: bool = False) -> str:
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        return f"{verb} INTO {cls.table.name} VALUES ({', '.join('?' * len(cls.columns()))})"

    def to_sql(self) -> tuple[Any, ...]:
        """The row's values in column order, as SQLite stores them (bools as 0/1, dicts as JSON, enums' values)."""
        out: list[Any] = []
        _flatten(_layout(type(self)), self, out)
        return tuple(out)

    @classmethod
    def from_sql(cls, values: Sequence[Any]) -> Self:
        """A row read back (a NULL in a non-nullable float reads as NaN)."""
        row: Self = _build(_layout(cls), iter(values))
        return row

    @classmethod
    def insert(cls, conn: sqlite3.Connection, rows: Iterable[Record], *, or_ignore: bool = False) -> None:
        conn.executemany(cls.insert_sql(or_ignore=or_ignore), (r.to_sql() for r in rows))

    @classmethod
    def select(
        cls, conn: sqlite3.Connection, where: str = "", params: Sequence[Any] = (), order_by: str = ""
    ) -> list[Self]:
        """Rows of the table (``where``/``order_by``: SQL clauses without their keyword)."""
        sql = f"SELECT {', '.join(cls.column_names())} FROM {cls.table.name}"
        sql += f" WHERE {where}" if where else ""
        sql += f" ORDER BY {order_by}" if order_by else ""
        return [cls.from_sql(r) for r in conn.execute(sql, tuple(params))]

    @classmethod
    def from_object(cls, source: object, **given: Any) -> Self:
        """A row whose columns not in ``given`` are ``source``'s attributes of the same names."""
        values = {name: given[name] if name in given else getattr(source, name) for name, _ in _layout(cls).fields}
        return cls.from_values(values)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Self:
        """A row from field values, each converted to its declared type as if it had been stored and read back."""
        out: list[Any] = []
        _flatten(_layout(cls), values, out)
        return cls.from_sql(out)

    @classmethod
    def write_csv(cls, f: IO[str], rows: Iterable[Self]) -> None:
        """The exported columns and :attr:`Table.derived` properties as CSV, cells as SQLite stores them."""
        keep = [c.export for c in cls.columns()]
        w = csv.writer(f)
        w.writerow([*cls.column_names(exported=True), *cls.table.derived])
        for r in rows:
            cells = [v for v, k in zip(r.to_sql(), keep, strict=True) if k]
            w.writerow([*cells, *(getattr(r, d) for d in cls.table.derived)])


@contextmanager
def open_tables(
    db_path: Path, tables: Iterable[type[Record]], what: str, *, wal: bool = False
) -> Iterator[sqlite3.Connection]:
    """A database holding ``tables`` (created where missing); ``what`` names it in errors (``results``).

    ``wal``: write-ahead logging, so that readers see each commit as it lands.
    """
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db_path)
    except (OSError, sqlite3.Error) as err:
        raise ConfigError(f"{db_path}: cannot open the {what} database: {err}") from None
    with closing(conn):
        try:
            if wal:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript("".join(t.create_sql() for t in tables))
        except sqlite3.Error as err:
            raise ConfigError(f"{db_path}: not a {what} database: {err}") from None
        yield conn
