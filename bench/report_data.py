"""The history of `leadflow bench report`: months of a call center's work, made in SQL.

PostgreSQL generates it itself (`generate_series`, hashes of the lead number: no random state,
so every run gets the same history) into a freshly migrated database, straight into the real
tables. For N events over D days ending at `end`:

- leads, one a customer, created evenly over the days (ids in time order, as intake makes
  them), by intake (realtime 55%, stock 20%, staging 15%, http 10%) and a source of that
  intake (12 sources), the product's channel, an event type, a campaign (45% none, one with a
  Chinese name), five business lines with four segments each, a queue per line (its two best
  segments in a priority queue of their own);
- events: each lead's first event plus merged ones (0 to 8 more, 0.4 on average, a sixth from
  another source) received while the lead was open, so the lead's `event_count` is right; the
  leads are cut so that the events number exactly N;
- 2% of the leads are blocked at intake (do not call); every other lead is queued and worked
  in up to five assignments to agents skilled for its line (1,000 agents): each assignment
  ends in a disposition (no answer 34%, callback 8%, converted 5%, not interested 34%, invalid
  number 9%, do not call 2%), an SLA expiry (6%) or a hand-back (2%), and the lead is recycled
  as the product does it — no answer and expiry count an attempt and close the lead at the
  third; callbacks and hand-backs come back without one — with the product's delays (a
  few minutes to first assignment, hours at night; retries after 30 minutes, 2 hours, a day;
  callbacks within two days). Whatever would happen after `end` has not happened: leads of
  the last days are waiting, assigned or in progress;
- agents' status history (an 8-hour shift with a break on 92% of days), staging extracts with
  their rejected rows (1% of staging events), poller runs with their rejects by code.

Foreign keys are checked by construction (the load runs with `session_replication_role =
replica`, as `pg_restore` loads data), secondary indexes are built after the data, and the
audit trail (`lead_transitions`) is not generated: the report never reads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import psycopg

#: Assignments a lead gets at most; the last one always ends it.
MAX_STEPS = 5
AGENTS = 1000
LINES = (
    "personal_credit_loan",
    "car_loan",
    "enterprise_loan",
    "wealth_management",
    "financial_leasing",
)
_LINE_SHARE = (0.40, 0.20, 0.15, 0.15, 0.10)
_SEGMENTS = {
    "personal_credit_loan": ("pending_payment_30d", "new_signup", "ad_click", "cash_evening"),
    "car_loan": ("car_pending_7d", "test_drive", "new_signup", "ad_click"),
    "enterprise_loan": ("key_account", "enterprise_form", "new_signup", "ad_click"),
    "wealth_management": ("silent_high_value", "wealth_returning", "new_signup", "ad_click"),
    "financial_leasing": ("lease_quote", "equipment_form", "new_signup", "ad_click"),
}
_SEGMENT_SHARE = (0.25, 0.25, 0.30, 0.20)
_PRIORITY = (90, 80, 75, 60)
_INTAKES = ("realtime", "stock", "staging", "http")
_INTAKE_SHARE = (0.55, 0.20, 0.15, 0.10)
_SOURCES = {
    "realtime": (
        ("loan-app", 0.30), ("car-app", 0.15), ("wealth-app", 0.10), ("mini-program", 0.15),
        ("ad-platform-a", 0.15), ("ad-platform-b", 0.10), ("partner-x", 0.05),
    ),
    "stock": (("dwh-silent-high-value", 0.5), ("dwh-churn-risk", 0.5)),
    "staging": (("staging", 1.0),),
    "http": (("crm-web", 0.6), ("partner-api", 0.4)),
}  # fmt: skip
_CHANNELS = {
    "realtime": (("app", 0.5), ("web", 0.3), ("ad", 0.2)),
    "http": (("web", 0.6), ("partner", 0.4)),
}
_EVENT_TYPES = (
    ("signup", 0.3), ("order_pending_payment", 0.25), ("browse", 0.2), ("ad_click", 0.15),
    ("form_submit", 0.1),
)  # fmt: skip
_CAMPAIGNS = (*(f"2026-q{q}-{n:02d}" for q in (3, 4) for n in range(1, 12)), "双十一-2026")
#: Outcome codes of an assignment, in the order of their cumulative shares below.
OUTCOMES = (
    "no_answer", "callback", "converted", "not_interested", "invalid_number", "do_not_call",
    "expired", "revoked",
)  # fmt: skip
_OUTCOME_SHARE = (0.34, 0.08, 0.05, 0.34, 0.09, 0.02, 0.06, 0.02)
_SLA_SECONDS = 300
_MAX_ATTEMPTS = 3
_MERGE_Q = 0.2857  # geometric: 0.4 merged events per lead on average
_DNC_AT_INTAKE = 0.02


def _text_array(values: Any) -> str:
    return "ARRAY[" + ", ".join("'" + str(v).replace("'", "''") + "'" for v in values) + "]"


def _cumulative(shares: Any) -> str:
    """Lower bounds of each share's bucket, for width_bucket (1-based bucket = the index)."""
    bounds, total = [], 0.0
    for share in shares:
        bounds.append(total)
        total += share
    return "ARRAY[" + ", ".join(f"{b:.6f}" for b in bounds) + "]::float8[]"


