"""The outbox relay: publishes what PostgreSQL committed to Kafka, at least once, in order per key.

Why an outbox: an assignment and the message announcing it must agree. The allocator writes
both in one transaction — the assignment rows and an `outbox` row (topic, key, payload, headers)
— and runs `NOTIFY leadflow_outbox`; this relay sends committed rows to Kafka and then marks
them published. A row that rolled back was never visible, so it is never published; a crash
between the send and the mark publishes the row again (at least once — AssignmentEvent's
`assignment_id` lets consumers recognise the repeat).

Order per key. The allocator serialises one agent's assignments by locking the agent row, so
for one key (the agent id) `outbox.id` order is commit order. The relay keeps it:

- exactly one relay publishes at a time. It holds the session advisory lock `RELAY_LOCK_KEY`
  on a dedicated connection for as long as it leads (that connection also LISTENs); other
  relays are hot standbys that try the lock every `poll_interval` and take over once the
  leader's session ends (a stopped, killed or disconnected leader's lock is released by
  PostgreSQL). A leader whose lock connection fails stops after the round in hand;
- a round reads unpublished rows `ORDER BY id` and sends them all through one producer;
  aiokafka keeps one request in flight per broker and re-queues a retried batch at the front,
  so one partition receives them in send order;
- per key, published rows are always a prefix of the key's rows: a row is marked only when
  every earlier row of its key in the round was delivered, so anything sent again starts at
  the key's first unpublished row and first occurrences on the topic stay in id order. (Two
  relays overlapping for a moment after a lost lock connection each send a key's rows in id
  order; that only adds repeats.)

Not idempotent, on purpose: the embedded broker (Tansu 0.6) answers InitProducerId with an
unknown error, so `enable_idempotence` would keep the relay from starting there. The one order
break left is the case idempotence exists for: a batch that expires client-side just as the
broker comes back while the partition's next batch gets through. The mark rule then sends the
expired rows again followed by the later ones, so a consumer that keeps the latest message per
assignment still ends in order, but the first occurrences are not.

Failures, named by what happens next:

- transient — the database or the broker away, a topic the broker does not know yet: the round
  ends (what was delivered is marked), the relay backs off with jitter (`Backoff`, up to
  `retry_backoff_max`) and reads again from the first unpublished row; nothing is skipped;
- unpublishable — a row Kafka will never take as it is (larger than `max_request_size`, an
  invalid topic name, headers that are not an object of strings): the row is held and its key
  stalls (its later rows wait, to keep the order) while other keys flow on; it is logged,
  counted (`leadflow_relay_errors_total{kind="unpublishable"}`, `leadflow_relay_held`) and
  retried with backoff, so a row fixed or deleted by hand releases its key. Nothing marks such
  a row failed: that would need columns the schema does not have (attempts, last error, a
  dead-letter time excluded from the unpublished index).

Published rows older than `retention` are deleted every `purge_interval`. Database time
(`now()`) stamps and ages rows, so relays on machines with skewed clocks agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import psycopg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from prometheus_client import Counter, Gauge

from ingest.consumer import Backoff

log = structlog.stdlib.get_logger("leadflow.relay")

#: The channel the allocator NOTIFYs after writing outbox rows; the leader LISTENs on it.
OUTBOX_CHANNEL = "leadflow_outbox"

#: The session advisory lock the leading relay holds: the ASCII bytes "lfoutbox" read as a
#: big-endian bigint (0x6C666F7574626F78). In pg_locks it shows as locktype 'advisory',
#: classid 0x6C666F75, objid 0x74626F78, objsubid 1. Advisory locks are per database.
RELAY_LOCK_KEY = int.from_bytes(b"lfoutbox", "big")

ErrorKind = Literal["database", "kafka", "unpublishable"]

PUBLISHED = Counter(
    "leadflow_relay_published_total",
    "Outbox messages delivered to Kafka and marked published, by topic.",
    ["topic"],
)
ERRORS = Counter(
    "leadflow_relay_errors_total",
    "Relay failures by kind: database and kafka (transient; the round is retried with "
    "backoff) and unpublishable (a row Kafka will not take; held, its key waits).",
    ["kind"],
)
BACKLOG = Gauge(
    "leadflow_relay_backlog",
    "Unpublished outbox rows (reported by the leader).",
    multiprocess_mode="livemostrecent",
)
OLDEST_SECONDS = Gauge(
    "leadflow_relay_oldest_unpublished_seconds",
    "Age of the oldest unpublished outbox row (reported by the leader).",
    multiprocess_mode="livemostrecent",
)
HELD = Gauge(
    "leadflow_relay_held",
    "Outbox rows held back because Kafka will not take them.",
    multiprocess_mode="livemostrecent",
)
LEADER = Gauge(
    "leadflow_relay_leader",
    "1 while this process holds the outbox lock.",
    multiprocess_mode="livesum",
)

_READ = """
SELECT id, topic, key, payload::text, headers
FROM outbox
WHERE published_at IS NULL
  AND id <> ALL(%(held_ids)s::bigint[])
  AND (key IS NULL OR key <> ALL(%(held_keys)s::text[]))
