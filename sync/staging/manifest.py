"""The staging manifest (`staging.extracts`): submitting, inspecting, claiming, finishing.

Every statement that names a data team's table builds the name with `psycopg.sql.Identifier`
(schema and table quoted, never interpolated); catalogue look-ups take names as parameters. A
table qualifies for loading when it is an ordinary table (not a view, foreign or partitioned
table: reading those could run code or reach elsewhere) in the configured staging schema, is
not one of leadflow's own manifest tables, and has a `phone` column.

Claiming: a loader takes the extract's row lock (`FOR UPDATE SKIP LOCKED`, so concurrent
claims pass each other by) and then a session advisory lock on one of the extract's lanes
(`EXTRACT_LOCK_CLASS + lane`, id), held on its connection for as long as it loads that lane.
A lane still to load whose advisory lock is free lost its loader (killed, disconnected:
PostgreSQL releases the lock with the session), or never had one, and is taken over from its
checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from schemas.tables import STAGING_SCHEMA

#: Classid of the session advisory locks on extracts: the ASCII bytes "lfst" as an int4. The
#: objid is the extract id. In pg_locks: locktype 'advisory', classid 1818653556, objsubid 2.
EXTRACT_LOCK_CLASS = int.from_bytes(b"lfst", "big")

#: NOTIFY channel of migration 0003's trigger on the manifest.
SUBMITTED_CHANNEL = "leadflow_staging"

MANIFEST_TABLES = frozenset({"extracts", "extract_rejects"})

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


class TableRefused(ValueError):
    """The table cannot be loaded; the message says why, for people."""


@dataclass(frozen=True, slots=True)
class TableInfo:
    relid: int
    filenode: int
    blocks: int  # pages of the table's main fork at inspection
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Extract:
    """A manifest row, as a loader or `staging status` reads it."""

    id: int
    table_name: str
    submitted_by: str
    submitted_at: datetime
    state: str
    source: str | None
    event_type: str | None
    business_line: str | None
    segment: str | None
    priority: int | None
    campaign: str | None
    rows_total: int
    rows_loaded: int
    rows_merged: int
    rows_rejected: int
    checkpoint: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    worker: str | None

    @property
    def rows_done(self) -> int:
        return self.rows_loaded + self.rows_merged + self.rows_rejected


_SELECT = """
SELECT id, table_name, submitted_by, submitted_at, state, source, event_type, business_line,
       segment, priority, campaign, rows_total, rows_loaded, rows_merged, rows_rejected,
       checkpoint, started_at, finished_at, error, worker
FROM staging.extracts
"""
_RECENT = _SELECT + "ORDER BY id DESC LIMIT %s"

_TABLE = """
SELECT c.oid, c.relkind, pg_relation_filenode(c.oid),
       pg_relation_size(c.oid) / current_setting('block_size')::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""
_TABLE_COLUMNS = """
SELECT attname FROM pg_attribute
WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped
ORDER BY attnum
"""
_KINDS = {
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "p": "a partitioned table",
    "S": "a sequence",
    "i": "an index",
    "c": "a composite type",
    "t": "a TOAST table",
}