def _pick(values: Any, shares: Any, draw: str) -> str:
    return f"({_text_array(values)})[width_bucket({draw}, {_cumulative(shares)})]"


def _by_intake(table: dict[str, Any], draw: str, default: str = "NULL") -> str:
    cases = " ".join(
        f"WHEN '{intake}' THEN {_pick([v for v, _ in pairs], [s for _, s in pairs], draw)}"
        for intake, pairs in table.items()
    )
    return f"CASE intake {cases} ELSE {default} END"


_FUNCTIONS = """
CREATE SCHEMA bench_gen;
CREATE FUNCTION bench_gen.u(i bigint, k int) RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (hashint8extended(i, k) & 4503599627370495)::float8 / 4503599627370496 $$;
CREATE FUNCTION bench_gen.e(i bigint, k int) RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT -ln(1 - bench_gen.u(i, k)) $$;
"""

# How many merged events each lead gets; leads are kept until the events number exactly N.
_COUNTS = """
CREATE UNLOGGED TABLE bench_gen.counts AS
SELECT i, extra, first_event FROM (
    SELECT i, extra, sum(1 + extra) OVER (ORDER BY i) - (1 + extra) AS first_event
    FROM (SELECT i, least(floor(ln(1 - bench_gen.u(i, 1)) / ln({q}))::int, 8) AS extra
          FROM generate_series(1, %(estimate)s::bigint) AS i) AS raw
) AS counted
WHERE first_event < %(events)s
"""


def _steps_sql() -> str:
    """Outcome draws of each step; the last one is settled in `_chain_sql`."""
    bounds = _cumulative(_OUTCOME_SHARE)
    names = [f"o{j}" for j in range(1, MAX_STEPS)] + ["d_last"]
    return ", ".join(
        f"width_bucket(bench_gen.u(i, {10 + j}), {bounds}) AS {name}"
        for j, name in enumerate(names, start=1)
    )


def _chain_sql() -> tuple[str, str]:
    """Attempts after each step. The last step always ends the lead: a recycling draw there
    becomes `not_interested` unless it uses up the attempts."""
    n = MAX_STEPS
    parts = []
    for j in range(1, n):
        counted = " + ".join(f"(o{m} IN (1, 7))::int" for m in range(1, j + 1))
        parts.append(f"{counted} AS a{j}")
    last_a = f"a{n - 1}" if n > 1 else "0"
    exhausts = f"d_last IN (1, 7) AND {last_a} + 1 >= {_MAX_ATTEMPTS}"
    return ", ".join(parts), (
        f"CASE WHEN d_last IN (3, 4, 5, 6) OR ({exhausts}) THEN d_last ELSE 4 END AS o{n}, "
        f"{last_a} + ({exhausts})::int AS a{n}"
    )


