"""``secmig attack list|run|sweep`` and ``secmig experiment paper``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from secmig.cli import app, console
from secmig.model.units import format_duration

attack_app = typer.Typer(help="The attack suite: adversaries against the security core and the monitor.")
experiment_app = typer.Typer(help="Reproduce the paper's experiment.")
app.add_typer(attack_app, name="attack")
app.add_typer(experiment_app, name="experiment")

RulesOption = Annotated[Path | None, typer.Option("--rules", help="Rule file (default: the paper's values).")]


@attack_app.command("list")
def list_attacks() -> None:
    """List the attacks and the benign scenarios."""
    from secmig.sim.attacks import attack_names

    table = Table(header_style="bold")
    for col in ("name", "kind", "what it does"):
        table.add_column(col)
    for name, kind, desc in attack_names():
        table.add_row(name, kind, desc)
    console.print(table)


@attack_app.command("run")
def run_attacks(
    name: Annotated[str, typer.Argument(help="An attack's name, or 'all'.")] = "all",
    rules: RulesOption = None,
) -> None:
    """Run attacks and print, for each, whether it was stopped, by which rule, how fast, and what leaked."""
    from secmig.monitor.rules import load_rules
    from secmig.sim.attacks import attack_names, false_alarm_rate, run_attack

    ruleset = load_rules(rules)
    names = [n for n, _, _ in attack_names()] if name == "all" else [name]
    results = [run_attack(n, ruleset) for n in names]
    table = Table(header_style="bold")
    for col in ("attack", "kind", "stopped", "by", "time to detect", "pages leaked", "VM's fate"):
        table.add_column(col, no_wrap=col != "by")
    for r in results:
        stopped = "[green]yes[/]" if r.stopped else "[red]no[/]"
        if r.kind == "benign":
            stopped = "[green]no false alarm[/]" if r.stopped else f"[red]{r.false_alarms} false alarms[/]"
        ttd = format_duration(r.time_to_detect_s) if r.time_to_detect_s is not None else "—"
        if r.kind == "authentication":
            ttd = "at handshake"
        table.add_row(r.name, r.kind, stopped, r.rule, ttd, f"{r.pages_leaked:,}", r.vm_fate)
    console.print(table)
    benign = [r for r in results if r.kind == "benign"]
    if benign:
        windows = sum(r.windows for r in benign)
        checks = sum(r.identity_checks for r in benign)
        console.print(
            f"benign: {false_alarm_rate(results):.2%} of {windows} VM-windows with a false alarm; "
            f"{checks} identity checks triggered, all passed"
            if all(r.stopped for r in benign)
            else ""
        )


@attack_app.command("sweep")
def sweep_attacks(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("secmig-out/attack-sweep"),
) -> None:
    """Detection against false alarms as the rate thresholds move: a table, a CSV and a ROC-style plot."""
    from secmig.sim.attacks import sweep

    factors = [1.05, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0]
    rows = sweep(factors)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = Table(header_style="bold")
    for col in ("medium ×", "high ×", "attacks detected", "false alarms", "identity checks (benign)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['medium']:g}",
            f"{r['high']:g}",
            f"{r['detected']:.0%}",
            f"{r['false_alarm_rate']:.2%}",
            f"{r['identity_check_rate']:.2%}",
        )
    console.print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    xs = [r["identity_check_rate"] * 100 for r in rows]
    ys = [r["detected"] * 100 for r in rows]
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(f"medium {r['medium']:g}×", (x, y), xytext=(4, -10), textcoords="offset points", fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_xlim(left=0)
    ax.set_xlabel("benign VM-windows that trigger an identity check (%)")
    ax.set_ylabel("detection attacks detected (%)")
    ax.set_title("Rate thresholds: detection vs checks on honest VMs", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "roc.png")
    plt.close(fig)
    console.print(f"written: {out / 'sweep.csv'}, {out / 'roc.png'}")


@experiment_app.command("paper")
def experiment_paper(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("secmig-out/experiment-paper"),
    rules: RulesOption = None,
) -> None:
    """Two datacenters, VMs moved while rates are monitored: Table 6.1 (CSV) and Chart 1 (PNG)."""
    import json
    from importlib import resources

    from secmig.cli.report import write_run_report
    from secmig.monitor.rules import load_rules
    from secmig.results.store import save_monitor_events, save_run
    from secmig.sim.experiment import run_paper_experiment, write_chart, write_table

    run, rows = run_paper_experiment(load_rules(rules))
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out / "table-6-1.csv")
    write_chart(run, rows, out / "chart-1.png")
    # The run and the monitor's verdicts go to the results database, and its report beside the table.
    db = out / "secmig.sqlite"
    text = resources.files("secmig.data").joinpath("experiment-paper.yaml").read_text(encoding="utf-8")
    run_id = save_run(db, run.result, text)
    save_monitor_events(
        db,
        run_id,
        [
            (v.t_s, v.vm, v.vswitch, v.rule, v.level.value, v.action.value, json.dumps(v.evidence, default=str))
            for v in run.log.verdicts
        ],
    )
    report = write_run_report(db, run_id, out)
    table = Table(title="Table 6.1 — VMs moved between hypervisors, rates at the vSwitch", header_style="bold")
    for col in ("VM", "move", "preset rate", "start", "completion", "actual rate", "verdict"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.vm,
            r.move,
            f"{r.preset_bytes_per_s / 1e6:.0f} MB/s",
            f"{r.start_s:.2f} s",
            f"{r.completion_s:.2f} s",
            f"{r.actual_bytes_per_s / 1e6:.1f} MB/s",
            r.verdict,
        )
    console.print(table)
    console.print(f"written: {out / 'table-6-1.csv'}, {out / 'chart-1.png'}, {report} (run {run_id} in {db})")
