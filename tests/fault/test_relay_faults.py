"""Fault test of the outbox relay (DESIGN.md, "Reliability"): the relay is the real `leadflow run
relay` process, killed with SIGKILL while it publishes and restarted, while writers commit and
roll back outbox rows the way the allocator does (rows of one key serialised by a lock, NOTIFY in
the transaction). Afterwards every committed row is on the topic at least once and marked, no
rolled-back row ever is, and per key the first occurrences are in id order."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from psycopg.types.json import Jsonb

from allocate.relay import OUTBOX_CHANNEL
from tests.fault.roles import RoleProcess

pytestmark = pytest.mark.fault

PARTITIONS = 4
AGENTS = [f"agent-{n:02d}" for n in range(24)]


@pytest.fixture
def assigned(kafka_bootstrap: str) -> str:
    name = f"fault.assigned.{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
        finally:
            await admin.close()

    asyncio.run(create())
    return name


def relay_env(db_url: str, bootstrap: str, topic: str) -> dict[str, str]:
    suffix = topic.rsplit(".", 1)[-1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    env.update(
        LEADFLOW_DATABASE_URL=db_url,
        LEADFLOW_KAFKA_BOOTSTRAP=bootstrap,
        LEADFLOW_TOPICS_RAW=f"fault.raw.{suffix}",
        LEADFLOW_TOPICS_DLQ=f"fault.dlq.{suffix}",
        LEADFLOW_TOPICS_ASSIGNED=topic,
        LEADFLOW_TOPICS_PARTITIONS=str(PARTITIONS),
        LEADFLOW_RELAY_BATCH_SIZE="100",  # the backlog of a restart takes several rounds
        LEADFLOW_RELAY_POLL_INTERVAL="0.2s",
        LEADFLOW_LOG_LEVEL="WARNING",
        PYTHONWARNINGS="ignore",
    )
    return env


def count(db_url: str, where: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM outbox WHERE {where}").fetchone()
    return int(row[0]) if row else 0


class Writers:
    """Threads committing and rolling back outbox rows like the allocator: the rows of one key
    are serialised by a lock taken before they are inserted, so per key id order is commit order.
    Each writes at least `transactions`, and goes on until `enough` is set (by the test, once it
    has struck the relay as often as it wants, however slow the machine)."""

    def __init__(self, db_url: str, topic: str, threads: int = 3, transactions: int = 500) -> None:
        self.db_url, self.topic, self.transactions = db_url, topic, transactions
        self.seq = itertools.count()
        self.committed: list[int] = []
        self.rolled_back: list[int] = []
        self.errors: list[BaseException] = []
        self.enough = threading.Event()
        self.threads = [
            threading.Thread(target=self._write, args=(n,), daemon=True) for n in range(threads)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self) -> None:
        self.enough.set()
        for thread in self.threads:
            thread.join(120)
        assert not self.errors, self.errors

    def _write(self, n: int) -> None:
        rng = random.Random(n)
        try:
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                for done in itertools.count():
                    if done >= self.transactions and self.enough.is_set():
                        break
                    keys = sorted(rng.sample(AGENTS, rng.randint(1, 3)))
                    seqs: list[int] = []
                    rollback = rng.random() < 0.15
                    with conn.transaction():
                        for key in keys:  # the allocator locks agent rows; this stands in
                            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (key,))
                        for key in keys:
                            for _ in range(rng.randint(1, 3)):
                                seq = next(self.seq)
                                seqs.append(seq)
                                payload = {
                                    "seq": seq,
                                    "agent_id": key,
                                    "pad": "x" * rng.randint(0, 1500),
                                }
                                conn.execute(
                                    "INSERT INTO outbox (topic, key, payload, headers) "
                                    "VALUES (%s, %s, %s, %s)",
                                    (
                                        self.topic,
                                        key,
                                        Jsonb(payload),
                                        Jsonb({"seq": str(seq)}),
                                    ),
                                )
                        conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")
                        if rollback:
                            raise psycopg.Rollback()
                    (self.rolled_back if rollback else self.committed).extend(seqs)
                    time.sleep(rng.uniform(0, 0.03))
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)


async def consume(bootstrap: str, topic: str, wanted: set[int]) -> list[Any]:
    """The whole topic from the beginning, by a fresh consumer with no group."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", max_poll_records=5000
    )
    await consumer.start()
    messages: list[Any] = []
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not wanted <= seen and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                messages.extend(batch)
                seen.update(json.loads(m.value)["seq"] for m in batch)
        await asyncio.sleep(0.5)  # a straggler, e.g. a rolled-back row, would show up here
        for batch in (await consumer.getmany(timeout_ms=500)).values():
            messages.extend(batch)
    finally:
        await consumer.stop()
    return messages


