"""One run of one stock-data source: pages from the source, through the intake chain, into
PostgreSQL with the advanced watermark, and a record of how it went.

A run (`Poller.run`, blocking: call it from a thread) goes:

1. connect to PostgreSQL and take the source's session advisory lock (`LOCK_CLASS`,
   hashtext(source)) for the whole run: one run per source at a time across every process —
   the scheduler's, `leadflow sources run`, `leadflow sources reset`. The scheduler skips a
   tick whose source is busy; the CLI waits;
2. open the run in `poller_runs` (a run of the source still `running` there died with its
   process: it is marked `interrupted`);
3. read a page — the source query with `:watermark`, `:limit` (and `:watermark_key`) — and
   decide what to take of it (`sync.pollers.watermark`: ties at page boundaries);
4. map the rows (`sync.pollers.rows`), pass them through the intake chain (intake `stock`), and
   in ONE PostgreSQL transaction: advance the watermark (only from the value the run read it
   at: anything else moved it meanwhile and the page is rolled back), store the accepted leads
   (`LeadStore.write_in`), record the rejected rows and the run's progress;
5. repeat until a page is short, or `stop` is set (SIGTERM): then the run ends after the page
   in hand, everything before it kept;
6. close the run: success resets the failure count; a failure leaves the watermark where the
   last committed page put it, counts the failure and sets `retry_at` (exponential backoff,
   `sync.pollers.failures`).

The next page is read, mapped and checked in a second thread while a page is stored, so the
source, the intake chain and PostgreSQL work at the same time; a page read ahead is simply not
stored when the run stops or fails. Memory is bounded by two pages (`batch_size` rows each; for
plain queries, the largest tie group up to `max_page_rows`), whatever the size of the source.
Source reads are short transactions of their own, one per page, so a long run holds no snapshot
open on the source.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any

import psycopg
import sqlalchemy as sa
import structlog
from psycopg.types.json import Jsonb
from sqlalchemy.engine import Engine, make_url

from ingest import metrics as intake_metrics
from ingest.chain import Accepted, IntakeChain, Outcome, Record, Rejected
from ingest.gcpause import gc_paused
from ingest.store import Classifier, LeadStore
from schemas.vocab import PollerOutcome, PollerTrigger
from sync.pollers import metrics
from sync.pollers.failures import describe_error, retry_delay
from sync.pollers.rows import RowMapper, RowSpec
from sync.pollers.schedule import Schedule
from sync.pollers.watermark import (
    Page,
    Watermark,
    from_json,
    keyed_page,
    plain_page,
    to_json,
)

# The one process-wide pause of cyclic garbage collection while a batch is in hand (counted across
# threads, shared with the staging loader): a page allocates hundreds of thousands of objects
# that reference counting frees, and the collector kept rescanning them — about a fifth of a
# run's CPU (measured: 100-122 µs a row with collections, 80-95 without).

log = structlog.stdlib.get_logger("leadflow.pollers")

#: Classid of the per-source session advisory locks: the ASCII bytes "lfpo" as an int4; the
#: objid is hashtext(source). In pg_locks: locktype 'advisory', classid 1818652783, objsubid 2.
LOCK_CLASS = int.from_bytes(b"lfpo", "big")

#: "busy": the source's lock was held by another process; the run did nothing.
RunOutcome = PollerOutcome | str


@dataclass(frozen=True)
class SourceSpec:
    """One configured source. `url` carries credentials: show `masked_url` instead."""

    name: str
    url: str = field(repr=False)
    query: str = field(repr=False)
    watermark: str
    schedule: Schedule
    event_type: str
    batch_size: int = 5000
    key: str | None = None
    keyed: bool = False  # the query takes :watermark_key
    columns: Mapping[str, str | None] = field(default_factory=dict)
    start: Any = datetime(1970, 1, 1)  # noqa: DTZ001 - compared with naive and aware columns alike
    timezone: tzinfo = UTC

    @property
    def masked_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    @property
    def password(self) -> str | None:
        return make_url(self.url).password

    def row_spec(self) -> RowSpec:
        return RowSpec(
            source=self.name,
            event_type=self.event_type,
            watermark=self.watermark,
            key=self.key,
            columns=self.columns,
            timezone=self.timezone,
        )


@dataclass(frozen=True)
class PollerConfig:
    retry_initial: timedelta = timedelta(seconds=5)
    retry_max: timedelta = timedelta(minutes=5)
    #: The most rows a page of a plain query may grow to when it is one tie group.
    max_page_rows: int = 100_000
    #: Rejected rows kept per run in poller_rejects (the counts are always complete).
    max_rejects_per_run: int = 1000


@dataclass
class RunResult:
    """A run's progress while it goes (passed to `progress`) and its end."""

    source: str
    trigger: PollerTrigger
    outcome: RunOutcome = "running"
    run_id: int | None = None
    pages: int = 0
    rows: int = 0  # source rows taken: stored or rejected
    new: int = 0
    merged: int = 0
    duplicate: int = 0
    rejected: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    watermark_from: Watermark | None = None
    watermark_to: Watermark | None = None
    error: str | None = None
    consecutive_failures: int = 0
    retry_at: datetime | None = None  # when failed: the next attempt
    seconds: float = 0.0


