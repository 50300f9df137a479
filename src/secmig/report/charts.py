"""Every chart secmig draws: matplotlib figures rendered off-screen (Agg), to PNG ``data:`` URIs or files.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``, so no global
figure state is kept and nothing needs a display. The report's charts return a ``data:`` URI, or ``None``
when they have nothing to draw; the others (sweep heat maps, the paper's Chart 1, the attack sweep)
return the figure for :func:`save_png`.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from secmig.report.data import LinkSeries, MonitorEvent
from secmig.results.tables import ConsolidationIntervalRow, ConsolidationMigrationRow, MigrationRow, RoundRow

if TYPE_CHECKING:
    from secmig.lab.attacks import ScenarioRun
    from secmig.lab.attacks import SweepPoint as RateSweepPoint
    from secmig.lab.experiment import MoveRow
    from secmig.sweep.aggregate import HeatmapData

MAX_ROUND_PANELS = 24
"""Migrations drawn in the rounds chart; the tables below it hold all of them."""
MAX_GANTT_ROWS = 60
LEVEL_STYLE: dict[str, tuple[str, str]] = {
    "LOW": ("#2e7d32", "o"),
    "MEDIUM": ("#ef6c00", "^"),
    "HIGH": ("#c62828", "X"),
}
_RC: dict[Any, Any] = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.fonttype": "none",
}
_COMPLETED, _ABORTED, _DOWNTIME, _LIVE, _STOP = "#4c78a8", "#e45756", "#222222", "#4c78a8", "#f58518"


def to_data_uri(fig: Figure, dpi: int = 100, tight: bool = True) -> str:
    """Render a figure as a PNG ``data:`` URI (``tight``: crop to the drawn area, which draws it twice)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def save_png(fig: Figure, path: str | Path, dpi: int = 110, tight: bool = True) -> None:
    """Write a figure to a PNG file (``tight``: cropped to the drawn area, else the figure's own size)."""
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight" if tight else None)


def migrations_gantt(migrations: Sequence[MigrationRow]) -> str | None:
    """One bar per migration from start to end; the downtime is the dark part at its end."""
    shown = list(migrations[:MAX_GANTT_ROWS])
    if not shown:
        return None
    with rc_context(_RC):
        fig = Figure(figsize=(11, 0.9 + 0.28 * len(shown)))
        ax = fig.add_subplot()
        for y, m in enumerate(shown):
            end = m.end_s if math.isfinite(m.end_s) else m.start_s
            color = _COMPLETED if m.outcome == "completed" else _ABORTED
            ax.barh(y, end - m.start_s, left=m.start_s, height=0.6, color=color)
            if m.outcome == "completed" and m.downtime_s > 0:
                ax.barh(y, m.downtime_s, left=end - m.downtime_s, height=0.6, color=_DOWNTIME)
        ax.set_yticks(range(len(shown)), [f"{m.vm} ({m.source}→{m.destination})" for m in shown])
        ax.invert_yaxis()
        ax.set_xlabel("simulated time (s)")
        ax.grid(axis="y", visible=False)
        ax.legend(
            handles=[
                Patch(color=_COMPLETED, label="completed"),
                Patch(color=_ABORTED, label="aborted"),
                Patch(color=_DOWNTIME, label="downtime"),
            ],
            loc="lower right",
            fontsize=8,
        )
        return to_data_uri(fig)


def _log_ticks(ax: Axes, values: np.ndarray) -> None:
    # Decades on a wide axis, 1-2-5 on a narrow one (which would otherwise have no labelled tick); minor
    # log ticks are most of the drawing time of a panel and add nothing here.
    pos = values[values > 0]
    wide = pos.size > 0 and pos.max() / pos.min() >= 100
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0,) if wide else (1.0, 2.0, 5.0), numticks=6))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _round_panel(ax: Axes, m: MigrationRow, rounds: Sequence[RoundRow]) -> None:
    idx = np.array([r.idx for r in rounds])
    mib = np.array([r.bytes for r in rounds], dtype=float) / 2**20
    colors = [_LIVE if r.live else _STOP for r in rounds]
    ax.bar(idx, np.maximum(mib, 1e-3), color=colors, width=0.8)
    ax.set_yscale("log")
    _log_ticks(ax, mib)
    ax.set_ylabel("MiB sent", fontsize=8)
    ax.set_xlabel("round", fontsize=8)
    ax.set_title(f"{m.vm}: {m.source}→{m.destination} ({m.outcome})", loc="left")
    dirty = np.array([r.dirty_pages_after for r in rounds], dtype=float)
    if dirty.any():
        ax2 = ax.twinx()
        # A round after which nothing was dirty has no point on a log axis: it is left out of the line.
        ax2.plot(idx, np.where(dirty > 0, dirty, np.nan), color="#54a24b", marker=".", linewidth=1.2)
        ax2.set_yscale("log")
        _log_ticks(ax2, dirty)
        ax2.set_ylabel("dirty pages after", fontsize=8, color="#54a24b")
        ax2.grid(False)
        ax2.spines["right"].set_visible(True)
    if len(idx) <= 12:
        ax.set_xticks(idx)


