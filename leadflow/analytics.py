"""Stream analytics with faust-streaming (`leadflow run analytics`, in `leadflow up`).

A faust app over the three topics keeps tumbling one-minute windows in faust tables:

| metric | topic | key | value |
| --- | --- | --- | --- |
| `raw_channel` | `leads.raw` | the event's `channel` (`-` none, `undecodable` for bad JSON) | events |
| `raw_source` | `leads.raw` | the event's `source` | events |
| `dlq_code` | `leads.dlq` | the `error` header (the rejection code) | events |
| `assigned_segment` | `leads.assigned` | `business_line/segment` | assignments |
| `speed_queue` | `leads.assigned` | the queue; first attempts only | histogram of speed to lead |

Windows follow the messages' own timestamps (producer time). Table keys carry the source
partition (`"3|app"`), so each key is only ever updated from one partition and lives in one
changelog partition — correct across rebalances and with several analytics workers, each owning
its partitions.

Every `analytics.flush_interval` a worker adds what it counted since its last flush to
`stream_minutes` (an additive upsert), where `/api/v1/pipeline`, `/ops` and `leadflow status`
read them (summing the partitions), and deletes rows past `analytics.retention`. The sink adds
deltas rather than copying the tables because a table restored from its changelog may be short
of the last updates (the embedded broker under-reports a changelog's end offset, so recovery can
stop before its last batch); the database keeps every count a worker made.

Nothing here is on the path of a lead: the role has its own consumer group and commits, a crash
or restart of it leaves intake untouched, and a failure inside it is logged and retried with
backoff rather than stopping the process it runs in. Figures are "at least once": a stop flushes
what was counted, and a restart may count again the messages after the last offset commit (a few
seconds' worth) — never fewer; a SIGKILL may lose up to one flush interval of counts. The
database's own counts (lead events, rejects) are the exact ones.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from prometheus_client import Counter, Gauge

from leadflow.kafka import describe_topics
from leadflow.logs import get_logger
from leadflow.settings import KafkaSettings, Settings, TopicSettings

log = get_logger("leadflow.analytics")

#: Upper bounds (seconds) of the speed-to-lead histogram buckets; the last one is open.
SPEED_BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600, 24 * 3600, math.inf,
)  # fmt: skip
METRICS = ("raw_channel", "raw_source", "dlq_code", "assigned_segment", "speed_queue")

_FLUSHES = Counter(
    "leadflow_analytics_flushes_total", "Flushes of the stream windows to PostgreSQL.", ["outcome"]
)
_MESSAGES = Counter(
    "leadflow_analytics_messages_total", "Messages the stream analytics counted.", ["topic"]
)
_RESTARTS = Counter(
    "leadflow_analytics_restarts_total", "Times the stream analytics app failed and restarted."
)
_UP = Gauge(
    "leadflow_analytics_up", "1 while the stream analytics app runs.", multiprocess_mode="livemax"
)


# --- pure parts -------------------------------------------------------------------------------


def table_key(partition: int, key: str) -> str:
    return f"{partition}|{key}"


def speed_bucket(seconds: float) -> int:
    """Index of the histogram bucket of a speed to lead (negative clock skew counts as 0)."""
    return bisect.bisect_left(SPEED_BUCKETS, max(seconds, 0.0))


def percentile(histogram: Mapping[str, int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-th quantile (None without data); the open
    last bucket reports its lower bound."""
    counts = {int(bucket): int(count) for bucket, count in histogram.items() if int(count) > 0}
    total = sum(counts.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            bound = SPEED_BUCKETS[bucket]
            return bound if math.isfinite(bound) else SPEED_BUCKETS[bucket - 1]
    return None  # pragma: no cover - the loop always reaches the total


def merge_histograms(histograms: Iterable[Mapping[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for histogram in histograms:
        for bucket, count in histogram.items():
            merged[str(bucket)] = merged.get(str(bucket), 0) + int(count)
    return merged


def raw_keys(value: bytes) -> tuple[str, str]:
    """(channel, source) of a raw event; what cannot be read counts as `undecodable`."""
    try:
        event = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return "undecodable", "undecodable"
    if not isinstance(event, dict):
        return "undecodable", "undecodable"
    channel = event.get("channel")
    source = event.get("source")
    return (
        channel if isinstance(channel, str) and channel else "-",
        source if isinstance(source, str) and source else "-",
    )


def assignment_keys(value: bytes) -> tuple[str, str, float | None]:
    """(line/segment, queue, speed to lead in seconds or None) of an assignment event."""
    event = json.loads(value)
    segment = f"{event.get('business_line', '-')}/{event.get('segment', '-')}"
    speed = None
    queued_at = event.get("lead_queued_at")
    if event.get("attempt") == 1 and queued_at and event.get("assigned_at"):
        speed = (
            datetime.fromisoformat(event["assigned_at"]) - datetime.fromisoformat(queued_at)
        ).total_seconds()
    return segment, str(event.get("queue", "-")), speed


@dataclass(frozen=True)
class WindowRow:
    minute: datetime
    metric: str
    key: str
    partition: int
    value: int | dict[str, int]


def minute_of(timestamp: float) -> float:
    """The start (epoch seconds) of the one-minute tumbling window holding `timestamp`."""
    return math.floor(timestamp / 60) * 60


class Deltas:
    """What a worker counted since its last flush, per (metric, minute, key, partition)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, float, str, int], int] = {}
        self.histograms: dict[tuple[str, float, str, int], dict[str, int]] = {}

    def add(self, metric: str, timestamp: float, key: str, partition: int) -> None:
        slot = (metric, minute_of(timestamp), key, partition)
        self.counts[slot] = self.counts.get(slot, 0) + 1

    def observe(self, metric: str, timestamp: float, key: str, partition: int, bucket: str) -> None:
        histogram = self.histograms.setdefault((metric, minute_of(timestamp), key, partition), {})
        histogram[bucket] = histogram.get(bucket, 0) + 1

    def take(self) -> list[WindowRow]:
        """The rows to add, leaving this empty."""
        rows = [
            WindowRow(datetime.fromtimestamp(slot[1], UTC), slot[0], slot[2], slot[3], count)
            for slot, count in self.counts.items()
        ]
        rows += [
            WindowRow(datetime.fromtimestamp(slot[1], UTC), slot[0], slot[2], slot[3], histogram)
            for slot, histogram in self.histograms.items()
        ]
        self.counts, self.histograms = {}, {}
        return rows

    def put_back(self, rows: Iterable[WindowRow]) -> None:
        """Rows a failed flush could not write, counted again for the next one."""
        for row in rows:
            slot = (row.metric, row.minute.timestamp(), row.key, row.partition)
            if isinstance(row.value, dict):
                merged = merge_histograms([self.histograms.get(slot, {}), row.value])
                self.histograms[slot] = merged
            else:
                self.counts[slot] = self.counts.get(slot, 0) + row.value


# --- the role ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyticsConfig:
    app_id: str
    flush_interval: timedelta
    retention: timedelta
    retry_backoff_max: timedelta
    #: Faust's defaults (60 s) keep a restarted worker out of its group for up to a minute or
    #: two while the broker waits on the member that left; the intake's defaults serve here too.
    session_timeout: timedelta = timedelta(seconds=10)
    heartbeat_interval: timedelta = timedelta(seconds=3)


# Adds counts (JSON numbers) and histograms (objects of bucket -> count) to what is there.
_UPSERT = """
INSERT INTO stream_minutes AS s (minute, metric, key, partition, value, updated_at)
SELECT m, me, k, p, v, now()
FROM unnest(%s::timestamptz[], %s::text[], %s::text[], %s::int[], %s::jsonb[]) AS u(m, me, k, p, v)
ON CONFLICT (minute, metric, key, partition) DO UPDATE
SET updated_at = now(), value = CASE
    WHEN jsonb_typeof(s.value) = 'number' AND jsonb_typeof(EXCLUDED.value) = 'number'
        THEN to_jsonb(s.value::bigint + EXCLUDED.value::bigint)
    ELSE (SELECT jsonb_object_agg(b, coalesce((s.value ->> b)::bigint, 0)
                                      + coalesce((EXCLUDED.value ->> b)::bigint, 0))
          FROM (SELECT jsonb_object_keys(s.value) UNION
                SELECT jsonb_object_keys(EXCLUDED.value)) AS buckets(b))
END
"""
_PRUNE = "DELETE FROM stream_minutes WHERE minute < %s"


def write_rows(conn: psycopg.Connection[Any], rows: Sequence[WindowRow], oldest: datetime) -> None:
    with conn.transaction():
        if rows:
            conn.execute(
                _UPSERT,
                (
                    [r.minute for r in rows],
                    [r.metric for r in rows],
                    [r.key for r in rows],
                    [r.partition for r in rows],
                    [json.dumps(r.value) for r in rows],
                ),
            )
        conn.execute(_PRUNE, (oldest,))


def _credentials(kafka: KafkaSettings) -> Any:
    import faust

    options = kafka.client_options()
    context = options.get("ssl_context")
    if kafka.sasl_mechanism:
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            ssl_context=context,
            mechanism=kafka.sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


class StreamAnalytics:
    """The analytics role: a faust app started inside the caller's event loop."""

    def __init__(
        self,
        config: AnalyticsConfig,
        kafka: KafkaSettings,
        topics: TopicSettings,
        connect: Callable[[], psycopg.Connection[Any]],
    ) -> None:
        self.config = config
        self.kafka = kafka
        self.topics = topics
        self.connect = connect
        self.deltas = Deltas()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop`; a failing app is stopped, logged and started again with backoff."""
        backoff = 1.0
        while not stop.is_set():
            app = None
            try:
                app = await self._build()
                await app.start()
                _UP.set(1)
                log.info("stream analytics running", app_id=self.config.app_id)
                backoff = 1.0
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            stop.wait(), self.config.flush_interval.total_seconds()
                        )
                    await self._flush()
                    crashed = getattr(app, "_crash_reason", None)
                    if crashed is not None:
                        raise RuntimeError(f"the faust app crashed: {crashed!r}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _RESTARTS.inc()
                log.warning(
                    "stream analytics failed; restarting", error=repr(exc), retry_in=backoff
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, self.config.retry_backoff_max.total_seconds())
            finally:
                _UP.set(0)
                if app is not None:
                    with contextlib.suppress(Exception):
                        await app.stop()
                    await self._flush()  # what was counted up to the stop

    async def _build(self) -> Any:
        import faust

        names = [self.topics.raw, self.topics.dlq, self.topics.assigned]
        info = await describe_topics(self.kafka, names)
        missing = [name for name, found in info.items() if found is None]
        if missing:
            raise RuntimeError(f"topics missing: {', '.join(missing)}")
        partitions = {name: found.partitions for name, found in info.items() if found}
        app = faust.App(
            self.config.app_id,
            broker=[
                f"kafka://{server.strip()}" for server in (self.kafka.bootstrap or "").split(",")
            ],
            broker_credentials=_credentials(self.kafka),
            store="memory://",
            web_enabled=False,
            autodiscover=False,
            topic_partitions=partitions[self.topics.raw],
            topic_replication_factor=self.topics.replication_factor,
            table_cleanup_interval=60.0,
            broker_session_timeout=self.config.session_timeout.total_seconds(),
            broker_rebalance_timeout=self.config.session_timeout.total_seconds(),
            broker_heartbeat_interval=self.config.heartbeat_interval.total_seconds(),
        )
        expires = self.config.retention + timedelta(minutes=5)

        def table(name: str, topic: str, default: type) -> Any:
            return (
                app.Table(name, default=default, partitions=partitions[topic])
                .tumbling(60, expires=expires)
                .relative_to_stream()
            )

        raw_channel = table("raw_channel", self.topics.raw, int)
        raw_source = table("raw_source", self.topics.raw, int)
        dlq_code = table("dlq_code", self.topics.dlq, int)
        assigned_segment = table("assigned_segment", self.topics.assigned, int)
        speed_queue = table("speed_queue", self.topics.assigned, dict)

        def topic(name: str) -> Any:
            return app.topic(
                name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
            )

        deltas = self.deltas

        async def count_raw(stream: Any) -> None:
            async for event in stream.events():
                partition, at = event.message.partition, event.message.timestamp
                channel, source = raw_keys(event.value or b"")
                raw_channel[table_key(partition, channel)] += 1
                raw_source[table_key(partition, source)] += 1
                deltas.add("raw_channel", at, channel, partition)
                deltas.add("raw_source", at, source, partition)
                _MESSAGES.labels("raw").inc()

        async def count_dlq(stream: Any) -> None:
            async for event in stream.events():
                partition, at = event.message.partition, event.message.timestamp
                headers = dict(event.headers or {})
                code = headers.get("error", b"-")
                text = code.decode("utf-8", "replace") if isinstance(code, bytes) else str(code)
                dlq_code[table_key(partition, text)] += 1
                deltas.add("dlq_code", at, text, partition)
                _MESSAGES.labels("dlq").inc()

        async def count_assigned(stream: Any) -> None:
            async for event in stream.events():
                partition, at = event.message.partition, event.message.timestamp
                try:
                    segment, queue, speed = assignment_keys(event.value or b"")
                except (ValueError, TypeError, KeyError):
                    continue  # not ours to judge: the relay publishes what the allocator wrote
                assigned_segment[table_key(partition, segment)] += 1
                deltas.add("assigned_segment", at, segment, partition)
                if speed is not None:
                    key = table_key(partition, queue)
                    histogram = dict(speed_queue[key].current())
                    bucket = str(speed_bucket(speed))
                    histogram[bucket] = histogram.get(bucket, 0) + 1
                    speed_queue[key] = histogram
                    deltas.observe("speed_queue", at, queue, partition, bucket)
                _MESSAGES.labels("assigned").inc()

        app.agent(topic(self.topics.raw), name="count_raw")(count_raw)
        app.agent(topic(self.topics.dlq), name="count_dlq")(count_dlq)
        app.agent(topic(self.topics.assigned), name="count_assigned")(count_assigned)
        return app

    async def _flush(self) -> None:
        now = datetime.now(UTC)
        rows = self.deltas.take()

        def write() -> None:
            with self.connect() as conn:
                write_rows(conn, rows, now - self.config.retention)

        try:
            await asyncio.to_thread(write)
            _FLUSHES.labels("ok").inc()
        except psycopg.Error as exc:
            self.deltas.put_back(rows)
            _FLUSHES.labels("failed").inc()
            log.warning("stream analytics flush failed; next one retries", error=repr(exc))


def analytics_worker(settings: Settings) -> StreamAnalytics:
    """The analytics role, wired from the settings."""
    assert settings.database.url is not None
    url = settings.database.url.get_secret_value()
    timeout = max(1, int(settings.database.connect_timeout.total_seconds()))
    section = settings.analytics
    return StreamAnalytics(
        AnalyticsConfig(
            app_id=section.app_id,
            flush_interval=section.flush_interval,
            retention=section.retention,
            retry_backoff_max=settings.intake.retry_backoff_max,
            session_timeout=section.session_timeout,
            heartbeat_interval=section.heartbeat_interval,
        ),
        settings.kafka,
        settings.topics,
        lambda: psycopg.connect(
            url, autocommit=True, connect_timeout=timeout, application_name="leadflow-analytics"
        ),
    )