ORDER BY id
LIMIT %(limit)s
"""
# `published_at IS NULL`: a row another relay marked during an overlap keeps its first time.
_MARK = (
    "UPDATE outbox SET published_at = now() WHERE id = ANY(%s::bigint[]) AND published_at IS NULL"
)
_PURGE = """
DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox WHERE published_at < now() - %s::interval LIMIT %s
)
"""
_BACKLOG = """
SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
FROM outbox WHERE published_at IS NULL
"""
_STILL_HELD = "SELECT id FROM outbox WHERE id = ANY(%s::bigint[]) AND published_at IS NULL"
_TRY_LOCK = "SELECT pg_try_advisory_lock(%s)"

_PURGE_CHUNK = 10_000
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

_DATABASE_ERRORS = (psycopg.OperationalError, psycopg.errors.AdminShutdown)
_KAFKA_ERRORS = (KafkaError, OSError)


class Unpublishable(ValueError):
    """A row that cannot become a Kafka message as it is."""


#: What Kafka (or the client, before sending) refuses about one message, however often asked.
_UNPUBLISHABLE_ERRORS: tuple[type[Exception], ...] = (
    Unpublishable,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    CorruptRecordException,
)


@dataclass(frozen=True)
class RelayConfig:
    batch_size: int = 500
    #: Fallback look for rows when no NOTIFY came; also how often a standby tries the lock.
    poll_interval: timedelta = timedelta(seconds=1)
    retention: timedelta = timedelta(days=7)
    retry_backoff_max: timedelta = timedelta(seconds=30)
    purge_interval: timedelta = timedelta(minutes=5)
    #: How often the backlog gauges are refreshed (a count over the unpublished index).
    gauge_interval: timedelta = timedelta(seconds=5)
    linger: timedelta = timedelta(milliseconds=5)
    #: The producer's cap on one message; a larger row is unpublishable.
    max_request_size: int = 1024 * 1024


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    key: str | None
    payload: str  # the jsonb as PostgreSQL prints it
    headers: Any  # decoded jsonb, or None


@dataclass(frozen=True)
class Message:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def to_message(row: OutboxRow) -> Message:
    """The Kafka message of an outbox row: UTF-8 key and JSON value; `headers`, when not null,
    is a JSON object of names to strings (sent as UTF-8). Raises Unpublishable."""
    if not _TOPIC_NAME.match(row.topic) or row.topic in (".", ".."):
        raise Unpublishable(f"invalid topic name {row.topic!r}")
    headers: list[tuple[str, bytes]] = []
    if row.headers is not None:
        if not isinstance(row.headers, dict) or not all(
            isinstance(v, str) for v in row.headers.values()
        ):
            raise Unpublishable("headers must be a JSON object of strings")
        headers = [(name, value.encode()) for name, value in row.headers.items()]
    return Message(
        row.topic,
        None if row.key is None else row.key.encode(),
        row.payload.encode(),
        headers,
    )


@dataclass
class _Hold:
    key: str | None
    backoff: Backoff
    due: float  # time.monotonic() of the next attempt


Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]


class OutboxRelay:
    """Publishes the outbox while it holds the relay lock; stands by while another relay does.

    `connect` opens an autocommit connection (one holds the lock and listens, one does the
    work). `run(stop)` returns after the round in hand once `stop` is set; it raises only on
    bugs — every database or broker failure is retried.
    """

    def __init__(
        self, config: RelayConfig, kafka_options: dict[str, Any], connect: Connect
    ) -> None:
        self.config = config
        self.kafka_options = kafka_options
        self.connect = connect
        self.leader = False
        self.rounds = 0  # rounds that read rows
        self.published = 0  # messages delivered and marked by this relay
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._held: dict[int, _Hold] = {}
        self._purged_at = -math.inf
        self._gauges_at = -math.inf

    async def run(self, stop: asyncio.Event) -> None:
        log.info("relay started")
        try:
            while not stop.is_set():
                lock = await self._acquire(stop)
                if lock is None:
                    break
                try:
                    await self._lead(lock, stop)
                finally:
                    await _close(lock)
        finally:
            await self._drop_connection()
            log.info("relay stopped", published=self.published, rounds=self.rounds)

    # -- leadership --------------------------------------------------------------------------

    async def _acquire(self, stop: asyncio.Event) -> psycopg.AsyncConnection[Any] | None:
        """A connection holding the relay lock, or None once stopped."""
        backoff = self._backoff()
        standing_by = False
        while not stop.is_set():
            try:
                conn = await self.connect()
            except _DATABASE_ERRORS as exc:
                await self._failed("database", exc, backoff, stop)
                continue
            try:
                while not stop.is_set():
                    row = await (await conn.execute(_TRY_LOCK, (RELAY_LOCK_KEY,))).fetchone()
                    if row is not None and row[0]:
                        log.info("relay leads: it holds the outbox lock")
                        return conn
                    if not standing_by:
                        log.info("another relay holds the outbox lock; standing by")
                        standing_by = True
                    backoff.reset()
                    await _sleep(self.config.poll_interval.total_seconds(), stop)
            except _DATABASE_ERRORS as exc:
                await _close(conn)
                await self._failed("database", exc, backoff, stop)
                continue
            await _close(conn)
        return None

    async def _lead(self, lock: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        wake = asyncio.Event()
        try:
            await lock.execute(f"LISTEN {OUTBOX_CHANNEL}")
        except _DATABASE_ERRORS as exc:
            await self._failed("database", exc, self._backoff(), stop)
            return
        listener = asyncio.create_task(_listen(lock, wake), name="relay-listen")
        producer: AIOKafkaProducer | None = None
        backoff = self._backoff()
        self.leader = True
        LEADER.set(1)
        try:
            producer = await self._start_producer(stop, listener, backoff)
            while producer is not None and not stop.is_set() and not listener.done():
                wake.clear()
                try:
                    more = await self.run_round(producer)
                    await self._housekeeping()
                except _DATABASE_ERRORS as exc:
                    await self._drop_connection()
                    await self._failed("database", exc, backoff, stop, listener)
                    continue
                except _KAFKA_ERRORS as exc:
                    await self._failed("kafka", exc, backoff, stop, listener)
                    continue
                backoff.reset()
                if not more:
                    await _sleep(self._idle_timeout(), stop, wake, listener)
        finally:
            self.leader = False
            self._held.clear()
            for gauge in (LEADER, BACKLOG, OLDEST_SECONDS, HELD):
                gauge.set(0)
            listener.cancel()
            (outcome,) = await asyncio.gather(listener, return_exceptions=True)
            if isinstance(outcome, Exception):
                ERRORS.labels("database").inc()
                log.warning(
                    "lost the outbox lock's connection; standing by",
                    error=_brief(outcome),
                )
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()

    async def _start_producer(
        self, stop: asyncio.Event, listener: asyncio.Task[None], backoff: Backoff
    ) -> AIOKafkaProducer | None:
        while not stop.is_set() and not listener.done():
            producer = AIOKafkaProducer(
                **self.kafka_options,
                acks="all",
                enable_idempotence=False,  # see the module docstring
                linger_ms=int(self.config.linger.total_seconds() * 1000),
                max_request_size=self.config.max_request_size,
            )
            try:
                await producer.start()
            except _KAFKA_ERRORS as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                await self._failed("kafka", exc, backoff, stop, listener)
                continue
            backoff.reset()
            return producer
        return None

    # -- one round ---------------------------------------------------------------------------

    async def run_round(self, producer: AIOKafkaProducer) -> bool:
        """Send the first unpublished rows, then mark those delivered. True when the batch was
        full (more may wait). Raises the first transient failure, after marking."""
        conn = await self._connection()
        now = time.monotonic()
        held_ids = [i for i, hold in self._held.items() if hold.due > now]
        held_keys = [h.key for h in self._held.values() if h.due > now and h.key is not None]
        cursor = await conn.execute(
            _READ,
            {"held_ids": held_ids, "held_keys": held_keys, "limit": self.config.batch_size},
        )
        rows = [OutboxRow(*row) for row in await cursor.fetchall()]
        if not rows:
            return False
        self.rounds += 1

        stalled: dict[str, int] = {}  # key -> id of its first row not delivered this round
        sent: list[tuple[OutboxRow, asyncio.Future[Any]]] = []
        error: BaseException | None = None
        for row in rows:
            if row.key is not None and row.key in stalled:
                continue
            try:
                message = to_message(row)
                future = await producer.send(
                    message.topic, message.value, key=message.key, headers=message.headers
                )
            except _UNPUBLISHABLE_ERRORS as exc:
                self._hold(row, exc)
                _stall(stalled, row)
                continue
            except _KAFKA_ERRORS as exc:
                error = exc  # the broker is away or the topic unknown: send no more
                break
            sent.append((row, future))

        results = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
        delivered: list[OutboxRow] = []
        for (row, _), result in zip(sent, results, strict=True):
            if row.key is not None and stalled.get(row.key, row.id + 1) < row.id:
                continue  # an earlier row of its key was not delivered: not a prefix
            if isinstance(result, BaseException):
                if isinstance(result, _UNPUBLISHABLE_ERRORS):
                    self._hold(row, result)
                elif error is None:
                    error = result
                _stall(stalled, row)
                continue
            delivered.append(row)

        if delivered:
            await conn.execute(_MARK, ([row.id for row in delivered],))
            self.published += len(delivered)
            for topic, count in Tally(row.topic for row in delivered).items():
                PUBLISHED.labels(topic).inc(count)
            for row in delivered:
                self._held.pop(row.id, None)
            HELD.set(len(self._held))
        if error is not None:
            raise error
        return len(rows) == self.config.batch_size

    def _hold(self, row: OutboxRow, error: BaseException) -> None:
        hold = self._held.get(row.id)
        if hold is None:
            hold = self._held[row.id] = _Hold(row.key, self._backoff(initial=1.0), 0.0)
        delay = hold.backoff.next()
        hold.due = time.monotonic() + delay
        ERRORS.labels("unpublishable").inc()
        HELD.set(len(self._held))
        log.error(
            "outbox row cannot be published; held, its key waits",
            outbox_id=row.id,
            topic=row.topic,
            key=row.key,
            error=_brief(error),
            retry_in=round(delay, 2),
        )

    # -- housekeeping ------------------------------------------------------------------------

    async def purge(self) -> int:
        """Delete published rows older than `retention`, in chunks; return how many."""
        conn = await self._connection()
        deleted = 0
        while True:
            cursor = await conn.execute(_PURGE, (self.config.retention, _PURGE_CHUNK))
            deleted += cursor.rowcount
            if cursor.rowcount < _PURGE_CHUNK:
                break
        if deleted:
            log.info("purged published outbox rows", deleted=deleted)
        return deleted

    async def refresh_gauges(self) -> None:
        conn = await self._connection()
        row = await (await conn.execute(_BACKLOG)).fetchone()
        assert row is not None
        BACKLOG.set(row[0])
        OLDEST_SECONDS.set(row[1])
        if self._held:  # rows fixed by hand (published, deleted) are no longer held
            cursor = await conn.execute(_STILL_HELD, (list(self._held),))
            still = {row[0] for row in await cursor.fetchall()}
            self._held = {i: hold for i, hold in self._held.items() if i in still}
        HELD.set(len(self._held))

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._purged_at >= self.config.purge_interval.total_seconds():
            await self.purge()
            self._purged_at = now
        if now - self._gauges_at >= self.config.gauge_interval.total_seconds():
            await self.refresh_gauges()
            self._gauges_at = now

    def _idle_timeout(self) -> float:
        timeout = self.config.poll_interval.total_seconds()
        if self._held:
            due = min(hold.due for hold in self._held.values()) - time.monotonic()
            timeout = min(timeout, max(due, 0.0))
        return timeout

    # -- plumbing ----------------------------------------------------------------------------

    def _backoff(self, initial: float = 0.1) -> Backoff:
        maximum = self.config.retry_backoff_max.total_seconds()
        return Backoff(maximum, min(initial, maximum))

    async def _failed(
        self,
        kind: ErrorKind,
        error: BaseException,
        backoff: Backoff,
        stop: asyncio.Event,
        listener: asyncio.Task[None] | None = None,
    ) -> None:
        ERRORS.labels(kind).inc()
        delay = backoff.next()
        log.warning(
            "transient failure, retrying",
            failed=kind,
            error=_brief(error),
            retry_in=round(delay, 2),
        )
        await _sleep(delay, stop, None, listener)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await self.connect()
        return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            await _close(self._conn)
        self._conn = None


def _stall(stalled: dict[str, int], row: OutboxRow) -> None:
    if row.key is not None:
        stalled[row.key] = min(stalled.get(row.key, row.id), row.id)


async def _listen(conn: psycopg.AsyncConnection[Any], wake: asyncio.Event) -> None:
    """Set `wake` on every notification; ends (raising) when the lock connection fails."""
    wake.set()  # rows notified before LISTEN took effect
    async for _ in conn.notifies():
        wake.set()


async def _sleep(
    seconds: float,
    stop: asyncio.Event,
    wake: asyncio.Event | None = None,
    listener: asyncio.Task[None] | None = None,
) -> None:
    """Wait `seconds`, or less if stopped, woken, or the listener ends."""
    events = [asyncio.ensure_future(e.wait()) for e in (stop, wake) if e is not None]
    waiters: Sequence[asyncio.Future[Any]] = [*events, *([listener] if listener else [])]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for event in events:
            event.cancel()


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


def _brief(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__)[:200]


__all__ = [
    "OUTBOX_CHANNEL",
    "RELAY_LOCK_KEY",
    "Message",
    "OutboxRelay",
    "OutboxRow",
    "RelayConfig",
    "Unpublishable",
    "to_message",
]
