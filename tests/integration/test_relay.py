"""The outbox relay on a real PostgreSQL and a real broker: what is committed is published with
its key, value and headers, in id order per key, and marked; what rolled back never is; one
relay leads while others stand by; retention; a broker away at first; rows Kafka refuses."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY
from psycopg.types.json import Jsonb

from allocate.relay import OUTBOX_CHANNEL, OutboxRelay, RelayConfig
from leadflow.embedded import EmbeddedKafka, free_port
from schemas.events import AssignmentEvent

pytestmark = pytest.mark.integration

Row = tuple[str, str | None, dict[str, Any], dict[str, Any] | None]  # topic, key, payload, headers


def assignment(agent: str, lead_id: int) -> dict[str, Any]:
    event = AssignmentEvent(
        assignment_id=uuid.uuid4(),
        lead_id=lead_id,
        agent_id=agent,
        queue="loans",
        strategy="round_robin",
        reason="next in turn",
        business_line="loans",
        segment="default",
        priority=60,
        attempt=1,
        assigned_at=datetime(2026, 11, 23, 9, 15, tzinfo=UTC),
        customer_phone="+8613800138000",
        customer_name="张三",
    )
    return event.model_dump(mode="json")


def insert(db_url: str, rows: Iterable[Row], *, commit: bool = True) -> list[int]:
    """Rows written in one transaction, as the allocator does (NOTIFY included)."""
    with psycopg.connect(db_url) as conn:
        ids = [
            conn.execute(
                "INSERT INTO outbox (topic, key, payload, headers) VALUES (%s, %s, %s, %s) "
                "RETURNING id",
                (topic, key, Jsonb(payload), _jsonb(headers)),
            ).fetchone()[0]  # type: ignore[index]
            for topic, key, payload, headers in rows
        ]
        conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")
        if not commit:
            conn.rollback()
    return ids


def _jsonb(value: Any) -> Any:
    return None if value is None else Jsonb(value)


def query(db_url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql, params).fetchall()


def unpublished(db_url: str) -> int:
    return int(query(db_url, "SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0])


def make_relay(
    db_url: str,
    bootstrap: str,
    *,
    app: str = "relay-test",
    kafka: dict[str, Any] | None = None,
    **config: Any,
) -> OutboxRelay:
    settings = {"poll_interval": timedelta(milliseconds=200), "gauge_interval": timedelta(0)}
    settings["retry_backoff_max"] = timedelta(milliseconds=500)
    return OutboxRelay(
        RelayConfig(**(settings | config)),
        {"bootstrap_servers": bootstrap, **(kafka or {})},
        lambda: psycopg.AsyncConnection.connect(db_url, autocommit=True, application_name=app),
    )


@asynccontextmanager
async def running(relay: OutboxRelay) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def wait_until(check: Callable[[], bool], limit: float = 20, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


async def read_topic(bootstrap: str, topic: str, expected: int) -> list[Any]:
    """Every message of the topic, from the beginning, by a fresh consumer with no group (the
    embedded broker's groups and ListOffsets have rough edges)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    messages: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(messages) < expected and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                messages.extend(batch)
        await asyncio.sleep(0.3)  # anything beyond `expected` shows up here
        for batch in (await consumer.getmany(timeout_ms=300)).values():
            messages.extend(batch)
    finally:
        await consumer.stop()
    return messages


def ids_by_assignment(db_url: str) -> dict[str, int]:
    return {
        str(a): int(i) for i, a in query(db_url, "SELECT id, payload->>'assignment_id' FROM outbox")
    }


def assert_first_occurrences_in_id_order(messages: Sequence[Any], ids: dict[str, int]) -> None:
    seen: set[int] = set()
    per_key: dict[bytes, list[int]] = {}
    for message in messages:
        row_id = ids[json.loads(message.value)["assignment_id"]]
        if row_id not in seen:
            seen.add(row_id)
            per_key.setdefault(message.key, []).append(row_id)
    for key, order in per_key.items():
        assert order == sorted(order), f"key {key!r} out of id order: {order}"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_committed_rows_are_published_in_order_marked_and_rolled_back_ones_never(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    # A poll interval far beyond the test: only NOTIFY can make the relay publish in time.
    relay = make_relay(db_url, kafka_bootstrap, poll_interval=timedelta(minutes=5))
    published_before = metric("leadflow_relay_published_total", topic=topic)
    async with running(relay):
        await wait_until(lambda: relay.leader, what="leadership")
        await asyncio.sleep(0.2)  # the first round (nothing to do) is behind it
        committed: list[Row] = []
        rolled_back: list[Row] = []
        for n in range(12):
            rows: list[Row] = [
                (
                    topic,
                    f"agent-{(n + i) % 3}",
                    assignment(f"agent-{(n + i) % 3}", n * 10 + i),
                    {"trace-id": f"t-{n}-{i}", "source": "allocator"} if i % 2 else None,
                )
                for i in range(5)
            ]
            if n in (3, 8):
                insert(db_url, rows, commit=False)
                rolled_back += rows
            else:
                insert(db_url, rows)
                committed += rows
        await wait_until(lambda: unpublished(db_url) == 0, what="every row marked published")

    messages = await read_topic(kafka_bootstrap, topic, len(committed))
    assert len(messages) == len(committed)  # no repeats without faults
    for _, key, payload, headers in committed:
        (message,) = [m for m in messages if json.loads(m.value) == payload]
        assert message.key == key.encode()  # type: ignore[union-attr]
        assert AssignmentEvent.model_validate_json(message.value).agent_id == key
        assert dict(message.headers) == {k: v.encode() for k, v in (headers or {}).items()}
    gone = {row[2]["assignment_id"] for row in rolled_back}
    assert not [m for m in messages if json.loads(m.value)["assignment_id"] in gone]
    assert_first_occurrences_in_id_order(messages, ids_by_assignment(db_url))
    assert query(db_url, "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == [
        (len(committed),)
    ]
    assert relay.published == len(committed)
    assert metric("leadflow_relay_published_total", topic=topic) - published_before == len(
        committed
    )


async def test_a_standby_waits_while_the_leader_lives_and_takes_over_when_it_stops(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    first, second = make_relay(db_url, kafka_bootstrap), make_relay(db_url, kafka_bootstrap)
    rows = [(topic, f"agent-{n % 4}", assignment(f"agent-{n % 4}", n), None) for n in range(40)]
    stop_first = asyncio.Event()
    first_task = asyncio.create_task(first.run(stop_first))
    try:
        await wait_until(lambda: first.leader, what="the first relay to lead")
        async with running(second):
            for chunk in range(0, 20, 5):
                insert(db_url, rows[chunk : chunk + 5])
            await wait_until(lambda: unpublished(db_url) == 0, what="the leader to publish")
            await asyncio.sleep(0.6)  # the standby tried the lock a few times meanwhile
            assert (first.published, second.published) == (20, 0)
            assert not second.leader

            stop_first.set()
            await asyncio.wait_for(first_task, 30)
            await wait_until(lambda: second.leader, what="the standby to take over")
            for chunk in range(20, 40, 5):
                insert(db_url, rows[chunk : chunk + 5])
            await wait_until(lambda: unpublished(db_url) == 0, what="the new leader to publish")
            assert second.published == 20
    finally:
        stop_first.set()
        await asyncio.wait_for(first_task, 30)
    messages = await read_topic(kafka_bootstrap, topic, len(rows))
    assert sorted(json.loads(m.value)["lead_id"] for m in messages) == list(range(40))
    assert_first_occurrences_in_id_order(messages, ids_by_assignment(db_url))


async def test_when_the_leaders_connections_die_publishing_goes_on(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    first = make_relay(db_url, kafka_bootstrap, app="relay-first")
    second = make_relay(db_url, kafka_bootstrap, app="relay-second")
    rows = [(topic, f"agent-{n % 3}", assignment(f"agent-{n % 3}", n), None) for n in range(30)]
    errors_before = metric("leadflow_relay_errors_total", kind="database")
    async with running(first), running(second):
        await wait_until(lambda: first.leader or second.leader, what="a leader")
        leader = "relay-first" if first.leader else "relay-second"
        insert(db_url, rows[:10])
        await wait_until(lambda: unpublished(db_url) == 0, what="the leader to publish")
        # The leader's sessions end under it (as when its host drops off the network): its
        # advisory lock goes with them.
        query(
            db_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (leader,),
        )
        await wait_until(
            lambda: metric("leadflow_relay_errors_total", kind="database") > errors_before,
            what="the loss to be noticed",
        )
        for chunk in range(10, 30, 5):
            insert(db_url, rows[chunk : chunk + 5])
        await wait_until(lambda: unpublished(db_url) == 0, what="publishing to resume")
        await wait_until(lambda: first.leader != second.leader, what="exactly one leader")
    messages = await read_topic(kafka_bootstrap, topic, len(rows))
    assert {json.loads(m.value)["lead_id"] for m in messages} == set(range(30))
    assert_first_occurrences_in_id_order(messages, ids_by_assignment(db_url))


async def test_retention_deletes_old_published_rows_only(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    old_published, recent_published, old_unpublished = (
        insert(db_url, [(topic, "agent-1", assignment("agent-1", n), None)])[0] for n in range(3)
    )
    now = datetime.now(UTC)
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE outbox SET created_at = %s, published_at = %s WHERE id = %s",
            (now - timedelta(days=9), now - timedelta(days=8), old_published),
        )
        conn.execute(
            "UPDATE outbox SET created_at = %s, published_at = %s WHERE id = %s",
            (now - timedelta(days=2), now - timedelta(days=1), recent_published),
        )
        conn.execute(
            "UPDATE outbox SET created_at = %s WHERE id = %s",
            (now - timedelta(days=8), old_unpublished),
        )
    relay = make_relay(db_url, kafka_bootstrap, retention=timedelta(days=7))
    async with running(relay):
        await wait_until(lambda: unpublished(db_url) == 0, what="the old unpublished row")
        await asyncio.sleep(0.3)
        assert relay.published == 1  # only the row not yet published
    remaining = {row[0] for row in query(db_url, "SELECT id FROM outbox")}
    assert remaining == {recent_published, old_unpublished}


async def test_a_broker_away_at_first_gets_the_rows_once_it_is_back(
    db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topic = f"relay.late.{uuid.uuid4().hex[:8]}"
    rows = [(topic, f"agent-{n % 2}", assignment(f"agent-{n % 2}", n), None) for n in range(10)]
    insert(db_url, rows)
    relay = make_relay(db_url, bootstrap, kafka={"request_timeout_ms": 2000})
    errors_before = metric("leadflow_relay_errors_total", kind="kafka")
    broker = EmbeddedKafka(tmp_path / "kafka", port=port)
    try:
        async with running(relay):
            await wait_until(lambda: relay.leader, what="leadership")
            await wait_until(
                lambda: metric("leadflow_relay_errors_total", kind="kafka") >= errors_before + 2,
                what="retries against the missing broker",
            )
            assert unpublished(db_url) == len(rows)  # nothing skipped, nothing marked
            broker.start()
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(topic, 2, 1)])
            finally:
                await admin.close()
            await wait_until(lambda: unpublished(db_url) == 0, limit=30, what="the rows")
        messages = await read_topic(bootstrap, topic, len(rows))
    finally:
        broker.stop()
    assert sorted(json.loads(m.value)["lead_id"] for m in messages) == list(range(10))
    assert_first_occurrences_in_id_order(messages, ids_by_assignment(db_url))


async def test_rows_kafka_refuses_are_held_their_key_waits_and_the_rest_flows(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    big = {**assignment("agent-a", 1), "customer_name": "x" * 20_000}
    a1, a2 = insert(
        db_url, [(topic, "agent-a", big, None), (topic, "agent-a", assignment("agent-a", 2), None)]
    )
    (b1,) = insert(db_url, [(topic, "agent-b", assignment("agent-b", 3), None)])
    (c1,) = insert(db_url, [(topic, "agent-c", assignment("agent-c", 4), None)])
    with psycopg.connect(db_url) as conn:  # headers that are not an object of strings
        conn.execute('UPDATE outbox SET headers = \'["not", "an object"]\' WHERE id = %s', (c1,))
    (c2,) = insert(db_url, [(topic, "agent-c", assignment("agent-c", 5), None)])
    (bad,) = insert(db_url, [("no spaces allowed", None, assignment("agent-d", 6), None)])
    (b2,) = insert(db_url, [(topic, "agent-b", assignment("agent-b", 7), None)])
    errors_before = metric("leadflow_relay_errors_total", kind="unpublishable")

    relay = make_relay(db_url, kafka_bootstrap, max_request_size=8 * 1024)
    async with running(relay):

        def published() -> set[int]:
            return {
                r[0] for r in query(db_url, "SELECT id FROM outbox WHERE published_at IS NOT NULL")
            }

        await wait_until(lambda: published() == {b1, b2}, what="the other key to flow")
        await asyncio.sleep(0.8)  # retries come and fail again; the key keeps waiting
        assert published() == {b1, b2}
        assert metric("leadflow_relay_errors_total", kind="unpublishable") >= errors_before + 4
        assert metric("leadflow_relay_held") == 3  # a1, c1 and the bad topic; a2, c2 wait
        assert metric("leadflow_relay_backlog") == 5
        assert metric("leadflow_relay_oldest_unpublished_seconds") > 0

        with psycopg.connect(db_url) as conn:  # an operator fixes or removes the rows
            conn.execute(
                "UPDATE outbox SET payload = %s WHERE id = %s",
                (Jsonb(assignment("agent-a", 1)), a1),
            )
            conn.execute("UPDATE outbox SET headers = NULL WHERE id = %s", (c1,))
            conn.execute("DELETE FROM outbox WHERE id = %s", (bad,))
        await wait_until(lambda: unpublished(db_url) == 0, what="the held keys to flow again")
        await wait_until(lambda: metric("leadflow_relay_held") == 0, what="nothing held")

    messages = await read_topic(kafka_bootstrap, topic, 6)
    ids = ids_by_assignment(db_url)
    assert sorted(ids[json.loads(m.value)["assignment_id"]] for m in messages) == sorted(
        [a1, a2, b1, b2, c1, c2]
    )
    assert_first_occurrences_in_id_order(messages, ids)
