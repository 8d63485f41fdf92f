"""`leadflow bench report`: the 30-day lead funnel by source over millions of lead events.

A fresh embedded PostgreSQL (durable: fsync and synchronous commit on, as in production; a
larger `max_wal_size` so the bulk load is not one checkpoint after another) is started in a
temporary directory and migrated. `bench.report_data` generates N lead events (default
10,000,000) over D days (default 90) with merges, assignments, dispositions, recycling, SLA
expiries, hand-backs, agents' status history and rejects, in PostgreSQL itself (generate_series
into the real tables, on two connections at once; indexes built after the data). Then:

1. the rollup is built (`leadflow.reports.refresh`, the first refresh of a database);
2. every open lead's row is touched (as if each changed at once), and the incremental
   refresh that recomputes them is timed: the most a refresh redoes in steady state;
3. the report is timed several times — `leadflow.reports.funnel` for the last 30 days by
   source, exactly what `GET /api/v1/reports/funnel` runs (a refresh with nothing new, then
   the read) — and once by agent and by source and segment;
4. the same 30-day funnel by source is computed straight from `leads` and `assignments` (the
   join the rollup replaces; exact `percentile_cont`), timed once, and compared: every count
   must be equal, every p50/p90 within the rollup's precision (1 s below ten minutes, 1%
   above). Totals are checked against the tables (leads, events = N). Any difference fails.

Reported: `p50_ms` of the timed runs (the goal: under 2 seconds on the 2-core machine), each
run, how long the load and the rollup build took, the incremental refresh, the direct query's
time, the sizes, and the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from bench import report_data
from bench.common import goal, machine, write_report
from bench.intake import BenchFailed
from leadflow import reports
from leadflow.embedded import EmbeddedServers
from schemas import migrate

DEFAULT_EVENTS = 10_000_000
DEFAULT_DAYS = 90
RUNS = 7
GOALS = {"p50_ms": 2000}
#: The report: the last 30 days of the history, which ends at the start of today (UTC).
WINDOW = timedelta(days=30)

# The funnel by source from the base tables, as a report would have to without the rollup.
_DIRECT = """
WITH cohort AS (
    SELECT l.id, l.source, l.event_count, l.queued_at IS NOT NULL AS queued, l.state,
           l.created_at, l.closed_at
    FROM leads l WHERE l.created_at >= %(start)s AND l.created_at < %(end)s
), work AS (
    SELECT s.lead_id, count(*) AS assignments,
           count(*) FILTER (WHERE s.status <> 'revoked') AS attempts,
           count(*) FILTER (WHERE s.status = 'expired') AS expired,
           count(*) FILTER (WHERE s.status = 'completed'
                            AND s.close_reason IN ('no_answer', 'callback')) AS recycles,
           min(s.assigned_at) AS first_assigned, min(s.first_contact_at) AS first_contact,
           max(s.close_reason) FILTER (WHERE s.status = 'completed' AND s.close_reason IN
               ('converted', 'not_interested', 'invalid_number', 'do_not_call')) AS terminal,
           max(s.closed_at) FILTER (WHERE s.status = 'completed'
                                    AND s.close_reason = 'no_answer') AS last_no_answer
    FROM assignments s WHERE s.assigned_at >= %(start)s
    GROUP BY s.lead_id
), facts AS (
    SELECT c.*, coalesce(w.assignments, 0) AS assignments, coalesce(w.attempts, 0) AS attempts,
           coalesce(w.expired, 0) AS expired, w.first_assigned, w.first_contact, w.terminal,
           coalesce(w.recycles, 0)
               - coalesce(c.state = 'closed' AND w.terminal IS NULL
                          AND c.closed_at = w.last_no_answer, false)::int AS recycles
    FROM cohort c LEFT JOIN work w ON w.lead_id = c.id
)
SELECT source, count(*) AS leads, sum(event_count) AS events,
       count(*) FILTER (WHERE queued) AS queued,
       count(*) FILTER (WHERE assignments > 0) AS assigned,
       count(*) FILTER (WHERE first_contact IS NOT NULL) AS contacted,
       count(*) FILTER (WHERE terminal = 'converted') AS converted,
       count(*) FILTER (WHERE state IN ('converted', 'closed', 'do_not_call')) AS closed,
       count(*) FILTER (WHERE recycles > 0) AS recycled,
       count(*) FILTER (WHERE expired > 0) AS expired, sum(attempts) AS attempts,
       percentile_cont(ARRAY[0.5, 0.9]) WITHIN GROUP (
           ORDER BY extract(epoch FROM first_contact - created_at)) AS contact,
       percentile_cont(ARRAY[0.5, 0.9]) WITHIN GROUP (
           ORDER BY extract(epoch FROM first_assigned - created_at)) AS assign
