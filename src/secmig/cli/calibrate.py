"""``secmig calibrate``: a real QEMU migration of the reference guest beside secmig's prediction of it."""

from __future__ import annotations

import json
import logging
import math
from typing import Annotated, Any

import typer
from rich.table import Table

from secmig.cli import app, console, err_console, option_value
from secmig.errors import ConfigError
from secmig.model.units import (
    format_bytes,
    format_duration,
    parse_bandwidth,
    parse_duration,
    parse_rate,
    parse_size,
)

_PATTERN_ALIASES = {
    "seq": "seq",
    "sequential": "seq",
    "rand": "rand",
    "uniform": "rand",
    "random": "rand",
    "hot": "hot",
    "hotspot": "hot",
}



def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return format_duration(value)
    if unit == "B":
        return format_bytes(value)
    return f"{value:g}"


def _err(value: float | None) -> str:
    if value is None:
        return "—"
    style = "green" if abs(value) <= 0.15 else "yellow" if abs(value) <= 0.5 else "red"
    return f"[{style}]{value:+.1%}[/]"


@app.command()
def calibrate(
    ram: Annotated[str, typer.Option(help="Guest RAM, e.g. 256MiB.")] = "256MiB",
    working_set: Annotated[str, typer.Option(help="Memory the guest keeps dirtying, e.g. 64MiB.")] = "64MiB",
    rate: Annotated[
        str, typer.Option(help="Guest page writes per second, e.g. 20000 or 20000pages/s; 0 = flat out.")
    ] = "20000",
    pattern: Annotated[str, typer.Option(help="seq|rand|hot (or sequential|uniform|hotspot).")] = "seq",
    hot_share: Annotated[
        int, typer.Option(help="hot: percent of writes in the working set; the rest hit the other RAM.")
    ] = 90,
    bandwidth: Annotated[str, typer.Option(help="QEMU's max-bandwidth, e.g. 100MB/s.")] = "100MB/s",
    downtime_limit: Annotated[str, typer.Option(help="QEMU's downtime-limit, e.g. 300ms.")] = "300ms",
    accel: Annotated[str, typer.Option(help="auto|kvm|tcg (auto: hardware KVM if usable).")] = "auto",
    qemu_binary: Annotated[
        str | None, typer.Option(help="QEMU to run (default: qemu-system-x86_64 on PATH).")
    ] = None,
    measure: Annotated[str, typer.Option(help="How long to measure the write rate first.")] = "2s",
    timeout: Annotated[
        str, typer.Option(help="Cancel a migration still running after this, as 'did not converge'.")
    ] = "60s",
    link_bandwidth: Annotated[
        str | None,
        typer.Option(help="Speed of the path when not capped (default: measured on loopback now)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every QMP command.")] = False,
) -> None:
    """Migrate the reference guest between two real QEMUs on loopback; compare with the prediction."""
    from secmig.agent.qemu import calibration as cal
    from secmig.agent.qemu.guest import GuestParams
    from secmig.agent.qemu.machine import AccelChoice

    if pattern not in _PATTERN_ALIASES:
        raise ConfigError(f"--pattern: {pattern!r} is not one of seq, rand, hot")
    if accel not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"--accel: {accel!r} is not one of auto, kvm, tcg")
    write_rate = float(rate) if rate.strip().isdigit() else option_value("--rate", parse_rate, rate).in_pages_per_s()
    ws_bytes = option_value("--working-set", parse_size, working_set)
    ws_bytes -= ws_bytes % 4096
    guest = GuestParams(
        working_set_bytes=ws_bytes,
        rate_pages_per_s=round(write_rate),
        pattern=_PATTERN_ALIASES[pattern],  # type: ignore[arg-type]
        hot_share_percent=hot_share,
    )
    ram_bytes = option_value("--ram", parse_size, ram)
    if ram_bytes % (1 << 20):
        raise ConfigError(f"--ram: {ram} is not a whole number of MiB")
    accel_choice: AccelChoice = accel  # type: ignore[assignment]
    config = cal.CalibrationConfig(
        ram_bytes=ram_bytes,
        guest=guest,
        bandwidth_bytes_per_s=option_value("--bandwidth", parse_bandwidth, bandwidth),
        downtime_limit_s=option_value("--downtime-limit", parse_duration, downtime_limit),
        accel=accel_choice,
        qemu_binary=qemu_binary,
        measure_s=option_value("--measure", parse_duration, measure),
        timeout_s=option_value("--timeout", parse_duration, timeout),
        link_bandwidth_bytes_per_s=(
            option_value("--link-bandwidth", parse_bandwidth, link_bandwidth)
            if link_bandwidth
            else cal.measure_loopback_bandwidth()
        ),
    )
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)8.0f %(name)s: %(message)s")

    cal.find_qemu(qemu_binary)  # before anything is printed: a missing QEMU is the one line said
    if not as_json:
        err_console.print(
            f"booting two QEMUs ({config.ram_bytes >> 20} MiB, working set "
            f"{format_bytes(guest.working_set_bytes)}, {guest.rate_pages_per_s or 'unpaced'} writes/s, "
            f"{guest.pattern}) and migrating…",
            highlight=False,
        )
    result = cal.calibrate(config)
    m = result.migration
    rate_pps = result.write_rate.pages_per_s
    secmig_pred = None
    pred_note = None
    try:
        secmig_pred = cal.predict_for(config, rate_pps)
    except ImportError as err:  # the simulator side is not installed in this tree yet
        pred_note = f"secmig's prediction is unavailable: {err}"
    cloud = cal.cloudsim_prediction(config)
    rows = cal.compare(result, secmig_pred) if secmig_pred is not None else None
    cloud_rows = {r.metric: r for r in cal.compare(result, cloud)}

    if as_json:
        out: dict[str, Any] = {
            "accel": result.accel,
            "qemu_version": result.qemu_version,
            "ram_bytes": config.ram_bytes,
            "used_bytes": config.used_bytes,
            "working_set_bytes": guest.working_set_bytes,
            "pattern": guest.pattern,
            "target_rate_pages_per_s": guest.rate_pages_per_s,
            "write_rate_pages_per_s": rate_pps,
            "write_rate_during_migration_pages_per_s": m.guest_write_rate_pages_per_s,
            "bandwidth_bytes_per_s": config.bandwidth_bytes_per_s,
            "downtime_limit_s": config.downtime_limit_s,
            "boot_s": result.boot_s,
            "resumed_on_destination": result.resumed_on_destination,
            "measured": {
                "status": m.status,
                "converged": m.converged,
                "total_time_s": m.total_time_s,
                "downtime_s": m.downtime_s,
                "setup_time_s": m.setup_time_s,
                "bytes_sent": m.transferred_bytes,
                "rounds": m.rounds,
                "dirty_sync_count": m.dirty_sync_count,
                "normal_pages": m.normal_pages,
                "zero_pages": m.zero_pages,
                "precopy_bytes": m.precopy_bytes,
                "downtime_bytes": m.downtime_bytes,
                "throughput_mbps": m.throughput_mbps,
            },
            "predicted": None
            if secmig_pred is None
            else {
                "total_time_s": secmig_pred.total_time_s if math.isfinite(secmig_pred.total_time_s) else None,
                "downtime_s": secmig_pred.downtime_s,
                "bytes_sent": secmig_pred.bytes_sent,
                "rounds": secmig_pred.rounds,
                "converged": secmig_pred.converged,
            },
            "relative_errors": None if rows is None else {r.metric: r.rel_error for r in rows},
            "cloudsim_total_time_s": cloud.total_time_s,
            "cloudsim_relative_error": cloud_rows["total time"].rel_error,
        }
        console.print_json(json.dumps(out, allow_nan=False))
        return

    setup = Table(title="calibration run", title_justify="left", show_header=False)
    setup.add_row("QEMU", f"{result.qemu_version}, {result.accel}")
    setup.add_row("guest booted in", format_duration(result.boot_s))
    setup.add_row(
        "write rate (measured)",
        f"{rate_pps:,.0f} pages/s (asked {guest.rate_pages_per_s or 'flat out'})",
    )
    if m.guest_write_rate_pages_per_s is not None:
        setup.add_row("write rate during migration", f"{m.guest_write_rate_pages_per_s:,.0f} pages/s")
    setup.add_row("used memory (assumed)", format_bytes(config.used_bytes))
    if m.converged:
        setup.add_row(
            "guest resumed on destination", "yes" if result.resumed_on_destination else "[red]no[/]"
        )
    console.print(setup)

    table = Table(title="measured vs predicted", title_justify="left", header_style="bold")
    table.add_column("figure")
    table.add_column("QEMU", justify="right")
    table.add_column("secmig", justify="right")
    table.add_column("error", justify="right")
    table.add_column("CloudSim", justify="right")
    table.add_column("error", justify="right")
    for base in cal.compare(result, cloud):
        row = next((r for r in rows if r.metric == base.metric), None) if rows else None
        if base.metric == "converged":
            table.add_row(
                "converged",
                "yes" if m.converged else "[red]no[/]",
                "—" if secmig_pred is None else ("yes" if secmig_pred.converged else "no"),
                ""
                if secmig_pred is None
                else ("ok" if secmig_pred.converged == m.converged else "[red]wrong[/]"),
                "yes",
                "ok" if m.converged else "[red]wrong[/]",
            )
            continue
        pred_v = row.predicted if row else None
        pred_err = row.rel_error if row else None
        if base.metric == "downtime" and row and row.abs_error is not None:
            label = _err(pred_err)
            table.add_row(base.metric, _fmt(base.measured, base.unit), _fmt(pred_v, base.unit),
                          f"{label} ({row.abs_error * 1e3:+.0f} ms)", "—", "—")  # fmt: skip
            continue
        table.add_row(
            base.metric,
            _fmt(base.measured, base.unit),
            _fmt(pred_v, base.unit),
            _err(pred_err),
            _fmt(base.predicted, base.unit),
            _err(base.rel_error),
        )
    console.print(table)
    if not m.converged:
        console.print(f"QEMU did not converge within {format_duration(config.timeout_s)}: cancelled.")
    if pred_note:
        err_console.print(pred_note, highlight=False)