def _layer(j: int) -> str:
    """Times of step j: wait before it (w), contact after assignment (c), close (d)."""
    if j == 1:
        wait = (
            "5 + 150 * bench_gen.e(i, 21)"
            " + (bench_gen.u(i, 22) < 0.08)::int * 3600 * (1 + 10 * bench_gen.u(i, 23))"
        )
    else:
        p = j - 1
        wait = (
            f"CASE o{p} WHEN 1 THEN (CASE a{p} WHEN 1 THEN 1800 WHEN 2 THEN 7200 ELSE 86400 END)"
            f" + 5 + 60 * bench_gen.e(i, {20 + 10 * j + 1})"
            f" WHEN 2 THEN 3600 + 172800 * bench_gen.u(i, {20 + 10 * j + 1})"
            f" WHEN 7 THEN 2 + 60 * bench_gen.e(i, {20 + 10 * j + 1})"
            f" ELSE 2 + 30 * bench_gen.e(i, {20 + 10 * j + 1}) END"
        )
    contact = f"CASE WHEN o{j} <= 6 THEN least(5 + 60 * bench_gen.e(i, {20 + 10 * j + 2}), 290) END"
    duration = (
        f"CASE o{j} WHEN 7 THEN {_SLA_SECONDS} WHEN 8 THEN 20 + 200 * bench_gen.u(i, {20 + 10 * j + 3})"
        f" ELSE least(5 + 60 * bench_gen.e(i, {20 + 10 * j + 2}), 290) + 30"
        f" + 400 * bench_gen.u(i, {20 + 10 * j + 3}) END"
    )
    prev_close = "0" if j == 1 else f"cl{j - 1}"
    return (
        f"{prev_close} + ({wait}) AS as{j}, {contact} AS ct{j},"
        f" {prev_close} + ({wait}) + ({duration}) AS cl{j}"
    )


