"""The allocator role: wakes on new queued leads at once, sweeps on a timer, retries on failure.

Intake (and every agent action that frees capacity or queues a lead) runs `NOTIFY
leadflow_queued` in its own transaction; this role listens on a dedicated connection and starts
a pass at once, so a real-time lead waits for no polling interval. Notifications arriving during
a pass start another right after it; many coalesce into one. Every `sweep_interval` a pass also
runs without being woken: that is what expires first-contact SLAs and picks up callbacks and
retries that became due and call windows that opened.

A pass is plain synchronous SQL (allocate.allocator) run in a thread on its own connection; a
lost database backs off with jitter and reconnects. `stop` ends the loop after the pass in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
import structlog

from allocate import metrics
from allocate.allocator import Allocator, PassResult
from allocate.work import WAKE_CHANNEL
from ingest.consumer import Backoff

log = structlog.stdlib.get_logger("leadflow.allocator")

_DEPTH = """
SELECT queue, count(*),
       extract(epoch FROM %s - min(queued_at) FILTER (
           WHERE next_action_at IS NULL OR next_action_at <= %s))
FROM leads WHERE state = 'queued' GROUP BY queue
"""


@dataclass(frozen=True)
class ServiceConfig:
    sweep_interval: timedelta = timedelta(seconds=1)
    retry_backoff_max: timedelta = timedelta(seconds=30)
    #: How often queue depth and age gauges are refreshed.
    gauge_interval: timedelta = timedelta(seconds=5)


class AllocatorService:
    def __init__(
        self,
        allocator: Allocator,
        connect: Callable[[], psycopg.Connection[Any]],
        connect_async: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]] | None = None,
        config: ServiceConfig | None = None,
    ) -> None:
        self.allocator = allocator
        self.connect = connect
        self.connect_async = connect_async
        self.config = config or ServiceConfig()
        self.clock = allocator.clock
        self.passes = 0
        self.totals = PassResult()
        self._conn: psycopg.Connection[Any] | None = None
        self._gauges_at = 0.0
        self._synced = False

    async def run(self, stop: asyncio.Event) -> None:
        wake = asyncio.Event()
        listener = (
            asyncio.create_task(self._listen(wake, stop), name="allocator-listen")
            if self.connect_async is not None
            else None
        )
        backoff = Backoff(self.config.retry_backoff_max.total_seconds())
        log.info("allocator started", queues=len(self.allocator.queues))
        try:
            while not stop.is_set():
                wake.clear()
                try:
                    await asyncio.to_thread(self.run_pass)
                    backoff.reset()
                except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as exc:
                    metrics.RETRIES.inc()
                    await asyncio.to_thread(self._drop_connection)
                    delay = backoff.next()
                    log.warning("allocation failed; retrying", error=str(exc), delay=delay)
                    await _wait_any(stop, None, delay)
                    continue
                await _wait_any(stop, wake, self.config.sweep_interval.total_seconds())
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            await asyncio.to_thread(self._drop_connection)
            log.info(
                "allocator stopped",
                passes=self.passes,
                assigned=self.totals.assigned,
                expired=self.totals.expired,
            )

    def run_pass(self) -> PassResult:
        """One pass: SLA sweep, routing, every queue. Synchronous; raises psycopg errors."""
        conn = self._connection()
        if not self._synced:
            self.allocator.sync_queues(conn)
            self._synced = True
        started = time.perf_counter()
        now = self.clock()
        expired = self.allocator.expire_slas(conn, now)
        result = self.allocator.allocate(conn)
        result.expired = expired
        metrics.PASS_SECONDS.observe(time.perf_counter() - started)
        metrics.SLA_EXPIRED.inc(expired)
        metrics.DEFERRED.inc(result.deferred)
        metrics.BLOCKED.inc(result.blocked)
        for (queue, strategy), count in result.by_queue_strategy.items():
            metrics.ASSIGNMENTS.labels(queue, strategy).inc(count)
        for queue, seconds in result.speeds:
            metrics.SPEED_TO_LEAD.labels(queue).observe(max(seconds, 0.0))
        self.passes += 1
        self.totals.add(result)
        if result.assigned or result.expired or result.blocked:
            log.info(
                "allocated",
                assigned=result.assigned,
                deferred=result.deferred,
                blocked=result.blocked,
                expired=result.expired,
                routed=result.routed,
                seconds=round(time.perf_counter() - started, 4),
            )
        if time.monotonic() - self._gauges_at >= self.config.gauge_interval.total_seconds():
            self._refresh_gauges(conn, now)
        return result

    def _refresh_gauges(self, conn: psycopg.Connection[Any], now: datetime) -> None:
        self._gauges_at = time.monotonic()
        unrouted = 0
        seen = set()
        for queue, depth, oldest in conn.execute(_DEPTH, (now, now)).fetchall():
            if queue is None:
                unrouted = depth
                continue
            seen.add(queue)
            metrics.QUEUE_DEPTH.labels(queue).set(depth)
            metrics.QUEUE_OLDEST_SECONDS.labels(queue).set(float(oldest or 0))
        for queue in self.allocator.queues:
            if queue not in seen:
                metrics.QUEUE_DEPTH.labels(queue).set(0)
                metrics.QUEUE_OLDEST_SECONDS.labels(queue).set(0)
        metrics.UNROUTED.set(unrouted)

    async def _listen(self, wake: asyncio.Event, stop: asyncio.Event) -> None:
        assert self.connect_async is not None
        backoff = Backoff(self.config.retry_backoff_max.total_seconds())
        while not stop.is_set():
            try:
                async with await self.connect_async() as conn:
                    await conn.execute(f"LISTEN {WAKE_CHANNEL}")
                    wake.set()  # whatever was notified while not listening
                    backoff.reset()
                    async for _ in conn.notifies():
                        wake.set()
            except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as exc:
                delay = backoff.next()
                log.warning("allocator listener lost; reconnecting", error=str(exc), delay=delay)
                await _wait_any(stop, None, delay)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event | None, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
