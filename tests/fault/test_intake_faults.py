"""Fault tests of the real-time intake (DESIGN.md, "Reliability"): the worker is the real
`leadflow run intake` process, killed and restarted; PostgreSQL is stopped under it; poison is
mixed into the stream. Afterwards every valid event is stored exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ingest.phones import InvalidPhone, PhoneNormaliser
from ingest.publisher import LeadPublisher
from leadflow.embedded import EmbeddedPostgres
from schemas import migrate
from tests.fault.roles import RoleProcess

pytestmark = pytest.mark.fault

PARTITIONS = 4


def event(n: int) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": f"ev-{n}",
        "occurred_at": "2026-11-23T09:15:02+08:00",
        "source": "loan-app",
        "event_type": "order_pending_payment",
        "customer": {
            "phone": f"1{3 + n % 7}{n % 1000:03d}{n // 1000:06d}"[:11],
            "external_id": f"c-{n % 5000}",
        },
        "product": "personal_credit_loan",
    }


PHONES = PhoneNormaliser("CN")


def valid_phone(n: int) -> bool:
    """Some generated numbers are not dialable: those events go to the DLQ, as they should."""
    try:
        PHONES.normalise(event(n)["customer"]["phone"])
    except InvalidPhone:
        return False
    return True


@pytest.fixture
def stream(kafka_bootstrap: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    names = {"raw": f"fault.raw.{suffix}", "dlq": f"fault.dlq.{suffix}", "group": f"fault-{suffix}"}

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(names["raw"], PARTITIONS, 1), NewTopic(names["dlq"], 1, 1)]
            )
        finally:
            await admin.close()

    asyncio.run(create())
    return names


def worker_env(db_url: str, bootstrap: str, stream: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    env.update(
        LEADFLOW_DATABASE_URL=db_url,
        LEADFLOW_KAFKA_BOOTSTRAP=bootstrap,
        LEADFLOW_TOPICS_RAW=stream["raw"],
        LEADFLOW_TOPICS_DLQ=stream["dlq"],
        LEADFLOW_TOPICS_PARTITIONS=str(PARTITIONS),
        LEADFLOW_INTAKE_CONSUMER_GROUP=stream["group"],
        LEADFLOW_INTAKE_SESSION_TIMEOUT="6s",
        LEADFLOW_INTAKE_HEARTBEAT_INTERVAL="1s",
        LEADFLOW_INTAKE_RETRY_BACKOFF_MAX="2s",
        LEADFLOW_LOG_LEVEL="WARNING",
        PYTHONWARNINGS="ignore",
    )
    return env


def stored_offsets(db_url: str, group: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE consumer_group = %s",
            (group,),
        ).fetchone()
    return int(row[0]) if row else 0


def wait_until_consumed(
    db_url: str, group: str, total: int, worker: RoleProcess, limit: float = 240
) -> None:
    deadline = time.monotonic() + limit
    while stored_offsets(db_url, group) < total:
        assert worker.process is not None
        if worker.process.poll() is not None:
            raise AssertionError(
                f"the worker exited: see {worker.log}:\n{worker.log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"consumed {stored_offsets(db_url, group)} of {total}; see {worker.log}"
            )
        time.sleep(0.5)


def assert_exactly_once(db_url: str, expected: set[str]) -> None:
    with psycopg.connect(db_url) as conn:
        stored = [row[0] for row in conn.execute("SELECT event_id FROM lead_events")]
        events_in_leads = conn.execute("SELECT coalesce(sum(event_count), 0) FROM leads").fetchone()
    assert len(stored) == len(set(stored)), "an event was stored twice"
    missing = expected - set(stored)
    assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:5]}"
    assert set(stored) == expected
    assert events_in_leads == (len(expected),), "lead event counts disagree with the events"


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    db_url: str, kafka_bootstrap: str, stream: dict[str, str], tmp_path: Path
) -> None:
    total = 100_000
    rng = random.Random(7)
    worker = RoleProcess(
        "intake", worker_env(db_url, kafka_bootstrap, stream), tmp_path / "worker.log"
    )

    async def produce() -> None:
        async with LeadPublisher(
            stream["raw"], bootstrap_servers=kafka_bootstrap, max_in_flight=5000
        ) as publisher:
            for n in range(total):
                await publisher.publish(event(n))
                if n % 2000 == 1999:
                    await publisher.flush()
                    await asyncio.sleep(0.25)  # a stream, not one burst

    at_kill: list[int] = []

    async def scenario() -> None:
        producing = asyncio.create_task(produce())
        for _ in range(6):
            # Kill only a worker that is storing: wait for progress, then strike within 0.5s.
            before = stored_offsets(db_url, stream["group"])
            deadline = time.monotonic() + 90
            while stored_offsets(db_url, stream["group"]) <= before:
                assert time.monotonic() < deadline, f"no progress; see {worker.log}"
                await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0, 0.5))
            at_kill.append(stored_offsets(db_url, stream["group"]))
            worker.kill()
            worker.start()
        await producing

    worker.start()
    try:
        asyncio.run(scenario())
        # Every produced record advances one stored offset, valid or not. (The embedded broker's
        # answer to ListOffsets(latest) can lag behind its log, so the test counts, not asks.)
        wait_until_consumed(db_url, stream["group"], total, worker)
    finally:
        worker.stop()
    assert len([n for n in at_kill if 0 < n < total]) >= 5, at_kill  # all mid-stream
    assert_exactly_once(db_url, {f"ev-{n}" for n in range(total) if valid_phone(n)})


def test_postgres_restarted_mid_stream_the_worker_recovers_by_itself(
    tmp_path: Path, kafka_bootstrap: str, stream: dict[str, str]
) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    url = server.start()
    migrate.upgrade(url)
    worker = RoleProcess(
        "intake", worker_env(url, kafka_bootstrap, stream), tmp_path / "worker.log"
    )
    total = 20_000

    async def produce(first: int, count: int) -> None:
        async with LeadPublisher(stream["raw"], bootstrap_servers=kafka_bootstrap) as publisher:
            for n in range(first, first + count):
                await publisher.publish(event(n))

    try:
        worker.start()
        asyncio.run(produce(0, total // 2))
        time.sleep(2)
        server.stop()  # PostgreSQL goes away under the worker
        asyncio.run(produce(total // 2, total // 2))
        time.sleep(3)
        assert worker.process is not None
        assert worker.process.poll() is None, "the worker must wait for the database, not die"
        server = EmbeddedPostgres(tmp_path / "pg", port=server.port, durable=False)
        server.start()
        wait_until_consumed(url, stream["group"], total, worker)
        assert worker.stop() == 0
        assert "transient failure, retrying" in (tmp_path / "worker.log").read_text()
        assert_exactly_once(url, {f"ev-{n}" for n in range(total) if valid_phone(n)})
    finally:
        worker.stop()
        server.stop()


POISON: list[tuple[bytes, str]] = [
    (b"{truncated", "invalid_json"),
    (b"\xc3\x28 not utf-8", "invalid_utf8"),
    (b'{"schema_version": 1, "event_id": 5}', "schema_violation"),
    (json.dumps({**event(0), "schema_version": 9}).encode(), "unsupported_schema_version"),
    (json.dumps({**event(0), "customer": {"phone": "not a phone"}}).encode(), "invalid_phone"),
    (b'{"pad": "' + b"x" * 70_000 + b'"}', "too_large"),
]


def test_a_flood_of_poison_goes_to_the_dlq_and_the_good_events_flow(
    db_url: str, kafka_bootstrap: str, stream: dict[str, str], tmp_path: Path
) -> None:
    good, bad = 5_000, 5_000
    expected_codes: dict[bytes, str] = {}

    async def produce() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap, linger_ms=5, max_request_size=2_000_000
        )
        await producer.start()
        try:
            pending = []
            for n in range(good + bad):
                if n % 2:
                    value, code = POISON[n % len(POISON)]
                    key = f"poison-{n}".encode()
                    expected_codes[key] = code
                else:
                    value, key = json.dumps(event(n)).encode(), f"good-{n}".encode()
                pending.append(await producer.send(stream["raw"], value, key=key))
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    asyncio.run(produce())
    worker = RoleProcess(
        "intake", worker_env(db_url, kafka_bootstrap, stream), tmp_path / "worker.log"
    )
    worker.start()
    try:
        wait_until_consumed(db_url, stream["group"], good + bad, worker)
    finally:
        assert worker.stop() == 0  # SIGTERM: finish the batch in hand and exit cleanly

    async def dead_letters() -> list[Any]:
        consumer = AIOKafkaConsumer(
            stream["dlq"],
            bootstrap_servers=kafka_bootstrap,
            auto_offset_reset="earliest",
            fetch_max_bytes=50_000_000,
        )
        await consumer.start()
        found: list[Any] = []
        try:
            deadline = time.monotonic() + 60
            while len(found) < bad + sum(1 for n in range(0, good + bad, 2) if not valid_phone(n)):
                if time.monotonic() > deadline:
                    break
                for messages in (await consumer.getmany(timeout_ms=1000)).values():
                    found.extend(messages)
        finally:
            await consumer.stop()
        return found

    letters = asyncio.run(dead_letters())
    poison = {m.key: m for m in letters if m.key.startswith(b"poison-")}
    assert len(poison) == bad
    for key, code in expected_codes.items():
        assert dict(poison[key].headers)["error"] == code.encode()
    assert_exactly_once(db_url, {f"ev-{n}" for n in range(0, good + bad, 2) if valid_phone(n)})
