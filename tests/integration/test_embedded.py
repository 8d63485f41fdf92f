"""The embedded servers: real PostgreSQL and a real Kafka-protocol broker, cleanly stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from leadflow.embedded import EmbeddedServerError, EmbeddedServers


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


async def roundtrip(bootstrap: str, topic: str) -> bytes:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        message = await asyncio.wait_for(consumer.getone(), 20)
        return bytes(message.value or b"")
    finally:
        await consumer.stop()


def test_servers_answer_and_stop_without_leftovers(tmp_path: Path) -> None:
    servers = EmbeddedServers(tmp_path / "data", durable=False).start()
    try:
        assert servers.postgres is not None
        assert servers.kafka is not None
        pids = [servers.postgres.pid, servers.kafka.pid]
        assert servers.database_url is not None
        assert servers.kafka_bootstrap is not None
        with psycopg.connect(servers.database_url) as conn:
            assert conn.execute("SHOW server_version").fetchone()[0].startswith("18")  # type: ignore[index]
        assert asyncio.run(roundtrip(servers.kafka_bootstrap, "smoke")) == b"hello"
    finally:
        servers.stop()
    assert all(pid is not None and gone(pid) for pid in pids)


def test_data_survives_a_restart_and_the_directory_is_locked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EmbeddedServers(data, kafka_bootstrap="external:9092", durable=False) as first:
        assert first.kafka is None  # a configured broker is left alone
        assert first.database_url is not None
        with psycopg.connect(first.database_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
        second = EmbeddedServers(data, kafka_bootstrap="external:9092")
        with pytest.raises(EmbeddedServerError, match="in use by leadflow pid"):
            second.start()
    with EmbeddedServers(data, kafka_bootstrap="external:9092", durable=False) as again:
        assert again.database_url is not None
        with psycopg.connect(again.database_url) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)


def test_configured_urls_win(tmp_path: Path) -> None:
    with EmbeddedServers(
        tmp_path, database_url="postgresql://x@db/y", kafka_bootstrap="k:1"
    ) as servers:
        assert (servers.postgres, servers.kafka) == (None, None)
        assert servers.database_url == "postgresql://x@db/y"
    assert not (tmp_path / "lock").exists()


SCRIPT = """
import sys, time
from pathlib import Path
from leadflow.embedded import EmbeddedServers
servers = EmbeddedServers(Path(sys.argv[1]), durable=False).start()
print(servers.postgres.pid, servers.kafka.pid, flush=True)
time.sleep(600)
"""


def test_kill_9_of_the_parent_leaves_no_server_behind(tmp_path: Path) -> None:
    errors = tmp_path / "parent.err"
    with (
        open(errors, "w") as stderr,
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "data")],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        ) as parent,
    ):
        try:
            assert parent.stdout is not None
            pids = [int(pid) for pid in parent.stdout.readline().split()]
            assert len(pids) == 2, errors.read_text()[-3000:]
            assert all(psutil.pid_exists(pid) for pid in pids)
            parent.send_signal(signal.SIGKILL)
            parent.wait(10)
            assert all(gone(pid) for pid in pids), "a server outlived its parent"
        finally:
            if parent.poll() is None:
                parent.kill()
