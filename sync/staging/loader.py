"""The staging loader role: claims extracts, loads them chunk by chunk, resumable, never twice.

A loader waits for `NOTIFY leadflow_staging` (sent by the manifest's trigger on every submit,
SQL INSERTs included) or its poll interval, claims the oldest pending extract — or a `loading`
one whose loader died (`manifest.claim`) — and loads it to the end, one chunk per transaction:

1. `LOCK TABLE ... IN ACCESS SHARE MODE` on the staging table, then check under that lock that
   the name still means the same ordinary table (oid, file node) the extract started on: the
   table cannot be dropped, replaced by a view or rewritten while the chunk reads it;
2. read a range of the table's pages in ctid order (`ctid >= '(b0,0)' AND ctid < '(b1,0)'`:
   PostgreSQL reads just those pages with a TID range scan, and any table works, with or
   without a key), so memory is bounded by the chunk whatever the table's size;
3. map the rows (`sync.staging.rows`), run the shared intake chain (intake `staging`, the
   extract's hints), store the accepted leads with `LeadStore.write_in`, COPY the rejects into
   `staging.extract_rejects`;
4. advance the counters and the checkpoint (the lane's next page) in the manifest — all in the
   chunk's transaction, so a crash or SIGTERM anywhere resumes at the first uncommitted chunk, and
   the rows' deterministic event ids make any replay a no-op.

Lanes: an extract started with `lanes` > 1 is loaded by that many loaders at once (separate
processes: `leadflow run staging` several times), each claiming one lane with its own advisory
lock and storing the rows of its share of the customers (a stable hash of the normalised phone)
with its own checkpoint; the last lane done marks the extract loaded. One customer's rows stay
in order in one lane, so the outcome is the one a single loader gives. One loader alone loads
the lanes one after the other.

Counts, per row: `loaded` made a new lead; `merged` joined an existing lead (an open lead of
the customer in that business line, an earlier row of the same extract included) or was
already stored (the same row of the same table loaded before: `checkpoint.duplicates` says
how many); `rejected` has a row in `staging.extract_rejects`. loaded + merged + rejected =
rows done, and at the end = rows_total.

Failures, by what happens next: the table gone, refused or changed, a permission or data
error -> the extract `failed` with the reason and the loader moves on; the database away, a
deadlock -> back off, reconnect, take the extract over again from its checkpoint. SIGTERM stops
after the chunk in hand; the extract stays `loading` and the next loader resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import structlog
from psycopg import sql
from psycopg.types.json import Jsonb

from ingest import metrics as intake_metrics
from ingest.chain import Accepted, IntakeChain, Outcome, Rejected
from ingest.consumer import Backoff
from ingest.gcpause import gc_paused
from ingest.phones import InvalidPhone
from ingest.store import Classifier, LeadStore
from schemas.lead import Hints
from sync.staging import metrics
from sync.staging.manifest import (
    SUBMITTED_CHANNEL,
    Extract,
    TableInfo,
    TableRefused,
    check_hints,
    claim,
    fail,
    inspect_table,
    qualified,
    release,
    start,
    state_counts,
)
from sync.staging.rows import EventDefaults, RowMapper, event_id_prefix

log = structlog.stdlib.get_logger("leadflow.staging")

#: How soon to claim again after passing by an extract another loader was claiming.
CONTENDED_RETRY = 0.2

#: Errors after which the same work may succeed: back off, reconnect, resume.
TRANSIENT = (
    psycopg.OperationalError,
    psycopg.errors.AdminShutdown,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.LockNotAvailable,
)


@dataclass(frozen=True)
class LoaderConfig:
    schema: str = "staging"
    chunk_rows: int = 20_000
    #: Lanes of a new extract: loaders that can load it at once, each its share of customers.
    lanes: int = 1
    poll_interval: timedelta = timedelta(seconds=5)
    retry_backoff_max: timedelta = timedelta(seconds=30)
    default_source: str = "staging"
    default_event_type: str = "staging_extract"
    #: Of naive timestamps (timestamp without time zone, date) in staging tables.
    timezone: tzinfo = field(default_factory=lambda: ZoneInfo("Asia/Shanghai"))
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


@dataclass
class LoadResult:
    extract_id: int
    state: str  # loaded, failed, or loading (stopped before the end)
    chunks: int = 0
    rows: int = 0
    error: str | None = None


_REJECTS_COPY = (
    "COPY staging.extract_rejects (extract_id, row_number, code, detail, row) FROM STDIN"
)
_PROGRESS = """
UPDATE staging.extracts
SET rows_loaded = rows_loaded + %(loaded)s,
    rows_merged = rows_merged + %(merged)s,
    rows_rejected = rows_rejected + %(rejected)s,
    checkpoint = jsonb_set(
        jsonb_set(checkpoint, ARRAY['lanes', %(lane)s], %(entry)s),
        '{duplicates}', to_jsonb((checkpoint->>'duplicates')::bigint + %(duplicates)s))
