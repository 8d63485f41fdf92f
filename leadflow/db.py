"""PostgreSQL access for the composition root: engines, reachability, schema version, counts.

Connection failures become `ServiceUnavailable` with one paragraph naming the server, the masked
URL, the cause and what to check, so the CLI can print it instead of a traceback.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from leadflow.errors import ServiceUnavailable
from leadflow.settings import masked_url
from schemas import migrate
from schemas.vocab import AGENT_STATUSES, LEAD_STATES


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