FROM facts GROUP BY source
"""
_COMPARED = (
    "leads", "events", "queued", "assigned", "contacted", "converted", "closed", "recycled",
    "expired", "attempts",
)  # fmt: skip


def _timed(action: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def _close_enough(rollup: float | None, exact: float | None) -> bool:
    if rollup is None or exact is None:
        return rollup is None and exact is None
    return abs(rollup - exact) <= max(1.0, 0.01 * exact)


def _verify(conn: psycopg.Connection[Any], report: reports.Report, events: int) -> dict[str, Any]:
    """The rollup against the tables, and the report against the direct query."""
    problems: list[str] = []
    with conn.transaction():
        row = conn.execute(
            "SELECT (SELECT count(*) FROM leads), (SELECT count(*) FROM lead_events),"
            " (SELECT count(*) FROM report_leads), (SELECT sum(events) FROM report_leads),"
            " (SELECT count(*) FROM assignments), (SELECT count(*) FROM report_assignments)"
        ).fetchone()
        assert row is not None
        leads, stored_events, rolled_leads, rolled_events, assignments, rolled_assignments = row
        if stored_events != events or rolled_events != events:
            problems.append(
                f"events: generated {events}, stored {stored_events}, rolled up {rolled_events}"
            )
        if rolled_leads != leads:
            problems.append(f"leads: {leads} in the table, {rolled_leads} rolled up")
        if rolled_assignments != assignments:
            problems.append(f"assignments: {assignments}, {rolled_assignments} rolled up")
        conn.execute("SET LOCAL work_mem = '256MB'")
        period = {"start": report.period.start, "end": report.period.end}
        cur = conn.execute(_DIRECT, period)
        names = [d.name for d in cur.description or ()]
        direct = {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}
    rows = {row["source"]: row for row in report.rows if row["leads"]}
    if set(rows) != set(direct):
        problems.append(f"sources differ: {sorted(rows)} vs {sorted(direct)}")
    for source, exact in direct.items():
        mine = rows.get(source)
        if mine is None:
            continue
        for name in _COMPARED:
            if int(mine[name]) != int(exact[name] or 0):
                problems.append(f"{source} {name}: rollup {mine[name]}, direct {exact[name]}")
        for metric in ("contact", "assign"):
            for index, p in enumerate((50, 90)):
                value = exact[metric][index] if exact[metric] else None
                if not _close_enough(mine[f"{metric}_p{p}_s"], value):
                    problems.append(
                        f"{source} {metric} p{p}: rollup {mine[f'{metric}_p{p}_s']}, direct {value}"
                    )
    if problems:
        raise BenchFailed("the report does not add up:\n  " + "\n  ".join(problems))
    return {
        "leads": int(leads),
        "events": int(stored_events),
        "assignments": int(assignments),
        "sources_compared": len(direct),
    }


def _sizes(conn: psycopg.Connection[Any]) -> dict[str, str]:
    tables = ["lead_events", "leads", "assignments", "report_leads", "report_assignments"]
    with conn.transaction():
        rows = conn.execute(
            "SELECT t, pg_size_pretty(pg_total_relation_size(t::regclass)) FROM unnest(%s::text[]) t",
            (tables,),
        ).fetchall()
    return {str(table): str(size) for table, size in rows}


def _measure(url: str, events: int, days: int, console: Console) -> dict[str, Any]:
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET max_wal_size = '16GB'")
        admin.execute("ALTER SYSTEM SET checkpoint_timeout = '1h'")
        admin.execute("SELECT pg_reload_conf()")
    migrate.upgrade(url)
    console.log(f"generating {events:,} lead events over {days} days")
    steps, load_seconds = _timed(lambda: report_data.load(url, events, days, end))
    console.log(f"loaded in {load_seconds:.1f}s: {steps}")
    with psycopg.connect(url) as conn:
        built, build_seconds = _timed(lambda: reports.refresh(conn))
        console.log(f"rollup built in {build_seconds:.1f}s ({built.leads:,} leads)")
        with conn.transaction():
            touched = conn.execute(
                "UPDATE leads SET updated_at = updated_at"
                " WHERE id IN (SELECT lead_id FROM report_open_leads)"
            ).rowcount
        _, incremental_seconds = _timed(lambda: reports.refresh(conn))
        console.log(
            f"{touched:,} open leads touched; incremental refresh {incremental_seconds:.2f}s"
        )
        period = reports.Period(end - WINDOW, end)
        runs: list[float] = []
        report: reports.Report | None = None
        for _ in range(RUNS):
            report, seconds = _timed(lambda: reports.funnel(conn, period, ("source",)))
            runs.append(seconds * 1000)
        assert report is not None
        console.log(f"30-day funnel by source: {', '.join(f'{r:.0f}' for r in runs)} ms")
        others = {}
        for by in (("agent",), ("source", "segment")):
            _, seconds = _timed(lambda by=by: reports.funnel(conn, period, by))
            others[",".join(by)] = round(seconds * 1000)
        console.log(f"other breakdowns (ms): {others}")
        console.log("computing the same funnel from leads and assignments, and comparing")
        checked, direct_seconds = _timed(lambda: _verify(conn, report, events))
        sizes = _sizes(conn)
    p50 = statistics.median(runs)
    total = report.total
    return {
        "scenario": "report",
        "events": events,
        "days": days,
        "p50_ms": round(p50),
        "details": {
            "runs_ms": [round(r) for r in runs],
            "report": "30-day funnel by source (refresh with nothing new + read)",
            "period": {"from": period.start.isoformat(), "to": period.end.isoformat()},
            "cohort": {
                "leads": total["leads"],
                "events": total["events"],
                "sources": len(report.rows),
                "converted": total["converted"],
                "contact_p50_s": total["contact_p50_s"],
                "contact_p90_s": total["contact_p90_s"],
            },
            "other_breakdowns_ms": others,
            "load_seconds": round(load_seconds, 1),
            "load_steps_seconds": steps,
            "rollup_build_seconds": round(build_seconds, 1),
            "incremental_refresh": {
                "open_leads_changed": touched,
                "seconds": round(incremental_seconds, 3),
            },
            "direct_query_seconds": round(direct_seconds, 1),
            "verified": checked,
            "sizes": sizes,
            "postgres": "embedded PostgreSQL 18, durable (fsync and synchronous_commit on), "
            "shared_buffers 256MB, max_wal_size 16GB for the load",
            "goals": GOALS,
            "load_average": os.getloadavg(),
            "machine": machine(),
        },
    }


def run(
    events: int = DEFAULT_EVENTS,
    days: int = DEFAULT_DAYS,
    json_path: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Start the server, load, measure, verify, clean up; write the JSON report and return it."""
    console = console or Console()
    work_dir = Path(tempfile.mkdtemp(prefix="leadflow-bench-report-"))
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        console.log(f"starting embedded PostgreSQL (durable) in {work_dir}")
        with EmbeddedServers(
            work_dir / "servers", kafka_bootstrap="unused", durable=True
        ) as servers:
            assert servers.database_url is not None
            report = _measure(servers.database_url, events, days, console)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    write_report(json_path, report)
    return report


