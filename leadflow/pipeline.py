"""The pipeline at a glance, from PostgreSQL: what `/api/v1/pipeline`, `/ops` and `leadflow
status` show.

Every figure here is read from the system of record, so it is exact and the same whichever
replica answers: intake per channel per minute, classification mix, queues, agents, SLA, speed to
lead, pollers and staging extracts. Rejections of real-time events never reach the database (they
go to `leads.dlq`): the `stream` section carries the stream analytics' per-minute figures (DLQ by
code, raw events by channel and source, assignments by segment, speed to lead per queue), read
from what the analytics role flushed to `stream_minutes`.

`snapshot(engine)` takes one consistent read (a REPEATABLE READ transaction), so the sections
agree with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from leadflow.analytics import merge_histograms, percentile
from leadflow.db import pipeline_sources
from schemas.vocab import AGENT_STATUSES, INTAKES
from sync.pollers import SourceSpec

#: The window of the per-minute intake series and the "last hour" figures.
WINDOW_MINUTES = 30

_NOW = sa.text("SELECT now()")
_INTAKE = sa.text("""
SELECT date_trunc('minute', received_at) AS minute, intake, count(*)
FROM lead_events WHERE received_at >= :since
GROUP BY 1, 2
""")
_MIX = sa.text("""
SELECT business_line, segment, count(*) FROM leads WHERE created_at >= :since
GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2
""")
_LEADS_BY_STATE = sa.text("SELECT state, count(*) FROM leads GROUP BY state")
_QUEUES = sa.text("""
WITH waiting AS (
    SELECT coalesce(queue, '-') AS queue, count(*) AS waiting,
           count(*) FILTER (WHERE next_action_at IS NULL OR next_action_at <= :now) AS due,
           max(:now - queued_at) FILTER (
               WHERE next_action_at IS NULL OR next_action_at <= :now) AS oldest
    FROM leads WHERE state = 'queued' GROUP BY 1
), open AS (
    SELECT queue, count(*) AS open,
           count(*) FILTER (WHERE first_contact_at IS NULL AND sla_deadline < :now) AS breached
    FROM assignments WHERE status = 'open' GROUP BY queue
)
SELECT coalesce(w.queue, o.queue) AS queue, coalesce(w.waiting, 0) AS waiting,
       coalesce(w.due, 0) AS due, extract(epoch FROM w.oldest) AS oldest_seconds,
       coalesce(o.open, 0) AS open, coalesce(o.breached, 0) AS sla_breached
FROM waiting w FULL JOIN open o ON o.queue = w.queue
ORDER BY 1
""")
_AGENTS = sa.text("""
SELECT a.status, count(*) AS agents, sum(a.capacity) AS capacity,
       coalesce(sum(o.open), 0) AS open
FROM agents a
LEFT JOIN (SELECT agent_id, count(*) AS open FROM assignments WHERE status = 'open'
           GROUP BY agent_id) o ON o.agent_id = a.id
GROUP BY a.status
""")
# Speed to lead: from the lead's creation (its first event stored) to its first assignment
# and to first contact, over first assignments made in the window.
_SPEED = sa.text("""
SELECT count(*) AS assignments,
       percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (
           ORDER BY extract(epoch FROM s.assigned_at - l.created_at)) AS assign,
       percentile_cont(ARRAY[0.5, 0.9]) WITHIN GROUP (
           ORDER BY extract(epoch FROM s.first_contact_at - l.created_at))
           FILTER (WHERE s.first_contact_at IS NOT NULL) AS contact
FROM assignments s JOIN leads l ON l.id = s.lead_id
WHERE s.assigned_at >= :since AND s.attempt = 1
""")
_SLA_EXPIRED = sa.text("""
SELECT count(*) FROM assignments
WHERE assigned_at >= :since AND status = 'expired'
""")
_EXTRACTS = sa.text("""
SELECT id, table_name, state, submitted_by, submitted_at, started_at, finished_at,
       rows_total, rows_loaded, rows_merged, rows_rejected, error