def plan_sql() -> str:
    """The per-lead plan: dimensions, the chain, its cut at `end` and the lead's final state."""
    n = MAX_STEPS
    segments = "CASE line " + " ".join(
        f"WHEN '{line}' THEN {_pick(_SEGMENTS[line], _SEGMENT_SHARE, 'bench_gen.u(i, 6)')}"
        for line in LINES
    ) + " END"  # fmt: skip
    priority = f"({'ARRAY[' + ', '.join(map(str, _PRIORITY)) + ']'})[width_bucket(bench_gen.u(i, 6), {_cumulative(_SEGMENT_SHARE)})]"
    terminal = " ".join(
        f"WHEN o{j} IN (3, 4, 5, 6) OR (o{j} IN (1, 7) AND a{j} >= {_MAX_ATTEMPTS}) THEN {j}"
        for j in range(1, n)
    )
    attempts, last = _chain_sql()
    # Cumulative offsets: each layer reads the previous close, so they are nested selects;
    # OFFSET 0 keeps each one a level of its own (flattened, every reference to an earlier
    # column would recompute its whole expression).
    timed = "SELECT *, " + _layer(1) + " FROM chained"
    for j in range(2, n + 1):
        timed = f"SELECT *, {_layer(j)} FROM ({timed} OFFSET 0) AS t{j - 1}"
    started = " + ".join(f"(as{j} < age)::int" for j in range(1, n + 1))

    def arr(prefix: str) -> str:
        return "ARRAY[" + ", ".join(f"{prefix}{j}" for j in range(1, n + 1)) + "]"

    return f"""
INSERT INTO bench_gen.plan
WITH base AS (
    SELECT c.i, c.extra, c.first_event,
           %(start)s::timestamptz + (c.i - 1) * %(slot)s::interval
               + bench_gen.u(c.i, 2) * %(slot)s::interval AS created_at,
           {_pick(_INTAKES, _INTAKE_SHARE, "bench_gen.u(c.i, 3)")} AS intake,
           {_pick(LINES, _LINE_SHARE, "bench_gen.u(c.i, 5)")} AS line,
           bench_gen.u(c.i, 9) < {_DNC_AT_INTAKE} AS dnc
    FROM bench_gen.counts c
    WHERE c.i BETWEEN %(lo)s AND %(hi)s
), dims AS (
    SELECT *,
           {_by_intake(_SOURCES, "bench_gen.u(i, 4)")} AS source,
           {_by_intake(_CHANNELS, "bench_gen.u(i, 7)")} AS channel,
           {_pick([v for v, _ in _EVENT_TYPES], [s for _, s in _EVENT_TYPES], "bench_gen.u(i, 8)")}
               AS event_type,
           CASE WHEN bench_gen.u(i, 10) < 0.45 THEN NULL
                ELSE ({_text_array(_CAMPAIGNS)})[1 + floor(bench_gen.u(i, 10) * 1000)::int
                      %% {len(_CAMPAIGNS)}] END AS campaign,
           {segments} AS segment,
           {priority} AS priority,
           extract(epoch FROM %(end)s::timestamptz - created_at) AS age
    FROM base OFFSET 0
), stepped AS (
    SELECT *, {_steps_sql()} FROM dims OFFSET 0
), chained0 AS (
    SELECT *, {attempts} FROM stepped OFFSET 0
), chained AS (
    SELECT *, {last} FROM chained0 OFFSET 0
), timed AS (
    {timed} OFFSET 0
), cut AS (
    SELECT *,
           CASE WHEN dnc THEN 0 ELSE CASE {terminal} ELSE {n} END END AS k,
           {started} AS begun
    FROM timed
)
SELECT i, extra, first_event, created_at, intake, source, channel, event_type, campaign, line, segment,
       priority, dnc, age,
       CASE WHEN segment = ANY({_text_array(sorted({s for segs in _SEGMENTS.values() for s in segs[:2]}))})
            THEN line || '-priority' ELSE line END AS queue,
       k, least(k, begun) AS kk,
       ({arr("o")})[1:k]::smallint[] AS outcomes,
       ({arr("a")})[1:k]::smallint[] AS attempts,
       ({arr("as")})[1:k] AS assign_off,
       ({arr("ct")})[1:k] AS contact_after,
       ({arr("cl")})[1:k] AS close_off
FROM cut
"""


# The lead as the end of its plan leaves it: state, attempts, closed_at, next_action_at.
_LEADS = """
INSERT INTO leads (id, customer_id, business_line, segment, priority, state, queue, intake,
                   channel, source, event_type, product, campaign, realtime, matched_rules,
                   rules_version, attempts, event_count, first_event_at, last_event_at, queued_at,
                   next_action_at, closed_at, created_at, updated_at, attributes)
SELECT i, i, line, segment, priority, lead_state, CASE WHEN dnc THEN NULL ELSE queue END,
       intake, channel, source, event_type, line, campaign, intake = 'realtime', ARRAY['bench'],
       'bench', lead_attempts, 1 + extra, created_at, created_at,
       CASE WHEN dnc THEN NULL ELSE created_at END, NULL, lead_closed_at, created_at,
       coalesce(lead_closed_at, created_at), '{}'::jsonb
FROM (
    SELECT p.*,
           CASE
               WHEN dnc THEN 'do_not_call'
               WHEN kk = 0 THEN 'queued'
               WHEN close_off[kk] >= age THEN
                   CASE WHEN outcomes[kk] <= 6 AND assign_off[kk] + contact_after[kk] < age
                        THEN 'in_progress' ELSE 'assigned' END
               WHEN kk < k THEN 'queued'
               WHEN outcomes[k] = 3 THEN 'converted'
               WHEN outcomes[k] = 6 THEN 'do_not_call'
               ELSE 'closed'
           END AS lead_state,
           CASE
               WHEN kk = 0 THEN 0
               WHEN close_off[kk] >= age THEN coalesce(attempts[kk - 1], 0)
               ELSE attempts[kk]
           END AS lead_attempts,
           CASE
               WHEN dnc THEN created_at
               WHEN kk = k AND k > 0 AND close_off[k] < age
                   THEN created_at + close_off[k] * interval '1 second'
           END AS lead_closed_at
    FROM bench_gen.plan p
    WHERE p.i BETWEEN %(lo)s AND %(hi)s
) AS leads
"""

