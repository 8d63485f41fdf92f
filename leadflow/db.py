"""PostgreSQL access for the composition root: engines, reachability, schema version, counts.

Connection failures become `ServiceUnavailable` with one paragraph naming the server, the masked
URL, the cause and what to check, so the CLI can print it instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from leadflow.errors import ServiceUnavailable
from leadflow.settings import masked_url
from schemas import migrate
from schemas.vocab import AGENT_STATUSES, LEAD_STATES
from sync.pollers import LOCK_CLASS, SourceSpec
from sync.pollers.watermark import display, from_json


def sqlalchemy_url(url: str) -> str:
    """postgresql://... as a SQLAlchemy URL on the psycopg 3 driver."""
    return migrate.normalise_url(url).render_as_string(hide_password=False)


def make_engine(
    url: str, *, pool_size: int = 5, connect_timeout: float = 5.0, **kwargs: Any
) -> Engine:
    return sa.create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": max(1, int(connect_timeout)),
            "application_name": "leadflow",
        },
        **kwargs,
    )


def _cause(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_database(engine: Engine) -> str:
    """Return the server version, or raise ServiceUnavailable."""
    try:
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SHOW server_version")).scalar_one())
    except sa.exc.DBAPIError as exc:
        raise ServiceUnavailable(
            f"Cannot reach PostgreSQL at {masked_url(engine.url.render_as_string(hide_password=False))}: "
            f"{_cause(exc)}. Check database.url (or LEADFLOW_DATABASE_URL) and that the server is "
            f"running; leave it unset to let `leadflow up` start the embedded server."
        ) from None


def upgrade(engine: Engine, revision: str = "head") -> None:
    check_database(engine)
    migrate.upgrade(engine.url.render_as_string(hide_password=False), revision)


def schema_version(engine: Engine) -> tuple[str | None, str]:
    """(current revision or None, head revision)."""
    return migrate.current(engine.url.render_as_string(hide_password=False)), migrate.head()


def lead_counts(engine: Engine) -> dict[str, int]:
    """Leads per state, every state present (zero where none)."""
    counts: dict[str, int] = dict.fromkeys(LEAD_STATES, 0)
    with engine.connect() as conn:
        for state, count in conn.execute(
            sa.text("SELECT state, count(*) FROM leads GROUP BY state")
        ):
            counts[state] = int(count)
    return counts


#: Per queue: waiting leads, those due now, the oldest due one's wait, open assignments and
#: the SLA breaches among them. Leads not yet routed show under queue "-".
_QUEUE_STATS = """
WITH waiting AS (
    SELECT coalesce(queue, '-') AS queue, count(*) AS waiting,
           count(*) FILTER (WHERE next_action_at IS NULL OR next_action_at <= now()) AS due,
           max(now() - queued_at) FILTER (
               WHERE next_action_at IS NULL OR next_action_at <= now()) AS oldest
    FROM leads WHERE state = 'queued' GROUP BY 1
), open AS (
    SELECT queue, count(*) AS open,
           count(*) FILTER (WHERE first_contact_at IS NULL AND sla_deadline < now()) AS breached
    FROM assignments WHERE status = 'open' GROUP BY queue
)
SELECT coalesce(w.queue, o.queue), coalesce(w.waiting, 0), coalesce(w.due, 0),
       extract(epoch FROM w.oldest), coalesce(o.open, 0), coalesce(o.breached, 0)
FROM waiting w FULL JOIN open o ON o.queue = w.queue
ORDER BY 1
"""


def queue_stats(engine: Engine) -> list[dict[str, Any]]:
    """Depth, due leads, oldest due wait (seconds), open assignments, SLA breaches per queue."""
    with engine.connect() as conn:
        return [
            {
                "queue": queue,
                "waiting": int(waiting),
                "due": int(due),
                "oldest_seconds": float(oldest) if oldest is not None else None,
                "open": int(open_),
                "sla_breached": int(breached),
            }
            for queue, waiting, due, oldest, open_, breached in conn.execute(sa.text(_QUEUE_STATS))
        ]


def agent_counts(engine: Engine) -> dict[str, int]:
    """Agents per status, every status present."""
    counts: dict[str, int] = dict.fromkeys(AGENT_STATUSES, 0)
    with engine.connect() as conn:
        for status, count in conn.execute(
            sa.text("SELECT status, count(*) FROM agents GROUP BY status")
        ):
            counts[status] = int(count)
    return counts


#: Per source with a state row: its watermark and health, and whether a run holds the source's
#: lock right now (in this database).
_POLLER_STATES = """
SELECT s.source, s.watermark, s.last_run_at, s.last_success_at, s.last_error,
       s.consecutive_failures, s.rows_total, s.last_outcome, s.last_rows, s.retry_at,
       EXISTS (
           SELECT 1 FROM pg_locks l
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
             AND l.classid = :lock_class AND l.objid = hashtext(s.source)::oid
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       ) AS running
FROM poller_state s
ORDER BY s.source
"""


def poller_states(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every source's row of poller_state (configured or not any more), with `running`."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(_POLLER_STATES), {"lock_class": LOCK_CLASS}).mappings()
        return {row["source"]: dict(row) for row in rows}


def pipeline_sources(
    engine: Engine, specs: Sequence[SourceSpec], now: datetime
) -> list[dict[str, Any]]:
    """The stock-data sources as `leadflow sources list` and `/api/v1/pipeline` show them: the
    configured ones in configuration order, then any with state but no configuration.

    `state` is `running` (a run holds the source now), `failing` (the last runs failed; see
    `last_error`, `consecutive_failures`, `retry_at`), `never run`, or `ok`. `next_run` is when
    the scheduler runs it next if one runs (after a failure: the backoff's retry time; `now`
    when it is due).
    Timestamps are aware datetimes; the watermark is given as text and as stored (JSON).
    """
    states = poller_states(engine)
    sources: list[dict[str, Any]] = []
    for spec in specs:
        row = states.pop(spec.name, None) or {}
        retry_at = row.get("retry_at") if row.get("consecutive_failures") else None
        schedule = spec.schedule
        next_run = schedule.next_run(now, spec.timezone, row.get("last_run_at"), retry_at)
        sources.append(
            _source_entry(spec.name, row, display(from_json(row.get("watermark"))))
            | {
                "configured": True,
                "schedule": schedule.text,
                "url": spec.masked_url,
                "next_run": next_run,
            }
        )
    for name, row in states.items():
        sources.append(
            _source_entry(name, row, display(from_json(row.get("watermark"))))
            | {"configured": False, "schedule": None, "url": None, "next_run": None}
        )
    return sources


def _source_entry(name: str, row: Mapping[str, Any], watermark: str) -> dict[str, Any]:
    failures = int(row.get("consecutive_failures") or 0)
    if row.get("running"):
        state = "running"
    elif failures:
        state = "failing"
    elif row.get("last_run_at") is None:
        state = "never run"
    else:
        state = "ok"
    return {
        "name": name,
        "state": state,
        "watermark": watermark,
        "watermark_json": row.get("watermark"),
        "last_run_at": row.get("last_run_at"),
        "last_outcome": row.get("last_outcome"),
        "last_rows": int(row.get("last_rows") or 0),
        "rows_total": int(row.get("rows_total") or 0),
        "last_success_at": row.get("last_success_at"),
        "consecutive_failures": failures,
        "last_error": row.get("last_error"),
        "retry_at": row.get("retry_at") if failures else None,
    }
