"""The real-time intake through a real broker into a real PostgreSQL: exact state, exact DLQ."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ingest.chain import ChainConfig, IntakeChain
from ingest.consumer import IntakeConfig, KafkaIntake
from ingest.publisher import LeadPublisher
from ingest.store import LeadStore
from schemas.lead import Classification, CustomerContext, Lead

GOOD = {
    "schema_version": 1,
    "occurred_at": "2026-11-23T09:15:02+08:00",
    "source": "loan-app",
    "event_type": "order_pending_payment",
    "customer": {"phone": "138 0013 8000", "external_id": "u-1"},
    "product": "personal_credit_loan",
    "consent": {"telemarketing": True},
}


def good(phone: str, external_id: str | None = None, **extra: Any) -> dict[str, Any]:
    customer = {"phone": phone, **({"external_id": external_id} if external_id else {})}
    return {**GOOD, "event_id": str(uuid.uuid4()), "customer": customer, **extra}


def classify(
    leads: Sequence[Lead], now: datetime, context: Mapping[str, CustomerContext]
) -> list[Classification]:
    return [
        Classification(lead.product or "general", "default", 50, ("r1",), "v1") for lead in leads
    ]


async def create_topics(bootstrap: str, *names: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 3, 1) for name in names])
    finally:
        await admin.close()


@pytest.fixture
async def topics(kafka_bootstrap: str) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    raw, dlq = f"raw.{suffix}", f"dlq.{suffix}"
    await create_topics(kafka_bootstrap, raw, dlq)
    return raw, dlq


def make_worker(
    db_url: str, bootstrap: str, raw: str, dlq: str, group: str, *, require_consent: bool = False
) -> KafkaIntake:
    return KafkaIntake(
        IntakeConfig(
            raw,
            dlq,
            group,
            batch_size=500,
            batch_wait=timedelta(milliseconds=20),
            retry_backoff_max=timedelta(seconds=1),
        ),
        {"bootstrap_servers": bootstrap},
        lambda: psycopg.connect(db_url, autocommit=True),
        IntakeChain(ChainConfig("CN", 64 * 1024, require_consent)),
        LeadStore(),
        lambda: classify,
    )


@asynccontextmanager
async def running(worker: KafkaIntake) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def wait_until(check: Callable[[], bool], limit: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting for the intake")
        await asyncio.sleep(0.2)


def count(db_url: str, query: str) -> int:
    with psycopg.connect(db_url) as conn:
        return int(conn.execute(query).fetchone()[0])  # type: ignore[index]


async def read_all(bootstrap: str, topic: str, expected: int) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    messages: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(messages) < expected and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                messages.extend(batch)
        await asyncio.sleep(0.5)  # anything beyond `expected` would show up here
        for batch in (await consumer.getmany(timeout_ms=500)).values():
            messages.extend(batch)
    finally:
        await consumer.stop()
    return messages


async def test_valid_invalid_redelivered_and_returning_events(
    db_url: str, kafka_bootstrap: str, topics: tuple[str, str]
) -> None:
    raw, dlq = topics
    returning = [good("139 0000 0001", "u-ret", product="car_loan") for _ in range(3)]
    fresh = [good(f"150 0000 {n:04d}") for n in range(20)]
    redelivered = fresh[:5]
    poison: list[tuple[bytes, str]] = [
        (b"{not json", "invalid_json"),
        (b'{"schema_version": 1, "event_id": "\xff\xfe"}', "invalid_utf8"),
        (json.dumps({**good("150 0000 0001"), "occurred_at": "yesterday"}).encode(), "schema_violation"),
        (json.dumps({**good("150 0000 0001"), "schema_version": 2}).encode(), "unsupported_schema_version"),
        (json.dumps(good("12345")).encode(), "invalid_phone"),
        (json.dumps({**good("150 0000 0002"), "attributes": {"x": "y" * 70_000}}).encode(), "too_large"),
        (json.dumps({k: v for k, v in good("150 0000 0003").items() if k != "consent"}).encode(),
         "consent_missing"),
    ]  # fmt: skip

    async with LeadPublisher(raw, bootstrap_servers=kafka_bootstrap) as publisher:
        for event in [*returning, *fresh, *redelivered]:
            await publisher.publish(event)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=1_000_000)
    await producer.start()
    try:
        for n, (value, _) in enumerate(poison):
            await producer.send_and_wait(raw, value, key=f"poison-{n}".encode())
    finally:
        await producer.stop()

    worker = make_worker(
        db_url, kafka_bootstrap, raw, dlq, f"g-{uuid.uuid4().hex[:6]}", require_consent=True
    )
    async with running(worker):
        await wait_until(lambda: count(db_url, "SELECT count(*) FROM lead_events") == 23)
        await wait_until(
            lambda: (
                count(db_url, "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets") == 35
            )
        )

    with psycopg.connect(db_url) as conn:
        leads = conn.execute(
            "SELECT c.phone_e164, l.business_line, l.state, l.event_count, l.realtime FROM leads l"
            " JOIN customers c ON c.id = l.customer_id ORDER BY c.phone_e164"
        ).fetchall()
        kafka_positions = conn.execute(
            "SELECT count(*) FROM lead_events WHERE kafka_topic = %s AND kafka_offset IS NOT NULL",
            (raw,),
        ).fetchone()
    assert leads[0] == ("+8613900000001", "car_loan", "queued", 3, True)
    assert [row[0] for row in leads[1:]] == [f"+861500000{n:04d}" for n in range(20)]
    assert all(row[1:] == ("personal_credit_loan", "queued", 1, True) for row in leads[1:])
    assert kafka_positions == (23,)

    dead = await read_all(kafka_bootstrap, dlq, len(poison))
    assert len(dead) == len(poison)
    by_key = {m.key: m for m in dead}
    for n, (value, code) in enumerate(poison):
        message = by_key[f"poison-{n}".encode()]
        headers = dict(message.headers)
        assert message.value == value, code  # the original bytes, untouched
        assert headers["error"] == code.encode()
        assert headers["error-detail"]
        assert headers["source-topic"] == raw.encode()
        assert (
            int(headers["source-partition"]) == message.partition
            or headers["source-partition"].isdigit()
        )
        assert headers["source-offset"].isdigit()


async def test_a_restarted_worker_resumes_from_the_database_offsets(
    db_url: str, kafka_bootstrap: str, topics: tuple[str, str]
) -> None:
    raw, dlq = topics
    group = f"g-{uuid.uuid4().hex[:6]}"
    async with LeadPublisher(raw, bootstrap_servers=kafka_bootstrap) as publisher:
        for n in range(50):
            await publisher.publish(good(f"151 0000 {n:04d}"))
    async with running(make_worker(db_url, kafka_bootstrap, raw, dlq, group)):
        await wait_until(lambda: count(db_url, "SELECT count(*) FROM lead_events") == 50)

    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT sum(next_offset) FROM consumer_offsets").fetchone()
    assert stored == (50,)
    # Kafka's committed offsets (50) are only for lag tools. Rewind the database's to 0: the
    # restarted worker must follow the database, re-read everything, and store nothing twice.
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE consumer_offsets SET next_offset = 0")

    async with LeadPublisher(raw, bootstrap_servers=kafka_bootstrap) as publisher:
        for n in range(50, 60):
            await publisher.publish(good(f"151 0000 {n:04d}"))
    restarted = make_worker(db_url, kafka_bootstrap, raw, dlq, group)
    async with running(restarted):
        await wait_until(lambda: restarted.records >= 60)
        await asyncio.sleep(1)  # anything read twice would show here
    assert restarted.records == 60  # it resumed where PostgreSQL said, not where Kafka did
    assert count(db_url, "SELECT count(*) FROM lead_events") == 60
    assert count(db_url, "SELECT count(*) FROM leads") == 60
    assert count(db_url, "SELECT sum(next_offset) FROM consumer_offsets") == 60


async def test_two_workers_share_the_partitions_and_store_everything_once(
    db_url: str, kafka_bootstrap: str, topics: tuple[str, str]
) -> None:
    raw, dlq = topics
    group = f"g-{uuid.uuid4().hex[:6]}"
    first = make_worker(db_url, kafka_bootstrap, raw, dlq, group)
    second = make_worker(db_url, kafka_bootstrap, raw, dlq, group)
    async with running(first), running(second):
        async with LeadPublisher(raw, bootstrap_servers=kafka_bootstrap) as publisher:
            for n in range(300):
                await publisher.publish(good(f"152 {n:04d} 0000", external_id=f"c-{n}"))
        await wait_until(lambda: count(db_url, "SELECT count(*) FROM lead_events") == 300)
        await asyncio.sleep(1)
    assert count(db_url, "SELECT count(*) FROM leads") == 300
    assert first.batches > 0
    assert second.batches > 0
    assert datetime.now().year >= 2026  # noqa: DTZ005 - sanity of the machine clock only
