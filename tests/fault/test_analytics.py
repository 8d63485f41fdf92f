"""The stream analytics (faust-streaming) against the real broker and database, beside the real
intake: its per-minute figures agree with what the database stored and the DLQ received, and
restarting it mid-stream disturbs neither the intake nor its own totals beyond the documented
at-least-once tolerance (a restart may count a message twice; never fewer)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from leadflow.analytics import (
    AnalyticsConfig,
    StreamAnalytics,
    merge_histograms,
    percentile,
)
from leadflow.kafka import ensure_topics
from leadflow.rules import RulesHolder
from leadflow.settings import DatabaseSettings, KafkaSettings, Settings, TopicSettings
from leadflow.stack import intake_worker, rules_classifier

pytestmark = pytest.mark.fault

WAIT = 150.0  # generous: faust joins its group in ~5 s on the embedded broker


def event(n: int, channel: str, phone: str) -> bytes:
    return json.dumps(
        {
            "schema_version": 1,
            "event_id": f"an-{n}",
            "occurred_at": "2026-11-24T09:15:02+08:00",
            "source": "loan-app" if n % 2 else "ads",
            "event_type": "signup",
            "channel": channel,
            "customer": {"phone": phone},
        }
    ).encode()


async def totals(db_url: str, metric: str) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with psycopg.connect(db_url) as conn:
            rows = conn.execute(
                "SELECT key, value FROM stream_minutes WHERE metric = %s", (metric,)
            ).fetchall()
        out: dict[str, Any] = {}
        for key, value in rows:
            if isinstance(value, dict):
                out[key] = merge_histograms([out.get(key, {}), value])
            else:
                out[key] = out.get(key, 0) + value
        return out

    return await asyncio.to_thread(read)


async def wait_for(check: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        if await check():
            return
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.5)


async def test_stream_figures_match_the_database_and_survive_a_restart(
    db_url: str, kafka_bootstrap: str
) -> None:
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        database=DatabaseSettings(url=SecretStr(db_url)),
        kafka=KafkaSettings(bootstrap=kafka_bootstrap),
        topics=TopicSettings(
            raw=f"an.raw.{suffix}",
            dlq=f"an.dlq.{suffix}",
            assigned=f"an.asg.{suffix}",
            partitions=2,
        ),
    )
    await ensure_topics(settings.kafka, settings.topics)
    stop_intake, stop_analytics = asyncio.Event(), asyncio.Event()
    intake = intake_worker(settings, rules_classifier(RulesHolder.from_settings(settings)))
    intake_task = asyncio.create_task(intake.run(stop_intake))

    def analytics() -> StreamAnalytics:
        return StreamAnalytics(
            AnalyticsConfig(
                app_id=f"an-{suffix}",
                flush_interval=timedelta(seconds=1),
                retention=timedelta(hours=2),
                retry_backoff_max=timedelta(seconds=5),
            ),
            settings.kafka,
            settings.topics,
            lambda: psycopg.connect(db_url, autocommit=True),
        )

    analytics_task = asyncio.create_task(analytics().run(stop_analytics))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        # 40 valid events over two channels, 6 with unusable phones, 2 that are not JSON.
        sent = {"app": 0, "web": 0}
        for n in range(40):
            channel = "app" if n % 3 else "web"
            sent[channel] += 1
            await producer.send(
                settings.topics.raw, event(n, channel, f"1390000{n:04d}"), key=b"k%d" % n
            )
        for n in range(40, 46):
            await producer.send(settings.topics.raw, event(n, "web", "12345"), key=b"k%d" % n)
        for n in range(2):
            await producer.send(settings.topics.raw, b"{not json", key=b"bad%d" % n)
        now = datetime.now(UTC)
        for n in range(4):
            assignment = {
                "queue": "q1",
                "business_line": "car_loan",
                "segment": "new_signup",
                "attempt": 1 if n < 3 else 2,
                "assigned_at": now.isoformat(),
                "lead_queued_at": (now - timedelta(seconds=3)).isoformat(),
            }
            await producer.send(settings.topics.assigned, json.dumps(assignment).encode(), key=b"a")
        await producer.flush()

        async def stored() -> bool:
            with psycopg.connect(db_url) as conn:
                row = conn.execute("SELECT count(*) FROM lead_events").fetchone()
            return row == (40,)

        await wait_for(stored, "the intake to store 40 events")

        async def counted() -> bool:
            raw = await totals(db_url, "raw_channel")
            dlq = await totals(db_url, "dlq_code")
            return sum(raw.values()) >= 48 and sum(dlq.values()) >= 8

        await wait_for(counted, "the analytics to count raw and DLQ messages")

        # Restart the analytics mid-stream; the intake keeps going meanwhile.
        stop_analytics.set()
        await analytics_task
        stop_analytics = asyncio.Event()
        analytics_task = asyncio.create_task(analytics().run(stop_analytics))
        for n in range(100, 110):
            await producer.send(settings.topics.raw, event(n, "app", f"1370000{n:04d}"), key=b"z")
        await producer.flush()
        sent["app"] += 10

        async def stored_more() -> bool:
            with psycopg.connect(db_url) as conn:
                row = conn.execute("SELECT count(*) FROM lead_events").fetchone()
            return row == (50,)

        await wait_for(stored_more, "the intake to store 10 more while analytics restarts")

        async def caught_up() -> bool:
            raw = await totals(db_url, "raw_channel")
            return raw.get("app", 0) >= sent["app"]

        await wait_for(caught_up, "the restarted analytics to catch up")
    finally:
        await producer.stop()
        stop_analytics.set()
        stop_intake.set()
        await asyncio.gather(analytics_task, intake_task)

    with psycopg.connect(db_url) as conn:
        by_channel = dict(
            conn.execute("SELECT channel, count(*) FROM lead_events GROUP BY channel").fetchall()
        )
    raw = await totals(db_url, "raw_channel")
    dlq = await totals(db_url, "dlq_code")
    # Exact for what the database holds (stored events), at least once for the rest.
    assert by_channel == {"app": sent["app"], "web": sent["web"]}
    assert raw["app"] >= by_channel["app"]
    assert raw["web"] >= by_channel["web"] + 6
    assert raw["undecodable"] >= 2
    assert dlq["invalid_phone"] >= 6
    assert dlq["invalid_json"] >= 2
    # Nothing beyond what was produced, save the replays of one restart.
    assert sum(raw.values()) <= 2 * 58
    segments = await totals(db_url, "assigned_segment")
    assert segments["car_loan/new_signup"] >= 4
    speed = await totals(db_url, "speed_queue")
    assert percentile(speed["q1"], 0.5) == 5  # 3 s falls in the (2, 5] bucket
