"""The intake's consumer-lag gauge follows the partitions a worker owns."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from ingest import metrics
from ingest.consumer import _SeekToStoredOffsets


def lag(topic: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(
        "leadflow_intake_consumer_lag", {"topic": topic, "partition": str(partition)}
    )


async def test_a_revoked_partition_leaves_the_lag_gauge() -> None:
    topic = "lag.unit"
    for partition, value in ((0, 120), (1, 7)):
        metrics.CONSUMER_LAG.labels(topic, str(partition)).set(value)
    intake = SimpleNamespace(busy=asyncio.Lock(), generation=0)
    listener = _SeekToStoredOffsets(intake, asyncio.Event())  # type: ignore[arg-type]

    await listener.on_partitions_revoked([TopicPartition(topic, 0)])

    assert lag(topic, 0) is None  # another worker reports it now
    assert lag(topic, 1) == 7
    assert intake.generation == 1
    await listener.on_partitions_revoked([TopicPartition(topic, 0)])  # twice is harmless
    assert lag(topic, 0) is None
