"""``secmig consolidate``: a day of dynamic VM consolidation on PlanetLab traces, CloudSim's experiment.

Prints CloudSim's figures and secmig's own (``--json``: one object of plain numbers); stores the day in
``OUT/secmig.sqlite`` and writes ``OUT/NAME-runID/`` (``summary.json``, ``intervals.csv``,
``migrations.csv``, ``report.html``), as ``simulate`` does for a scenario.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from secmig.cli import app, console, err_console

if TYPE_CHECKING:
    from secmig.lab.consolidation import DayResult

DEFAULT_OUT = Path("secmig-out/consolidate")


def _plain(value: object) -> object:
    # JSON has no NaN: a figure that does not exist (no shutdown, no migration) is null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@app.command()
def consolidate(
    workload_dir: Annotated[Path, typer.Argument(help="A PlanetLab day: one file of 288 CPU samples per VM.")],
    overload: Annotated[
        str, typer.Option(help="Overload detection: thr:0.8, iqr:1.5, mad:2.5, lr:1.2 or lrr:1.2.")
    ] = "thr:0.8",
    selection: Annotated[str, typer.Option(help="VM selection: mmt, mc, mu or rs.")] = "mmt",
    migration_model: Annotated[
        str, typer.Option("--migration-model", help="cloudsim (RAM ÷ half the NIC) or network (pre-copy).")
    ] = "cloudsim",
    dirty_pages_per_s: Annotated[
        float, typer.Option(help="network model: page writes/s of a VM at 100 % CPU (scaled by its utilisation).")
    ] = 5000.0,
    hosts: Annotated[int, typer.Option(help="Hosts (G4 and G5 alternately).")] = 800,
    duration: Annotated[float | None, typer.Option(help="Seconds to simulate (default: the whole trace).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random selection policy.")] = 0,
    secure: Annotated[bool, typer.Option(help="Vsignatures, grants and the monitor.")] = True,
    revoke: Annotated[list[int] | None, typer.Option(help="Revoke this host's Vsignature first (repeatable).")] = None,
    retire_idle_vms: Annotated[
        bool, typer.Option(help="CloudSim's rule: a VM asking 0 MIPS has finished and leaves.")
    ] = True,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for secmig.sqlite and NAME-runID/ (summary.json, intervals.csv, migrations.csv, "
            "report.html). Default: secmig-out/consolidate; with --json, nothing is written unless given.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run the consolidation day and print CloudSim's figures (energy, migrations, SLATAH, PDM, SLAV, ESV)."""
    from secmig.cloud.overload import parse_overload
    from secmig.cloud.selection import parse_selection
    from secmig.errors import ConfigError
    from secmig.lab.consolidation import DayConfig, NetworkModel, parse_migration_model, run_day

    if not dirty_pages_per_s >= 0:
        raise ConfigError(f"--dirty-pages-per-s {dirty_pages_per_s:g}: must be ≥ 0")

    cfg = DayConfig(
        workload_dir,
        parse_overload(overload),
        parse_selection(selection),
        parse_migration_model(migration_model),
        hosts=hosts,
        duration_s=duration,
        seed=seed,
        secure=secure,
        revoked=tuple(revoke or ()),
        retire_idle_vms=retire_idle_vms,
        network=NetworkModel(dirty_pages_per_s_at_full_cpu=dirty_pages_per_s),
    )
    target = _check_out(out if out is not None else DEFAULT_OUT) if out is not None or not as_json else None
    with Progress(
        TextColumn("consolidating"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f} %"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=as_json,
    ) as bar:
        task = bar.add_task("day", total=1.0)
        result = run_day(cfg, lambda t, end: bar.update(task, completed=t / end))
    summary = {k: _plain(v) for k, v in result.summary().items()}
    stored = _store(result, target) if target is not None else None
    if as_json:
        print(json.dumps(summary))
        if stored is not None:
            err_console.print(f"results: run {stored[1]} in {stored[0]}; report: {stored[2] / 'report.html'}")
        return
    table = Table(
        title=f"{workload_dir.name}: {cfg.overload.spec} + {cfg.selection.value}, "
        f"migration model {cfg.migration_model.value}",
        title_justify="left",
        header_style="bold",
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("energy", f"{result.metrics.energy_kwh:.2f} kWh"),
        ("VM migrations", f"{result.metrics.migrations}"),
        ("SLATAH", f"{result.metrics.slatah * 100:.2f} %"),
        ("PDM", f"{result.metrics.pdm * 100:.3f} %"),
        ("SLAV", f"{result.metrics.slav * 100:.5f} %"),
        ("ESV", f"{result.metrics.esv:.5f}"),
        ("host shutdowns", f"{result.metrics.shutdowns}"),
        ("mean time before a shutdown", f"{result.metrics.mean_time_before_shutdown_s:.1f} s"),
        ("mean time before a migration", f"{result.metrics.mean_time_before_migration_s:.1f} s"),
        ("total migration downtime", f"{summary['total_downtime_s']:.2f} s"),
        ("bytes moved", f"{sum(r.bytes_moved for r in result.migrations) / 1e9:.1f} GB"),
        ("grants issued / refused", f"{result.grants_issued} / {result.grants_refused}"),
        ("destination hosts (valid Vsignature)", f"{result.eligible_hosts}"),
        ("capacity of a cloudlet, ΣC(i)/Nvm", f"{result.mean_cloudlet_capacity_mips:.0f} MIPS"),
        ("VMs finished (asked 0 MIPS, CloudSim's rule)", f"{result.vms_retired}"),
    ]
    if result.monitor is not None:
        m = result.monitor
        rows += [
            ("monitor verdicts (passed checks)", f"{m.verdicts} ({m.challenges_passed})"),
            ("monitor alarms / VMs destroyed", f"{m.alarms} / {m.destroyed}"),
            ("false alarms per VM-hour watched", f"{m.false_alarms_per_vm_hour:.4f}"),
        ]
    rows.append(("wall time", f"{result.wall_time_s:.1f} s"))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if stored is not None:
        db, run_id, export_dir = stored
        console.print(f"results: run {run_id} in [bold]{db}[/]; summary.json and CSV in [bold]{export_dir}/[/]")
        console.print(f"report: [bold]{export_dir / 'report.html'}[/]")


def _check_out(out: Path) -> Path:
    """``--out`` checked before the day runs (it is created only once there is something to write)."""
    from secmig.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    return out


def _store(result: DayResult, out: Path) -> tuple[Path, int, Path]:
    """The day into OUT/secmig.sqlite, its exports and report.html into OUT/NAME-runID/."""
    from secmig.cli.report import write_run_report
    from secmig.results.store import consolidation_run_name, export_consolidation, save_consolidation

    db = out / "secmig.sqlite"
    run_id = save_consolidation(db, result)
    export_dir = out / f"{consolidation_run_name(result.config)}-run{run_id}"
    export_consolidation(result, export_dir)
    write_run_report(db, run_id, export_dir)
    return db, run_id, export_dir
