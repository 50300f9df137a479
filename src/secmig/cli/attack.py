"""``secmig attack list|run|sweep``: the attack suite against the security core and the monitor."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from secmig.cli import app, console
from secmig.errors import ConfigError

if TYPE_CHECKING:
    from secmig.monitor.samples import Verdict
    from secmig.security.audit import AuditLog

attack_app = typer.Typer(help="The attack suite: adversaries against the security core and the monitor.")
app.add_typer(attack_app, name="attack")

RulesOption = Annotated[Path | None, typer.Option("--rules", help="Rule file (default: the paper's values).")]


@attack_app.command("list")
def list_attacks() -> None:
    """List the attacks and the benign scenarios."""
    from secmig.lab.attacks import attack_names

    table = Table(header_style="bold")
    for col in ("name", "kind", "what it does"):
        table.add_column(col)
    for name, kind, desc in attack_names():
        table.add_row(name, kind, desc)
    console.print(table)


def open_audit_log(path: Path) -> AuditLog:
    """A hash-chained audit log for the monitor's decisions, signed by a key kept beside it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from secmig.security.audit import AuditLog

    key_path = path.with_suffix(".key")
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{key_path}: not an Ed25519 key")
    else:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        key_path.write_bytes(pem)
        key_path.chmod(0o600)
    return AuditLog(path, key, "monitor")


def monitor_event_rows(verdicts: list[Verdict]) -> list[tuple[float, str, str, str, str, str, str]]:
    """The verdicts as rows of the results store's ``monitor_events`` table."""
    return [
        (v.t_s, v.vm, v.vswitch, v.rule, v.level.value, v.action.value, json.dumps(v.evidence, default=str))
        for v in verdicts
    ]