def rounds_chart(migrations: Sequence[MigrationRow], rounds: Mapping[int, Sequence[RoundRow]]) -> str | None:
    """Small multiples, one per migration: bytes per round (bars) and pages dirtied during it (line)."""
    shown = [m for m in migrations if rounds.get(m.idx)][:MAX_ROUND_PANELS]
    if not shown:
        return None
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    with rc_context(_RC):
        # A fixed layout: the constrained layout engine costs seconds with twin log axes.
        height = 2.5 * rows + 0.6
        fig = Figure(figsize=(3.6 * cols + 0.8, height))
        axes = fig.subplots(rows, cols, squeeze=False)
        fig.subplots_adjust(
            left=0.07, right=0.93, wspace=0.75, hspace=0.62, top=1 - 0.35 / height, bottom=0.75 / height
        )
        for ax, m in zip(axes.flat, shown, strict=False):
            _round_panel(ax, m, rounds[m.idx])
        for ax in list(axes.flat)[len(shown) :]:
            ax.set_visible(False)
        fig.legend(
            handles=[
                Patch(color=_LIVE, label="live round (bytes)"),
                Patch(color=_STOP, label="stop-and-copy (bytes)"),
                Line2D([], [], color="#54a24b", marker=".", label="pages dirtied during the round"),
            ],
            loc="lower center",
            ncols=3,
            fontsize=8,
        )
        return to_data_uri(fig, tight=False)


def links_chart(series: Sequence[LinkSeries]) -> str | None:
    """Utilisation over time of the given links, in % of capacity."""
    finite = [s for s in series if math.isfinite(s.capacity_bytes_per_s) and len(s.times_s)]
    if not finite:
        return None
    with rc_context(_RC):
        fig = Figure(figsize=(11, 3.8))
        ax = fig.add_subplot()
        for s in finite:
            ax.step(s.times_s, 100 * s.utilization(), where="post", linewidth=1.2, label=f"{s.name} ({s.kind})")
        ax.axhline(100, color="#888888", linewidth=0.8, linestyle="--")
        ax.set_ylim(0, 105)
        ax.set_ylabel("utilisation (% of capacity)")
        ax.set_xlabel("simulated time (s)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return to_data_uri(fig)


def monitor_timeline(events: Sequence[MonitorEvent], migrations: Sequence[MigrationRow]) -> str | None:
    """Alerts over time, one row per VM, over grey bars showing when that VM was migrating."""
    if not events:
        return None
    vms = sorted({e.vm for e in events})
    row = {vm: i for i, vm in enumerate(vms)}
    with rc_context(_RC):
        fig = Figure(figsize=(11, 1.2 + 0.35 * len(vms)))
        ax = fig.add_subplot()
        for m in migrations:
            if m.vm in row and math.isfinite(m.end_s):
                ax.barh(row[m.vm], m.end_s - m.start_s, left=m.start_s, height=0.5, color="#dddddd", zorder=1)
        for level, (color, marker) in LEVEL_STYLE.items():
            pts = [e for e in events if e.level == level]
            if pts:
                ax.scatter(
                    [e.t_s for e in pts],
                    [row[e.vm] for e in pts],
                    c=color,
                    marker=marker,
                    s=46,
                    zorder=3,
                    label=level,
                    edgecolors=["black" if e.action == "destroy" else color for e in pts],
                )
        other = [e for e in events if e.level not in LEVEL_STYLE]
        if other:
            ax.scatter([e.t_s for e in other], [row[e.vm] for e in other], c="#777777", s=30, zorder=3, label="other")
        ax.set_yticks(range(len(vms)), vms)
        ax.invert_yaxis()
        ax.set_xlabel("simulated time (s)")
        ax.grid(axis="y", visible=False)
        handles, _labels = ax.get_legend_handles_labels()
        if any(e.action == "destroy" for e in events):
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="",
                    marker="o",
                    markerfacecolor="white",
                    markeredgecolor="black",
                    label="action: destroy",
                )
            )
        handles.append(Patch(color="#dddddd", label="migrating"))
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return to_data_uri(fig)


