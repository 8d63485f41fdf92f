"""Shared fixtures. Tests are tiered by folder: `unit` needs no servers; `integration` and `e2e`
get real servers (see tests/servers.py for which), a database per test cloned from a migrated
template, and a unique topic per test."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import Engine, make_url

from leadflow.db import make_engine, sqlalchemy_url
from schemas import migrate
from tests.servers import describe_choice, kafka_server, postgres_server

TIERS = ("unit", "integration", "e2e", "fault")


def pytest_report_header() -> str:
    return f"leadflow test servers: {describe_choice()}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(item.fspath).parts
        for tier in TIERS[1:]:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


def _with_database(admin_url: str, name: str) -> str:
    """libpq URL of database `name` on the server of `admin_url`."""
    url = make_url(admin_url).set(database=name)
    return url.render_as_string(hide_password=False)


def _admin(admin_url: str) -> psycopg.Connection:
    return psycopg.connect(
        make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    )


def _create_database(admin_url: str, name: str, template: str | None = None) -> None:
    with _admin(admin_url) as conn:
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(statement)


def _drop_database(admin_url: str, name: str) -> None:
    with _admin(admin_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    """Where the session's embedded servers keep their data. Not under pytest's numbered temp
    directories: another pytest run on the machine prunes those, even while in use."""
    with tempfile.TemporaryDirectory(prefix="leadflow-test-servers-") as directory:
        yield Path(directory)


@pytest.fixture(scope="session")
def pg_admin_url(servers_dir: Path) -> Iterator[str]:
    """Admin URL (libpq form) of the PostgreSQL server for this run."""
    with postgres_server(servers_dir) as url:
        yield url


@pytest.fixture(scope="session")
def kafka_bootstrap(servers_dir: Path) -> Iterator[str]:
    with kafka_server(servers_dir) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def template_database(pg_admin_url: str) -> Iterator[str]:
    """A database migrated to head once per run; each test clones it (fast, isolated)."""
    name = f"lf_tpl_{uuid.uuid4().hex[:10]}"
    _create_database(pg_admin_url, name)
    try:
        migrate.upgrade(sqlalchemy_url(_with_database(pg_admin_url, name)))
        yield name
    finally:
        _drop_database(pg_admin_url, name)


@pytest.fixture
def db_url(pg_admin_url: str, template_database: str) -> Iterator[str]:
    """libpq URL of a fresh database at the head revision, dropped after the test."""
    name = f"lf_t_{uuid.uuid4().hex[:12]}"
    _create_database(pg_admin_url, name, template=template_database)
    try:
        yield _with_database(pg_admin_url, name)
    finally:
        _drop_database(pg_admin_url, name)


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """SQLAlchemy URL (psycopg driver) of a fresh, empty database, for migration tests."""
    name = f"lf_e_{uuid.uuid4().hex[:12]}"
    _create_database(pg_admin_url, name)
    try:
        yield sqlalchemy_url(_with_database(pg_admin_url, name))
    finally:
        _drop_database(pg_admin_url, name)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    """A unique, freshly created topic with 3 partitions."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    name = f"test.{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, 3, 1)])
        finally:
            await admin.close()

    asyncio.run(create())
    return name