_CUSTOMERS = """
INSERT INTO customers (id, phone_e164, name, timezone, created_at, updated_at)
SELECT i, '+8613' || lpad(i::text, 9, '0'),
       (ARRAY['王','李','张','刘','陈','杨','黄','赵'])[1 + i %% 8]
           || (ARRAY['伟','芳','娜','敏','静','丽','强','磊','军','洋'])[1 + i %% 10],
       'Asia/Shanghai', created_at, created_at
FROM bench_gen.plan
WHERE i BETWEEN %(lo)s AND %(hi)s
"""

# The first event of each lead at its creation; merged ones while it was open (at most the
# dedup window), a sixth of them from another source of the same intake.
_LEAD_EVENTS = """
INSERT INTO lead_events (id, event_id, customer_id, lead_id, intake, source, event_type, channel,
                         occurred_at, received_at, payload, kafka_topic, kafka_partition,
                         kafka_offset)
SELECT e.n, 'bench-' || p.i || '-' || e.m, p.i, p.i, p.intake, e.source, p.event_type, p.channel,
       e.received_at - interval '3 seconds', e.received_at,
       jsonb_build_object(
           'schema_version', 1, 'event_id', 'bench-' || p.i || '-' || e.m,
           'occurred_at', e.received_at - interval '3 seconds', 'source', e.source,
           'event_type', p.event_type, 'channel', p.channel,
           'customer', jsonb_build_object('phone', '+8613' || lpad(p.i::text, 9, '0'),
                                          'name', '张伟', 'external_id', 'u-' || p.i),
           'product', p.line, 'campaign', p.campaign,
           'attributes', jsonb_build_object('amount', p.i %% 50000, 'tags', jsonb_build_array('bench'))
       ),
       CASE WHEN p.intake = 'realtime' THEN 'leads.raw' END,
       CASE WHEN p.intake = 'realtime' THEN (p.i %% 12)::int END,
       CASE WHEN p.intake = 'realtime' THEN e.n END
FROM bench_gen.plan p
CROSS JOIN LATERAL (
    SELECT p.first_event + m + 1 AS n, m,
           CASE WHEN m = 0 THEN p.created_at
                ELSE p.created_at + least(
                    CASE WHEN p.dnc THEN 0
                         WHEN p.kk = p.k AND p.k > 0 AND p.close_off[p.k] < p.age
                             THEN p.close_off[p.k] ELSE p.age END,
                    2592000) * bench_gen.u(p.i, 200 + m) * interval '1 second' END AS received_at,
           CASE WHEN m > 0 AND bench_gen.u(p.i, 300 + m) < 0.17
                THEN (%(other_sources)s::text[])[1 + floor(bench_gen.u(p.i, 400 + m)
                                                            * cardinality(%(other_sources)s::text[]))::int]
                ELSE p.source END AS source
    FROM generate_series(0, p.extra) AS m
) AS e
WHERE p.i BETWEEN %(lo)s AND %(hi)s
"""

