"""``secmig experiment paper``: the paper's Table 6.1 (CSV and a table) and Chart 1 (PNG) from a monitored run."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from secmig.cli import app, console

if TYPE_CHECKING:
    from secmig.lab.experiment import MoveRow

experiment_app = typer.Typer(help="Reproduce the paper's experiment.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


def _write_table(rows: Sequence[MoveRow], path: Path) -> None:
    """Table 6.1 as CSV (rates in MB/s, times in seconds of simulated time)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["vm", "move", "preset_rate_MB_s", "start_s", "completion_s", "actual_rate_MB_s", "verdict"])
        for r in rows:
            w.writerow(
                [
                    r.vm,
                    r.move,
                    f"{r.preset_bytes_per_s / 1e6:.1f}",
                    f"{r.start_s:.2f}",
                    f"{r.completion_s:.2f}",
                    f"{r.actual_bytes_per_s / 1e6:.1f}",
                    r.verdict,
                ]
            )


@experiment_app.command("paper")
def experiment_paper(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("secmig-out/experiment-paper"),
    rules: Annotated[Path | None, typer.Option("--rules", help="Rule file (default: the paper's values).")] = None,
) -> None:
    """Two datacenters, VMs moved while the monitor watches: Table 6.1 (CSV), Chart 1 (PNG), the run's report."""
    from secmig.cli.attack import monitor_event_rows, open_audit_log
    from secmig.cli.report import write_run_report
    from secmig.lab.experiment import run_paper_experiment, scenario_text
    from secmig.monitor.rules import load_rules
    from secmig.report.charts import paper_chart_1, save_png
    from secmig.results.store import save_monitor_events, save_run

    ruleset = load_rules(rules)
    out.mkdir(parents=True, exist_ok=True)
    with open_audit_log(out / "audit.sqlite") as audit:
        run, rows = run_paper_experiment(ruleset, audit)
    _write_table(rows, out / "table-6-1.csv")
    save_png(paper_chart_1(run, rows), out / "chart-1.png", tight=False)
    # The run and the monitor's verdicts go to the results database, and its report beside the table.
    db = out / "secmig.sqlite"
    run_id = save_run(db, run.result, scenario_text())
    save_monitor_events(db, run_id, monitor_event_rows(run.log.verdicts))
    report = write_run_report(db, run_id, out)
    table = Table(title="Table 6.1 — VMs moved between hypervisors, transfer rates at the vSwitch", header_style="bold")
    for col in ("S.No", "VM", "move", "preset rate", "start", "completion", "actual rate", "verdict"):
        table.add_column(
            col, justify="right" if col in ("S.No", "preset rate", "start", "completion", "actual rate") else "left"
        )
    for i, r in enumerate(rows, 1):
        colour = "green" if r.authorized else "red"
        table.add_row(
            str(i),
            r.vm,
            r.move,
            f"{r.preset_bytes_per_s / 1e6:.0f} MB/s",
            f"{r.start_s:.2f} s",
            f"{r.completion_s:.2f} s",
            f"{r.actual_bytes_per_s / 1e6:.1f} MB/s",
            f"[{colour}]{r.verdict}[/]",
        )
    console.print(table)
    console.print(
        "completion: the migration's end, or the moment the monitor stopped the move; "
        "actual rate: bytes moved ÷ (completion − start).",
        highlight=False,
    )
    console.print(
        f"written: {out / 'table-6-1.csv'}, {out / 'chart-1.png'}, {report}, {out / 'audit.sqlite'} "
        f"(run {run_id} in {db})",
        highlight=False,
    )
