"""Reports: the lead funnel and speed to lead by a dimension over a period, computed in
PostgreSQL (what `/api/v1/reports/funnel`, `/ops/reports` and `leadflow report funnel` show).

The rule: a funnel follows the **leads created in the period** `[from, to)` through everything
that has happened to them until now — their events (the one that created each lead and those
merged into it later), queueing, every assignment, first contact, dispositions, recycling and
SLA expiry, and how each closed. A lead counts once per step (a lead assigned three times is one
assigned lead and three attempts). Rejected input never became a lead: it is counted by when it
was rejected, in the period, where the database knows it (staging extracts and pollers).
With `by=agent` the unit is the assignment: the assignments made to each agent in the period,
followed until now, beside the agent's available hours in the period.

Dimensions are a fixed allow-list mapped to column names; nothing a user sends reaches SQL text.

It reads a rollup (`report_leads`, `report_assignments`: a narrow row per lead and per assignment)
that `refresh()` brings up to date incrementally before each report: leads new since the last
refresh, and open leads whose `leads` row changed (every change to a lead or its assignments
rewrites the lead's row, so its `xmin` changes). Closed leads are final; their rows are never
recomputed. Measured on 10 million events, a 30-day funnel by source took 1.6 s from the rollup,
refresh included, and 22.8 s straight from `leads` and `assignments` (README, Reports).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from schemas.vocab import REJECT_CODES

# --- dimensions and columns -------------------------------------------------------------------

#: What a report can be broken down by: the name users give -> the rollup's column (and the
#: `report_values.dimension` of its codes). `channel` is how a lead came in (realtime, stock,
#: staging, http); `product_channel` is the event's own `channel` field (web, app, ad, ...).
DIMENSIONS: Final[dict[str, str]] = {
    "source": "source",
    "channel": "intake",
    "product_channel": "channel",
    "event_type": "event_type",
    "campaign": "campaign",
    "business_line": "business_line",
    "segment": "segment",
    "queue": "queue",
    "agent": "agent",
}
#: The `leads` columns the rollup keeps as codes, in `report_values.dimension` names.
_LEAD_DIMENSIONS: Final = (
    "intake", "source", "channel", "event_type", "campaign", "business_line", "segment", "queue",
)  # fmt: skip
MAX_DIMENSIONS: Final = 2

#: How a closed lead ended: the disposition that closed it, its last SLA expiry, blocked as
#: do-not-call without a disposition (the list, or consent withdrawn), or the allocator's
#: attempts limit.
OUTCOMES: Final = (
    "converted", "not_interested", "invalid_number", "do_not_call", "no_answer", "sla_expired",
    "blocked_dnc", "max_attempts",
)  # fmt: skip
#: How an assignment ended (agents' view): its disposition, an SLA expiry, handed back by
#: the agent, or revoked when the lead was closed by intake (do not call).
ASSIGNMENT_OUTCOMES: Final = (
    "converted", "not_interested", "invalid_number", "do_not_call", "no_answer", "callback",
    "sla_expired", "handed_back", "revoked",
)  # fmt: skip

#: How a column reads: a dimension value, a count, a share (0..1), a ratio (attempts per lead,
#: conversions per hour), seconds, hours.
Kind = Literal["dimension", "count", "rate", "ratio", "seconds", "hours"]


@dataclass(frozen=True)
class Column:
    name: str
    label: str
    kind: Kind


def _count(name: str, label: str) -> Column:
    return Column(name, label, "count")


FUNNEL_COLUMNS: Final = (
    _count("events", "events received"),
    _count("merged", "merged"),
    _count("rejected", "rejected"),
    _count("leads", "leads"),
    _count("queued", "queued"),
    _count("assigned", "assigned"),
    _count("contacted", "first contacted"),
    _count("converted", "converted"),
    _count("closed", "closed"),
    _count("open", "still open"),
    _count("recycled", "recycled"),
    _count("recycles", "recycles"),
    _count("expired", "expired by SLA"),
    _count("expiries", "SLA expiries"),
    _count("attempts", "attempts"),
    Column("queued_rate", "queued / leads", "rate"),
    Column("assigned_rate", "assigned / queued", "rate"),
    Column("contact_rate", "contacted / assigned", "rate"),
    Column("conversion_rate", "converted / contacted", "rate"),
    Column("lead_conversion_rate", "converted / leads", "rate"),
    Column("recycle_rate", "recycled / assigned", "rate"),
    Column("expiry_rate", "expired / assigned", "rate"),
    Column("attempts_per_lead", "attempts per assigned lead", "ratio"),
    Column("merge_rate", "merged / events", "rate"),
    Column("reject_rate", "rejected / (events + rejected)", "rate"),
    Column("contact_p50_s", "to first contact p50 (s)", "seconds"),
    Column("contact_p90_s", "to first contact p90 (s)", "seconds"),
    Column("assign_p50_s", "to first assignment p50 (s)", "seconds"),
    Column("assign_p90_s", "to first assignment p90 (s)", "seconds"),
    *(_count(f"closed_{o}", f"closed: {o.replace('_', ' ')}") for o in OUTCOMES),
    *(_count(f"rejected_{c}", f"rejected: {c.replace('_', ' ')}") for c in REJECT_CODES),
)
AGENT_COLUMNS: Final = (
    _count("assignments", "assignments"),
    _count("attempts", "attempts"),
    _count("contacted", "contacted"),
    _count("converted", "converted"),
    _count("open", "still open"),
    Column("available_hours", "available hours", "hours"),
    Column("conversions_per_hour", "conversions per available hour", "ratio"),
    Column("contact_rate", "contacted / attempts", "rate"),
    Column("conversion_rate", "converted / contacted", "rate"),
    Column("contact_p50_s", "assignment to contact p50 (s)", "seconds"),
    Column("contact_p90_s", "assignment to contact p90 (s)", "seconds"),
    *(_count(f"ended_{o}", f"ended: {o.replace('_', ' ')}") for o in ASSIGNMENT_OUTCOMES),
)

# --- speed buckets ----------------------------------------------------------------------------

#: Speeds below this many seconds are kept to the whole second; above, in buckets 1% wide.
EXACT_SECONDS: Final = 600
_GROWTH: Final = 1.01


def speed_bucket(seconds: float) -> int:
    """The bucket of a speed (negative clock skew counts as 0); `_bucket_sql` is the same."""
    if seconds < EXACT_SECONDS:
        return math.floor(max(seconds, 0.0))
    return min(
        EXACT_SECONDS + math.floor(math.log(seconds / EXACT_SECONDS) / math.log(_GROWTH)), 32767
    )


def _bucket_sql(expression: str) -> str:
    value = f"({expression})"
    return (
        f"CASE WHEN {value} IS NULL THEN NULL WHEN {value} < {EXACT_SECONDS}"
        f" THEN floor(greatest({value}, 0))::smallint"
        f" ELSE least({EXACT_SECONDS} + floor(ln({value} / {EXACT_SECONDS}) / ln({_GROWTH})),"
        " 32767)::smallint END"
    )


def _bucket_bounds(bucket: int) -> tuple[float, float]:
    if bucket < EXACT_SECONDS:
        return float(bucket), float(bucket)
    low = EXACT_SECONDS * _GROWTH ** (bucket - EXACT_SECONDS)
    return low, low * _GROWTH


def percentiles(histogram: Mapping[int, int], qs: Sequence[float]) -> list[float | None]:
    """`percentile_cont` of the speeds a histogram of buckets holds: a speed below
    `EXACT_SECONDS` is its whole seconds; in a 1% bucket the k-th of its n speeds is taken at
    (k + 0.5) / n of the bucket's width. None for an empty histogram."""
    buckets = sorted((b, n) for b, n in histogram.items() if n > 0)
    total = sum(n for _, n in buckets)
    if total == 0:
        return [None for _ in qs]

    def value(rank: int) -> float:
        before = 0
        for bucket, count in buckets:
            if rank < before + count:
                low, high = _bucket_bounds(bucket)
                return low + (high - low) * (rank - before + 0.5) / count
            before += count
        raise AssertionError("rank beyond the histogram")

    results: list[float | None] = []
    for q in qs:
        position = q * (total - 1)
        lower = math.floor(position)
        fraction = position - lower
        low = value(lower)
        high = value(lower + 1) if fraction > 0 else low
        results.append(low + (high - low) * fraction)
    return results