_ASSIGNMENTS = """
INSERT INTO assignments (id, lead_id, agent_id, queue, strategy, reason, status, attempt,
                         assigned_at, sla_deadline, first_contact_at, closed_at, close_reason)
SELECT md5('bench-' || p.i || '-' || j)::uuid, p.i,
       'ag-' || lpad((array_position(%(lines)s::text[], p.line) - 1
                      + 5 * floor(bench_gen.u(p.i, 80 + j) * %(per_line)s))::text, 4, '0'),
       p.queue, 'round_robin', 'bench', s.status, coalesce(p.attempts[j - 1], 0) + 1,
       p.created_at + p.assign_off[j] * interval '1 second',
       p.created_at + (p.assign_off[j] + %(sla)s) * interval '1 second',
       CASE WHEN p.outcomes[j] <= 6 AND p.assign_off[j] + p.contact_after[j] < p.age
            THEN p.created_at + (p.assign_off[j] + p.contact_after[j]) * interval '1 second' END,
       CASE WHEN s.status <> 'open' THEN p.created_at + p.close_off[j] * interval '1 second' END,
       CASE s.status WHEN 'completed' THEN (%(outcomes)s::text[])[p.outcomes[j]]
                     WHEN 'expired' THEN 'first-contact SLA expired'
                     WHEN 'revoked' THEN 'rejected: customer speaks another language' END
FROM bench_gen.plan p
CROSS JOIN LATERAL generate_series(1, p.kk) AS j
CROSS JOIN LATERAL (
    SELECT CASE WHEN p.close_off[j] >= p.age THEN 'open'
                WHEN p.outcomes[j] = 7 THEN 'expired'
                WHEN p.outcomes[j] = 8 THEN 'revoked'
                ELSE 'completed' END AS status
) AS s
WHERE p.i BETWEEN %(lo)s AND %(hi)s
"""

_DISPOSITIONS = """
INSERT INTO dispositions (assignment_id, lead_id, agent_id, outcome, note, callback_at, created_at)
SELECT id, lead_id, agent_id, close_reason, NULL,
       CASE WHEN close_reason = 'callback' THEN closed_at + interval '1 day' END, closed_at
FROM assignments WHERE status = 'completed' AND lead_id BETWEEN %(lo)s AND %(hi)s
"""

_AGENTS = """
INSERT INTO agents (id, name, team, business_lines, segments, capacity, daily_cap, timezone,
                    status, status_changed_at, created_at, updated_at)
SELECT 'ag-' || lpad(n::text, 4, '0'), '坐席' || n, 'team-' || (n / 50),
       ARRAY[(%(lines)s::text[])[1 + n %% 5]], ARRAY['*'], 20, 400, 'Asia/Shanghai', 'offline',
       %(start)s, %(start)s, %(start)s
FROM generate_series(0, %(agents)s - 1) AS n
"""

# An 8-hour shift (early or late, Shanghai daytime) with a 45-minute break, on 92% of days.
_STATUS_LOG = """
INSERT INTO agent_status_log (agent_id, status, at)
SELECT 'ag-' || lpad(n::text, 4, '0'), x.status, d + x.at
FROM generate_series(0, %(agents)s - 1) AS n
CROSS JOIN generate_series(%(start_day)s::timestamptz, %(end)s::timestamptz - interval '1 day',
                           interval '1 day') AS d
CROSS JOIN LATERAL (VALUES
    ('available', interval '1 hour' + (n %% 2) * interval '4 hours'),
    ('away', interval '4 hours' + (n %% 2) * interval '4 hours'),
    ('available', interval '4 hours 45 minutes' + (n %% 2) * interval '4 hours'),
    ('offline', interval '9 hours' + (n %% 2) * interval '4 hours')
) AS x(status, at)
WHERE bench_gen.u(n * 100000 + extract(epoch FROM d)::bigint / 86400, 1) < 0.92
ORDER BY 3
"""