FROM staging.extracts
WHERE state IN ('pending', 'loading') OR submitted_at >= :recent
ORDER BY id DESC LIMIT 20
""")
_STREAM = sa.text("""
SELECT minute, metric, key, value FROM stream_minutes WHERE minute >= :since
""")
_REJECTS = sa.text("""
SELECT 'staging' AS intake, code, count(*) FROM staging.extract_rejects
WHERE created_at >= :since GROUP BY code
UNION ALL
SELECT 'stock', code, count(*) FROM poller_rejects WHERE created_at >= :since GROUP BY code
""")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _seconds(values: list[float] | None, index: int) -> float | None:
    if not values or values[index] is None:
        return None
    return round(float(values[index]), 3)


def _intake(conn: Connection, now: datetime) -> dict[str, Any]:
    start = (now - timedelta(minutes=WINDOW_MINUTES - 1)).replace(second=0, microsecond=0)
    minutes = [start + timedelta(minutes=n) for n in range(WINDOW_MINUTES)]
    series = {intake: [0] * WINDOW_MINUTES for intake in INTAKES}
    for minute, intake, count in conn.execute(_INTAKE, {"since": start}):
        slot = int((minute - start).total_seconds() // 60)
        if 0 <= slot < WINDOW_MINUTES:
            series[intake][slot] = int(count)
    return {
        "minutes": [_iso(m) for m in minutes],
        "events_per_minute": series,
        "events_in_window": {k: sum(v) for k, v in series.items()},
    }


def _stream(conn: Connection, now: datetime) -> dict[str, Any]:
    """The stream analytics' figures (summed over partitions), empty when it is not running."""
    start = (now - timedelta(minutes=WINDOW_MINUTES - 1)).replace(second=0, microsecond=0)
    raw: dict[str, list[int]] = {}
    totals: dict[str, dict[str, int]] = {"dlq_code": {}, "assigned_segment": {}, "raw_source": {}}
    speed: dict[str, list[dict[str, int]]] = {}
    latest: datetime | None = None
    for minute, metric, key, value in conn.execute(_STREAM, {"since": start}):
        latest = max(latest, minute) if latest else minute
        if metric == "raw_channel":
            slot = int((minute - start).total_seconds() // 60)
            if 0 <= slot < WINDOW_MINUTES:
                raw.setdefault(key, [0] * WINDOW_MINUTES)[slot] += int(value)
        elif metric == "speed_queue":
            speed.setdefault(key, []).append(value)
        elif metric in totals:
            totals[metric][key] = totals[metric].get(key, 0) + int(value)
    queues = {}
    for queue, histograms in speed.items():
        merged = merge_histograms(histograms)
        queues[queue] = {
            "first_assignments": sum(merged.values()),
            **{f"p{int(q * 100)}_seconds": percentile(merged, q) for q in (0.5, 0.9, 0.99)},
        }
    return {
        "latest_minute": _iso(latest),
        "raw_per_minute_by_channel": raw,
        "raw_by_source": totals["raw_source"],
        "dlq_by_code": totals["dlq_code"],
        "assigned_by_segment": totals["assigned_segment"],
        "speed_to_lead_by_queue": queues,
    }


def snapshot(engine: Engine, sources: Sequence[SourceSpec] = ()) -> dict[str, Any]:
    """The whole picture, read in one consistent snapshot of the database (the pollers' view,
    with the configured `sources` and whether a run holds one now, is read beside it)."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            now: datetime = conn.execute(_NOW).scalar_one()
            since = now - timedelta(minutes=WINDOW_MINUTES)
            leads = dict.fromkeys(("new", "queued", "assigned", "in_progress"), 0)
            leads.update({state: int(n) for state, n in conn.execute(_LEADS_BY_STATE)})
            agents = {status: {"agents": 0, "capacity": 0, "open": 0} for status in AGENT_STATUSES}
            for row in conn.execute(_AGENTS):
                agents[row.status] = {
                    "agents": int(row.agents),
                    "capacity": int(row.capacity or 0),
                    "open": int(row.open),
                }
            speed = conn.execute(_SPEED, {"since": since}).one()
            queues = [
                {
                    **dict(row._mapping),
                    "oldest_seconds": float(row.oldest_seconds)
                    if row.oldest_seconds is not None
                    else None,
                }
                for row in conn.execute(_QUEUES, {"now": now})
            ]
            rejects: dict[str, dict[str, int]] = {}
            for intake, code, count in conn.execute(_REJECTS, {"since": since}):
                rejects.setdefault(intake, {})[code] = int(count)
            return {
                "at": _iso(now),
                "window_minutes": WINDOW_MINUTES,
                "intake": {**_intake(conn, now), "rejects_in_window": rejects},
                "stream": _stream(conn, now),
                "leads_by_state": leads,
                "classification": [
                    {"business_line": line, "segment": segment, "leads": int(n)}
                    for line, segment, n in conn.execute(_MIX, {"since": since})
                ],
                "queues": queues,
                "agents": agents,
                "sla": {
                    "open_breached": sum(q["sla_breached"] for q in queues),
                    "expired_in_window": int(
                        conn.execute(_SLA_EXPIRED, {"since": since}).scalar_one()
                    ),
                },
                "speed_to_lead": {
                    "first_assignments": int(speed.assignments),
                    "assign_p50_seconds": _seconds(speed.assign, 0),
                    "assign_p90_seconds": _seconds(speed.assign, 1),
                    "assign_p99_seconds": _seconds(speed.assign, 2),
                    "contact_p50_seconds": _seconds(speed.contact, 0),
                    "contact_p90_seconds": _seconds(speed.contact, 1),
                },
                "pollers": [
                    {key: _iso(v) if isinstance(v, datetime) else v for key, v in entry.items()}
                    for entry in pipeline_sources(engine, sources, now)
                ],
                "extracts": [
                    {
                        **dict(row._mapping),
                        **{
                            key: _iso(row._mapping[key])
                            for key in ("submitted_at", "started_at", "finished_at")
                        },
                    }
                    for row in conn.execute(_EXTRACTS, {"recent": now - timedelta(days=1)})
                ],
            }
