"""The real-time driver: an aiokafka consumer group on `leads.raw` feeding the intake chain.

Exactly once into PostgreSQL: the offsets a batch consumed are stored in the batch's own
transaction, and on partition assignment the consumer seeks to them, so a crash anywhere
replays at most one uncommitted batch, whose event_ids make it a no-op. Offsets are also
committed to Kafka after the database commit, for lag tools. Rejected records go to the DLQ
(original bytes, error headers) before their batch commits. Transient failures — database or
broker away — back off and retry the same batch; nothing is skipped. `stop` ends the loop after
the batch in hand is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from ingest import metrics
from ingest.chain import Accepted, IntakeChain, Record, Rejected
from ingest.store import Classifier, LeadStore, Offset

log = structlog.stdlib.get_logger("leadflow.intake")

_LOAD_OFFSETS = """
SELECT partition, next_offset FROM consumer_offsets
WHERE consumer_group = %s AND topic = %s AND partition = ANY(%s)
"""


@dataclass(frozen=True)
class IntakeConfig:
    topic: str
    dlq_topic: str
    group: str
    batch_size: int = 2000
    batch_wait: timedelta = timedelta(milliseconds=50)
    retry_backoff_max: timedelta = timedelta(seconds=30)
    session_timeout: timedelta = timedelta(seconds=10)
    heartbeat_interval: timedelta = timedelta(seconds=3)


class Backoff:
    """Exponential backoff with jitter, reset by a success."""

    def __init__(self, maximum: float, initial: float = 0.1) -> None:
        self.maximum, self.initial, self.current = maximum, initial, initial

    def next(self) -> float:
        delay = self.current * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security
        self.current = min(self.current * 2, self.maximum)
        return min(delay, self.maximum)

    def reset(self) -> None:
        self.current = self.initial


def dlq_headers(rejected: Rejected) -> list[tuple[str, bytes]]:
    record = rejected.record
    return [
        ("error", rejected.code.encode()),
        ("error-detail", rejected.detail.encode()),
        ("source-topic", (record.topic or "").encode()),
        ("source-partition", str(record.partition).encode()),
        ("source-offset", str(record.offset).encode()),
    ]


class KafkaIntake:
    """One intake worker. Run several with the same group to share the partitions."""

    def __init__(
        self,
        config: IntakeConfig,
        kafka_options: dict[str, Any],
        connect: Callable[[], psycopg.Connection],
        chain: IntakeChain,
        store: LeadStore,
        classifier: Callable[[], Classifier],
    ) -> None:
        self.config = config
        self.kafka_options = kafka_options
        self.connect = connect
        self.chain = chain
        self.store = store
        self.classifier = classifier  # asked per batch: a rules reload applies between batches
        self._conn: psycopg.Connection | None = None
        self.busy = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self.batches = 0
        self.records = 0  # records handled (stored or rejected)
        self.generation = 0  # bumped by every rebalance

    # -- database, with reconnects ---------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def stored_offsets(self, partitions: Sequence[int]) -> dict[int, int]:
        conn = self._connection()
        with conn.transaction():
            rows = conn.execute(
                _LOAD_OFFSETS, (self.config.group, self.config.topic, list(partitions))
            ).fetchall()
        return {int(partition): int(offset) for partition, offset in rows}

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        producer = AIOKafkaProducer(**self.kafka_options, linger_ms=5, acks="all")
        consumer = AIOKafkaConsumer(
            **self.kafka_options,
            group_id=config.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=config.batch_size,
            session_timeout_ms=int(config.session_timeout.total_seconds() * 1000),
            heartbeat_interval_ms=int(config.heartbeat_interval.total_seconds() * 1000),
            # A fetch the broker holds open longer than a batch wait only delays fresh leads
            # (aiokafka's 500 ms default added up to ~270 ms at p99 on the embedded broker).
            fetch_max_wait_ms=max(10, int(config.batch_wait.total_seconds() * 1000)),
        )
        self.consumer = consumer
        await self.retry("kafka", stop, producer.start)
        await self.retry("kafka", stop, consumer.start)
        consumer.subscribe([config.topic], listener=_SeekToStoredOffsets(self, stop))
        log.info("intake started", topic=config.topic, group=config.group)
        wait_ms = int(config.batch_wait.total_seconds() * 1000)
        try:
            while not stop.is_set():
                generation = self.generation
                fetched = await consumer.getmany(
                    timeout_ms=wait_ms or 1, max_records=config.batch_size
                )
                async with self.busy:
                    if self.generation != generation:
                        # Fetched across a rebalance: this worker may no longer own some of these
                        # partitions. Put back what it still owns (reading again is a no-op at
                        # worst, skipping would not be) and let the next poll decide.
                        owned = consumer.assignment()
                        for tp, messages in fetched.items():
                            if (
                                messages
                                and tp in owned
                                and await consumer.position(tp) > messages[0].offset
                            ):
                                consumer.seek(tp, messages[0].offset)
                        continue
                    records = [
                        Record(m.value, m.key, m.topic, m.partition, m.offset)
                        for messages in fetched.values()
                        for m in messages
                    ]
                    if records:
                        next_offsets = {
                            (tp.topic, tp.partition): messages[-1].offset + 1
                            for tp, messages in fetched.items()
                            if messages
                        }
                        await self._handle(records, next_offsets, producer, consumer, stop)
                await self._report_lag(consumer)
        finally:
            # aiokafka's stop() can raise the CancelledError of a fetch it cancelled itself
            # (its connection closed under it); that must not skip the producer's close. A real
            # cancellation of this task is raised again once everything is closed.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()
            await asyncio.to_thread(self._drop_connection)
            log.info("intake stopped", batches=self.batches)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError

    async def _handle(
        self,
        records: list[Record],
        next_offsets: dict[tuple[str, int], int],
        producer: AIOKafkaProducer,
        consumer: AIOKafkaConsumer,
        stop: asyncio.Event,
    ) -> None:
        started = time.perf_counter()
        outcomes = self.chain.process(records, "realtime")
        accepted = [o for o in outcomes if isinstance(o, Accepted)]
        rejected = [o for o in outcomes if isinstance(o, Rejected)]
        offsets = [
            Offset(topic, partition, offset) for (topic, partition), offset in next_offsets.items()
        ]

        if rejected:
            await self.retry("kafka", stop, lambda: self._send_to_dlq(producer, rejected))
        classify = self.classifier()
        result = await self.retry(
            "database",
            stop,
            lambda: asyncio.to_thread(
                self.store.write,
                self._connection(),
                accepted,
                classify,
                offsets=offsets,
                consumer_group=self.config.group,
            ),
        )
        if result is None:  # stopped while retrying: nothing committed, the batch replays
            return
        with contextlib.suppress(KafkaError):  # the database holds the truth; this is for lag tools
            await consumer.commit(
                {
                    TopicPartition(t, p): OffsetAndMetadata(o, "")
                    for (t, p), o in next_offsets.items()
                }
            )
        self.batches += 1
        self.records += len(records)
        metrics.BATCH_SIZE.labels("realtime").observe(len(records))
        metrics.BATCH_SECONDS.labels("realtime").observe(time.perf_counter() - started)
        metrics.count_stored(
            "realtime",
            {outcome: result.count(outcome) for outcome in ("new", "merged", "duplicate")},
            result.new_leads,
        )
        if rejected:
            metrics.EVENTS.labels("realtime", "rejected").inc(len(rejected))
            for r in rejected:
                metrics.REJECTS.labels("realtime", r.code).inc()

    async def _send_to_dlq(self, producer: AIOKafkaProducer, rejected: Sequence[Rejected]) -> None:
        futures = [
            await producer.send(
                self.config.dlq_topic,
                value=r.record.value,
                key=r.record.key,
                headers=dlq_headers(r),
            )
            for r in rejected
        ]
        await asyncio.gather(*futures)

    async def retry(self, what: str, stop: asyncio.Event, attempt: Callable[[], Any]) -> Any:
        """Run `attempt` until it succeeds; transient failures back off. None if stopped."""
        backoff = Backoff(self.config.retry_backoff_max.total_seconds())
        while True:
            try:
                return await attempt()
            except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as exc:
                await asyncio.to_thread(self._drop_connection)
                error: Exception = exc
            except (KafkaError, OSError) as exc:
                error = exc
            metrics.RETRIES.labels("realtime", what).inc()
            delay = backoff.next()
            log.warning(
                "transient failure, retrying",
                failed=what,
                error=str(error).strip()[:200],
                retry_in=round(delay, 2),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return None

    async def _report_lag(self, consumer: AIOKafkaConsumer) -> None:
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            position = await consumer.position(tp)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                max(0, highwater - position)
            )


def forget_lag(tp: TopicPartition) -> None:
    """Stop reporting the lag of a partition this worker no longer owns; left alone, its last
    figure would stay in /metrics beside the new owner's and add up in every alert. Zero first:
    where the roles share a metrics directory (`leadflow up`), removal leaves the file's last
    value, and the newest value of a live process is the one served."""
    labels = (tp.topic, str(tp.partition))
    metrics.CONSUMER_LAG.labels(*labels).set(0)
    with contextlib.suppress(KeyError):
        metrics.CONSUMER_LAG.remove(*labels)


class _SeekToStoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """On assignment, continue from the offsets PostgreSQL holds; on revocation, let the batch
    in hand commit first, so the next owner starts where this one ended."""

    def __init__(self, intake: KafkaIntake, stop: asyncio.Event) -> None:
        self.intake = intake
        self.stop = stop

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        async with self.intake.busy:  # the batch in hand commits first
            if revoked:
                self.intake.generation += 1
        for tp in revoked:
            forget_lag(tp)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        if not assigned:
            return
        consumer = self.intake.consumer
        assert consumer is not None
        partitions = [tp.partition for tp in assigned]
        # The coordinator calls this from its own task, possibly while a batch is being stored
        # on the worker's connection: wait for that batch, as on revocation.
        async with self.intake.busy:
            self.intake.generation += 1
            stored = await self.intake.retry(
                "database",
                self.stop,
                lambda: asyncio.to_thread(self.intake.stored_offsets, partitions),
            )
        for tp in assigned:
            if stored and tp.partition in stored:
                consumer.seek(tp, stored[tp.partition])
        log.info(
            "partitions assigned", partitions=sorted(partitions), from_database=sorted(stored or {})
        )
