"""A small publisher for product teams: validate LeadEvents locally, send them keyed to `leads.raw`.

Events are validated against LeadEvent v1 before they leave (a bad one raises
`pydantic.ValidationError` and is never sent), keyed by the customer's external id or else the
phone in E.164 (one customer's events stay in order on one partition), and sent in batches:
`publish` only queues; `flush` waits until the broker has acknowledged everything queued.

    async with LeadPublisher(bootstrap_servers="kafka:9092") as publisher:
        await publisher.publish({"schema_version": 1, "event_id": "...", ...})
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer

from ingest.phones import InvalidPhone, PhoneNormaliser
from schemas.events import LeadEvent

DEFAULT_TOPIC = "leads.raw"


class LeadPublisher:
    def __init__(
        self,
        topic: str = DEFAULT_TOPIC,
        *,
        default_region: str = "CN",
        max_in_flight: int = 10_000,
        **kafka_options: Any,
    ) -> None:
        self.topic = topic
        self._phones = PhoneNormaliser(default_region)
        self._producer = AIOKafkaProducer(linger_ms=10, acks="all", **kafka_options)
        self._pending: list[asyncio.Future[Any]] = []
        self._max_in_flight = max_in_flight
        self.sent = 0

    async def __aenter__(self) -> LeadPublisher:
        await self._producer.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                await self.flush()
        finally:
            await self._producer.stop()

    def key_of(self, event: LeadEvent) -> bytes:
        """The partition key: external id, else E.164 phone (the raw text if it is no number)."""
        customer = event.customer
        if customer.external_id:
            return customer.external_id.encode()
        try:
            return self._phones.normalise(customer.phone).e164.encode()
        except InvalidPhone:
            return customer.phone.encode()

    async def publish(self, event: LeadEvent | Mapping[str, Any] | str | bytes) -> LeadEvent:
        """Validate and queue one event; returns the validated model."""
        if isinstance(event, str | bytes):
            model = LeadEvent.model_validate_json(event)
        elif isinstance(event, LeadEvent):
            model = event
        else:
            model = LeadEvent.model_validate(event)
        value = model.model_dump_json(exclude_none=True).encode()
        self._pending.append(
            await self._producer.send(self.topic, value=value, key=self.key_of(model))
        )
        if len(self._pending) >= self._max_in_flight:
            await self.flush()
        return model

    async def flush(self) -> None:
        """Wait for every queued event to be acknowledged; raises the first send failure."""
        pending, self._pending = self._pending, []
        await self._producer.flush()
        await asyncio.gather(*pending)
        self.sent += len(pending)
