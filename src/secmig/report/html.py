"""One self-contained HTML page for a stored run: inline CSS, charts as ``data:`` PNGs, no script, no network.

Sections, each a ``<section id=…>``: ``summary``, ``migrations``, ``rounds``, ``links``, ``monitor``,
``audit``. A section with nothing to show says so in words (``class="empty"``) rather than disappearing.
A consolidation day has its own sections (:data:`CONSOLIDATION_SECTIONS`): the summary of CloudSim's
figures and secmig's own, energy and active hosts over the day, migrations per interval, the monitor's
verdicts and the audit summary.
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
from secmig.report.data import ConsolidationData, RunData, scenario_counts
from secmig.results.tables import ConsolidationMigrationRow

SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Scenario summary"),
    ("migrations", "Migrations"),
    ("rounds", "Rounds per migration"),
    ("links", "Link utilisation"),
    ("monitor", "Monitor verdicts"),
    ("audit", "Audit summary"),
)
CONSOLIDATION_SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Consolidation summary"),
    ("energy", "Energy and active hosts"),
    ("consolidation-migrations", "Migrations per interval"),
    ("monitor", "Monitor verdicts"),
    ("audit", "Audit summary"),
)
LONGEST_MIGRATIONS = 20
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


def _section(sid: str, body: str, sections: Sequence[tuple[str, str]] = SECTIONS) -> str:
    title = dict(sections)[sid]
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
    if run.consolidation is not None:
        sections = CONSOLIDATION_SECTIONS
        body = [
            _consolidation_summary(run, run.consolidation),
            _consolidation_energy(run.consolidation),
            _consolidation_migrations(run.consolidation),
            _consolidation_monitor(run, run.consolidation),
            _audit(run),
        ]
    else:
        sections = SECTIONS
        body = [_summary(run), _migrations(run), _rounds(run), _links(run), _monitor(run), _audit(run)]
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title in sections)
    title = f"secmig report: {run.stored.name}, run {run.run_id}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request, even from file://
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{escape(title)}</h1><p>{escape(str((run.scenario or {}).get('description', '')))}</p>"
        f"<nav>{nav}</nav></header>",
        *body,
        f"<footer>secmig {escape(version)} · run {run.run_id} of {escape(str(run.db_path))}</footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"



# --- the consolidation day ------------------------------------------------------------------------------


def _num(x: float | int | None, fmt: str, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:{fmt}}" + (f" {unit}" if unit else "")


def _frac(x: float | None, digits: int) -> str:
    """A fraction as CloudSim prints it (percent) with the stored fraction beside it."""
    if x is None or not math.isfinite(x):
        return "—"
    return f"{100 * x:.{digits}f} % <span class=note>({x:.3g})</span>"


def _consolidation_summary(run: RunData, c: ConsolidationData) -> str:
    s = c.summary
    created = _dt.datetime.fromtimestamp(run.stored.created_at, tz=_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    end_h = max((iv.t_s for iv in c.intervals), default=0.0) / 3600
    body = _kv(
        [
            ("run", f"{run.run_id} ({escape(run.stored.name)}, seed {run.stored.seed}), stored {created}"),
            ("workload", escape(s.workload)),
            ("policies", escape(f"overload {s.overload}, selection {s.selection}, migration model "
                                f"{s.migration_model}")),
            ("datacenter", f"{s.hosts:,} hosts, {s.vms:,} VMs, scheduling every {s.interval_s:g} s, {end_h:.1f} h"),
            ("security", "Vsignatures, grants" + (" and the monitor" if s.migration_model == "network" else "")
             if s.secure else "off (--no-secure)"),
            ("wall time", _dur(s.wall_time_s)),
        ]
    )
    body += "<h3>CloudSim's figures</h3>" + _kv(
        [
            ("energy", _num(s.energy_kwh, ".2f", "kWh")),
            ("VM migrations", _num(s.migrations, ",d")),
            ("SLATAH (SLA time per active host)", _frac(s.slatah, 2)),
            ("PDM (degradation due to migrations)", _frac(s.pdm, 3)),
            ("SLAV = SLATAH × PDM", _frac(s.slav, 5)),
            ("ESV = energy × SLAV", _num(s.esv, ".5f")),
            ("overall SLA violation", _frac(s.overall_sla_violation, 2)),
            ("average SLA violation", _frac(s.average_sla_violation, 2)),
            ("host shutdowns", _num(s.shutdowns, ",d")),
            ("mean time before a host shutdown", _num(s.mean_time_before_shutdown_s, ".1f", "s")
             + f" <span class=note>(σ {_num(s.stdev_time_before_shutdown_s, '.1f', 's')})</span>"),
            ("mean time before a VM migration", _num(s.mean_time_before_migration_s, ".1f", "s")
             + f" <span class=note>(σ {_num(s.stdev_time_before_migration_s, '.1f', 's')})</span>"),
        ]
    )
    monitor: list[tuple[str, str]]
    if s.monitor_verdicts is None:
        monitor = [("monitor", "did not run (it watches migrations of the network model)")]
    else:
        destroyed = s.monitor_destroyed or 0
        monitor = [
            ("monitor verdicts (identity checks passed)",
             f"{s.monitor_verdicts:,} ({_num(s.monitor_challenges_passed, ',d')})"),
            ("monitor alarms / VMs destroyed",
             f"{_num(s.monitor_alarms, ',d')} / <span class={'bad' if destroyed else 'ok'}>{destroyed}</span>"),
            ("false alarms per VM-hour watched",
             f"{_num(s.false_alarms_per_vm_hour, '.4f')} over {_num(s.monitor_vm_hours, '.1f', 'VM-hours')}"),
        ]
    body += "<h3>secmig's own</h3>" + _kv(
        [
            ("mean migration time (completed)", _num(s.mean_migration_time_s, ".2f", "s")),
            ("total migration downtime", _num(s.total_downtime_s, ".2f", "s")),
            ("bytes moved by migrations", format_bytes(s.bytes_moved)),
            ("aborted migrations", _num(s.aborted_migrations, ",d")),
            ("grants issued / refused", f"{s.grants_issued:,} / {s.grants_refused:,}"),
            ("destination hosts (valid Vsignature)", _num(s.eligible_hosts, ",d")),
            ("VMs finished (asked 0 MIPS, CloudSim's rule)", _num(s.vms_retired, ",d")),
            ("capacity of a cloudlet, ΣC(i)/Nvm", _num(s.mean_cloudlet_capacity_mips, ",.0f", "MIPS")),
            *monitor,
        ]
    )
    body += f"<details><summary>parameters as run</summary><pre>{escape(run.stored.scenario)}</pre></details>"
    return _section("summary", body, CONSOLIDATION_SECTIONS)


def _consolidation_energy(c: ConsolidationData) -> str:
    if not c.intervals:
        empty = _empty("No scheduling instant was recorded for this run.")
        return _section("energy", empty, CONSOLIDATION_SECTIONS)
    body = _img(charts.consolidation_timeline(c.intervals), "energy and active hosts over the day")
    caps = [iv.cloudlet_capacity_mips for iv in c.intervals if iv.cloudlet_capacity_mips is not None]
    body += (
        f'<p class="note">{len(c.intervals)} scheduling instants. A host is active while it runs at least one '
        "VM; an empty host is switched off and draws nothing."
        + (f" ΣC(i)/Nvm per host ranged from {min(caps):,.0f} to {max(caps):,.0f} MIPS." if caps else "")
        + "</p>"
    )
    return _section("energy", body, CONSOLIDATION_SECTIONS)


def _consolidation_migrations(c: ConsolidationData) -> str:
    if not c.migrations:
        empty = _empty("The planner issued no migration in this run.")
        return _section("consolidation-migrations", empty, CONSOLIDATION_SECTIONS)
    t = [iv.t_s for iv in c.intervals]
    body = _img(
        charts.consolidation_migrations_chart(t, c.migrations_per_interval(), c.summary.interval_s),
        "migrations per interval",
    )
    body += _img(charts.consolidation_migration_times(c.migrations), "migration times and downtime")
    groups: dict[tuple[str, str], list[ConsolidationMigrationRow]] = {}
    for m in c.migrations:
        groups.setdefault((m.reason, m.outcome), []).append(m)
    rows = [
        [
            escape(reason),
            f'<span class="{"ok" if outcome == "completed" else "bad"}">{escape(outcome)}</span>',
            f"{len(ms):,}",
            _dur(sum(m.end_s - m.start_s for m in ms) / len(ms)),
            _dur(sum(m.downtime_s for m in ms)),
            format_bytes(sum(m.bytes_moved for m in ms)),
        ]
        for (reason, outcome), ms in sorted(groups.items())
    ]
    body += _table(["reason", "outcome", "migrations", "mean time", "total downtime", "bytes moved"], rows,
                   numeric=(2, 3, 4, 5))
    longest = sorted(c.migrations, key=lambda m: m.end_s - m.start_s, reverse=True)[:LONGEST_MIGRATIONS]
    table = _table(
        ["VM", "route", "reason", "start", "time", "downtime", "bytes", "outcome"],
        [
            [escape(m.vm), escape(f"{m.source} → {m.destination}"), escape(m.reason), _dur(m.start_s),
             _dur(m.end_s - m.start_s), _dur(m.downtime_s), format_bytes(m.bytes_moved), escape(m.outcome)]
            for m in longest
        ],
        numeric=(3, 4, 5, 6),
    )
    body += (
        f"<details><summary>the {len(longest)} longest of {len(c.migrations):,} migrations (all are in "
        f"<code>consolidation_migrations</code> and <code>migrations.csv</code>)</summary>{table}</details>"
    )
    return _section("consolidation-migrations", body, CONSOLIDATION_SECTIONS)


def _consolidation_monitor(run: RunData, c: ConsolidationData) -> str:
    ev = run.monitor_events
    if not ev:
        if c.summary.monitor_verdicts is None:
            why = (
                "the monitor runs with the network migration model (<code>--migration-model network</code>), "
                "where migrations move bytes over the vSwitches; this run used the "
                f"{escape(c.summary.migration_model)} model"
            )
        else:
            why = "the monitor watched every migration and judged nothing worth a verdict"
        empty = _empty(f"No monitor verdicts recorded for this run: {why}.")
        return _section("monitor", empty, CONSOLIDATION_SECTIONS)
    levels = Counter(e.level for e in ev)
    actions = Counter(e.action for e in ev)
    end_s = max((iv.t_s for iv in c.intervals), default=0.0)
    body = _kv(
        [
            ("verdicts", f"{len(ev):,}"),
            ("by level", escape(", ".join(f"{lvl}: {n:,}" for lvl, n in levels.most_common()))),
            ("by action", escape(", ".join(f"{a}: {n:,}" for a, n in actions.most_common()))),
            ("identity checks passed", f"{sum(1 for e in ev if e.evidence.get('challenge') == 'passed'):,}"),
            ("VMs concerned", f"{len({e.vm for e in ev}):,}"),
        ]
    )
    body += _img(charts.consolidation_verdicts_chart(ev, end_s, c.summary.interval_s), "verdicts over the day")
    rows = [
        [_dur(e.t_s), escape(e.vm), escape(e.vswitch), escape(e.rule),
         f'<span class="{ {"HIGH": "bad", "MEDIUM": "warn"}.get(e.level, "ok") }">{escape(e.level)}</span>',
         escape(e.action), _evidence(e.evidence)]
        for e in ev[:MAX_EVENT_ROWS]
    ]
    table = _table(["time", "VM", "vSwitch", "rule", "level", "action", "evidence"], rows, numeric=(0,))
    more = f" (first {MAX_EVENT_ROWS} of {len(ev):,})" if len(ev) > MAX_EVENT_ROWS else ""
    body += f"<details><summary>the verdicts{more}</summary>{table}</details>"
    return _section("monitor", body, CONSOLIDATION_SECTIONS)