# A staging extract a day, 1% of its rows rejected; hourly poller runs per stock source.
_EXTRACTS = """
INSERT INTO staging.extracts (id, table_name, submitted_by, submitted_at, state, source,
                              campaign, rows_total, rows_loaded, rows_merged, rows_rejected,
                              started_at, finished_at)
SELECT n, 'campaign_' || n, 'data-team', d, 'loaded', NULL,
       CASE WHEN n %% 3 = 0 THEN '双十一-2026' END, 0, 0, 0, 0, d, d + interval '10 minutes'
FROM generate_series(%(start_day)s::timestamptz, %(end)s::timestamptz - interval '1 day',
                     interval '1 day') WITH ORDINALITY AS g(d, n)
"""
_EXTRACT_REJECTS = """
INSERT INTO staging.extract_rejects (extract_id, row_number, code, detail, created_at)
SELECT x.id, r, CASE WHEN r %% 4 = 0 THEN 'schema_violation' ELSE 'invalid_phone' END,
       'bench', x.started_at + interval '5 minutes'
FROM staging.extracts x
CROSS JOIN LATERAL generate_series(1, %(per_extract)s) AS r
"""
_POLLER_RUNS = """
INSERT INTO poller_runs (source, trigger, outcome, started_at, finished_at, pages, rows_read,
                         rows_new, rows_rejected, rejects)
SELECT s, 'schedule', 'succeeded', h, h + interval '20 seconds', 1, 100, 98,
       r1 + r2, jsonb_build_object('invalid_phone', r1, 'schema_violation', r2)
FROM unnest(ARRAY['dwh-silent-high-value', 'dwh-churn-risk']) AS s
CROSS JOIN generate_series(%(start_day)s::timestamptz, %(end)s::timestamptz - interval '1 hour',
                           interval '1 hour') AS h
CROSS JOIN LATERAL (SELECT (extract(hour FROM h)::int %% 3) AS r1,
                           (extract(hour FROM h)::int %% 5 = 0)::int AS r2) AS r
"""

#: Per-lead steps, in order; each runs on every connection at once over its share of the leads.
_PER_LEAD = (
    ("customers", _CUSTOMERS),
    ("leads", _LEADS),
    ("lead_events", _LEAD_EVENTS),
    ("assignments", _ASSIGNMENTS),
    ("dispositions", _DISPOSITIONS),
)
#: Secondary indexes dropped for the load and built after it (what pg_restore does).
_TABLES_WITH_INDEXES = ("lead_events", "assignments", "leads", "dispositions", "customers")


def load(url: str, events: int, days: int, end: datetime, workers: int = 2) -> dict[str, float]:
    """Generate the history into the migrated, empty database at `url`; seconds per step.

    The per-lead steps run on `workers` connections at once, each over its own range of leads
    (PostgreSQL runs one statement on one core). Identity sequences end past the generated ids.
    """
    seconds: dict[str, float] = {}
    start = end - timedelta(days=days)
    start_day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    connections = [psycopg.connect(url, autocommit=True) for _ in range(workers)]
    try:
        for conn in connections:
            conn.execute("SET session_replication_role = replica")
            conn.execute("SET work_mem = '256MB'")
            conn.execute("SET maintenance_work_mem = '1GB'")
        main = connections[0]

        def timed(name: str, action: Callable[[], object]) -> None:
            started = time.perf_counter()
            action()
            seconds[name] = round(time.perf_counter() - started, 3)

        main.execute(_FUNCTIONS)
        indexes = _drop_indexes(main)
        estimate = int(events / (1 + _MERGE_Q / (1 - _MERGE_Q)) * 1.05) + 10
        timed(
            "plan_counts",
            lambda: main.execute(
                _COUNTS.format(q=_MERGE_Q), {"estimate": estimate, "events": events}
            ),
        )
        counted = main.execute("SELECT count(*) FROM bench_gen.counts").fetchone()
        assert counted is not None
        leads = int(counted[0])
        params: dict[str, Any] = {
            "start": start,
            "start_day": start_day,
            "end": end,
            "slot": timedelta(seconds=days * 86400 / leads),
            "lines": list(LINES),
            "per_line": AGENTS // len(LINES),
            "agents": AGENTS,
            "sla": _SLA_SECONDS,
            "outcomes": list(OUTCOMES),
            "other_sources": [s for s, _ in _SOURCES["realtime"]],
            "per_extract": max(1, int(events * 0.15 * 0.01 / max(days, 1))),
        }
        plan = plan_sql()
        # The plan's table, typed by its own query (over no leads), then filled in parallel.
        query = plan.split("INSERT INTO bench_gen.plan", 1)[1]
        main.execute(
            "CREATE UNLOGGED TABLE bench_gen.plan AS " + query,
            {**params, "lo": 0, "hi": -1},
        )
        shares = _shares(leads, workers)
        timed("plan", lambda: _parallel(connections, plan, params, shares))
        for name, statement in _PER_LEAD:
            timed(name, partial(_parallel, connections, statement, params, shares))
        for name, statement in (
            ("agents", _AGENTS),
            ("agent_status_log", _STATUS_LOG),
            ("extracts", _EXTRACTS),
            ("extract_rejects", _EXTRACT_REJECTS),
            ("poller_runs", _POLLER_RUNS),
        ):
            timed(name, partial(main.execute, statement, params))
        main.execute("DROP SCHEMA bench_gen CASCADE")
        timed("indexes", lambda: _spread(connections, indexes))
        for table in _SEQUENCED:
            main.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                f" (SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
            )
        main.execute("SET session_replication_role = origin")
        timed(
            "vacuum_analyze",
            lambda: _spread(connections, [f"VACUUM ANALYZE {t}" for t in _VACUUMED]),
        )
    finally:
        for conn in connections:
            conn.close()
    return seconds


