"""Which real servers the tests use, in this order (DESIGN.md, "Real servers everywhere"):

1. explicit URLs: LEADFLOW_TEST_DATABASE_URL (an admin URL; the tests create databases there)
   and LEADFLOW_TEST_KAFKA_BOOTSTRAP;
2. testcontainers, when a Docker engine answers: `postgres` and `apache/kafka` in KRaft mode;
3. the embedded servers leadflow ships (PostgreSQL 18 and the Tansu broker).

LEADFLOW_TEST_SERVERS=embedded|containers forces one of the last two.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from leadflow.embedded import EmbeddedKafka, EmbeddedPostgres, free_port

POSTGRES_IMAGE = "postgres:16-alpine"
KAFKA_IMAGE = "apache/kafka:3.9.1"


@functools.cache
def docker_available() -> bool:
    """True when a Docker engine answers its /_ping (asked directly: no client left open)."""
    forced = os.environ.get("LEADFLOW_TEST_SERVERS")
    if forced:
        return forced == "containers"
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(3)
            try:
                sock.connect(host.removeprefix("unix://"))
            except OSError:
                sock.close()
                raise
        elif host.startswith("tcp://"):
            address, _, port = host.removeprefix("tcp://").rpartition(":")
            sock = socket.create_connection((address, int(port)), timeout=3)
        else:
            return False
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b"OK" in sock.recv(4096)
    except (OSError, ValueError):
        return False


def describe_choice() -> str:
    pg = os.environ.get("LEADFLOW_TEST_DATABASE_URL")
    kafka = os.environ.get("LEADFLOW_TEST_KAFKA_BOOTSTRAP")
    fallback = "testcontainers" if docker_available() else "embedded"
    return f"postgres={'env' if pg else fallback} kafka={'env' if kafka else fallback}"


@contextmanager
def postgres_server(workdir: Path) -> Iterator[str]:
    """Yield an admin URL (postgresql://...) of a server on which tests may create databases."""
    if url := os.environ.get("LEADFLOW_TEST_DATABASE_URL"):
        yield url
    elif docker_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
            yield container.get_connection_url()
    else:
        server = EmbeddedPostgres(workdir / "pg", durable=False)
        server.start()
        try:
            yield f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        finally:
            server.stop()


@contextmanager
def kafka_server(workdir: Path) -> Iterator[str]:
    """Yield a bootstrap address of a Kafka-protocol broker."""
    if bootstrap := os.environ.get("LEADFLOW_TEST_KAFKA_BOOTSTRAP"):
        yield bootstrap
    elif docker_available():
        with _apache_kafka() as bootstrap:
            yield bootstrap
    else:
        broker = EmbeddedKafka(workdir / "kafka")
        broker.start()
        try:
            yield broker.bootstrap
        finally:
            broker.stop()


@contextmanager
def _apache_kafka() -> Iterator[str]:
    """A single-node apache/kafka broker in KRaft mode, advertised on a fixed host port."""
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = (
        DockerContainer(KAFKA_IMAGE)
        .with_bind_ports(9092, port)
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://127.0.0.1:{port}")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env(
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        )
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
    )
    with container:
        deadline = time.monotonic() + 120
        while b"Kafka Server started" not in b"".join(container.get_logs()):
            if time.monotonic() > deadline:
                raise TimeoutError("apache/kafka did not start within 120s")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
