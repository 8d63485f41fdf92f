"""Liveness, readiness and metrics over real PostgreSQL and Kafka."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest
from pydantic import SecretStr

from leadflow.db import make_engine
from leadflow.kafka import ensure_topics
from leadflow.settings import DatabaseSettings, KafkaSettings, Settings, TopicSettings
from leadflow.web import WebContext, create_app


def settings_for(db_url: str, bootstrap: str) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return Settings(
        database=DatabaseSettings(url=SecretStr(db_url)),
        kafka=KafkaSettings(bootstrap=bootstrap),
        topics=TopicSettings(
            raw=f"r.{suffix}", dlq=f"d.{suffix}", assigned=f"a.{suffix}", partitions=1
        ),
    )


async def client_for(settings: Settings, db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    engine = make_engine(db_url)
    app = create_app(WebContext(settings, engine))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            yield client
    finally:
        engine.dispose()


@pytest.fixture
async def ready_client(db_url: str, kafka_bootstrap: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_for(db_url, kafka_bootstrap)
    await ensure_topics(settings.kafka, settings.topics)
    async for client in client_for(settings, db_url):
        yield client


async def test_ready_when_schema_is_current_and_topics_exist(
    ready_client: httpx.AsyncClient,
) -> None:
    response = await ready_client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["postgres"]["schema"] == body["postgres"]["schema_head"]
    assert (await ready_client.get("/healthz")).json() == {"status": "ok"}


async def test_metrics_are_exposed(ready_client: httpx.AsyncClient) -> None:
    response = await ready_client.get("/metrics/")
    assert response.status_code == 200
    assert "python_info" in response.text


async def test_not_ready_names_the_missing_topics(db_url: str, kafka_bootstrap: str) -> None:
    settings = settings_for(db_url, kafka_bootstrap)
    async for client in client_for(settings, db_url):
        response = await client.get("/readyz")
        assert response.status_code == 503
        kafka = response.json()["kafka"]
        assert kafka["ok"] is False
        assert sorted(kafka["missing_topics"]) == sorted(
            [settings.topics.raw, settings.topics.dlq, settings.topics.assigned]
        )


async def test_not_ready_when_the_schema_is_behind(empty_db_url: str, kafka_bootstrap: str) -> None:
    settings = settings_for(empty_db_url, kafka_bootstrap)
    await ensure_topics(settings.kafka, settings.topics)
    async for client in client_for(settings, empty_db_url):
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["postgres"]["schema"] is None


async def test_not_ready_without_the_servers_and_no_leak_of_internals(db_url: str) -> None:
    settings = settings_for("postgresql://postgres@127.0.0.1:1/none", "127.0.0.1:1")
    async for client in client_for(settings, "postgresql://postgres@127.0.0.1:1/none"):
        response = await client.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert "Cannot reach PostgreSQL" in body["postgres"]["error"]
        assert "Cannot reach the Kafka broker" in body["kafka"]["error"]
        assert "Traceback" not in response.text


async def test_the_pipeline_reports_the_intake_consumer_lag(
    db_url: str, kafka_bootstrap: str
) -> None:
    from aiokafka import AIOKafkaProducer

    from allocate.roster import issue_token

    settings = settings_for(db_url, kafka_bootstrap)
    await ensure_topics(settings.kafka, settings.topics)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for _ in range(10):
            await producer.send_and_wait(settings.topics.raw, b"{}", partition=0)
    finally:
        await producer.stop()
    engine = make_engine(db_url)
    with engine.connect() as conn:
        token = issue_token(conn, None, role="ops")
    engine.dispose()
    async for client in client_for(settings, db_url):
        headers = {"Authorization": f"Bearer {token}"}
        lag = (await client.get("/api/v1/pipeline", headers=headers)).json()["intake"][
            "consumer_lag"
        ]
        # The embedded broker reports the end as the start of the last batch (one record here).
        assert 9 <= lag["total"] <= 10, lag
        assert lag["error"] is None
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset)"
                " VALUES (%s, %s, 0, 4)",
                (settings.intake.consumer_group, settings.topics.raw),
            )
        lag = (await client.get("/api/v1/pipeline", headers=headers)).json()["intake"][
            "consumer_lag"
        ]
        assert 5 <= lag["total"] <= 6, lag
