"""``secmig demo|simulate|predict|validate``: the simulator's commands."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from secmig.cli import app, console, err_console, option_value
from secmig.errors import ConfigError
from secmig.migration.result import MigrationResult
from secmig.model.units import (
    format_bytes,
    format_duration,
    parse_bandwidth,
    parse_duration,
    parse_rate,
    parse_size,
)
from secmig.sim.engine import STRATEGIES, RunResult, Simulation, SimulationSpec
from secmig.sim.predict import PATTERNS, predict
from secmig.sim.scenario import load_scenario, load_scenario_text

OutOption = Annotated[Path, typer.Option("--out", "-o", help="Directory for the results database and exports.")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Override the scenario's random seed.")]
PROGRESS_MIN_MIGRATIONS = 20


def migrations_table(results: tuple[MigrationResult, ...], title: str) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for col in ("VM", "route", "strategy", "start", "total time", "downtime", "rounds", "sent", "result"):
        table.add_column(col, justify="left" if col in ("VM", "route", "strategy", "result") else "right", no_wrap=True)
    for m in results:
        style = "green" if m.outcome == "completed" else "red"
        # The full reason is in the results files; the table keeps its first clause.
        why = m.stop_reason.split(":")[0]
        table.add_row(
            m.vm,
            f"{m.source} → {m.destination}",
            m.strategy if m.strategy != "precopy" else f"precopy/{m.policy}",
            format_duration(m.start_s),
            format_duration(m.total_time_s),
            format_duration(m.downtime_s) if m.outcome == "completed" else "—",
            str(len(m.rounds)),
            format_bytes(m.bytes_sent),
            f"[{style}]{m.outcome}[/] ({why})",
        )
    return table


def _run_and_store(spec: SimulationSpec, scenario_text: str, out: Path) -> tuple[RunResult, int, Path]:
    from secmig.cli.report import write_run_report
    from secmig.results.store import export_run, save_run

    sim = Simulation(spec)
    total = len(spec.migrations)
    if total >= PROGRESS_MIN_MIGRATIONS:
        with Progress(
            TextColumn("simulating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("migrations"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as bar:
            task = bar.add_task("migrations", total=total)
            run = sim.run(lambda done, _t: bar.update(task, completed=done))
    else:
        run = sim.run()
    db = out / "secmig.sqlite"
    run_id = save_run(db, run, scenario_text)
    export_dir = out / f"{spec.name}-run{run_id}"
    export_run(run, export_dir)
    write_run_report(db, run_id, export_dir)
    return run, run_id, export_dir


def _print_run(run: RunResult, run_id: int, out: Path, export_dir: Path) -> None:
    console.print(migrations_table(run.migrations, f"{run.name}: {len(run.migrations)} migrations (seed {run.seed})"))
    done = sum(1 for m in run.migrations if m.outcome == "completed")
    console.print(
        f"{done} completed, {len(run.migrations) - done} aborted; "
        f"{format_duration(run.sim_time_s)} simulated in {format_duration(run.wall_time_s)} "
        f"({run.reshares} network re-shares)"
    )
    console.print(f"results: run {run_id} in [bold]{out / 'secmig.sqlite'}[/]; JSON and CSV in [bold]{export_dir}/[/]")
    console.print(f"report: [bold]{export_dir / 'report.html'}[/]")


def _with_seed(spec: SimulationSpec, seed: int | None) -> SimulationSpec:
    if seed is None:
        return spec
    from dataclasses import replace

    return replace(spec, seed=seed)


@app.command()
def demo(out: OutOption = Path("secmig-out"), seed: SeedOption = None) -> None:
    """Run the bundled scenario: two datacenters, concurrent migrations inside and across them."""
    text = resources.files("secmig.data").joinpath("demo.yaml").read_text(encoding="utf-8")
    _, spec = load_scenario_text(text, "demo.yaml")
    run, run_id, export_dir = _run_and_store(_with_seed(spec, seed), text, out)
    _print_run(run, run_id, out, export_dir)


@app.command()
def simulate(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    out: OutOption = Path("secmig-out"),
    seed: SeedOption = None,
) -> None:
    """Run a scenario file and store its results (SQLite, JSON, CSV)."""
    _, spec = load_scenario(scenario)
    text = scenario.read_text(encoding="utf-8")
    run, run_id, export_dir = _run_and_store(_with_seed(spec, seed), text, out)
    _print_run(run, run_id, out, export_dir)


@app.command()
def validate(scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")]) -> None:
    """Check a scenario file without running it."""
    _, spec = load_scenario(scenario)
    console.print(
        f"{scenario}: ok — {len(spec.infra.datacenters)} datacenters, {len(spec.infra.hosts)} hosts, "
        f"{len(spec.vms)} VMs, {len(spec.migrations)} migrations, {len(spec.traffic)} traffic flows"
    )


@app.command(name="predict")
def predict_cmd(
    ram: Annotated[str, typer.Option(help="VM memory, e.g. 4GiB.")],
    dirty_rate: Annotated[str, typer.Option(help="Page writes per second, e.g. 20000pages/s or 80MB/s.")],
    bandwidth: Annotated[str, typer.Option(help="Migration bandwidth, e.g. 1Gbit/s.")],
    used: Annotated[str | None, typer.Option(help="Non-zero memory (default: all of --ram).")] = None,
    working_set: Annotated[str | None, typer.Option(help="Pages the workload writes to (default: --used).")] = None,
    pattern: Annotated[str, typer.Option(help=f"Dirtying pattern: {'|'.join(PATTERNS)}.")] = "uniform",
    latency: Annotated[str, typer.Option(help="One-way latency, e.g. 1ms.")] = "0ms",
    downtime_limit: Annotated[str, typer.Option(help="Downtime budget, e.g. 300ms.")] = "300ms",
    policy: Annotated[str, typer.Option(help="Stop policy: qemu|xen|paper.")] = "qemu",
    strategy: Annotated[str, typer.Option(help="precopy|postcopy|hybrid|stop-and-copy.")] = "precopy",
    auto_converge: Annotated[bool, typer.Option(help="Throttle the vCPUs as QEMU's auto-converge does.")] = False,
    switchover_bandwidth: Annotated[
        str | None,
        typer.Option(help="Stop-and-copy speed if not --bandwidth (QEMU's avail-switchover-bandwidth)."),
    ] = None,
    postcopy_after: Annotated[int, typer.Option(help="hybrid: pre-copy rounds before post-copy.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Predict one migration from parameters a user can measure; no scenario file needed."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy: unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    ram_b = option_value("--ram", parse_size, ram)
    rate = option_value("--dirty-rate", parse_rate, dirty_rate)
    result = predict(
        ram_bytes=ram_b,
        used_bytes=option_value("--used", parse_size, used) if used is not None else None,
        dirty_rate_pages_per_s=rate.in_pages_per_s(),
        working_set_bytes=option_value("--working-set", parse_size, working_set) if working_set is not None else None,
        pattern=pattern,
        bandwidth_bytes_per_s=option_value("--bandwidth", parse_bandwidth, bandwidth),
        latency_s=option_value("--latency", parse_duration, latency),
        downtime_limit_s=option_value("--downtime-limit", parse_duration, downtime_limit),
        policy=policy,
        strategy=strategy,  # type: ignore[arg-type]
        auto_converge=auto_converge,
        switchover_bandwidth_bytes_per_s=(
            option_value("--switchover-bandwidth", parse_bandwidth, switchover_bandwidth)
            if switchover_bandwidth
            else None
        ),
        postcopy_after_rounds=postcopy_after,
    )
    summary = {
        "total_time_s": result.total_time_s,
        "downtime_s": result.downtime_s,
        "rounds": len(result.rounds),
        "live_rounds": result.live_rounds,
        "bytes_sent": result.bytes_sent,
        "pages_sent": result.pages_sent,
        "converged": result.converged,
        "outcome": result.outcome,
        "stop_reason": result.stop_reason,
        **result.extra,
        "rounds_detail": [
            {"index": r.index, "bytes": r.bytes, "pages": r.pages, "duration_s": r.duration_s, "live": r.live}
            for r in result.rounds
        ],
    }
    if as_json:
        console.print_json(json.dumps(summary, allow_nan=False) if math.isfinite(result.total_time_s) else "{}")
        return
    table = Table(title="predicted migration", title_justify="left", show_header=False)
    table.add_row("total time (Tmr)", format_duration(result.total_time_s))
    table.add_row("downtime (Tsd)", format_duration(result.downtime_s) if result.outcome == "completed" else "—")
    table.add_row("rounds", f"{len(result.rounds)} ({result.live_rounds} live)")
    table.add_row("data sent", format_bytes(result.bytes_sent))
    table.add_row("converged", "yes" if result.converged else "[red]no[/]")
    table.add_row("outcome", result.outcome)
    table.add_row("why it stopped", result.stop_reason)
    labels: dict[str, tuple[str, Callable[[float], str]]] = {
        "throttle": ("auto-converge throttle", lambda v: f"{v:.0%}"),
        "remote_faults": ("post-copy remote faults", lambda v: f"{v:,.0f}"),
        "degraded_s": ("post-copy degraded period", format_duration),
    }
    for key, value in result.extra.items():
        label, fmt = labels.get(key, (key, str))
        table.add_row(label, fmt(value))
    console.print(table)