@dataclass(frozen=True)
class _Prepared:
    """A page read, decided, mapped and checked, ready to store."""

    page: Page
    mapper: RowMapper
    rows: Sequence[tuple[Any, ...]]  # the rows taken
    outcomes: Sequence[Outcome]
    seconds: float


class WatermarkMoved(RuntimeError):
    """The source's watermark changed under a run (a reset by hand): its page is not stored."""


class DriverMissing(RuntimeError):
    """The source URL names a database driver that is not installed."""


Connect = Callable[[], psycopg.Connection]


class Poller:
    """Runs one source; one instance per source and process, any number of processes."""

    def __init__(
        self,
        spec: SourceSpec,
        config: PollerConfig,
        connect: Connect,
        chain: IntakeChain,
        store: LeadStore,
        classifier: Callable[[], Classifier],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        redact: Callable[[str], str] = lambda text: text,
        worker: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.config = config
        self.connect = connect
        self.chain = chain
        self.store = store
        self.classifier = classifier  # asked per page: a rules reload applies between pages
        self.clock = clock
        self.redact = redact
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self.failures = 0  # consecutive failures, as last known (kept when PostgreSQL is away)
        self._engine: Engine | None = None
        self._statement = sa.text(spec.query)

    # -- the run -----------------------------------------------------------------------------

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        trigger: PollerTrigger = "schedule",
        wait: bool = False,
        progress: Callable[[RunResult], None] | None = None,
    ) -> RunResult:
        """Run the source once. `wait`: wait for a run elsewhere to end (or `stop`) instead of
        returning outcome "busy". Never raises for a failed run: the result says what happened."""
        stop = stop or threading.Event()
        started = time.monotonic()
        result = RunResult(self.spec.name, trigger)
        conn: psycopg.Connection | None = None
        try:
            conn = self.connect()
            if not lock_source(conn, self.spec.name, wait=wait, stop=stop):
                result.outcome = "busy"
                return result
            self._begin(conn, result)
            self._read(conn, result, stop, progress)
            self._finish(conn, result)
        except Exception as exc:
            self._failed(conn, result, exc)
        finally:
            if conn is not None:
                conn.close()  # releases the source's lock
            result.seconds = time.monotonic() - started
            self._report(result)
        return result

    def _begin(self, conn: psycopg.Connection, result: RunResult) -> None:
        with conn.transaction():
            conn.execute(_ENSURE_STATE, (self.spec.name,))
            row = conn.execute(_LOAD_STATE, (self.spec.name,)).fetchone()
            assert row is not None
            result.watermark_from = result.watermark_to = from_json(row[0])
            self.failures = result.consecutive_failures = int(row[1])
            if result.trigger == "schedule" and self.failures:
                result.trigger = "retry"
            interrupted = conn.execute(_INTERRUPTED, (self.spec.name,)).rowcount
            if interrupted:
                log.warning(
                    "a run of this source ended with its process; marked interrupted",
                    source=self.spec.name,
                    runs=interrupted,
                )
            run = conn.execute(
                _OPEN_RUN,
                {
                    "source": self.spec.name,
                    "trigger": result.trigger,
                    "worker": self.worker,
                    "watermark": _jsonb(result.watermark_from),
                },
            ).fetchone()
            assert run is not None
            result.run_id = int(run[0])

    def _read(
        self,
        conn: psycopg.Connection,
        result: RunResult,
        stop: threading.Event,
        progress: Callable[[RunResult], None] | None,
    ) -> None:
        spec = self.spec
        # Plain queries read one row of look-ahead: the trailing tie group of a full page is
        # left for the next read, and with distinct values that is just the extra row.
        base_limit = spec.batch_size if spec.keyed else spec.batch_size + 1
        # The next page is read, mapped and checked in a thread while this one is stored: the
        # source, the chain and PostgreSQL work at the same time. Only one thread uses the
        # source connection at a time (the next read starts after this one was taken).
        with (
            self.engine().connect() as source,
            ThreadPoolExecutor(1, thread_name_prefix=f"poller-{spec.name}-read") as reader,
        ):
            ahead = reader.submit(
                self._prepare, source, result.watermark_to, base_limit, base_limit, None
            )
            while True:
                prepared = ahead.result()
                page = prepared.page
                if stop.is_set():
                    result.outcome = "stopped"  # the page read ahead is not stored
                    return
                if not page.done:
                    ahead = reader.submit(
                        self._prepare,
                        source,
                        page.watermark or result.watermark_to,
                        page.next_limit,
                        base_limit,
                        prepared.mapper,
                    )
                if page.take:
                    self._store(conn, result, prepared)
                    if progress is not None:
                        progress(result)
                if page.done:
                    result.outcome = "succeeded"
                    return

    def _prepare(
        self,
        source: sa.Connection,
        watermark: Watermark | None,
        limit: int,
        base_limit: int,
        mapper: RowMapper | None,
    ) -> _Prepared:
        """Read a page, decide what to take of it, map and check those rows (no PostgreSQL)."""
        with gc_paused():
            return self._prepare_page(source, watermark, limit, base_limit, mapper)

    def _prepare_page(
        self,
        source: sa.Connection,
        watermark: Watermark | None,
        limit: int,
        base_limit: int,
        mapper: RowMapper | None,
    ) -> _Prepared:
        started = time.perf_counter()
        columns, rows = self._fetch(source, watermark, limit)
        if mapper is None or tuple(columns) != mapper.columns:
            mapper = RowMapper(self.spec.row_spec(), columns)
        page = self._decide(mapper, rows, limit, base_limit)
        taken = rows[: page.take]
        now = self.clock()
        items = [(Record(None, row=n), mapper.event(row, now)) for n, row in enumerate(taken)]
        outcomes = self.chain.process_objects(items, "stock") if items else []
        return _Prepared(page, mapper, taken, outcomes, time.perf_counter() - started)

    def _fetch(
        self, source: sa.Connection, watermark: Watermark | None, limit: int
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        params: dict[str, Any] = {
            "watermark": self.spec.start if watermark is None else watermark.value,
            "limit": limit,
        }
        if self.spec.keyed:
            params["watermark_key"] = None if watermark is None else watermark.key
        try:
            cursor = source.execute(self._statement, params)
            columns = list(cursor.keys())
            rows = [tuple(row) for row in cursor.fetchall()]
        finally:
            source.rollback()  # one short read transaction per page on the source
        return columns, rows

    def _decide(
        self, mapper: RowMapper, rows: Sequence[tuple[Any, ...]], limit: int, base_limit: int
    ) -> Page:
        if self.spec.keyed:
            pairs = [(mapper.watermark_of(row), mapper.key_of(row)) for row in rows]
            return keyed_page(pairs, limit)
        values = [mapper.watermark_of(row) for row in rows]
        return plain_page(values, limit, base_limit, self.config.max_page_rows)

    def _store(self, conn: psycopg.Connection, result: RunResult, prepared: _Prepared) -> None:
        with gc_paused():
            self._store_page(conn, result, prepared)

    def _store_page(self, conn: psycopg.Connection, result: RunResult, prepared: _Prepared) -> None:
        started = time.perf_counter()
        mapper, rows, watermark = prepared.mapper, prepared.rows, prepared.page.watermark
        accepted = [o for o in prepared.outcomes if isinstance(o, Accepted)]
        rejected = [o for o in prepared.outcomes if isinstance(o, Rejected)]
        classify = self.classifier()
        room = max(0, self.config.max_rejects_per_run - result.rejected)
        kept = []
        for reject in rejected[:room]:
            row = rows[reject.record.row or 0]  # the row's place in the page
            where = _jsonb(Watermark(mapper.watermark_of(row)))
            kept.append(
                (
                    result.run_id,
                    self.spec.name,
                    mapper.identity(row),
                    where,
                    reject.code,
                    reject.detail,
                )
            )
        codes = Counter(r.code for r in rejected)
        rejects = result.rejects + codes
        with conn.transaction(), conn.cursor() as cur:
            advanced = cur.execute(
                _ADVANCE,
                {
                    "source": self.spec.name,
                    "old": _jsonb(result.watermark_to),
                    "new": _jsonb(watermark),
                    "rows": len(rows),
                },
            ).rowcount
            if advanced != 1:
                raise WatermarkMoved(
                    "the watermark was moved while the run read the source (leadflow sources "
                    "reset?); the page was not stored, the next run reads from the new watermark"
                )
            batch = self.store.write_in(cur, accepted, classify)
            if kept:
                cur.executemany(_REJECT, kept)
            cur.execute(
                _PROGRESS,
                {
                    "id": result.run_id,
                    "rows": len(rows),
                    "new": batch.count("new"),
                    "merged": batch.count("merged"),
                    "duplicate": batch.count("duplicate"),
                    "rejected": len(rejected),
                    "rejects": Jsonb(dict(rejects)),
                    "watermark": _jsonb(watermark),
                },
            )
        # Committed: count it.
        result.pages += 1
        result.rows += len(rows)
        result.new += batch.count("new")
        result.merged += batch.count("merged")
        result.duplicate += batch.count("duplicate")
        result.rejected += len(rejected)
        result.rejects = rejects
        result.watermark_to = watermark
        source = self.spec.name
        for outcome in ("new", "merged", "duplicate"):
            if count := batch.count(outcome):
                metrics.ROWS.labels(source, outcome).inc(count)
                intake_metrics.EVENTS.labels("stock", outcome).inc(count)
        if rejected:
            metrics.ROWS.labels(source, "rejected").inc(len(rejected))
            intake_metrics.EVENTS.labels("stock", "rejected").inc(len(rejected))
            for code, count in codes.items():
                metrics.REJECTS.labels(source, code).inc(count)
                intake_metrics.REJECTS.labels("stock", code).inc(count)
            log.info(
                "source rows rejected",
                source=source,
                run=result.run_id,
                rejected=dict(codes),
            )
        intake_metrics.BATCH_SIZE.labels("stock").observe(len(rows))
        intake_metrics.BATCH_SECONDS.labels("stock").observe(
            prepared.seconds + time.perf_counter() - started
        )
        self._watermark_gauge(watermark)

    def _finish(self, conn: psycopg.Connection, result: RunResult) -> None:
        succeeded = result.outcome == "succeeded"
        with conn.transaction():
            conn.execute(_CLOSE_RUN, (result.outcome, None, result.run_id))
            row = conn.execute(
                _FINISHED,
                {
                    "source": self.spec.name,
                    "outcome": result.outcome,
                    "rows": result.rows,
                    "succeeded": succeeded,
                },
            ).fetchone()
        assert row is not None
        last_success, failures = row
        self.failures = result.consecutive_failures = int(failures)
        if last_success is not None:
            metrics.LAST_SUCCESS.labels(self.spec.name).set(last_success.timestamp())

    def _failed(self, conn: psycopg.Connection | None, result: RunResult, error: Exception) -> None:
        result.outcome = "failed"
        secrets = [s for s in (self.spec.password,) if s]
        result.error = describe_error(error, secrets, self.redact)
        self.failures += 1
        delay = retry_delay(
            self.failures,
            self.config.retry_initial,
            self.config.retry_max,
            self.rng.uniform(0.8, 1.2),
        )
        result.consecutive_failures = self.failures
        result.retry_at = self.clock() + delay
        try:
            if conn is None or conn.closed or conn.broken:
                if conn is not None:
                    conn.close()
                conn = self.connect()
            with conn.transaction():
                if result.run_id is not None:
                    conn.execute(_CLOSE_RUN, ("failed", result.error, result.run_id))
                row = conn.execute(
                    _FAILED,
                    {
                        "source": self.spec.name,
                        "error": result.error,
                        "rows": result.rows,
                        "delay": delay,
                    },
                ).fetchone()
            assert row is not None
            self.failures = result.consecutive_failures = int(row[0])
            result.retry_at = row[1]
        except psycopg.Error as exc:
            log.warning(
                "cannot record the failed run in PostgreSQL",
                source=self.spec.name,
                error=describe_error(exc, secrets, self.redact),
            )
        finally:
            if conn is not None:
                conn.close()
        log.warning(
            "poller run failed; retrying with backoff",
            source=self.spec.name,
            error=result.error,
            failures=result.consecutive_failures,
            retry_in=round(delay.total_seconds(), 1),
            stored_rows=result.rows,
        )

    def _report(self, result: RunResult) -> None:
        source = self.spec.name
        metrics.RUNS.labels(source, result.outcome).inc()
        if result.outcome == "busy":
            log.info("source busy: another process runs it; skipped", source=source)
            return
        metrics.FAILURES.labels(source).set(result.consecutive_failures)
        metrics.RUN_SECONDS.labels(source).observe(result.seconds)
        if result.outcome != "failed":
            level = log.info if result.rows or result.outcome != "succeeded" else log.debug
            level(
                "poller run ended",
                source=source,
                outcome=result.outcome,
                rows=result.rows,
                new=result.new,
                merged=result.merged,
                duplicate=result.duplicate,
                rejected=result.rejected,
                pages=result.pages,
                seconds=round(result.seconds, 2),
            )

    def _watermark_gauge(self, watermark: Watermark | None) -> None:
        value = None if watermark is None else watermark.value
        if isinstance(value, datetime):
            zone = value.tzinfo or self.spec.timezone
            metrics.WATERMARK.labels(self.spec.name).set(value.replace(tzinfo=zone).timestamp())
        elif isinstance(value, date):
            moment = datetime(value.year, value.month, value.day, tzinfo=self.spec.timezone)
            metrics.WATERMARK.labels(self.spec.name).set(moment.timestamp())

    # -- the source's connection pool --------------------------------------------------------

    def engine(self) -> Engine:
        """The source's SQLAlchemy engine: one pooled connection, checked before use."""
        if self._engine is None:
            try:
                self._engine = sa.create_engine(
                    self.spec.url,
                    pool_size=1,
                    max_overflow=1,
                    pool_pre_ping=True,
                    pool_recycle=1800,
                )
            except (ImportError, sa.exc.NoSuchModuleError) as exc:
                dialect = make_url(self.spec.url).drivername
                raise DriverMissing(
                    f"no SQLAlchemy driver for {dialect!r} is installed ({exc}); MySQL and "
                    "MariaDB sources need `pip install 'leadflow[mysql]'`"
                ) from None
        return self._engine

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


# --- the source lock, reset, state ------------------------------------------------------------


def lock_source(
    conn: psycopg.Connection,
    source: str,
    *,
    wait: bool,
    stop: threading.Event | None = None,
    poll: float = 0.5,
) -> bool:
    """Take the source's session lock on `conn` (autocommit); False if another holds it and
    `wait` is false, or `stop` is set while waiting. Closing the connection releases it."""
    stop = stop or threading.Event()
    while True:
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, source)
        ).fetchone()
        if row is not None and row[0]:
            return True
        if not wait or stop.wait(poll):
            return False


