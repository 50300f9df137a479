"""``secmig report|sweep``: the HTML report of a stored run, and parameter sweeps on Dask."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from secmig.cli import app, console, err_console
from secmig.errors import ConfigError
from secmig.model.units import format_bytes, format_duration

MAX_SUMMARY_ROWS = 40


def write_run_report(db: Path, run_id: int, export_dir: Path) -> Path:
    """Write the report of a run just stored (``demo``, ``simulate``) beside its exports: EXPORT-DIR/report.html."""
    from secmig.report import write_report

    return write_report(db, run_id, export_dir / "report.html")


@app.command()
def report(
    run: Annotated[
        str,
        typer.Argument(
            help="Run id in the database, 'latest', or a results database / --out folder (its latest run)."
        ),
    ] = "latest",
    db: Annotated[
        Path, typer.Option("--db", help="Results database, or the folder holding its secmig.sqlite.")
    ] = Path("secmig-out/secmig.sqlite"),
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML file to write (default: DB-FOLDER/NAME-runID/report.html).")
    ] = None,
    audit: Annotated[
        Path | None, typer.Option("--audit", help="An audit log (SQLite) to summarise in the report.")
    ] = None,
) -> None:
    """Write the self-contained HTML report of a stored run: summary, migrations, rounds, links, monitor, audit
    (a consolidation day: its figures, energy and active hosts, migrations per interval, monitor, audit)."""
    from secmig.report import latest_run_id, write_report

    if run not in ("latest",) and not run.lstrip("-").isdigit() and Path(run).exists():
        db, run = Path(run), "latest"
    if db.is_dir():
        db = db / "secmig.sqlite"
    if run == "latest":
        run_id = latest_run_id(db)
    else:
        try:
            run_id = int(run)
        except ValueError:
            raise ConfigError(f"RUN: {run!r} is not a run id (an integer, or 'latest')") from None
    target = write_report(db, run_id, out, audit)
    console.print(f"report of run {run_id}: [bold]{target}[/]")


def _fmt_s(x: float) -> str:
    return format_duration(x) if math.isfinite(x) else "—"


@app.command()
def sweep(
    grid_file: Annotated[Path, typer.Argument(metavar="GRID.yaml", help="Grid: a base scenario and values to vary.")],
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="Dask scheduler address, e.g. tcp://HOST:8786.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", help="Worker processes of the local cluster (default: cores).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for sweep.sqlite and the plots.")] = Path(
        "sweep-out"
    ),
    parquet: Annotated[bool, typer.Option("--parquet", help="Also write sweep.parquet (needs pyarrow).")] = False,
    chunk: Annotated[
        int | None, typer.Option("--chunk", help="Points per Dask task (default: up to 16, by size).")
    ] = None,
) -> None:
    """Run a parameter grid on Dask; restartable: points already in OUT/sweep.sqlite are skipped."""
    from secmig.report.charts import save_png, sweep_heatmaps
    from secmig.sweep import (
        aggregate,
        heatmap_data,
        load_grid,
        read_points,
        run_sweep,
        value_label,
        write_parquet,
    )

    grid = load_grid(grid_file)
    if parquet:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("--parquet needs pyarrow: pip install 'secmig[parquet]'") from None
    points = grid.points()
    where = scheduler or f"a local cluster of {workers or 'one worker per core'}" + (" workers" if workers else "")
    console.print(
        f"sweep [bold]{escape(grid.name)}[/]: {len(points)} points ({len(grid.parameters)} parameters × "
        f"{len(grid.seeds)} seeds) on {where}"
    )
    with Progress(
        TextColumn("sweeping"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("points"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("points", total=len(points))
        outcome = run_sweep(
            grid, out, scheduler=scheduler, workers=workers, points=points, chunk=chunk,
            progress=lambda done, _total: bar.update(task, completed=done),
        )
    rows = read_points(outcome.db_path, [p.key for p in points])
    if outcome.computed:
        console.print(
            f"{outcome.computed} points computed on {outcome.workers} worker{'s' if outcome.workers != 1 else ''} in "
            f"{format_duration(outcome.wall_time_s)}; {outcome.skipped} were already done"
        )
    else:
        console.print(f"nothing to compute: all {outcome.skipped} points were already done")
    names = [p for p, _ in grid.parameters]
    table = Table(
        title=f"{escape(grid.name)}: mean over {len(grid.seeds)} seeds", title_justify="left", header_style="bold"
    )
    for n in names:
        table.add_column(escape(n), overflow="fold")
    for col in ("points", "completed", "aborted", "mean total", "max total", "max downtime", "sent/point"):
        table.add_column(col, justify="right", no_wrap=True)
    aggs = aggregate(grid, rows)
    for a in aggs[:MAX_SUMMARY_ROWS]:
        table.add_row(
            *(escape(value_label(v)) for v in a.values),
            str(a.points),
            str(a.completed),
            f"[red]{a.aborted}[/]" if a.aborted else "0",
            _fmt_s(a.mean_total_time_s),
            _fmt_s(a.max_total_time_s),
            _fmt_s(a.max_downtime_s),
            format_bytes(a.mean_bytes_sent) if math.isfinite(a.mean_bytes_sent) else "—",
        )
    console.print(table)
    if len(aggs) > MAX_SUMMARY_ROWS:
        console.print(f"(first {MAX_SUMMARY_ROWS} of {len(aggs)} combinations; all points are in the database)")
    errors = sum(1 for r in rows if r.result.error)
    if errors:
        first = next(r for r in rows if r.result.error)
        err_console.print(f"[yellow]{errors} points could not be simulated[/], e.g. {escape(first.result.error or '')}")
    written = [f"[bold]{outcome.db_path}[/] (table sweep_points)"]
    hm = heatmap_data(grid, rows)
    if hm is not None:
        fig = sweep_heatmaps(
            hm,
            f"{grid.name}: mean over {len(grid.seeds)} seeds"
            + (f" and over {', '.join(names[2:])}" if len(names) > 2 else ""),
        )
        png = out / "heatmap.png"
        save_png(fig, png)
        written.append(f"[bold]{png}[/]")
    if parquet:
        written.append(f"[bold]{write_parquet(grid, rows, out / 'sweep.parquet')}[/]")
    console.print("results: " + ", ".join(written))
