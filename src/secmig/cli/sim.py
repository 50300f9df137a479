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
    if spec.secure:
        # The scenario asks for security (an attack block, a monitor block, operations or grants): the real
        # handshake before each operation and the monitor on every VM, as `secmig attack run` does.
        from secmig.monitor.rules import load_rules
        from secmig.sim.gate import run_secure

        secure = run_secure(spec, load_rules())
        run = secure.result
        refused = sum(1 for _vm, _op, d in secure.gate.decisions if not d.accepted)
        acted = [v for v in secure.log.verdicts if v.action.value != "continue"]
        err_console.print(
            f"gate: {len(secure.gate.decisions)} operations, {refused} refused before any page; "
            f"monitor: {len(acted)} actions, destroyed: {', '.join(sorted(secure.sim.destroyed)) or 'none'}",
            highlight=False,
        )
        return _store(run, spec, scenario_text, out)
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
    return _store(run, spec, scenario_text, out)


def _store(run: RunResult, spec: SimulationSpec, scenario_text: str, out: Path) -> tuple[RunResult, int, Path]:
    from secmig.cli.report import write_run_report
    from secmig.results.store import export_run, save_run

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
    """Check a scenario file (or a monitor rule file) without running it."""
    from secmig.yamlfile import read_yaml

    doc = read_yaml(scenario)
    if isinstance(doc, dict) and "datacenters" not in doc and "name" not in doc:
        from secmig.monitor.rules import load_rules

        rules = load_rules(scenario)
        console.print(f"{scenario}: ok — a monitor rule file (window {rules.window:g} s, step {rules.step_s:g} s)")
        return
    _, spec = load_scenario(scenario)
    extra = ""
    if spec.attack is not None:
        extra = f"; attack block: {spec.attack.kind}" + (f", target {spec.attack.target}" if spec.attack.target else "")
    console.print(
        f"{scenario}: ok — {len(spec.infra.datacenters)} datacenters, {len(spec.infra.hosts)} hosts, "
        f"{len(spec.vms)} VMs, {len(spec.migrations)} migrations, {len(spec.traffic)} traffic flows{extra}"
    )


