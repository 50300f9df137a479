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
    """Table 6.1 as CSV: the paper's columns in its units (IOPS of 4 KiB I/Os, ms), then secmig's (MB/s, s)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "s_no",
                "vm",
                "preset_iops",
                "start_ms",
                "completion_ms",
                "actual_iops",
                "preset_MB_s",
                "actual_MB_s",
                "actual_over_preset",
                "level",
                "move",
                "verdict",
            ]
        )
        for i, r in enumerate(rows, 1):
            w.writerow(
                [
                    i,
                    r.vm,
                    f"{r.preset_iops:.0f}",
                    f"{r.start_s * 1e3:.1f}",
                    f"{r.completion_s * 1e3:.1f}",
                    f"{r.actual_iops:.0f}",
                    f"{r.preset_bytes_per_s / 1e6:.3f}",
                    f"{r.actual_bytes_per_s / 1e6:.3f}",
                    f"{r.ratio:.2f}",
                    r.level,
                    r.move,
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
    right = ("S.No", "preset (IOPS)", "start (ms)", "completion (ms)", "actual (IOPS)", "preset / actual (MB/s)", "×")
    for col in ("S.No", "VM", "preset (IOPS)", "start (ms)", "completion (ms)", "actual (IOPS)"):
        table.add_column(col, justify="right" if col in right else "left")
    for col in ("preset / actual (MB/s)", "×", "level", "verdict"):
        table.add_column(col, justify="right" if col in right else "left")
    for i, r in enumerate(rows, 1):
        colour = "green" if r.authorized else "red"
        table.add_row(
            str(i),
            r.vm,
            f"{r.preset_iops:.0f}",
            f"{r.start_s * 1e3:.0f}",
            f"{r.completion_s * 1e3:.0f}",
            f"{r.actual_iops:.0f}",
            f"{r.preset_bytes_per_s / 1e6:.2f} / {r.actual_bytes_per_s / 1e6:.2f}",
            f"{r.ratio:.2f}",
            r.level,
            f"[{colour}]{r.verdict}[/]",
        )
    console.print(table)
    console.print(
        "IOPS: one I/O is a 4 KiB page (IOPS = bytes/s ÷ 4096); times in simulated ms. Completion: the "
        "migration's end, or the moment the monitor's identity check answered and the VM was destroyed. Actual: "
        "a migration's bytes ÷ its duration; for a caught VM, the rate the monitor judged when it caught it.",
        highlight=False,
    )
    console.print(
        f"written: {out / 'table-6-1.csv'}, {out / 'chart-1.png'}, {report}, {out / 'audit.sqlite'} "
        f"(run {run_id} in {db})",
        highlight=False,
    )
