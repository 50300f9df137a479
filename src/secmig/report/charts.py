"""The report's charts: matplotlib figures rendered off-screen (Agg) to PNG ``data:`` URIs.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``, so no global
figure state is kept and nothing needs a display. Each function returns ``None`` when it has nothing to draw.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from secmig.report.data import LinkSeries, MigrationRow, MonitorEvent, RoundRow

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


def save_png(fig: Figure, path: str, dpi: int = 110) -> None:
    """Write a figure to a PNG file."""
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")


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
        fig.subplots_adjust(left=0.07, right=0.93, wspace=0.75, hspace=0.62, top=1 - 0.35 / height,
                            bottom=0.75 / height)
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
                    [e.t_s for e in pts], [row[e.vm] for e in pts], c=color, marker=marker, s=46, zorder=3,
                    label=level, edgecolors=["black" if e.action == "destroy" else color for e in pts],
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
                Line2D([], [], linestyle="", marker="o", markerfacecolor="white", markeredgecolor="black",
                       label="action: destroy")
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


def sweep_heatmaps(
    total_time_s: np.ndarray,
    downtime_s: np.ndarray,
    xlabels: Sequence[str],
    ylabels: Sequence[str],
    xname: str,
    yname: str,
    title: str,
) -> Figure:
    """Two heat maps side by side: mean total time and max downtime over two parameters (NaN: no value).

    ``yname`` empty: one parameter only, drawn as a single row.
    """
    with rc_context(_RC):
        fig = Figure(figsize=(12, 1.8 + 0.45 * max(len(ylabels), 4)), layout="constrained")
        a1, a2 = fig.subplots(1, 2)
        _heatmap(a1, total_time_s, xlabels, ylabels, "mean total time of completed migrations (s)")
        _heatmap(a2, downtime_s * 1e3, xlabels, ylabels, "max downtime of a point (ms)")
        for ax in (a1, a2):
            ax.set_xlabel(xname)
            ax.set_ylabel(yname)
        fig.suptitle(title)
        return fig