_SEQUENCED = (
    "customers", "leads", "lead_events", "dispositions", "agent_status_log", "staging.extracts",
    "staging.extract_rejects", "poller_runs",
)  # fmt: skip
_VACUUMED = (
    "lead_events", "assignments", "leads", "customers", "dispositions", "agent_status_log",
    "agents", "staging.extracts", "staging.extract_rejects", "poller_runs",
)  # fmt: skip


def _shares(leads: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ranges of lead numbers, one per worker."""
    size = -(-leads // workers)
    return [(1 + n * size, min(leads, (n + 1) * size)) for n in range(workers)]


def _parallel(
    connections: list[psycopg.Connection[Any]],
    statement: str,
    params: dict[str, Any],
    shares: list[tuple[int, int]],
) -> None:
    """One statement on every connection at once, each over its share of the leads."""
    with ThreadPoolExecutor(len(connections)) as pool:
        futures = [
            pool.submit(conn.execute, statement, {**params, "lo": lo, "hi": hi})
            for conn, (lo, hi) in zip(connections, shares, strict=True)
        ]
        for future in futures:
            future.result()


def _spread(connections: list[psycopg.Connection[Any]], statements: list[str]) -> None:
    """Statements shared out over the connections, each running its share in turn."""

    def run(conn: psycopg.Connection[Any], mine: list[str]) -> None:
        for statement in mine:
            conn.execute(statement)

    with ThreadPoolExecutor(len(connections)) as pool:
        futures = [
            pool.submit(run, conn, statements[n :: len(connections)])
            for n, conn in enumerate(connections)
        ]
        for future in futures:
            future.result()


def _drop_indexes(conn: psycopg.Connection[Any]) -> list[str]:
    """Drop the secondary (non-constraint) indexes of the big tables; their CREATE statements,
    biggest table first (so two connections share the building evenly)."""
    rows = conn.execute(
        """
        SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
        FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
        WHERE t.relname = ANY(%s) AND t.relnamespace = 'public'::regnamespace
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        ORDER BY array_position(%s, t.relname::text), 1
        """,
        (list(_TABLES_WITH_INDEXES), list(_TABLES_WITH_INDEXES)),
    ).fetchall()
    for name, _ in rows:
        conn.execute(f"DROP INDEX {name}")
    return [definition for _, definition in rows]