@attack_app.command("run")
def run_attacks(
    name: Annotated[str, typer.Argument(help="An attack's name (see `secmig attack list`), or 'all'.")] = "all",
    rules: RulesOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Also store each monitored run, its verdicts and an audit log here."),
    ] = None,
) -> None:
    """Run attacks: stopped or not, by which rule, how fast, the pages that reached the attacker, the VM's fate."""
    from secmig.lab.attacks import attack_names, false_alarm_rate, run_attack_full, slow_exfil_floor
    from secmig.monitor.rules import load_rules

    ruleset = load_rules(rules)
    known = [n for n, _, _ in attack_names()]
    if name != "all" and name not in known:
        raise ConfigError(f"unknown attack {name!r} (one of: all, {', '.join(known)})")
    names = known if name == "all" else [name]
    audit = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        audit = open_audit_log(out / "audit.sqlite")
    results = []
    try:
        for n in names:
            result, run = run_attack_full(n, ruleset, audit)
            results.append(result)
            if out is not None and run is not None:
                from secmig.results.store import save_monitor_events, save_run

                path = out / "secmig.sqlite"
                run_id = save_run(path, run.result, f"# attack scenario {n}\n")
                save_monitor_events(path, run_id, monitor_event_rows(run.log.verdicts))
    finally:
        if audit is not None:
            audit.close()
    table = Table(header_style="bold")
    for col in ("attack", "kind", "stopped", "by", "time to detect", "pages leaked", "VM's fate"):
        table.add_column(col, no_wrap=col not in ("by", "VM's fate"))
    for r in results:
        stopped = "[green]yes[/]" if r.stopped else "[red]no[/]"
        if r.kind == "benign":
            stopped = "[green]no false alarm[/]" if r.stopped else f"[red]{r.false_alarms} false alarms[/]"
        if r.kind == "authentication":
            ttd = "handshake"
        elif r.time_to_detect_s is not None:
            ttd = f"{r.time_to_detect_s:.1f} s"
        else:
            ttd = "—"
        leaked = f"{r.pages_leaked:,}" if r.kind != "benign" else "—"
        table.add_row(r.name, r.kind, stopped, r.rule, ttd, leaked, r.vm_fate)
    console.print(table)
    for r in results:
        if r.kind != "benign" and (r.pages_leaked or not r.stopped):
            console.print(f"[dim]{r.name}: {r.detail}[/]", highlight=False)
    benign = [r for r in results if r.kind == "benign"]
    if benign:
        windows = sum(r.windows for r in benign)
        checks = sum(r.identity_checks for r in benign)
        rate = false_alarm_rate(results)
        console.print(
            f"benign: {sum(r.false_alarms for r in benign)} false alarms in {windows} VM-windows "
            f"({0.0 if math.isnan(rate) else rate:.2%}); {checks} identity checks on honest VMs, "
            + ("all passed" if all(r.stopped for r in benign) else "some failed"),
            highlight=False,
        )
    if name == "all":
        floor = slow_exfil_floor(ruleset)
        console.print(floor.describe(), highlight=False)
    if out is not None:
        with (out / "attacks.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["attack", "kind", "stopped", "rule", "time_to_detect_s", "pages_leaked", "vm_fate", "detail"])
            for r in results:
                ttd = "" if r.time_to_detect_s is None else f"{r.time_to_detect_s:.2f}"
                w.writerow([r.name, r.kind, r.stopped, r.rule, ttd, r.pages_leaked, r.vm_fate, r.detail])
        console.print(f"written: {out / 'attacks.csv'}, {out / 'secmig.sqlite'}, {out / 'audit.sqlite'}")


def _floats(option: str, text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a comma-separated list of numbers") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{option}: {text!r}: give positive numbers")
    return sorted(values)


@attack_app.command("sweep")
def sweep_attacks(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("secmig-out/attack-sweep"),
    medium: Annotated[
        str, typer.Option("--medium", help="MEDIUM thresholds to try (× preset rate), comma-separated.")
    ] = "1.02,1.1,1.25,1.5,2,3,5,10,30",
    high_ratio: Annotated[float, typer.Option("--high-ratio", help="HIGH threshold = this × MEDIUM.")] = 1.6,
    rules: RulesOption = None,
) -> None:
    """Detection against false alarms as the rate thresholds move: a table, a CSV and a ROC-style plot."""
    from secmig.lab.attacks import sweep
    from secmig.monitor.rules import load_rules
    from secmig.report.charts import attack_sweep_chart, save_png

    if high_ratio <= 1:
        raise ConfigError(f"--high-ratio: {high_ratio:g}: must be above 1 (HIGH is above MEDIUM)")
    points = sweep(_floats("--medium", medium), high_ratio, load_rules(rules))
    out.mkdir(parents=True, exist_ok=True)
    fields = [
        "medium",
        "high",
        "detected",
        "detected_by_rate",
        "median_time_to_detect_s",
        "false_alarm_rate",
        "check_rate",
    ]
    with (out / "sweep.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for p in points:
            w.writerow([f"{getattr(p, k):.6g}" for k in fields])
    table = Table(header_style="bold", title="Rate thresholds: detection attacks vs honest VMs")
    for col in (
        "MEDIUM ×",
        "HIGH ×",
        "detected",
        "by the rate rule",
        "median time to detect",
        "false alarms",
        "checks",
    ):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(
            f"{p.medium:g}",
            f"{p.high:g}",
            f"{p.detected:.0%}",
            f"{p.detected_by_rate:.0%}",
            "—" if math.isnan(p.median_time_to_detect_s) else f"{p.median_time_to_detect_s:.1f} s",
            f"{p.false_alarm_rate:.2%}",
            f"{p.check_rate:.2%}",
        )
    console.print(table)
    console.print(
        "false alarms: benign VM-windows with a throttle, abort or destroy; checks: benign VM-windows that "
        "triggered an identity check (it passed; its cost is the check).",
        highlight=False,
    )
    save_png(attack_sweep_chart(points), out / "roc.png", tight=False)
    console.print(f"written: {out / 'sweep.csv'}, {out / 'roc.png'}")
