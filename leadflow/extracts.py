"""`leadflow staging submit|status`: the manifest from the command line, as rich tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from leadflow.errors import LeadflowError, ServiceUnavailable
from leadflow.settings import Settings, masked_url
from sync.staging import Extract, Submission, TableRefused, extracts, submit

_STATE_STYLE = {"pending": "yellow", "loading": "cyan", "loaded": "green", "failed": "red"}


class SubmitRefused(LeadflowError):
    """The table cannot be submitted; the message says why."""


def connect(url: str) -> psycopg.Connection[Any]:
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServiceUnavailable(
            f"Cannot reach PostgreSQL at {masked_url(url)}: {first}. Check database.url (or "
            "LEADFLOW_DATABASE_URL) and that the server is running."
        ) from None
    return conn


def _manifest_missing(url: str) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"The database at {masked_url(url)} has no staging.extracts table: run "
        "`leadflow db upgrade` first."
    )


def submit_table(settings: Settings, url: str, submission: Submission) -> int:
    """Register the table; SubmitRefused when it cannot be loaded."""
    with connect(url) as conn:
        try:
            return submit(conn, settings.staging.schema_name, submission)
        except TableRefused as exc:
            raise SubmitRefused(f"not submitted: {exc}.") from None
        except psycopg.errors.UndefinedTable:
            raise _manifest_missing(url) from None


def recent(url: str, limit: int) -> list[Extract]:
    with connect(url) as conn:
        try:
            return extracts(conn, limit)
        except psycopg.errors.UndefinedTable:
            raise _manifest_missing(url) from None


def _duration(extract: Extract, now: datetime) -> str:
    if extract.started_at is None:
        return "-"
    seconds = int(((extract.finished_at or now) - extract.started_at).total_seconds())
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def status_table(rows: list[Extract], now: datetime) -> Table:
    """One line per extract: state, progress, counts, duration, error."""
    table = Table(title="staging extracts", title_justify="left")
    for column in ("id", "table", "state", "progress", "rows", "loaded", "merged", "rejected", "duration", "submitted", "error"):  # fmt: skip
        numeric = column in ("id", "rows", "loaded", "merged", "rejected", "duration")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for extract in rows:
        style = _STATE_STYLE.get(extract.state, "")
        total = max(extract.rows_total, 1)
        done = extract.rows_total if extract.state == "loaded" else extract.rows_done
        progress = (
            ProgressBar(total=total, completed=min(done, total), width=20)
            if extract.state != "pending"
            else "-"
        )
        duplicates = int((extract.checkpoint or {}).get("duplicates", 0))
        merged = f"{extract.rows_merged:,}"
        if duplicates:
            merged += f" ({duplicates:,} already loaded)"
        table.add_row(
            str(extract.id),
            escape(extract.table_name),
            f"[{style}]{extract.state}[/]" if style else extract.state,
            progress,
            f"{done:,}/{extract.rows_total:,}" if extract.state != "pending" else "-",
            f"{extract.rows_loaded:,}",
            merged,
            f"{extract.rows_rejected:,}",
            _duration(extract, now),
            f"{extract.submitted_at:%Y-%m-%d %H:%M} by {escape(extract.submitted_by)}",
            escape(extract.error or ""),
        )
    return table