def _heatmap(ax: Axes, grid: np.ndarray, xlabels: Sequence[str], ylabels: Sequence[str], title: str) -> None:
    masked = np.ma.masked_invalid(grid)
    finite = grid[np.isfinite(grid)]
    # A logarithmic colour scale when values span more than a factor of 20, or one cell hides the rest.
    wide = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > 20
    im = ax.imshow(masked, cmap="viridis", aspect="auto", origin="lower", norm=LogNorm() if wide else None)
    bar = ax.figure.colorbar(im, ax=ax, shrink=0.9)
    if wide:
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        bar.ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.set_title(title, loc="left")
    ax.grid(False)
    if finite.size == 0:
        mid = 0.0
    elif wide:
        mid = float(np.sqrt(finite.min() * finite.max()))
    else:
        mid = float(finite.min() + finite.max()) / 2
    if grid.size <= 144:
        for (y, x), v in np.ndenumerate(grid):
            text = "—" if not math.isfinite(v) else (f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}")
            ax.text(x, y, text, ha="center", va="center", fontsize=7, color="white" if v < mid else "black")


def sweep_heatmaps(cells: HeatmapData, title: str) -> Figure:
    """Two heat maps side by side: mean total time and max downtime over two parameters (NaN: no value).

    ``cells.yname`` empty: one parameter only, drawn as a single row.
    """
    with rc_context(_RC):
        fig = Figure(figsize=(12, 1.8 + 0.45 * max(len(cells.ylabels), 4)), layout="constrained")
        a1, a2 = fig.subplots(1, 2)
        x, y = cells.xlabels, cells.ylabels
        _heatmap(a1, cells.total_time_s, x, y, "mean total time of completed migrations (s)")
        _heatmap(a2, cells.downtime_s * 1e3, x, y, "max downtime of a point (ms)")
        for ax in (a1, a2):
            ax.set_xlabel(cells.xname)
            ax.set_ylabel(cells.yname)
        fig.suptitle(title)
        return fig