class Progress:
    """How far the relay is, read on one open connection (fast enough to strike inside a round)."""

    def __init__(self, db_url: str) -> None:
        self.conn = psycopg.connect(db_url, autocommit=True)

    def __call__(self) -> tuple[int, int]:
        row = self.conn.execute(
            "SELECT count(*) FILTER (WHERE published_at IS NOT NULL), "
            "count(*) FILTER (WHERE published_at IS NULL) FROM outbox"
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def close(self) -> None:
        self.conn.close()


def test_kill_9_while_publishing_loses_nothing_and_keeps_each_agents_order(
    db_url: str, kafka_bootstrap: str, assigned: str, tmp_path: Path
) -> None:
    relay = RoleProcess(
        "relay", relay_env(db_url, kafka_bootstrap, assigned), tmp_path / "relay.log"
    )
    writers = Writers(db_url, assigned)
    at_kill: list[tuple[int, int]] = []  # (published, waiting) just after each kill
    rng = random.Random(11)
    progress = Progress(db_url)
    relay.start()
    writers.start()
    try:
        while len(at_kill) < 6 and writers.alive():
            # Strike a relay in the middle of its work: it has just marked a round and more
            # rows wait (the backlog that built up while it was down), so the next round is
            # being read, sent or marked.
            before, _ = progress()
            deadline = time.monotonic() + 60
            while writers.alive():
                published, waiting = progress()
                if published > before and waiting >= 50:
                    break
                relay.assert_alive()
                assert time.monotonic() < deadline, f"no progress; see {relay.log}"
            else:
                break
            time.sleep(rng.uniform(0, 0.01))
            relay.kill()
            at_kill.append(progress())
            relay.start()
        writers.join()
        deadline = time.monotonic() + 60
        while count(db_url, "published_at IS NULL"):
            relay.assert_alive()
            assert time.monotonic() < deadline, f"backlog left; see {relay.log}"
            time.sleep(0.1)
    finally:
        writers.enough.set()
        writers_done = not writers.alive()
        stopped = relay.stop()
        progress.close()
    assert writers_done
    assert stopped == 0  # SIGTERM: the round in hand, then a clean exit

    committed, rolled_back = set(writers.committed), set(writers.rolled_back)
    assert len(committed) >= 2000, len(committed)
    assert rolled_back
    assert len(at_kill) >= 5, at_kill
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT id, key, (payload->>'seq')::int, published_at IS NOT NULL FROM outbox"
        ).fetchall()
    assert {seq for _, _, seq, _ in rows} == committed  # rolled back rows never existed
    assert all(published for *_, published in rows), "a committed row is not marked published"
    id_of = {seq: row_id for row_id, _, seq, _ in rows}

    messages = asyncio.run(consume(kafka_bootstrap, assigned, committed))
    seqs = [json.loads(m.value)["seq"] for m in messages]
    missing = committed - set(seqs)
    assert not missing, f"{len(missing)} committed rows never published, e.g. {sorted(missing)[:5]}"
    assert not set(seqs) & rolled_back, "a rolled-back row was published"
    first: dict[int, Any] = {}
    for message, seq in zip(messages, seqs, strict=True):
        assert message.key.decode() == json.loads(message.value)["agent_id"]
        assert dict(message.headers) == {"seq": str(seq).encode()}
        first.setdefault(seq, message)
    per_key: dict[bytes, list[tuple[int, int, int]]] = {}
    for seq, message in first.items():
        per_key.setdefault(message.key, []).append((message.partition, message.offset, id_of[seq]))
    for key, found in per_key.items():
        ids = [row_id for *_, row_id in sorted(found)]
        assert ids == sorted(ids), f"{key!r}: first occurrences out of id order"
    repeats = len(messages) - len(committed)
    print(
        f"\n{len(committed)} committed, {repeats} repeats; (published, waiting) at kills {at_kill}"
    )
    assert repeats > 0, "no kill landed between a send and its mark"
