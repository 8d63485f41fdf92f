"""Topic administration against the real broker."""

from __future__ import annotations

import uuid

import pytest

from leadflow.errors import ServiceUnavailable
from leadflow.kafka import describe_topics, ensure_topics
from leadflow.settings import KafkaSettings, TopicSettings


def unique_topics(partitions: int = 4) -> TopicSettings:
    suffix = uuid.uuid4().hex[:8]
    return TopicSettings(
        raw=f"raw.{suffix}",
        dlq=f"dlq.{suffix}",
        assigned=f"assigned.{suffix}",
        partitions=partitions,
    )


async def test_topic_creation_is_idempotent(kafka_bootstrap: str) -> None:
    kafka = KafkaSettings(bootstrap=kafka_bootstrap)
    topics = unique_topics(partitions=4)
    names = [topics.raw, topics.dlq, topics.assigned]
    assert sorted(await ensure_topics(kafka, topics)) == sorted(names)
    assert await ensure_topics(kafka, topics) == []
    described = await describe_topics(kafka, [*names, "missing.topic.x"])
    assert {name: info.partitions for name, info in described.items() if info} == dict.fromkeys(
        names, 4
    )
    assert described["missing.topic.x"] is None


async def test_an_unreachable_broker_is_one_clear_paragraph() -> None:
    kafka = KafkaSettings(bootstrap="127.0.0.1:1")
    with pytest.raises(ServiceUnavailable) as raised:
        await ensure_topics(kafka, unique_topics())
    message = str(raised.value)
    assert message.startswith("Cannot reach the Kafka broker at 127.0.0.1:1")
    assert "LEADFLOW_KAFKA_BOOTSTRAP" in message