@app.command(name="predict")
def predict_cmd(
    bandwidth: Annotated[str, typer.Option(help="Migration cap, QEMU's max-bandwidth, e.g. 100MB/s or 1Gbit/s.")],
    ram: Annotated[str | None, typer.Option(help="VM memory, e.g. 4GiB (measured with --qmp).")] = None,
    dirty_rate: Annotated[
        str | None, typer.Option(help="Page writes per second, e.g. 20000pages/s or 80MB/s (measured with --qmp).")
    ] = None,
    qmp: Annotated[
        str | None,
        typer.Option(help="unix:PATH of a running VM's QMP socket: measure RAM, used memory and dirtying live."),
    ] = None,
    used: Annotated[str | None, typer.Option(help="Non-zero memory (default: all of --ram).")] = None,
    working_set: Annotated[str | None, typer.Option(help="Pages the workload writes to (default: --used).")] = None,
    pattern: Annotated[str, typer.Option(help=f"Dirtying pattern: {'|'.join(PATTERNS)}.")] = "uniform",
    latency: Annotated[str, typer.Option(help="One-way latency, e.g. 1ms.")] = "0ms",
    downtime_limit: Annotated[str, typer.Option(help="QEMU's downtime-limit, e.g. 300ms.")] = "300ms",
    policy: Annotated[str, typer.Option(help="Stop policy: qemu|xen|paper.")] = "qemu",
    strategy: Annotated[str, typer.Option(help="precopy|postcopy|hybrid|stop-and-copy.")] = "precopy",
    auto_converge: Annotated[bool, typer.Option(help="Throttle the vCPUs as QEMU's auto-converge does.")] = False,
    link: Annotated[
        str | None,
        typer.Option(help="The link's own speed, used uncapped for the stop-and-copy (default: --bandwidth)."),
    ] = None,
    switchover_bandwidth: Annotated[
        str | None,
        typer.Option(
            help="QEMU >= 8.2's avail-switchover-bandwidth: budgets the downtime with it (and is the "
            "stop-and-copy's speed unless --link says otherwise)."
        ),
    ] = None,
    postcopy_after: Annotated[int, typer.Option(help="hybrid: pre-copy rounds before post-copy.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Predict one migration, from parameters or measured live from a running VM (--qmp)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy: unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    cap = option_value("--bandwidth", parse_bandwidth, bandwidth)
    limit = option_value("--downtime-limit", parse_duration, downtime_limit)
    link_bps = option_value("--link", parse_bandwidth, link) if link else None
    switch_bps = (
        option_value("--switchover-bandwidth", parse_bandwidth, switchover_bandwidth) if switchover_bandwidth else None
    )
    profile: dict[str, object] | None = None
    if qmp is not None:
        if ram is not None or dirty_rate is not None or used is not None or working_set is not None:
            raise ConfigError("--qmp measures --ram, --dirty-rate, --used and --working-set: give none of them")
        import asyncio

        from secmig.agent.qemu.profile import profile_over_qmp

        prof = asyncio.run(profile_over_qmp(qmp))
        profile = prof.as_dict()
        ram_b = prof.ram_bytes
        used_b: int | None = prof.used_bytes
        ws_b: int | None = prof.working_set_bytes
        rate_pps, pat = prof.fit.rate_pages_per_s, prof.fit.pattern if prof.fit.pattern != "none" else "uniform"
    else:
        if ram is None or dirty_rate is None:
            raise ConfigError("give --ram and --dirty-rate, or --qmp unix:PATH to measure a running VM")
        ram_b = option_value("--ram", parse_size, ram)
        used_b = option_value("--used", parse_size, used) if used is not None else None
        ws_b = option_value("--working-set", parse_size, working_set) if working_set is not None else None
        rate_pps = option_value("--dirty-rate", parse_rate, dirty_rate).in_pages_per_s()
        pat = pattern

    def run(cap_bps: float) -> MigrationResult:
        return predict(
            ram_bytes=ram_b,
            used_bytes=used_b,
            dirty_rate_pages_per_s=rate_pps,
            working_set_bytes=ws_b,
            pattern=pat,
            bandwidth_bytes_per_s=cap_bps,
            latency_s=option_value("--latency", parse_duration, latency),
            downtime_limit_s=limit,
            policy=policy,
            strategy=strategy,  # type: ignore[arg-type]
            auto_converge=auto_converge,
            switchover_bandwidth_bytes_per_s=switch_bps,
            budget_with_switchover_bandwidth=switch_bps is not None,
            link_bytes_per_s=link_bps,
            postcopy_after_rounds=postcopy_after,
        )

    result = run(cap)
    min_cap = None
    if strategy == "precopy" and policy == "qemu":
        from secmig.sim.predict import min_converging_bandwidth

        min_cap = min_converging_bandwidth(run, limit)
    summary: dict[str, object] = {
        "total_time_s": result.total_time_s,
        "downtime_s": result.downtime_s,
        "rounds": len(result.rounds),
        "live_rounds": result.live_rounds,
        "bytes_sent": result.bytes_sent,
        "pages_sent": result.pages_sent,
        "converged": result.converged,
        "outcome": result.outcome,
        "stop_reason": result.stop_reason,
        "min_converging_bandwidth_bytes_per_s": min_cap,
        **result.extra,
        "rounds_detail": [
            {"index": r.index, "bytes": r.bytes, "pages": r.pages, "duration_s": r.duration_s, "live": r.live}
            for r in result.rounds
        ],
    }
    if profile is not None:
        summary["measured"] = profile
    if as_json:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in summary.items()}
        console.print_json(json.dumps(clean, allow_nan=False))
        return
    if profile is not None:
        fit = profile["fit"]
        assert isinstance(fit, dict)
        mt = Table(title="measured over QMP", title_justify="left", show_header=False)
        mt.add_row("RAM / used", f"{format_bytes(ram_b)} / {format_bytes(float(used_b or 0))}")
        ws_text = format_bytes(float(fit["working_set_bytes"]))
        mt.add_row("dirty pattern", f"{fit['pattern']}, {fit['rate_pages_per_s']:,.0f} pages/s over {ws_text}")
        samples = profile["dirty_samples"]
        assert isinstance(samples, list)
        points = ", ".join(f"{d['pages']:,.0f} in {d['window_s']:g}s" for d in samples)
        mt.add_row("dirty pages (calc-dirty-rate)", points)
        probe = profile["probe"]
        assert isinstance(probe, dict)
        mt.add_row(
            "probe pass / guest paused",
            f"{format_duration(probe['first_pass_s'])} / {format_duration(probe['pause_s'])}",
        )
        console.print(mt)
    table = Table(title="predicted migration", title_justify="left", show_header=False)
    table.add_row("total time (Tmr)", format_duration(result.total_time_s))
    table.add_row("downtime (Tsd)", format_duration(result.downtime_s) if result.outcome == "completed" else "—")
    table.add_row("rounds", f"{len(result.rounds)} ({result.live_rounds} live)")
    table.add_row("data sent", format_bytes(result.bytes_sent))
    table.add_row("converged", "yes" if result.converged else "[red]no[/]")
    table.add_row("outcome", result.outcome)
    table.add_row("why it stopped", result.stop_reason)
    if min_cap is not None or (strategy == "precopy" and policy == "qemu"):
        table.add_row(
            f"smallest cap within {format_duration(limit)}",
            "none up to 100 GB/s" if min_cap is None else f"{min_cap / 1e6:,.1f} MB/s",
        )
    labels: dict[str, tuple[str, Callable[[float], str]]] = {
        "throttle": ("auto-converge throttle", lambda v: f"{v:.0%}"),
        "remote_faults": ("post-copy remote faults", lambda v: f"{v:,.0f}"),
        "degraded_s": ("post-copy degraded period", format_duration),
    }
    for key, value in result.extra.items():
        label, fmt = labels.get(key, (key, str))
        table.add_row(label, fmt(value))
    console.print(table)
