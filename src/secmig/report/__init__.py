"""HTML reports of stored runs: read a run back from the results database, write one self-contained page.

``write_report(db, run_id, out)`` is all a caller needs. The report only reads the database (opened
read-only) and writes the one file it is asked for; it prints nothing.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from secmig.errors import ConfigError
from secmig.report.data import RunData, latest_run_id, load_run
from secmig.report.html import CONSOLIDATION_SECTIONS, SECTIONS, render

__all__ = [
    "CONSOLIDATION_SECTIONS",
    "SECTIONS", "RunData", "default_report_path", "latest_run_id", "load_run", "write_report",
]


def _version() -> str:
    try:
        return version("secmig")
    except PackageNotFoundError:
        return ""


def default_report_path(db_path: Path, name: str, run_id: int) -> Path:
    """``DB-FOLDER/NAME-runID/report.html``: beside the run's JSON and CSV exports."""
    return db_path.parent / f"{name}-run{run_id}" / "report.html"


def write_report(db_path: Path, run_id: int, out: Path | None = None, audit_log: Path | None = None) -> Path:
    """Write the report of run ``run_id`` to ``out`` (default: :func:`default_report_path`) and return the path."""
    data = load_run(db_path, run_id, audit_log)
    target = out if out is not None else default_report_path(db_path, data.stored.name, run_id)
    page = render(data, _version())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page, encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{target}: cannot write the report: {err.strerror}") from None
    return target