def _preset_vs_actual(ax: Axes, rows: Sequence[MoveRow]) -> None:
    """The paper's Chart 1 proper: preset and actual transfer rate per VM, in IOPS (4 KiB I/Os)."""
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [r.preset_iops for r in rows], 0.4, color="#9e9e9e", label="preset")
    colours = ["#2ca02c" if r.authorized else ("#ff7f0e" if r.level == "MEDIUM" else "#d62728") for r in rows]
    ax.bar([i + 0.2 for i in x], [r.actual_iops for r in rows], 0.4, color=colours, label="actual")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r.actual_iops, f"{r.actual_iops:.0f}\n{r.level}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{i + 1}. {r.vm}" for i, r in enumerate(rows)])
    ax.set_ylabel("transfer rate (IOPS, 4 KiB I/Os)")
    ax.set_title("preset vs actual, per VM (Table 6.1)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)


def paper_chart_1(run: ScenarioRun, rows: Sequence[MoveRow]) -> Figure:
    """The paper's Chart 1: the moved VMs' transfer rates over time (top) and what the rate rule judged (bottom)."""
    rules = run.rules
    end_s = float(run.sim.env.now)
    fig = Figure(figsize=(15, 8.5), dpi=110)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 2], width_ratios=[3, 1.1])
    top = fig.add_subplot(grid[0, 0])
    bottom = fig.add_subplot(grid[1, 0], sharex=top)
    bars = fig.add_subplot(grid[:, 1])
    _preset_vs_actual(bars, rows)
    colours = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b"]

    def padded(series: list[tuple[float, float]], vm: str) -> list[tuple[float, float]]:
        out = list(series)
        if vm in run.sim.destroyed and out:  # a destroyed VM sends nothing more
            out += [(out[-1][0] + rules.step_s, 0.0), (end_s, 0.0)]
        return out

    peak = max((b for r in rows for _, b in run.log.rates.get(r.vm, [])), default=1.0) / 1e6
    k = 0
    checked_label = "identity check passed (a granted migration's burst)"
    for i, r in enumerate(rows):
        c = colours[i % len(colours)]
        style = "--" if r.authorized else "-"
        kind = "granted live migration" if r.authorized else "memory copied out, no grant"
        inst = padded(run.log.rates.get(r.vm, []), r.vm)
        top.step(
            [t for t, _ in inst],
            [b / 1e6 for _, b in inst],
            where="pre",
            color=c,
            ls=style,
            lw=1.6 if r.authorized else 2.2,
            label=f"{r.vm}: {kind}, preset {r.preset_bytes_per_s / 1e6:.0f} MB/s",
        )
        top.axhline(r.preset_bytes_per_s / 1e6, color=c, lw=0.7, ls=":")
        window = padded(run.log.window_rates.get(r.vm, []), r.vm)
        preset = r.preset_bytes_per_s or 1.0
        bottom.plot([t for t, _ in window], [b / preset for _, b in window], color=c, ls=style, lw=1.6)
        for v in run.log.verdicts:
            if v.vm == r.vm and v.evidence.get("challenge") == "passed":
                y = max((b for t, b in inst if abs(t - v.t_s) < rules.window), default=0.0) / 1e6
                top.plot([v.t_s], [y], "o", ms=7, mfc="white", mec=c, mew=2, label=checked_label, zorder=5)
                checked_label = "_"
        if r.detected_s is not None:
            y = max((b for t, b in inst if t <= r.detected_s + 1e-9), default=0.0) / 1e6
            top.plot([r.detected_s], [y], marker="X", ms=12, color=c, mec="black", zorder=6)
            top.annotate(
                f"{r.vm} detected {r.detected_s - r.start_s:.1f} s after it began ({r.detected_s:.1f} s):\n"
                f"{r.verdict.split(': ', 1)[1]}",
                (r.detected_s, y),
                xytext=(r.detected_s + 2.5, peak * (1.32 - 0.2 * k)),
                fontsize=8.5,
                color=c,
                va="center",
                ha="left",
                arrowprops={"arrowstyle": "->", "color": c, "lw": 0.9, "relpos": (0.0, 0.5)},
            )
            bottom.axvline(r.detected_s, color=c, lw=0.9, ls=":")
            k += 1
    top.set_ylabel("transfer rate at the VM's vSwitch port (MB/s)")
    top.set_title(
        "Chart 1 — transfer rates while VMs are moved between hypervisors (dotted lines: each VM's preset rate)\n"
        "the unauthorized moves rise suddenly above their preset rate; the monitor catches them (✕) and the VM "
        "destroys itself",
        fontsize=10,
    )
    top.legend(fontsize=8, loc="upper right")
    top.grid(alpha=0.3)
    top.set_ylim(0, peak * 1.45)
    ratios = [b / (r.preset_bytes_per_s or 1) for r in rows for _, b in run.log.window_rates.get(r.vm, [])]
    ymax = max(2.8, max(ratios, default=0.0) * 1.1)
    bottom.axhspan(0, rules.rate.medium, color="#2ca02c", alpha=0.10)
    bottom.axhspan(rules.rate.medium, rules.rate.high, color="#ff7f0e", alpha=0.14)
    bottom.axhspan(rules.rate.high, ymax, color="#d62728", alpha=0.12)
    for y, text in (
        (rules.rate.medium / 2, f"LOW (< {rules.rate.medium:g} × preset) → continue"),
        ((rules.rate.medium + rules.rate.high) / 2, "MEDIUM → identity check, throttled to preset meanwhile"),
        (
            (rules.rate.high + ymax) / 2,
            f"HIGH (≥ {rules.rate.high:g} × preset) → flows cut, check, destroy if it fails",
        ),
    ):
        bottom.text(end_s * 0.25, y, text, fontsize=8.5, va="center", ha="left", color="#333333")
    bottom.set_ylim(0, ymax)
    bottom.set_xlim(0, end_s)
    bottom.set_ylabel(f"rate over the last {rules.rate.over or rules.window:g} s\n÷ preset rate (what the rule judges)")
    bottom.set_xlabel("simulated time (s)")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def attack_sweep_chart(points: Sequence[RateSweepPoint]) -> Figure:
    """The attack sweep: detection against identity checks on honest VMs (ROC-style), and time to detect."""
    pts = list(points)
    fig = Figure(figsize=(11, 4.6), dpi=110)
    roc, ttd = fig.subplots(1, 2)
    xs = [p.check_rate * 100 for p in pts]
    for ys, label, style in (
        ([p.detected * 100 for p in pts], "detected (any rule)", "o-"),
        ([p.detected_by_rate * 100 for p in pts], "detected by the rate rule", "s--"),
    ):
        roc.plot(xs, ys, style, label=label)
    for p, x in zip(pts, xs, strict=True):
        roc.annotate(
            f"{p.medium:g}×", (x, p.detected_by_rate * 100), xytext=(4, -11), textcoords="offset points", fontsize=7
        )
    fa = [p.false_alarm_rate * 100 for p in pts]
    roc.set_xlim(left=0)
    roc.set_ylim(0, 105)
    roc.set_xlabel("honest VM-windows that trigger an identity check (%)")
    roc.set_ylabel("detection attacks detected (%)")
    roc.set_title(
        "Detection vs checks on honest VMs as MEDIUM moves (labels)\n"
        f"false alarms (wrongful actions): at most {max(fa, default=0):.2f} %",
        fontsize=9,
    )
    roc.grid(alpha=0.3)
    roc.legend(fontsize=8, loc="lower right")
    ttd.plot([p.medium for p in pts], [p.median_time_to_detect_s for p in pts], "o-", color="#d62728")
    ttd.set_xscale("log")
    ttd.set_xlabel("MEDIUM threshold (× preset rate; HIGH moves with it)")
    ttd.set_ylabel("median time to detect (s)")
    ttd.set_title("How fast the detected attacks are caught", fontsize=9)
    ttd.grid(alpha=0.3, which="both")
    ttd.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