class ReportError(ValueError):
    """A report asked for something it cannot be: an unknown dimension, a bad period."""


# --- the request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """`[start, end)`, both aware."""

    start: datetime
    end: datetime


def parse_time(text: str, zone: ZoneInfo, what: str) -> datetime:
    """A date (`2026-11-01`: its start in `zone`) or an RFC 3339 time with an offset."""
    value = text.strip()
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), datetime.min.time(), zone)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ReportError(
            f"{what} must be a date (2026-11-01) or a time with an offset "
            "(2026-11-01T08:00:00+08:00)"
        ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ReportError(f"{what} needs a UTC offset (2026-11-01T08:00:00+08:00), or give a date")
    return moment


def parse_period(
    start: str | None, end: str | None, zone: ZoneInfo, now: datetime, default_days: int = 30
) -> Period:
    """The period of a request: both ends given, or the last `default_days` whole days up to
    today included (in `zone`) for what is missing."""
    stop = (
        parse_time(end, zone, "to")
        if end
        else datetime.combine(
            now.astimezone(zone).date() + timedelta(days=1), datetime.min.time(), zone
        )
    )
    begin = parse_time(start, zone, "from") if start else stop - timedelta(days=default_days)
    if begin >= stop:
        raise ReportError("from must be before to (the period is [from, to))")
    if stop - begin > timedelta(days=3660):
        raise ReportError("the period is longer than ten years")
    return Period(begin, stop)


def parse_by(text: str | None) -> tuple[str, ...]:
    """`source`, `source,segment`, ...: one or two known dimensions, no repeats."""
    names = tuple(part.strip() for part in (text or "source").split(",") if part.strip())
    if not names:
        raise ReportError("by names no dimension")
    if any(name not in DIMENSIONS for name in names):
        # What was sent is not echoed: error bodies never carry submitted values.
        raise ReportError(f"unknown dimension in by; choose from {', '.join(DIMENSIONS)}")
    if len(names) > MAX_DIMENSIONS:
        raise ReportError(f"at most {MAX_DIMENSIONS} dimensions")
    if len(set(names)) != len(names):
        raise ReportError("a dimension is named twice")
    return names


# --- the rollup -------------------------------------------------------------------------------

_LOCK_REFRESH = "LOCK TABLE report_refresh IN SHARE ROW EXCLUSIVE MODE"
# Read before the refresh's snapshot: a lead that snapshot cannot see yet belongs to a
# transaction running now or starting later, so it was created (its created_at is its
# transaction's now()) at or after the oldest start of the transactions running now. Sessions of
# other roles are hidden from pg_stat_activity without pg_read_all_stats; if there are any,
# ten minutes before now stands in for their start.
_CUTOFF = """
SELECT CASE WHEN count(*) FILTER (WHERE backend_type = 'client backend'
                                  AND query = '<insufficient privilege>') > 0
            THEN least(clock_timestamp() - interval '10 minutes', min(xact_start))
            ELSE least(clock_timestamp(), min(xact_start)) END
FROM pg_stat_activity
"""
_STATE = "SELECT refreshed_at, cutoff, max_lead_id FROM report_refresh WHERE id = 1"
# New leads (by id, or created since the last cutoff), and open leads whose row changed.
_CHANGED = """
SELECT id FROM leads WHERE id > %(max_lead_id)s OR created_at >= %(cutoff)s
UNION
SELECT o.lead_id FROM report_open_leads o JOIN leads l ON l.id = o.lead_id
WHERE o.lead_xmin <> l.xmin::text::bigint
"""
# The statements below are put together from this module's constants only (column names and
# vocabularies), never from anything a caller passes: hence the S608 exemptions.
# New values get the next codes of their dimension (only the refresh, under its lock, writes).
_NEW_VALUES = """
INSERT INTO report_values (dimension, id, value)
SELECT n.dimension,
       coalesce(m.top, 0) + row_number() OVER (PARTITION BY n.dimension ORDER BY n.value),
       n.value
FROM (
    SELECT DISTINCT x.dimension, x.value FROM ({pairs}) AS x(dimension, value)
    WHERE x.value IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM report_values v
                      WHERE v.dimension = x.dimension AND v.value = x.value)
) AS n
LEFT JOIN (SELECT dimension, max(id) AS top FROM report_values GROUP BY dimension) AS m
       ON m.dimension = n.dimension
"""
_LEAD_PAIRS = (
    "SELECT x.* FROM (SELECT DISTINCT "  # noqa: S608
    + ", ".join(_LEAD_DIMENSIONS)
    + " FROM leads {where}) AS l CROSS JOIN LATERAL (VALUES "
    + ", ".join(f"('{name}', l.{name})" for name in _LEAD_DIMENSIONS)
    + ") AS x"
)
_ASSIGNMENT_PAIRS = (
    "SELECT x.* FROM (SELECT DISTINCT agent_id, queue FROM assignments {where}) AS s"
    " CROSS JOIN LATERAL (VALUES ('agent', s.agent_id), ('queue', s.queue)) AS x"
)


def _code_joins(alias: str, names: Sequence[str], columns: Mapping[str, str]) -> str:
    return " ".join(
        f"LEFT JOIN report_values {alias}_{name} ON {alias}_{name}.dimension = '{name}'"
        f" AND {alias}_{name}.value = {columns[name]}"
        for name in names
    )


def _case(expression: str, values: Sequence[str]) -> str:
    whens = " ".join(f"WHEN '{value}' THEN {n}" for n, value in enumerate(values, start=1))
    return f"CASE {expression} {whens} END"


# Per lead: what the funnel counts. A closing disposition (converted, not interested, invalid
# number, do not call) can only be a lead's last; otherwise a closed lead closed with its last
# no-answer or SLA expiry when it closed at that moment (the same instant is written to both),
# was blocked as do-not-call, or hit the allocator's attempts limit.
_LEAD_FACTS = (
    """
WITH changed AS MATERIALIZED (SELECT id FROM leads {lead_filter}),
work AS (
    SELECT s.lead_id,
           count(*) AS assignments,
           count(*) FILTER (WHERE s.status <> 'revoked') AS attempts,
           count(*) FILTER (WHERE s.status = 'expired') AS expired,
           count(*) FILTER (WHERE s.status = 'completed'
                            AND s.close_reason IN ('no_answer', 'callback')) AS recycles,
           min(s.assigned_at) AS first_assigned,
           min(s.first_contact_at) AS first_contact,
           max(s.close_reason) FILTER (WHERE s.status = 'completed' AND s.close_reason IN
               ('converted', 'not_interested', 'invalid_number', 'do_not_call')) AS terminal,
           max(s.closed_at) FILTER (WHERE s.status = 'completed'
                                    AND s.close_reason = 'no_answer') AS last_no_answer,
           max(s.closed_at) FILTER (WHERE s.status = 'expired') AS last_expired
    FROM assignments s
    {assignment_filter}
    GROUP BY s.lead_id
),
facts AS (
    SELECT l.id, l.created_at, """  # noqa: S608
    + ", ".join(f"v_{name}.id AS {name}" for name in _LEAD_DIMENSIONS)
    + """,
           l.state IN ('converted', 'closed', 'do_not_call') AS final,
           l.xmin::text::bigint AS lead_xmin, l.event_count, l.queued_at IS NOT NULL AS queued,
           coalesce(w.assignments, 0) AS assignments, coalesce(w.attempts, 0) AS attempts,
           coalesce(w.expired, 0) AS expired, coalesce(w.recycles, 0) AS recycles,
           """
    + _bucket_sql("extract(epoch FROM w.first_assigned - l.created_at)")
    + """ AS assign_bucket,
           """
    + _bucket_sql("extract(epoch FROM w.first_contact - l.created_at)")
    + """ AS contact_bucket,
           CASE
               WHEN l.state NOT IN ('converted', 'closed', 'do_not_call') THEN NULL
               WHEN w.terminal IS NOT NULL THEN w.terminal
               WHEN l.state = 'do_not_call' THEN 'blocked_dnc'
               WHEN l.closed_at = w.last_no_answer THEN 'no_answer'
               WHEN l.closed_at = w.last_expired THEN 'sla_expired'
               ELSE 'max_attempts'
           END AS outcome
    FROM leads l
    {lead_join}
    LEFT JOIN work w ON w.lead_id = l.id
    """
    + _code_joins("v", _LEAD_DIMENSIONS, {n: f"l.{n}" for n in _LEAD_DIMENSIONS})
    + """
),
leads_done AS (
    INSERT INTO report_leads AS r (
        lead_id, created_at, """
    + ", ".join(_LEAD_DIMENSIONS)
    + """, events, queued,
        assignments, attempts, expired, recycles, assign_bucket, contact_bucket, outcome)
    SELECT id, created_at, """
    + ", ".join(_LEAD_DIMENSIONS)
    + """, event_count, queued,
           assignments, attempts, expired,
           recycles - (outcome IS NOT DISTINCT FROM 'no_answer')::int, assign_bucket,
           contact_bucket, """
    + _case("outcome", OUTCOMES)
    + """
    FROM facts
    {upsert_leads}
    RETURNING 1
),
open_done AS (
    INSERT INTO report_open_leads (lead_id, lead_xmin)
    SELECT id, lead_xmin FROM facts WHERE NOT final
    {upsert_open}
),
closed_done AS (
    DELETE FROM report_open_leads WHERE lead_id IN (SELECT id FROM facts WHERE final)
),
assignments_done AS (
    INSERT INTO report_assignments AS r (
        assignment_id, lead_id, assigned_at, agent, queue, """
    + ", ".join(n for n in _LEAD_DIMENSIONS if n != "queue")
    + """,
        open, attempt, outcome, contact_bucket)
    SELECT s.id, s.lead_id, s.assigned_at, a_agent.id, a_queue.id, """
    + ", ".join(f"f.{n}" for n in _LEAD_DIMENSIONS if n != "queue")
    + """,
           s.status = 'open', s.status <> 'revoked',
           """
    + _case(
        """CASE s.status
               WHEN 'completed' THEN s.close_reason
               WHEN 'expired' THEN 'sla_expired'
               WHEN 'revoked' THEN CASE WHEN s.close_reason LIKE 'rejected:%%'
                                        THEN 'handed_back' ELSE 'revoked' END
           END""",
        ASSIGNMENT_OUTCOMES,
    )
    + """,
           """
    + _bucket_sql("extract(epoch FROM s.first_contact_at - s.assigned_at)")
    + """
    FROM assignments s
    JOIN facts f ON f.id = s.lead_id
    """
    + _code_joins("a", ("agent", "queue"), {"agent": "s.agent_id", "queue": "s.queue"})
    + """
    {upsert_assignments}
    RETURNING 1
)
SELECT (SELECT count(*) FROM leads_done), (SELECT count(*) FROM assignments_done),
       (SELECT max(id) FROM changed)
"""
)


def _upsert(key: str, columns: Sequence[str]) -> str:
    sets = ", ".join(f"{column} = EXCLUDED.{column}" for column in columns)
    return f"ON CONFLICT ({key}) DO UPDATE SET {sets}"


_UPSERT_LEADS = _upsert(
    "lead_id",
    [
        *_LEAD_DIMENSIONS, "events", "queued", "assignments", "attempts", "expired", "recycles",
        "assign_bucket", "contact_bucket", "outcome",
    ],
)  # fmt: skip
_UPSERT_OPEN = _upsert("lead_id", ["lead_xmin"])
_UPSERT_ASSIGNMENTS = _upsert(
    "assignment_id",
    [
        "agent", "queue", *(n for n in _LEAD_DIMENSIONS if n != "queue"), "open", "attempt",
        "outcome", "contact_bucket",
    ],
)  # fmt: skip
_SAVE_STATE = """
INSERT INTO report_refresh (id, refreshed_at, cutoff, max_lead_id, leads_refreshed, seconds)
VALUES (1, now(), %(cutoff)s, %(max_lead_id)s, %(leads)s, %(seconds)s)
ON CONFLICT (id) DO UPDATE SET
    refreshed_at = EXCLUDED.refreshed_at, cutoff = EXCLUDED.cutoff,
    max_lead_id = EXCLUDED.max_lead_id, leads_refreshed = EXCLUDED.leads_refreshed,
    seconds = EXCLUDED.seconds
RETURNING refreshed_at
"""


@dataclass(frozen=True)
class Refresh:
    """What one refresh did; `as_of` is the moment the rollup now reflects."""

    as_of: datetime
    leads: int
    assignments: int
    seconds: float
    full: bool


def refresh(conn: psycopg.Connection[Any]) -> Refresh:
    """Bring the rollup up to date; one refresh at a time (others wait, then find little to do).

    `conn` must not be in a transaction; it is left out of one. The first refresh of a database
    builds the rollup from every lead (minutes for millions of leads); later ones recompute only
    new leads and open leads that changed.
    """
    _idle(conn)
    started = time.perf_counter()
    with conn.transaction():
        cutoff = _one(conn, _CUTOFF)[0]
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        # LOCK takes no snapshot: the snapshot comes after the lock, so a refresh that waited
        # for another sees everything that one saw.
        conn.execute(_LOCK_REFRESH)
        state = conn.execute(_STATE).fetchone()
        full = state is None
        leads = assignments = 0
        highest = 0
        ids: list[int] | None = None
        if state is None:
            conn.execute("TRUNCATE report_leads, report_open_leads, report_assignments")
            conn.execute("SET LOCAL work_mem = '256MB'")
        else:
            highest = state[2]
            params = {"max_lead_id": state[2], "cutoff": state[1]}
            ids = [row[0] for row in conn.execute(_CHANGED, params)]
        if ids is None or ids:
            leads, assignments, top = _store_facts(conn, ids)
            highest = max(highest, top or 0)
        seconds = time.perf_counter() - started
        (as_of,) = _one(
            conn,
            _SAVE_STATE,
            {
                "cutoff": cutoff,
                "max_lead_id": highest,
                "leads": leads,
                "seconds": round(seconds, 3),
            },
        )
    return Refresh(as_of, int(leads), int(assignments), round(seconds, 3), full)


def _store_facts(conn: psycopg.Connection[Any], ids: list[int] | None) -> tuple[int, int, int]:
    """Compute and write the rows of these leads (all leads: None); returns rows written and
    the highest lead id."""
    if ids is None:
        parts = {
            "lead_filter": "",
            "assignment_filter": "",
            "lead_join": "",
            "upsert_leads": "",
            "upsert_open": "",
            "upsert_assignments": "",
        }
        params: dict[str, Any] = {}
        lead_where = assignment_where = ""
    else:
        parts = {
            "lead_filter": "WHERE id = ANY(%(ids)s)",
            "assignment_filter": "WHERE s.lead_id = ANY(%(ids)s)",
            "lead_join": "JOIN changed c ON c.id = l.id",
            "upsert_leads": _UPSERT_LEADS,
            "upsert_open": _UPSERT_OPEN,
            "upsert_assignments": _UPSERT_ASSIGNMENTS,
        }
        params = {"ids": ids}
        lead_where = "WHERE id = ANY(%(ids)s)"
        assignment_where = "WHERE lead_id = ANY(%(ids)s)"
    for pairs in (
        _LEAD_PAIRS.format(where=lead_where),
        _ASSIGNMENT_PAIRS.format(where=assignment_where),
    ):
        conn.execute(_NEW_VALUES.format(pairs=pairs), params)
    leads, assignments, highest = _one(conn, _LEAD_FACTS.format(**parts), params)
    if ids is None:
        # Fresh statistics, or the first incremental refresh plans for empty tables.
        conn.execute("ANALYZE report_leads, report_open_leads, report_assignments, report_values")
    return int(leads), int(assignments), int(highest or 0)


def _idle(conn: psycopg.Connection[Any]) -> None:
    """Reports set their own isolation level, so they need a connection between transactions."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("reports need a connection that is not in a transaction")


def _one(
    conn: psycopg.Connection[Any], query: str, params: Mapping[str, Any] | None = None
) -> tuple[Any, ...]:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return tuple(row)


# --- reading the rollup -----------------------------------------------------------------------

_REJECTS = """
SELECT 'staging' AS intake, coalesce(x.source, %(staging_source)s) AS source, x.campaign,
       r.code, count(*)
FROM staging.extract_rejects r JOIN staging.extracts x ON x.id = r.extract_id
WHERE r.created_at >= %(start)s AND r.created_at < %(end)s
GROUP BY 1, 2, 3, 4
UNION ALL
SELECT 'stock', p.source, NULL, c.key, sum(c.value::bigint)
FROM poller_runs p CROSS JOIN LATERAL jsonb_each_text(p.rejects) AS c
WHERE p.started_at >= %(start)s AND p.started_at < %(end)s
GROUP BY 1, 2, 3, 4
"""


@dataclass
class Report:
    """A finished report: what `/api/v1/reports/funnel` answers (see `as_dict`)."""

    kind: Literal["funnel", "agents"]
    period: Period
    by: tuple[str, ...]
    as_of: datetime
    columns: tuple[Column, ...]
    rows: list[dict[str, Any]]
    total: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "report": self.kind,
            "from": self.period.start.isoformat(),
            "to": self.period.end.isoformat(),
            "by": list(self.by),
            "as_of": self.as_of.isoformat(),
            "columns": [{"name": c.name, "label": c.label, "kind": c.kind} for c in self.columns],
            "rows": self.rows,
            "total": self.total,
        }


def funnel(
    conn: psycopg.Connection[Any],
    period: Period,
    by: Sequence[str],
    *,
    staging_source: str = "staging",
    fresh: bool = True,
) -> Report:
    """The report for `period` broken down by `by` (validated names, see `parse_by`): the lead
    funnel, or with `agent` among them the agents' work. Refreshes the rollup first unless
    `fresh` is False; reads in one snapshot. `conn` must not be in a transaction."""
    names = tuple(by)
    for name in names:
        if name not in DIMENSIONS:  # callers validate; this keeps SQL to the allow-list
            raise ReportError(f"unknown dimension {name!r}")
    _idle(conn)
    as_of = refresh(conn).as_of if fresh else _as_of(conn)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute("SET LOCAL work_mem = '64MB'")
        values = _dictionary(conn)
        if "agent" in names:
            return _agents(conn, period, names, as_of, values)
        return _funnel(conn, period, names, as_of, values, staging_source)


def _as_of(conn: psycopg.Connection[Any]) -> datetime:
    with conn.transaction():
        row = conn.execute("SELECT refreshed_at FROM report_refresh WHERE id = 1").fetchone()
    if row is None:
        raise ReportError("the reports' rollup was never refreshed")
    return row[0]  # type: ignore[no-any-return]


Dictionary = Mapping[tuple[str, int], str]


def _dictionary(conn: psycopg.Connection[Any]) -> dict[tuple[str, int], str]:
    """(dimension, code) -> value."""
    rows = conn.execute("SELECT dimension, id, value FROM report_values")
    return {(str(d), int(i)): str(v) for d, i, v in rows}


def _decode(
    values: Dictionary, columns: Sequence[str], codes: Sequence[int | None]
) -> tuple[str | None, ...]:
    return tuple(
        None if code is None else values[(column, code)]
        for column, code in zip(columns, codes, strict=True)
    )


@dataclass
class _Group:
    """The sums of a group's aggregates and its histogram of speed buckets."""

    sums: dict[str, int]
    histogram: dict[int, int]


def _grouped(
    conn: psycopg.Connection[Any],
    table: str,
    time_column: str,
    columns: Sequence[str],
    bucket: str,
    aggregates: Sequence[tuple[str, str]],
    period: Period,
) -> tuple[dict[tuple[int | None, ...], _Group], _Group]:
    """The period's rows grouped by the dimension columns (their codes), and the total: the
    aggregates summed, and each group's histogram of `bucket` (rows per bucket). One pass over
    the rows, in one statement; the total comes from the same pass."""
    keys = [sql.Identifier(column) for column in columns]
    names = [name for name, _ in aggregates]
    # One pass over the period's rows (g), kept for the three reads of it: the groups with
    # their buckets folded into two arrays, and the total with the buckets of all rows.
    query = sql.SQL("""
WITH g AS MATERIALIZED (
    SELECT {keys}{comma} {bucket} AS b, count(*) AS n{aggregates}
    FROM {table} WHERE {time} >= %(start)s AND {time} < %(end)s
    GROUP BY {keys}{comma} {bucket}
), total_histogram AS (
    SELECT b, sum(n)::bigint AS n FROM g WHERE b IS NOT NULL GROUP BY b
)
SELECT false, {keys}{comma} sum(n)::bigint, {sums}
       array_agg(b ORDER BY b) FILTER (WHERE b IS NOT NULL),
       array_agg(n ORDER BY b) FILTER (WHERE b IS NOT NULL)
FROM g {group}
UNION ALL
SELECT true, {nulls}{comma} coalesce(sum(n), 0)::bigint, {sums}
       (SELECT array_agg(b ORDER BY b) FROM total_histogram),
       (SELECT array_agg(n ORDER BY b) FROM total_histogram)
FROM g
""").format(
        keys=sql.SQL(", ").join(keys),
        comma=sql.SQL(",") if keys else sql.SQL(""),
        bucket=sql.Identifier(bucket),
        aggregates=sql.SQL("").join(
            sql.SQL(", " + expression + " AS {}").format(sql.Identifier(name))
            for name, expression in aggregates
        ),
        table=sql.Identifier(table),
        time=sql.Identifier(time_column),
        sums=sql.SQL("").join(
            sql.SQL("coalesce(sum({}), 0)::bigint, ").format(sql.Identifier(name)) for name in names
        ),
        group=sql.SQL("GROUP BY {}").format(sql.SQL(", ").join(keys)) if keys else sql.SQL(""),
        nulls=sql.SQL(", ").join(sql.SQL("NULL") for _ in keys),
    )
    groups: dict[tuple[int | None, ...], _Group] = {}
    total = _Group(dict.fromkeys(names, 0), {})
    for record in conn.execute(query, {"start": period.start, "end": period.end}):
        # (total?, codes..., rows, sums..., buckets, counts); `rows` makes the total's
        # select an aggregate (one row) even without sums.
        is_total, codes = record[0], tuple(record[1 : 1 + len(keys)])
        sums = dict(zip(names, (int(v) for v in record[2 + len(keys) : -2]), strict=True))
        group = _Group(sums, dict(zip(record[-2] or (), record[-1] or (), strict=True)))
        if is_total:
            total = group
        else:
            groups[codes] = group
    return groups, total


def _outcome_counts(prefix: str, values: Sequence[str]) -> list[tuple[str, str]]:
    return [
        (f"{prefix}{value}", f"count(*) FILTER (WHERE outcome = {n})")
        for n, value in enumerate(values, start=1)
    ]


_LEAD_AGGREGATES: Final = (
    ("leads", "count(*)"),
    ("events", "sum(events)"),
    ("queued", "count(*) FILTER (WHERE queued)"),
    ("assigned", "count(*) FILTER (WHERE assignments > 0)"),
    ("contacted", "count(*) FILTER (WHERE contact_bucket IS NOT NULL)"),
    ("closed", "count(*) FILTER (WHERE outcome IS NOT NULL)"),
    ("recycled", "count(*) FILTER (WHERE recycles > 0)"),
    ("recycles", "sum(recycles)"),
    ("expired", "count(*) FILTER (WHERE expired > 0)"),
    ("expiries", "sum(expired)"),
    ("attempts", "sum(attempts)"),
    *_outcome_counts("closed_", OUTCOMES),
)


def _funnel(
    conn: psycopg.Connection[Any],
    period: Period,
    names: tuple[str, ...],
    as_of: datetime,
    values: Dictionary,
    staging_source: str,
) -> Report:
    columns = [DIMENSIONS[name] for name in names]
    # One pass for the counts and the speed to contact, one for the speed to assignment.
    fields = [name for name, _ in _LEAD_AGGREGATES]
    counted, counted_total = _grouped(
        conn, "report_leads", "created_at", columns, "contact_bucket", _LEAD_AGGREGATES, period
    )
    assigned, assigned_total = _grouped(
        conn, "report_leads", "created_at", columns, "assign_bucket", (), period
    )
    counts = {_decode(values, columns, codes): group.sums for codes, group in counted.items()}
    contact = {_decode(values, columns, codes): g.histogram for codes, g in counted.items()}
    assign = {_decode(values, columns, codes): g.histogram for codes, g in assigned.items()}
    rejected: dict[tuple[Any, ...], dict[str, int]] = {}
    params = {"start": period.start, "end": period.end, "staging_source": staging_source}
    for intake, source, campaign, code, count in conn.execute(_REJECTS, params):
        # A reject has a value for these dimensions only (it never became a lead).
        where = {"channel": intake, "source": source, "campaign": campaign}
        key = tuple(where.get(name) for name in names)
        codes = rejected.setdefault(key, {})
        codes[code] = codes.get(code, 0) + int(count)

    empty = dict.fromkeys(fields, 0)
    rows = []
    for key in sorted(set(counts) | set(rejected), key=_sort_key):
        figures = _funnel_figures(
            counts.get(key, empty), contact.get(key, {}), assign.get(key, {}), rejected.get(key, {})
        )
        rows.append({**dict(zip(names, key, strict=True)), **figures})
    total = _funnel_figures(
        counted_total.sums,
        counted_total.histogram,
        assigned_total.histogram,
        _merge(rejected.values()),
    )
    return Report(
        "funnel", period, names, as_of, _dimension_columns(names) + FUNNEL_COLUMNS, rows, total
    )


def _merge(histograms: Iterable[Mapping[Any, int]]) -> dict[Any, int]:
    merged: dict[Any, int] = {}
    for histogram in histograms:
        for key, n in histogram.items():
            merged[key] = merged.get(key, 0) + n
    return merged


def _funnel_figures(
    c: Mapping[str, int],
    contact: Mapping[int, int],
    assign: Mapping[int, int],
    rejected: Mapping[str, int],
) -> dict[str, Any]:
    """A row's columns, in order, from its counts: steps, rates, speed, outcomes, rejects."""
    rejects = {code: int(rejected.get(code, 0)) for code in REJECT_CODES}
    rejected_total = sum(rejects.values())
    events, leads = c["events"], c["leads"]
    converted = c["closed_converted"]
    contact_p = percentiles(contact, (0.5, 0.9))
    assign_p = percentiles(assign, (0.5, 0.9))
    figures: dict[str, Any] = {
        "events": events,
        "merged": events - leads,
        "rejected": rejected_total,
        "leads": leads,
        "queued": c["queued"],
        "assigned": c["assigned"],
        "contacted": c["contacted"],
        "converted": converted,
        "closed": c["closed"],
        "open": leads - c["closed"],
        "recycled": c["recycled"],
        "recycles": c["recycles"],
        "expired": c["expired"],
        "expiries": c["expiries"],
        "attempts": c["attempts"],
        "queued_rate": _rate(c["queued"], leads),
        "assigned_rate": _rate(c["assigned"], c["queued"]),
        "contact_rate": _rate(c["contacted"], c["assigned"]),
        "conversion_rate": _rate(converted, c["contacted"]),
        "lead_conversion_rate": _rate(converted, leads),
        "recycle_rate": _rate(c["recycled"], c["assigned"]),
        "expiry_rate": _rate(c["expired"], c["assigned"]),
        "attempts_per_lead": _rate(c["attempts"], c["assigned"]),
        "merge_rate": _rate(events - leads, events),
        "reject_rate": _rate(rejected_total, events + rejected_total),
        "contact_p50_s": _seconds(contact_p[0]),
        "contact_p90_s": _seconds(contact_p[1]),
        "assign_p50_s": _seconds(assign_p[0]),
        "assign_p90_s": _seconds(assign_p[1]),
    }
    figures.update({f"closed_{o}": c[f"closed_{o}"] for o in OUTCOMES})
    figures.update({f"rejected_{code}": n for code, n in rejects.items()})
    return figures


def _rate(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _sort_key(key: tuple[Any, ...]) -> tuple[tuple[bool, str], ...]:
    """Dimension values in order, the unknown (None) last."""
    return tuple((value is None, "" if value is None else str(value)) for value in key)


def _dimension_columns(names: Iterable[str]) -> tuple[Column, ...]:
    return tuple(Column(name, name.replace("_", " "), "dimension") for name in names)


# --- agents -----------------------------------------------------------------------------------

_AGENT_AGGREGATES: Final = (
    ("assignments", "count(*)"),
    ("attempts", "count(*) FILTER (WHERE attempt)"),
    ("contacted", "count(*) FILTER (WHERE contact_bucket IS NOT NULL)"),
    ("open", "count(*) FILTER (WHERE open)"),
    *_outcome_counts("ended_", ASSIGNMENT_OUTCOMES),
)
# Each agent's available time in the period (up to now): from the status in force at its start
# and every change within it (agent_status_log, written by a trigger on agents).
_AVAILABLE_HOURS = """
WITH changes AS (
    SELECT a.id AS agent_id, %(start)s::timestamptz AS at, b.status
    FROM agents a
    CROSS JOIN LATERAL (
        SELECT status FROM agent_status_log l
        WHERE l.agent_id = a.id AND l.at < %(start)s ORDER BY l.at DESC, l.id DESC LIMIT 1
    ) AS b
    UNION ALL
    SELECT agent_id, at, status FROM agent_status_log
    WHERE at >= %(start)s AND at < %(stop)s
), spans AS (
    SELECT agent_id, status, at,
           lead(at, 1, %(stop)s::timestamptz) OVER (PARTITION BY agent_id ORDER BY at) AS until
    FROM changes
)
SELECT agent_id, sum(extract(epoch FROM until - at)) / 3600.0
FROM spans WHERE status = 'available' AND until > at
GROUP BY agent_id
"""


def _agents(
    conn: psycopg.Connection[Any],
    period: Period,
    names: tuple[str, ...],
    as_of: datetime,
    values: Dictionary,
) -> Report:
    columns = [DIMENSIONS[name] for name in names]
    stop = min(period.end, max(as_of, period.start))
    hours = {
        str(agent): float(value)
        for agent, value in conn.execute(
            _AVAILABLE_HOURS, {"start": period.start, "stop": stop}
        ).fetchall()
    }
    groups, grand = _grouped(
        conn,
        "report_assignments",
        "assigned_at",
        columns,
        "contact_bucket",
        _AGENT_AGGREGATES,
        period,
    )
    counts = {_decode(values, columns, codes): group.sums for codes, group in groups.items()}
    contact = {_decode(values, columns, codes): g.histogram for codes, g in groups.items()}
    agent_at = names.index("agent")
    if names == ("agent",):
        # Agents who were available and got nothing belong in the picture too.
        for agent, available in hours.items():
            if available > 0:
                counts.setdefault((agent,), dict.fromkeys(grand.sums, 0))
    rows = [
        {
            **dict(zip(names, key, strict=True)),
            **_agent_figures(counts[key], contact.get(key, {}), hours.get(str(key[agent_at]), 0.0)),
        }
        for key in sorted(counts, key=_sort_key)
    ]
    total = _agent_figures(grand.sums, grand.histogram, sum(hours.values()))
    return Report(
        "agents", period, names, as_of, _dimension_columns(names) + AGENT_COLUMNS, rows, total
    )


def _agent_figures(
    c: Mapping[str, int], contact: Mapping[int, int], hours: float
) -> dict[str, Any]:
    converted = c["ended_converted"]
    speed = percentiles(contact, (0.5, 0.9))
    figures: dict[str, Any] = {
        "assignments": c["assignments"],
        "attempts": c["attempts"],
        "contacted": c["contacted"],
        "converted": converted,
        "open": c["open"],
        "available_hours": round(hours, 3),
        "conversions_per_hour": _rate(converted, hours) if hours > 0 else None,
        "contact_rate": _rate(c["contacted"], c["attempts"]),
        "conversion_rate": _rate(converted, c["contacted"]),
        "contact_p50_s": _seconds(speed[0]),
        "contact_p90_s": _seconds(speed[1]),
    }
    figures.update({f"ended_{o}": c[f"ended_{o}"] for o in ASSIGNMENT_OUTCOMES})
    return figures


# --- CSV --------------------------------------------------------------------------------------

#: Excel reads a CSV as UTF-8 (and shows Chinese) only with a byte order mark.
BOM: Final = "\ufeff"


def to_csv(report: Report) -> str:
    """The report's rows and a last `total` row, every column, with a BOM, CRLF line ends."""
    out = io.StringIO()
    out.write(BOM)
    names = [column.name for column in report.columns]
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(names)
    for row in report.rows:
        writer.writerow([_cell(row.get(name)) for name in names])
    dims = set(report.by)
    writer.writerow(
        [
            "total" if name == report.by[0] else "" if name in dims else _cell(report.total[name])
            for name in names
        ]
    )
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def csv_filename(report: Report) -> str:
    """`funnel-source-2026-10-25-2026-11-24.csv`: ASCII only, safe in a header."""
    start, end = report.period.start.date().isoformat(), report.period.end.date().isoformat()
    return f"{report.kind}-{'-'.join(report.by)}-{start}-{end}.csv"