WHERE id = %(id)s AND state = 'loading'
"""
# Loaded once no lane is left; the loader checks that the counts add up before it commits.
_FINISH = """
UPDATE staging.extracts SET state = 'loaded', finished_at = now()
WHERE id = %s AND state = 'loading'
  AND NOT EXISTS (
      SELECT FROM jsonb_array_elements(checkpoint->'lanes') AS lane
      WHERE (lane->>'next_block')::bigint < (checkpoint->>'blocks')::bigint)
RETURNING rows_loaded, rows_merged, rows_rejected, rows_total
"""
_IDENTITY = """
SELECT c.oid, c.relkind, pg_relation_filenode(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""


class ExtractFailed(Exception):
    """This extract cannot be loaded; the message is the manifest's error text."""


class _Ended(Exception):
    """The extract failed (or finished) under another lane's loader: leave it as it is."""


class StagingLoader:
    """One loader; run any number, in one process or many."""

    def __init__(
        self,
        config: LoaderConfig,
        connect: Callable[[], psycopg.Connection[Any]],
        chain: IntakeChain,
        store: LeadStore,
        classifier: Callable[[], Classifier],
        connect_async: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]] | None = None,
    ) -> None:
        self.config = config
        self.connect = connect
        self.connect_async = connect_async
        self.chain = chain
        self.store = store
        self.classifier = classifier
        self._conn: psycopg.Connection[Any] | None = None  # claims, locks, writes
        self._read: psycopg.Connection[Any] | None = None  # reads staging tables
        self.loads = 0
        self.contended = False  # the last claim passed by an extract another loader held

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        wake = asyncio.Event()
        listener = (
            asyncio.create_task(self._listen(wake, stop), name="staging-listen")
            if self.connect_async is not None
            else None
        )
        backoff = Backoff(self.config.retry_backoff_max.total_seconds())
        log.info("staging loader started", schema=self.config.schema, worker=self.config.worker)
        try:
            while not stop.is_set():
                wake.clear()
                try:
                    result = await asyncio.to_thread(self.load_next, stop.is_set)
                    backoff.reset()
                except TRANSIENT as exc:
                    intake_metrics.RETRIES.labels("staging", "database").inc()
                    await asyncio.to_thread(self._drop_connection)
                    delay = backoff.next()
                    log.warning(
                        "staging load interrupted; retrying",
                        error=str(exc).strip()[:200],
                        retry_in=round(delay, 2),
                    )
                    await _wait_any(stop, None, delay)
                    continue
                if result is None:  # nothing to load: wait for a submission or the poll
                    seconds = self.config.poll_interval.total_seconds()
                    if self.contended:  # another loader was claiming: a lane may be free soon
                        seconds = min(seconds, CONTENDED_RETRY)
                    await _wait_any(stop, wake, seconds)
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            await asyncio.to_thread(self._drop_connection)
            log.info("staging loader stopped", loads=self.loads)

    async def _listen(self, wake: asyncio.Event, stop: asyncio.Event) -> None:
        assert self.connect_async is not None
        backoff = Backoff(self.config.retry_backoff_max.total_seconds())
        while not stop.is_set():
            try:
                async with await self.connect_async() as conn:
                    await conn.execute(f"LISTEN {SUBMITTED_CHANNEL}")
                    wake.set()  # whatever was submitted while not listening
                    backoff.reset()
                    async for _ in conn.notifies():
                        wake.set()
            except TRANSIENT as exc:
                delay = backoff.next()
                log.warning("staging listener lost; reconnecting", error=str(exc), delay=delay)
                await _wait_any(stop, None, delay)

    # -- one extract -----------------------------------------------------------------------------

    def load_next(self, stopping: Callable[[], bool] = lambda: False) -> LoadResult | None:
        """Claim one lane of an extract and load it to its end (or until `stopping()`); None if
        there was nothing to claim. Synchronous; raises TRANSIENT errors, after which the lane
        is resumed by whichever loader claims it next."""
        conn = self._connection()
        self._refresh_gauge(conn)
        busy: list[int] = []
        claimed = claim(conn, self.config.lanes, busy)
        self.contended = bool(busy)
        if claimed is None:
            return None
        extract, lane = claimed
        self.loads += 1
        try:
            if lane < 0:  # every lane done; its last loader died before finishing the extract
                result = LoadResult(extract.id, "loading")
                result.state = self._finish(conn, extract)
            else:
                result = self._load(conn, extract, lane, stopping)
        except _Ended:
            result = LoadResult(extract.id, "failed")
        except ExtractFailed as exc:
            result = LoadResult(extract.id, "failed", error=str(exc))
            self._fail(conn, extract, str(exc))
        except TRANSIENT:
            raise
        except psycopg.DatabaseError as exc:
            # Permission, a column dropped, a value PostgreSQL refused: not going to get better.
            message = f"database error: {str(exc).strip().splitlines()[0]}"
            result = LoadResult(extract.id, "failed", error=message)
            self._fail(conn, extract, message)
        finally:
            if not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    release(conn, extract.id, lane)
        self._refresh_gauge(conn)
        return result

    def _fail(self, conn: psycopg.Connection[Any], extract: Extract, error: str) -> None:
        with conn.transaction():
            fail(conn, extract.id, error, self.config.worker)
        metrics.EXTRACTS_FINISHED.labels("failed").inc()
        log.warning("extract failed", extract=extract.id, table=extract.table_name, error=error)

    def _begin(
        self, conn: psycopg.Connection[Any], extract: Extract
    ) -> tuple[TableInfo, dict[str, Any], int]:
        """Inspect the table and record the start (or the takeover); return the table, the
        checkpoint and rows_total."""
        config = self.config
        problems = check_hints(extract.source, extract.event_type, extract.priority)
        if problems:
            raise ExtractFailed("; ".join(problems))
        try:
            with conn.transaction():
                info = inspect_table(conn, config.schema, extract.table_name)
                fresh = None
                rows_total = None
                if extract.checkpoint is None:
                    row = conn.execute(
                        sql.SQL("SELECT count(*) FROM {} WHERE ctid < %s::tid").format(
                            qualified(config.schema, extract.table_name)
                        ),
                        (f"({info.blocks},0)",),
                    ).fetchone()
                    rows_total = int(row[0]) if row else 0
                    rows_per_block = max(1.0, rows_total / info.blocks) if info.blocks else 1.0
                    fresh = {
                        "relid": info.relid,
                        "filenode": info.filenode,
                        "blocks": info.blocks,
                        # Fixed for the extract's life, so that a resumed lane cuts the same
                        # chunks and every loader sends a customer to the same lane.
                        "chunk_blocks": max(1, round(config.chunk_rows / rows_per_block)),
                        "lanes": [{"next_block": 0, "next_row": 1}] * config.lanes,
                        "duplicates": 0,
                    }
                started = start(conn, extract.id, config.worker, rows_total, fresh)
                if started is None:
                    raise _Ended
                rows_total, checkpoint = started
                _same_table(checkpoint, info, f"{config.schema}.{extract.table_name}")
        except TableRefused as exc:
            raise ExtractFailed(str(exc)) from None
        return info, checkpoint, rows_total

    def _load(
        self,
        conn: psycopg.Connection[Any],
        extract: Extract,
        lane: int,
        stopping: Callable[[], bool],
    ) -> LoadResult:
        info, checkpoint, rows_total = self._begin(conn, extract)
        result = LoadResult(extract.id, "loading")
        lanes = len(checkpoint["lanes"])
        if lane >= lanes:  # claimed before another loader started the extract with fewer lanes
            return result
        log.info(
            "loading extract" if extract.checkpoint is None else "resuming extract",
            extract=extract.id,
            table=extract.table_name,
            lane=f"{lane + 1} of {lanes}",
            rows_total=rows_total,
            next_block=checkpoint["lanes"][lane]["next_block"],
            blocks=checkpoint["blocks"],
        )
        reader = _Reader(self, extract, info, checkpoint, lane)
        # The next chunk is read and run through the chain in a thread while this one is
        # stored: Python preparing one chunk while PostgreSQL stores the other.
        with ThreadPoolExecutor(1, thread_name_prefix="staging-read") as pool:
            ahead = pool.submit(reader.next) if reader.more else None
            while ahead is not None:
                chunk = ahead.result()
                ahead = pool.submit(reader.next) if reader.more else None
                self._store(conn, extract, lane, chunk)
                # The collector is paused while chunks are in hand, nearly all the time during
                # a load: collect the young generations once a chunk, so that cyclic garbage
                # (of any role in this process) stays bounded however long the extract.
                gc.collect(1)
                result.chunks += 1
                result.rows += len(chunk.outcomes)
                if ahead is not None and stopping():
                    log.info("staging load paused", extract=extract.id, next_block=chunk.end)
                    return result
        result.state = self._finish(conn, extract)
        return result

    def _store(
        self, conn: psycopg.Connection[Any], extract: Extract, lane: int, chunk: _Chunk
    ) -> None:
        """A lane's share of a chunk — leads, rejects, the lane's checkpoint and the extract's
        counters — in one transaction."""
        classify = self.classifier()
        with gc_paused(), conn.transaction(), conn.cursor() as cur:
            accepted = [o for o in chunk.outcomes if isinstance(o, Accepted)]
            rejected = [o for o in chunk.outcomes if isinstance(o, Rejected)]
            stored = self.store.write_in(cur, accepted, classify)
            if rejected:
                with cur.copy(_REJECTS_COPY) as copy:
                    for r in rejected:
                        row_number = r.record.row
                        assert row_number is not None
                        row = chunk.rows[row_number - chunk.first_row]
                        copy.write_row(
                            (extract.id, row_number, r.code, r.detail, Jsonb(chunk.mapper.row_json(row)))
                        )  # fmt: skip
            new, merged, duplicate = (stored.count(o) for o in ("new", "merged", "duplicate"))
            cur.execute(
                _PROGRESS,
                {
                    "loaded": new,
                    "merged": merged + duplicate,
                    "rejected": len(rejected),
                    "duplicates": duplicate,
                    "lane": str(lane),
                    "entry": Jsonb({"next_block": chunk.end, "next_row": chunk.next_row}),
                    "id": extract.id,
                },
            )
            if cur.rowcount == 0:  # another lane's loader failed the extract: undo, stop
                raise _Ended
        self._count(
            len(chunk.outcomes),
            new,
            merged,
            duplicate,
            rejected,
            time.perf_counter() - chunk.started,
        )

    def _finish(self, conn: psycopg.Connection[Any], extract: Extract) -> str:
        """Mark the extract loaded once every lane is done and every row accounted for; the
        state it is in afterwards (`loading` while other lanes still load)."""
        where = f"{self.config.schema}.{extract.table_name}"
        with conn.transaction():
            row = conn.execute(_FINISH, (extract.id,)).fetchone()
            if row is None:
                return "loading"
            loaded, merged, rejected, total = row
            if loaded + merged + rejected != total:  # undone; the extract fails instead
                raise ExtractFailed(
                    f"{loaded + merged + rejected:,} rows read but {total:,} counted at the "
                    f"start: {where} changed while loading; submit it again once it is complete"
                )
        metrics.EXTRACTS_FINISHED.labels("loaded").inc()
        log.info(
            "extract loaded",
            extract=extract.id,
            table=extract.table_name,
            loaded=loaded,
            merged=merged,
            rejected=rejected,
        )
        return "loaded"

    @staticmethod
    def _count(
        rows: int, new: int, merged: int, duplicate: int, rejected: list[Rejected], seconds: float
    ) -> None:
        metrics.ROWS.labels("loaded").inc(new)
        metrics.ROWS.labels("merged").inc(merged + duplicate)
        metrics.ROWS.labels("rejected").inc(len(rejected))
        metrics.CHUNK_SECONDS.observe(seconds)
        intake_metrics.BATCH_SIZE.labels("staging").observe(rows)
        intake_metrics.BATCH_SECONDS.labels("staging").observe(seconds)
        for outcome, count in (("new", new), ("merged", merged), ("duplicate", duplicate)):
            if count:
                intake_metrics.EVENTS.labels("staging", outcome).inc(count)
        if rejected:
            intake_metrics.EVENTS.labels("staging", "rejected").inc(len(rejected))
            for code, count in Counter(r.code for r in rejected).items():
                intake_metrics.REJECTS.labels("staging", code).inc(count)

    def _refresh_gauge(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            counts = state_counts(conn)
        for state in ("pending", "loading", "loaded", "failed"):
            metrics.EXTRACTS.labels(state).set(counts.get(state, 0))

    # -- the connection --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections (`run` does on its way out); a later load reconnects."""
        self._drop_connection()

    def _read_connection(self) -> psycopg.Connection[Any]:
        if self._read is None or self._read.closed:
            self._read = self._open()
        return self._read

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self._open()
        return self._conn

    def _open(self) -> psycopg.Connection[Any]:
        conn = self.connect()
        # A policy on a data team's table would run its expressions as this role: with row
        # security off, reading such a table fails instead (and so does the extract).
        conn.execute("SET row_security = off")
        return conn

    def _drop_connection(self) -> None:
        for conn in (self._conn, self._read):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._conn = self._read = None


@dataclass
class _Chunk:
    first: int  # pages [first, end)
    end: int
    first_row: int  # row number of rows[0]
    rows: list[Any]  # every row of the pages, whichever lane it belongs to
    outcomes: list[Outcome]  # of this lane's rows
    mapper: RowMapper
    started: float

    @property
    def next_row(self) -> int:
        return self.first_row + len(self.rows)


class _Reader:
    """Reads an extract's chunks for one lane, in order, on the loader's read connection, each
    in its own transaction under LOCK TABLE, and runs the lane's rows through the chain.

    Lanes split the customers, not the pages: every lane reads every page, and keeps the rows
    whose phone hashes to it (a stable hash of the normalised phone: the same customer, the
    same lane, in every process and after every restart; rows with no usable phone go to lane
    0). So one customer's rows are stored in order by one loader, and any number of loaders
    give the result one gives. Chunks are cut at multiples of the extract's `chunk_blocks`."""

    def __init__(
        self,
        loader: StagingLoader,
        extract: Extract,
        info: TableInfo,
        checkpoint: dict[str, Any],
        lane: int,
    ) -> None:
        config = loader.config
        self.loader, self.checkpoint, self.lane = loader, checkpoint, lane
        self.lanes = len(checkpoint["lanes"])
        self.schema, self.table_name = config.schema, extract.table_name
        self.where = f"{config.schema}.{extract.table_name}"
        self.blocks = int(checkpoint["blocks"])
        position = checkpoint["lanes"][lane]
        self.next_block = int(position["next_block"])
        self.next_row = int(position["next_row"])
        self.chunk_blocks = int(checkpoint["chunk_blocks"])
        self.phone = info.columns.index("phone") + 1  # in a selected row, after the ctid
        table = qualified(config.schema, extract.table_name)
        self.select = sql.SQL(
            "SELECT ctid, {} FROM {} WHERE ctid >= %s::tid AND ctid < %s::tid ORDER BY ctid"
        ).format(sql.SQL(", ").join(sql.Identifier(c) for c in info.columns), table)
        self.lock = sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(table)
        self.mapper = RowMapper(
            info.columns,
            EventDefaults(
                source=extract.source or config.default_source,
                event_type=extract.event_type or config.default_event_type,
                campaign=extract.campaign,
                occurred_at=extract.submitted_at,
                timezone=config.timezone,
            ),
            event_id_prefix(extract.table_name, info.relid, info.filenode),
        )
        self.hints = None
        if extract.business_line or extract.segment or extract.priority is not None:
            self.hints = Hints(extract.business_line, extract.segment, extract.priority)

    @property
    def more(self) -> bool:
        return self.next_block < self.blocks

    def _lane_of(self, phone: Any) -> int:
        if phone is None:
            return 0
        try:
            e164 = self.loader.chain.phones.normalise(str(phone).strip())
        except (InvalidPhone, ValueError):
            return 0
        return zlib.crc32(e164.e164.encode()) % self.lanes

    def next(self) -> _Chunk:
        started = time.perf_counter()
        first = self.next_block
        end = min(self.blocks, first + self.chunk_blocks)
        conn = self.loader._read_connection()
        with gc_paused():
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(self.lock)
                identity = cur.execute(_IDENTITY, (self.schema, self.table_name)).fetchone()
                if identity is None:
                    raise ExtractFailed(f"table {self.where} was dropped while loading")
                if identity[1] != "r":
                    raise ExtractFailed(
                        f"{self.where} was replaced by something other than a table while loading"
                    )
                _same_table(
                    self.checkpoint,
                    TableInfo(int(identity[0]), int(identity[2]), self.blocks, ()),
                    self.where,
                )
                rows = cur.execute(self.select, (f"({first},0)", f"({end},0)")).fetchall()
            numbered = enumerate(rows, self.next_row)
            if self.lanes > 1:
                phone, lane = self.phone, self.lane
                numbered = ((n, row) for n, row in numbered if self._lane_of(row[phone]) == lane)  # type: ignore[assignment]
            outcomes = self.loader.chain.process_objects(
                self.mapper.records(numbered), "staging", self.hints
            )
        chunk = _Chunk(first, end, self.next_row, rows, outcomes, self.mapper, started)
        self.next_block = end
        self.next_row += len(rows)
        return chunk


def _same_table(checkpoint: dict[str, Any], info: TableInfo, where: str) -> None:
    if int(checkpoint["relid"]) != info.relid:
        raise ExtractFailed(
            f"table {where} was dropped and created again while loading; submit it again"
        )
    if int(checkpoint["filenode"]) != info.filenode:
        raise ExtractFailed(
            f"table {where} was rewritten (TRUNCATE, VACUUM FULL, CLUSTER or ALTER) while "
            "loading; submit it again"
        )


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event | None, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