# --- the consolidation day ------------------------------------------------------------------------------

_REASON_COLOURS = ("#e45756", "#4c78a8", "#f58518", "#54a24b", "#b279a2")


def _hours(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64) / 3600.0


def _day_axis(ax: Axes, end_h: float) -> None:
    ax.set_xlim(0, max(end_h, 1e-9))
    if end_h > 6:
        ax.set_xticks(np.arange(0, end_h + 1e-9, 2 if end_h <= 26 else 6))
    ax.set_xlabel("time into the day (h)")


def consolidation_timeline(intervals: Sequence[ConsolidationIntervalRow]) -> str | None:
    """Energy of each interval (kWh, the total in the title) and active hosts at each scheduling instant."""
    if not intervals:
        return None
    t = _hours([iv.t_s for iv in intervals])
    energy = np.array([iv.energy_kwh for iv in intervals], dtype=np.float64)
    hosts = np.array([iv.active_hosts for iv in intervals], dtype=np.float64)
    dt_min = float(np.median(np.diff(t))) * 60 if t.size > 1 else float(t[0]) * 60
    with rc_context(_RC):
        fig = Figure(figsize=(11, 5.2))
        top, bottom = fig.subplots(2, 1, sharex=True)
        # Each row holds the energy since the previous instant: drawn over the interval it ends.
        top.step(
            np.concatenate(([0.0], t)),
            np.concatenate(([energy[0]], energy)),
            where="pre",
            color="#4c78a8",
            linewidth=1.4,
        )
        top.set_ylim(0, max(float(energy.max()) * 1.1, 1e-6))
        top.set_ylabel(f"energy per {dt_min:.0f} min\ninterval (kWh)")
        top.set_title(f"energy of every host: {energy.sum():.2f} kWh over {t[-1]:.1f} h", loc="left")
        bottom.step(t, hosts, where="post", color="#f58518", linewidth=1.4)
        bottom.set_ylim(0, max(float(hosts.max()) * 1.1, 1.0))
        bottom.set_ylabel("active hosts")
        bottom.set_title(
            f"active hosts (at least one VM running): mean {hosts.mean():.1f}, peak {hosts.max():.0f}", loc="left"
        )
        _day_axis(bottom, float(t[-1]))
        fig.tight_layout()
        return to_data_uri(fig)