def qualified(schema: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def inspect_table(conn: psycopg.Connection[Any], schema: str, table: str) -> TableInfo:
    """The table's identity and columns, or TableRefused saying why it cannot be loaded."""
    where = f"{schema}.{table}"
    if schema == STAGING_SCHEMA and table in MANIFEST_TABLES:
        raise TableRefused(f"{where} is leadflow's own manifest, not an extract")
    row = conn.execute(_TABLE, (schema, table)).fetchone()
    if row is None:
        raise TableRefused(
            f"table {where} does not exist (never created, misspelt, or dropped since)"
        )
    relid, kind, filenode, blocks = row
    if kind != "r":
        what = _KINDS.get(kind, f"a relation of kind {kind!r}")
        raise TableRefused(f"{where} is {what}; only ordinary tables are loaded")
    columns = tuple(name for (name,) in conn.execute(_TABLE_COLUMNS, (relid,)))
    if "phone" not in columns:
        shown = ", ".join(columns[:12]) + (", ..." if len(columns) > 12 else "")
        raise TableRefused(
            f"table {where} has no column named phone (its columns: {shown or 'none'}); "
            "every extract needs one"
        )
    return TableInfo(int(relid), int(filenode), int(blocks), columns)


@dataclass(frozen=True)
class Submission:
    table: str
    source: str | None = None
    event_type: str | None = None
    business_line: str | None = None
    segment: str | None = None
    priority: int | None = None
    campaign: str | None = None


def check_hints(source: str | None, event_type: str | None, priority: int | None) -> list[str]:
    """What is wrong with an extract's values (empty when nothing is)."""
    problems = []
    for name, value in (("source", source), ("event type", event_type)):
        if value is not None and (len(value) > 64 or not _SLUG.match(value)):
            problems.append(
                f"{name} {value!r} must be a slug: lowercase letters, digits, _ . - "
                "(at most 64, starting with a letter or digit)"
            )
    if priority is not None and not 0 <= priority <= 100:
        problems.append(f"priority {priority} must be between 0 and 100")
    return problems


_INSERT = """
INSERT INTO staging.extracts
    (table_name, source, event_type, business_line, segment, priority, campaign)
VALUES (%s, %s, %s, %s, %s, %s, %s)
RETURNING id
"""


def submit(conn: psycopg.Connection[Any], schema: str, submission: Submission) -> int:
    """Check the table and register it; return the extract id. Raises TableRefused."""
    problems = check_hints(submission.source, submission.event_type, submission.priority)
    if problems:
        raise TableRefused("; ".join(problems))
    with conn.transaction():
        inspect_table(conn, schema, submission.table)
        row = conn.execute(
            _INSERT,
            (
                submission.table,
                submission.source,
                submission.event_type,
                submission.business_line,
                submission.segment,
                submission.priority,
                submission.campaign,
            ),
        ).fetchone()
    assert row is not None
    return int(row[0])


def extracts(conn: psycopg.Connection[Any], limit: int = 50) -> list[Extract]:
    """The most recent extracts, newest first."""
    rows = conn.execute(_RECENT, (limit,)).fetchall()
    return [Extract(*row) for row in rows]


def state_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {
        str(state): int(count)
        for state, count in conn.execute(
            "SELECT state, count(*) FROM staging.extracts GROUP BY state"
        )
    }


_CANDIDATES = (
    "SELECT id FROM staging.extracts WHERE state IN ('pending', 'loading') ORDER BY id LIMIT 100"
)
_LOCK_ROW = _SELECT + "WHERE id = %s AND state IN ('pending', 'loading') FOR UPDATE SKIP LOCKED"


def lanes_left(extract: Extract) -> list[int] | None:
    """The lanes of a started extract still to load (None: not started, any lane count)."""
    if extract.checkpoint is None:
        return None
    blocks = int(extract.checkpoint["blocks"])
    return [
        n for n, lane in enumerate(extract.checkpoint["lanes"]) if int(lane["next_block"]) < blocks
    ]


def claim(
    conn: psycopg.Connection[Any], lanes: int, busy: list[int] | None = None
) -> tuple[Extract, int] | None:
    """The oldest extract with a lane nobody loads — a pending one (lane 0; a new extract gets
    `lanes` lanes), a lane still to load, or a lane whose loader is gone — now locked by this
    session (release with `release`); None when there is nothing to take. A started extract
    whose lanes are all done (its finishing loader died) comes back as lane -1: only to be
    finished. The ids of extracts another loader was claiming at that moment go to `busy`:
    one of their lanes may be free in a moment."""
    for (extract_id,) in conn.execute(_CANDIDATES).fetchall():
        with conn.transaction():
            row = conn.execute(_LOCK_ROW, (extract_id,)).fetchone()
            if row is None:  # another loader is claiming it, or it just finished
                if busy is not None:
                    busy.append(extract_id)
                continue
            extract = Extract(*row)
            left = lanes_left(extract)
            if left == []:
                if _try_lock(conn, extract_id, 0):
                    return extract, -1
                continue
            for lane in left if left is not None else range(lanes):
                if _try_lock(conn, extract_id, lane):
                    return extract, lane
    return None


def _try_lock(conn: psycopg.Connection[Any], extract_id: int, lane: int) -> bool:
    locked = conn.execute(
        "SELECT pg_try_advisory_lock(%s, %s)", (EXTRACT_LOCK_CLASS + lane, extract_id)
    ).fetchone()
    return bool(locked is not None and locked[0])


def release(conn: psycopg.Connection[Any], extract_id: int, lane: int) -> None:
    conn.execute(
        "SELECT pg_advisory_unlock(%s, %s)", (EXTRACT_LOCK_CLASS + max(lane, 0), extract_id)
    )


# The first loader of an extract records its start; a loader of another lane that raced it
# finds the checkpoint set (no row returned) and takes that one.
_START = """
UPDATE staging.extracts
SET state = 'loading', started_at = coalesce(started_at, now()), worker = %s,
    rows_total = %s, checkpoint = %s, error = NULL
WHERE id = %s AND checkpoint IS NULL
RETURNING rows_total, checkpoint
"""
_RESUME = """
UPDATE staging.extracts SET state = 'loading', worker = %s
WHERE id = %s AND state IN ('pending', 'loading')
RETURNING rows_total, checkpoint
"""
_FAIL = """
UPDATE staging.extracts
SET state = 'failed', error = %s, finished_at = now(), worker = %s
WHERE id = %s
"""


def start(
    conn: psycopg.Connection[Any],
    extract_id: int,
    worker: str,
    rows_total: int | None,
    checkpoint: dict[str, Any] | None,
) -> tuple[int, dict[str, Any]] | None:
    """Record a (first) start, or a takeover; return the extract's rows_total and checkpoint,
    or None when it finished or failed meanwhile (another lane's loader ended it)."""
    row = None
    if checkpoint is not None:
        row = conn.execute(_START, (worker, rows_total, Jsonb(checkpoint), extract_id)).fetchone()
    if row is None:
        row = conn.execute(_RESUME, (worker, extract_id)).fetchone()
    if row is None or row[1] is None:
        return None
    return int(row[0]), dict(row[1])


def fail(conn: psycopg.Connection[Any], extract_id: int, error: str, worker: str) -> None:
    conn.execute(_FAIL, (error[:2000], worker, extract_id))