def reset_watermark(conn: psycopg.Connection, source: str, watermark: Watermark | None) -> None:
    """Move the source's watermark (the caller holds the source's lock): the next run reads the
    rows after it, those already stored as no-ops. Failures and the retry time are cleared."""
    with conn.transaction():
        conn.execute(_ENSURE_STATE, (source,))
        conn.execute(_RESET, (_jsonb(watermark), source))


def load_watermark(conn: psycopg.Connection, source: str) -> Watermark | None:
    row = conn.execute("SELECT watermark FROM poller_state WHERE source = %s", (source,)).fetchone()
    return None if row is None else from_json(row[0])


def _jsonb(watermark: Watermark | None) -> Jsonb | None:
    """The watermark as a jsonb parameter; None is SQL NULL (never the JSON null)."""
    document = to_json(watermark)
    return None if document is None else Jsonb(document)


_ENSURE_STATE = "INSERT INTO poller_state (source) VALUES (%s) ON CONFLICT (source) DO NOTHING"
_LOAD_STATE = (
    "SELECT watermark, consecutive_failures FROM poller_state WHERE source = %s FOR UPDATE"
)
_INTERRUPTED = """
UPDATE poller_runs SET outcome = 'interrupted', finished_at = now(),
    error = 'the process running it ended mid-run; its committed pages are kept'
WHERE source = %s AND outcome = 'running'
"""
_OPEN_RUN = """
WITH run AS (
    INSERT INTO poller_runs (source, trigger, worker, watermark_from, watermark_to)
    VALUES (%(source)s, %(trigger)s, %(worker)s, %(watermark)s, %(watermark)s)
    RETURNING id, source
)
UPDATE poller_state SET last_run_at = now(), updated_at = now()
FROM run WHERE poller_state.source = run.source
RETURNING run.id
"""
_ADVANCE = """
UPDATE poller_state SET watermark = %(new)s, rows_total = rows_total + %(rows)s, updated_at = now()
WHERE source = %(source)s AND watermark IS NOT DISTINCT FROM %(old)s
"""
_REJECT = """
INSERT INTO poller_rejects (run_id, source, row_key, watermark, code, detail)
VALUES (%s, %s, %s, %s, %s, %s)
"""
_PROGRESS = """
UPDATE poller_runs SET pages = pages + 1, rows_read = rows_read + %(rows)s,
    rows_new = rows_new + %(new)s, rows_merged = rows_merged + %(merged)s,
    rows_duplicate = rows_duplicate + %(duplicate)s, rows_rejected = rows_rejected + %(rejected)s,
    rejects = %(rejects)s, watermark_to = %(watermark)s
WHERE id = %(id)s
"""
_CLOSE_RUN = "UPDATE poller_runs SET outcome = %s, error = %s, finished_at = now() WHERE id = %s"
_FINISHED = """
UPDATE poller_state SET
    last_outcome = %(outcome)s,
    last_rows = %(rows)s,
    last_success_at = CASE WHEN %(succeeded)s THEN now() ELSE last_success_at END,
    consecutive_failures = CASE WHEN %(succeeded)s THEN 0 ELSE consecutive_failures END,
    last_error = CASE WHEN %(succeeded)s THEN NULL ELSE last_error END,
    retry_at = CASE WHEN %(succeeded)s THEN NULL ELSE retry_at END,
    updated_at = now()
WHERE source = %(source)s
RETURNING last_success_at, consecutive_failures
"""
_FAILED = """
INSERT INTO poller_state AS s (source, consecutive_failures, last_error, last_outcome, last_rows,
                               retry_at, last_run_at)
VALUES (%(source)s, 1, %(error)s, 'failed', %(rows)s, now() + %(delay)s, now())
ON CONFLICT (source) DO UPDATE SET
    consecutive_failures = s.consecutive_failures + 1,
    last_error = EXCLUDED.last_error,
    last_outcome = 'failed',
    last_rows = EXCLUDED.last_rows,
    retry_at = EXCLUDED.retry_at,
    last_run_at = coalesce(s.last_run_at, EXCLUDED.last_run_at),
    updated_at = now()
RETURNING consecutive_failures, retry_at
"""
_RESET = """
UPDATE poller_state SET watermark = %s, consecutive_failures = 0, last_error = NULL,
    retry_at = NULL, updated_at = now()
WHERE source = %s
"""
#: Runs (with their rejects) older than the retention given, and runs that read nothing older
#: than a day: the scheduler's leader runs it every hour.
PRUNE_HISTORY = """
DELETE FROM poller_runs
WHERE outcome <> 'running'
  AND (finished_at < now() - %s::interval
       OR (rows_read = 0 AND outcome = 'succeeded' AND finished_at < now() - interval '1 day'))
"""


# --- configuration helpers ----------------------------------------------------------------------

#: Drivers leadflow installs (psycopg) or offers as an extra (`leadflow[mysql]`: PyMySQL), used
#: when a source URL names a database but no driver.
_DEFAULT_DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


def source_url(url: str) -> str:
    """The SQLAlchemy URL to connect with: `mysql://` reads as `mysql+pymysql://`,
    `postgresql://` as `postgresql+psycopg://`; ValueError when it is no URL."""
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise ValueError(
            "is not a SQLAlchemy URL such as mysql+pymysql://user:password@host:3306/db or "
            "postgresql://user@host:5432/db"
        ) from None
    driver = _DEFAULT_DRIVERS.get(parsed.drivername)
    if driver is not None:
        parsed = parsed.set(drivername=driver)
    return parsed.render_as_string(hide_password=False)


def query_parameters(query: str) -> frozenset[str]:
    """The `:name` parameters of a source query, as SQLAlchemy's `text()` reads them."""
    return frozenset(sa.text(query).compile().params)