def consolidation_migrations_chart(
    times_s: Sequence[float], per_reason: Mapping[str, np.ndarray], interval_s: float
) -> str | None:
    """Migrations started at each scheduling instant, stacked by why the planner issued them."""
    if not per_reason or not len(times_s):
        return None
    t = _hours(times_s)
    width = interval_s / 3600.0
    with rc_context(_RC):
        fig = Figure(figsize=(11, 3.4))
        ax = fig.add_subplot()
        bottom = np.zeros(t.size)
        for i, (reason, counts) in enumerate(per_reason.items()):
            ax.bar(
                t,
                counts,
                width=width,
                bottom=bottom,
                align="edge",
                color=_REASON_COLOURS[i % 5],
                label=f"{reason} ({int(counts.sum()):,})",
                linewidth=0,
            )
            bottom = bottom + counts
        ax.set_ylim(0, max(float(bottom.max()) * 1.1, 1.0))
        ax.set_ylabel(f"migrations per {interval_s / 60:g} min interval")
        ax.set_title(f"{int(bottom.sum()):,} migrations, by the reason the planner gave", loc="left")
        _day_axis(ax, float(t[-1]) + width)
        ax.grid(axis="x", visible=False)
        ax.legend(fontsize=8, loc="upper right", title="reason", title_fontsize=8)
        fig.tight_layout()
        return to_data_uri(fig)


def consolidation_migration_times(migrations: Sequence[ConsolidationMigrationRow]) -> str | None:
    """How long the completed migrations took, and (when any had one) their downtime: two histograms."""
    done = [m for m in migrations if m.outcome == "completed"]
    if not done:
        return None
    total = np.array([m.end_s - m.start_s for m in done])
    down = np.array([m.downtime_s for m in done]) * 1e3
    panels = 2 if down.max() > 0 else 1
    with rc_context(_RC):
        fig = Figure(figsize=(11 if panels == 2 else 6, 3.2))
        axes = fig.subplots(1, panels, squeeze=False)[0]
        axes[0].hist(total, bins=40, color=_COMPLETED)
        axes[0].set_xlim(left=0)
        axes[0].set_xlabel("migration time, start to end (s)")
        axes[0].set_ylabel("migrations")
        axes[0].set_title(f"{len(done):,} completed: mean {total.mean():.1f} s, max {total.max():.1f} s", loc="left")
        if panels == 2:
            axes[1].hist(down, bins=40, color=_DOWNTIME)
            axes[1].set_xlim(left=0)
            axes[1].set_xlabel("downtime (ms)")
            axes[1].set_ylabel("migrations")
            axes[1].set_title(
                f"downtime: mean {down.mean():.0f} ms, max {down.max():.0f} ms,\n{down.sum() / 1e3:.1f} s in all",
                loc="left",
            )
        fig.tight_layout()
        return to_data_uri(fig)


def consolidation_verdicts_chart(events: Sequence[MonitorEvent], end_s: float, interval_s: float) -> str | None:
    """The monitor's verdicts per scheduling interval over the day, stacked by level."""
    if not events:
        return None
    edges = np.arange(0.0, max(end_s, max(e.t_s for e in events)) + interval_s, interval_s)
    t = edges[:-1] / 3600.0
    width = interval_s / 3600.0
    with rc_context(_RC):
        fig = Figure(figsize=(11, 3.0))
        ax = fig.add_subplot()
        bottom = np.zeros(t.size)
        for level, (colour, _marker) in {**LEVEL_STYLE, "other": ("#777777", "o")}.items():
            times = [e.t_s for e in events if (e.level == level) or (level == "other" and e.level not in LEVEL_STYLE)]
            if not times:
                continue
            counts = np.histogram(times, bins=edges)[0].astype(np.float64)
            ax.bar(
                t,
                counts,
                width=width,
                bottom=bottom,
                align="edge",
                color=colour,
                linewidth=0,
                label=f"{level} ({len(times):,})",
            )
            bottom = bottom + counts
        ax.set_ylim(0, max(float(bottom.max()) * 1.1, 1.0))
        ax.set_ylabel(f"verdicts per {interval_s / 60:g} min")
        ax.set_title("the traffic monitor's verdicts on migrating VMs, by level", loc="left")
        _day_axis(ax, float(edges[-1]) / 3600.0)
        ax.grid(axis="x", visible=False)
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        return to_data_uri(fig)