def show(console: Console, report: dict[str, Any]) -> None:
    """The report as a table, for people."""
    details = report["details"]
    cohort = details["cohort"]
    table = Table(title="leadflow bench report", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal")
    sizes = details["sizes"]
    table.add_row(
        "history",
        f"{report['events']:,} events",
        f"{report['days']} days; lead_events {sizes['lead_events']}, leads {sizes['leads']}, "
        f"assignments {sizes['assignments']}; rollup {sizes['report_leads']} + "
        f"{sizes['report_assignments']}",
    )
    table.add_row(
        "30-day funnel by source, p50",
        f"[bold]{report['p50_ms']:,} ms[/]",
        f"< {GOALS['p50_ms']:,} ms: " + goal(report["p50_ms"] < GOALS["p50_ms"]),
    )
    table.add_row(
        "runs", ", ".join(f"{r:,}" for r in details["runs_ms"]) + " ms", details["report"]
    )
    table.add_row(
        "cohort",
        f"{cohort['leads']:,} leads",
        f"{cohort['events']:,} events, {cohort['sources']} sources, {cohort['converted']:,} converted",
    )
    for name, ms in details["other_breakdowns_ms"].items():
        table.add_row(f"30 days by {name}", f"{ms:,} ms", "one run")
    table.add_row("load (generate_series, two connections)", f"{details['load_seconds']:,} s", "")
    table.add_row("rollup built (first refresh)", f"{details['rollup_build_seconds']:,} s", "")
    refresh = details["incremental_refresh"]
    table.add_row(
        "incremental refresh",
        f"{refresh['seconds']:,} s",
        f"after {refresh['open_leads_changed']:,} open leads changed",
    )
    table.add_row(
        "same funnel from leads + assignments",
        f"{details['direct_query_seconds']:,} s",
        "counts equal, percentiles within precision: verified",
    )
    machine_ = details["machine"]
    table.add_row(
        "machine",
        f"{machine_['cores']} cores",
        f"{machine_['cpu']}, load average {', '.join(f'{x:.1f}' for x in details['load_average'])}",
    )
    console.print(table)
