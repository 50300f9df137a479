"""One self-contained HTML page for a stored run: inline CSS, charts as ``data:`` PNGs, no script, no network.

Sections, each a ``<section id=…>``: ``summary``, ``migrations``, ``rounds``, ``links``, ``monitor``,
``audit``. A section with nothing to show says so in words (``class="empty"``) rather than disappearing.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from html import escape

from secmig.model.units import format_bytes, format_duration, format_rate
from secmig.report import charts
from secmig.report.data import RunData, scenario_counts

SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Scenario summary"),
    ("migrations", "Migrations"),
    ("rounds", "Rounds per migration"),
    ("links", "Link utilisation"),
    ("monitor", "Monitor verdicts"),
    ("audit", "Audit summary"),
)
BUSIEST_LINKS_CHART = 6
BUSIEST_LINKS_TABLE = 12
MAX_EVENT_ROWS = 500
MAX_AUDIT_ROWS = 50

CSS = """
:root { --fg: #1d2430; --muted: #5b6676; --line: #d8dde5; --bg: #ffffff; --head: #f3f5f8; --ok: #2e7d32;
        --bad: #c62828; --warn: #ef6c00; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1200px; padding: 0 24px 48px; }
header { border-bottom: 2px solid var(--fg); padding: 20px 0 8px; margin-bottom: 8px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: var(--muted); }
nav { margin: 10px 0 0; }
nav a { margin-right: 14px; color: #1f5fbf; text-decoration: none; }
section { padding: 8px 0 18px; border-bottom: 1px solid var(--line); }
h2 { font-size: 18px; margin: 18px 0 8px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; }
table.kv th { width: 250px; white-space: nowrap; }
img.chart { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.ok { color: var(--ok); font-weight: 600; }
.bad { color: var(--bad); font-weight: 600; }
.warn { color: var(--warn); font-weight: 600; }
.empty { color: var(--muted); font-style: italic; background: var(--head); padding: 10px 14px;
         border-left: 4px solid var(--line); }
.note { color: var(--muted); font-size: 13px; }
details { margin: 4px 0; }
summary { cursor: pointer; }
pre { background: var(--head); padding: 10px; overflow-x: auto; font-size: 12px; }
footer { color: var(--muted); font-size: 12px; margin-top: 16px; }
"""


def _dur(s: float) -> str:
    return format_duration(s) if math.isfinite(s) else "—"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %" if math.isfinite(x) else "—"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = (), cls: str = "") -> str:
    """Cells are HTML already (escape what needs escaping before)."""
    num = set(numeric)
    head = "".join(f'<th{" class=num" if i in num else ""}>{h}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in num else ""}>{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f'<table{f" class={cls}" if cls else ""}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv(rows: Iterable[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _img(uri: str | None, alt: str) -> str:
    return f'<img class="chart" src="{uri}" alt="{escape(alt)}">' if uri else ""


def _empty(text: str) -> str:
    return f'<p class="empty">{text}</p>'


def _section(sid: str, body: str) -> str:
    title = dict(SECTIONS)[sid]
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{body}</section>'


def _summary(run: RunData) -> str:
    sc = run.scenario or {}
    done = [m for m in run.migrations if m.outcome == "completed"]
    totals = [m.total_time_s for m in done if math.isfinite(m.total_time_s)]
    created = _dt.datetime.fromtimestamp(run.stored.created_at, tz=_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    rows: list[tuple[str, str]] = [
        ("scenario", escape(run.stored.name)),
        ("description", escape(str(sc.get("description", ""))) or "—"),
        ("run", f"{run.run_id} (seed {run.stored.seed}), stored {created}"),
        ("simulated time", _dur(run.stored.sim_time_s)),
        ("wall time", _dur(run.stored.wall_time_s)),
    ]
    counts = scenario_counts(run.scenario)
    if counts:
        rows.append(("topology", escape(", ".join(f"{v} {k}" for k, v in counts.items()))))
    rows += [
        (
            "migrations",
            f'{len(run.migrations)}: <span class="ok">{len(done)} completed</span>, '
            + (
                f'<span class="bad">{len(run.migrations) - len(done)} aborted</span>'
                if len(done) < len(run.migrations)
                else "0 aborted"
            ),
        ),
        ("mean total time (completed)", _dur(sum(totals) / len(totals)) if totals else "—"),
        ("max downtime (completed)", _dur(max((m.downtime_s for m in done), default=math.nan))),
        ("data sent by migrations", format_bytes(sum(m.bytes_sent for m in run.migrations))),
        ("flows recorded", str(run.flow_count)),
        ("links recorded", str(len(run.links))),
    ]
    defaults = sc.get("defaults")
    if isinstance(defaults, dict) and defaults:
        rows.append(("defaults", escape(", ".join(f"{k}: {v}" for k, v in defaults.items()))))
    body = _kv(rows)
    if run.scenario is None:
        body += _empty("The stored scenario text is not valid YAML any more; it is shown as stored.")
    body += f"<details><summary>scenario file as run</summary><pre>{escape(run.stored.scenario)}</pre></details>"
    return _section("summary", body)


def _migrations(run: RunData) -> str:
    if not run.migrations:
        return _section("migrations", _empty("This run has no migrations."))
    rows = []
    for m in run.migrations:
        cls = "ok" if m.outcome == "completed" else "bad"
        rows.append(
            [
                escape(m.vm),
                escape(f"{m.source} → {m.destination}"),
                escape(m.strategy if m.strategy != "precopy" else f"precopy/{m.policy}"),
                _dur(m.start_s),
                _dur(m.total_time_s),
                _dur(m.downtime_s) if m.outcome == "completed" else "—",
                str(m.rounds),
                format_bytes(m.bytes_sent),
                "yes" if m.converged else "no",
                f'<span class="{cls}">{escape(m.outcome)}</span>',
                escape(m.stop_reason),
            ]
        )
    headers = ["VM", "route", "strategy", "start", "total time", "downtime", "rounds", "sent", "converged",
               "outcome", "why it stopped"]
    body = _img(charts.migrations_gantt(run.migrations), "migrations over time")
    if len(run.migrations) > charts.MAX_GANTT_ROWS:
        body += f'<p class="note">The chart shows the first {charts.MAX_GANTT_ROWS} migrations; the table all.</p>'
    body += _table(headers, rows, numeric=(3, 4, 5, 6, 7))
    return _section("migrations", body)


def _rounds(run: RunData) -> str:
    if not any(run.rounds.values()):
        return _section("rounds", _empty("No rounds were recorded for this run."))
    body = _img(charts.rounds_chart(run.migrations, run.rounds), "bytes and dirty pages per round")
    with_rounds = [m for m in run.migrations if run.rounds.get(m.idx)]
    if len(with_rounds) > charts.MAX_ROUND_PANELS:
        body += (
            f'<p class="note">The chart shows the first {charts.MAX_ROUND_PANELS} of {len(with_rounds)} '
            "migrations; the tables below hold every round.</p>"
        )
    for m in with_rounds:
        rows = [
            [
                str(r.idx),
                _dur(r.start_s),
                _dur(r.duration_s),
                f"{r.pages:,}",
                f"{r.zero_pages:,}",
                format_bytes(r.bytes),
                f"{r.dirty_pages_after:,}",
                "live" if r.live else "stop-and-copy",
            ]
            for r in run.rounds[m.idx]
        ]
        table = _table(
            ["round", "start", "duration", "pages", "zero pages", "bytes", "dirty pages after", "phase"],
            rows,
            numeric=(0, 1, 2, 3, 4, 5, 6),
        )
        body += (
            f"<details><summary>{escape(m.vm)} ({escape(m.source)} → {escape(m.destination)}): "
            f"{len(rows)} rounds, {format_bytes(m.bytes_sent)}</summary>{table}</details>"
        )
    return _section("rounds", body)


def _links(run: RunData) -> str:
    if not run.links:
        return _section("links", _empty("No link usage was recorded for this run."))
    busiest = run.busiest_links(BUSIEST_LINKS_TABLE)
    if not busiest:
        return _section("links", _empty("No link carried any traffic in this run."))
    body = (
        f'<p class="note">The {min(BUSIEST_LINKS_CHART, len(busiest))} busiest of {len(run.links)} links by mean '
        "utilisation over the run; each point is the mean load over one time bin.</p>"
    )
    body += _img(charts.links_chart(busiest[:BUSIEST_LINKS_CHART]), "link utilisation over time")
    rows = [
        [
            escape(s.name),
            escape(s.kind),
            format_rate(s.capacity_bytes_per_s) if math.isfinite(s.capacity_bytes_per_s) else "unlimited",
            _pct(s.mean_utilization),
            _pct(s.peak_utilization),
            format_bytes(s.carried_bytes),
        ]
        for s in busiest
    ]
    body += _table(["link", "kind", "capacity", "mean utilisation", "peak utilisation", "carried"], rows,
                   numeric=(3, 4, 5))
    return _section("links", body)


def _evidence(ev: Mapping[str, object]) -> str:
    return escape(", ".join(f"{k}={v}" for k, v in ev.items()))


def _monitor(run: RunData) -> str:
    if not run.monitor_events:
        why = (
            "the traffic monitor wrote nothing to <code>monitor_events</code> for it"
            if run.monitor_table
            else "this results database predates the monitor (it has no <code>monitor_events</code> table)"
        )
        return _section("monitor", _empty(f"No monitor verdicts recorded for this run: {why}."))
    ev = run.monitor_events
    levels = Counter(e.level for e in ev)
    actions = Counter(e.action for e in ev)
    level_text = ", ".join(
        f'<span class="{ {"HIGH": "bad", "MEDIUM": "warn"}.get(lvl, "ok") }">{escape(lvl)}: {n}</span>'
        for lvl, n in sorted(levels.items(), key=lambda kv: ("LOW", "MEDIUM", "HIGH").index(kv[0])
                             if kv[0] in ("LOW", "MEDIUM", "HIGH") else 9)
    )
    body = _kv(
        [
            ("verdicts", str(len(ev))),
            ("by level", level_text),
            ("by action", escape(", ".join(f"{a}: {n}" for a, n in actions.most_common()))),
            ("VMs concerned", str(len({e.vm for e in ev}))),
            ("first / last alert", f"{_dur(ev[0].t_s)} / {_dur(ev[-1].t_s)}"),
        ]
    )
    body += "<h3>Timeline of alerts</h3>" + _img(charts.monitor_timeline(ev, run.migrations), "monitor alerts")
    rows = [
        [_dur(e.t_s), escape(e.vm), escape(e.vswitch), escape(e.rule),
         f'<span class="{ {"HIGH": "bad", "MEDIUM": "warn"}.get(e.level, "ok") }">{escape(e.level)}</span>',
         escape(e.action), _evidence(e.evidence)]
        for e in ev[:MAX_EVENT_ROWS]
    ]
    body += _table(["time", "VM", "vSwitch", "rule", "level", "action", "evidence"], rows, numeric=(0,))
    if len(ev) > MAX_EVENT_ROWS:
        body += f'<p class="note">First {MAX_EVENT_ROWS} of {len(ev)} verdicts shown.</p>'
    return _section("monitor", body)


def _audit(run: RunData) -> str:
    a = run.audit
    if a is None:
        return _section(
            "audit",
            _empty(
                "No audit log recorded for this run: the simulator writes none, and none was given "
                "(<code>secmig report RUN --audit PATH</code> includes one)."
            ),
        )
    if a.verification is None and not a.records:
        return _section("audit", _empty(f"The audit log {escape(str(a.source))} could not be read: {escape(a.error)}"))
    if a.verification is None:
        status = f'<span class="bad">could not be verified</span>: {escape(a.error)}'
    elif a.verification.ok:
        status = f'<span class="ok">chain and signed head verify</span> (signer {escape(a.verification.signer)})'
    else:
        status = '<span class="bad">tampered or damaged</span>: ' + escape("; ".join(a.verification.problems))
    decisions = Counter(r.decision for r in a.records)
    body = _kv(
        [
            ("log", escape(str(a.source))),
            ("records", str(len(a.records))),
            ("integrity", status),
            ("decisions", escape(", ".join(f"{d}: {n}" for d, n in decisions.most_common())) or "—"),
        ]
    )
    by_event = Counter((r.event, r.decision) for r in a.records)
    body += _table(
        ["event", "decision", "count"],
        [[escape(e), escape(d), str(n)] for (e, d), n in sorted(by_event.items())],
        numeric=(2,),
    )
    refused = [r for r in a.records if r.decision == "refuse"]
    if refused:
        body += "<h3>Refusals</h3>" + _table(
            ["seq", "time (UTC)", "event", "actor", "subject", "detail"],
            [
                [
                    str(r.seq),
                    _dt.datetime.fromtimestamp(r.ts, tz=_dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
                    escape(r.event),
                    escape(r.actor),
                    escape(r.subject),
                    escape(json.dumps(r.detail, sort_keys=True)),
                ]
                for r in refused[:MAX_AUDIT_ROWS]
            ],
            numeric=(0,),
        )
    else:
        body += '<p class="note">No refusals in this log.</p>'
    return _section("audit", body)


def render(run: RunData, version: str = "") -> str:
    """The whole page for a run."""
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title in SECTIONS)
    title = f"secmig report: {run.stored.name}, run {run.run_id}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request, even from file://
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{escape(title)}</h1><p>{escape(str((run.scenario or {}).get('description', '')))}</p>"
        f"<nav>{nav}</nav></header>",
        _summary(run),
        _migrations(run),
        _rounds(run),
        _links(run),
        _monitor(run),
        _audit(run),
        f"<footer>secmig {escape(version)} · run {run.run_id} of {escape(str(run.db_path))}</footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"

