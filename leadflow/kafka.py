"""Kafka administration for the composition root: reachability and idempotent topic creation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from leadflow.errors import ServiceUnavailable
from leadflow.settings import KafkaSettings, TopicSettings

TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: int


def _unreachable(settings: KafkaSettings, exc: BaseException) -> ServiceUnavailable:
    detail = str(exc).strip() or type(exc).__name__
    return ServiceUnavailable(
        f"Cannot reach the Kafka broker at {settings.bootstrap}: {detail}. Check kafka.bootstrap "
        f"(or LEADFLOW_KAFKA_BOOTSTRAP), the security settings, and that the broker is running; "
        f"leave it unset to let `leadflow up` start the embedded broker."
    )


async def _admin(settings: KafkaSettings) -> AIOKafkaAdminClient:
    client = AIOKafkaAdminClient(**settings.client_options())
    try:
        await asyncio.wait_for(client.start(), settings.request_timeout.total_seconds())
    except (KafkaError, OSError, TimeoutError) as exc:
        await client.close()
        raise _unreachable(settings, exc) from None
    return client


async def ensure_topics(
    settings: KafkaSettings, topics: TopicSettings, names: Iterable[str] | None = None
) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Safe to repeat."""
    wanted = list(names) if names is not None else [topics.raw, topics.dlq, topics.assigned]
    client = await _admin(settings)
    try:
        existing = set(await client.list_topics())
        missing = [name for name in wanted if name not in existing]
        if not missing:
            return []
        response = await client.create_topics(
            [NewTopic(name, topics.partitions, topics.replication_factor) for name in missing]
        )
        created = []
        for name, code, message in response.topic_errors:
            if code == 0:
                created.append(name)
            elif code != TOPIC_ALREADY_EXISTS:  # a concurrent creator won the race: fine
                raise ServiceUnavailable(
                    f"Kafka refused to create topic {name!r}: {message} (code {code})."
                )
        return created
    except KafkaError as exc:
        raise _unreachable(settings, exc) from None
    finally:
        await client.close()


async def describe_topics(
    settings: KafkaSettings, names: Iterable[str]
) -> dict[str, TopicInfo | None]:
    """Partition counts of the named topics (None for a missing one)."""
    wanted = list(names)
    client = await _admin(settings)
    try:
        existing = set(await client.list_topics())
        present = [name for name in wanted if name in existing]
        found: dict[str, TopicInfo | None] = dict.fromkeys(wanted)
        if present:
            for topic in await client.describe_topics(present):
                found[topic["topic"]] = TopicInfo(topic["topic"], len(topic["partitions"]))
        return found
    except KafkaError as exc:
        raise _unreachable(settings, exc) from None
    finally:
        await client.close()


async def end_offsets(settings: KafkaSettings, topic: str) -> dict[int, int]:
    """The next offset to be written, per partition of `topic` (empty for a missing topic)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**settings.client_options(), enable_auto_commit=False)
    try:
        await asyncio.wait_for(consumer.start(), settings.request_timeout.total_seconds())
        partitions = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in sorted(partitions)])
        return {tp.partition: offset for tp, offset in ends.items()}
    except (KafkaError, OSError, TimeoutError) as exc:
        raise _unreachable(settings, exc) from None
    finally:
        await consumer.stop()
