"""The scheduler role (`leadflow run scheduler`): one APScheduler job per source, one runner.

One runner across replicas. APScheduler 3 cannot share a job store between processes (two
schedulers on one store run jobs twice or miss them), so every replica keeps its jobs in memory
and only one of them runs them: the one holding the session advisory lock `SCHEDULER_LOCK_KEY`
on a dedicated PostgreSQL connection. The others are hot standbys that try the lock every
`lock_interval` and take over once the leader's session ends (stopped, killed, disconnected:
PostgreSQL releases the lock with the session). The leader checks its lock connection every
`lock_interval` (a query with a timeout); if it fails, the leader has lost the lock, and it
stops at once: the scheduler is paused (no job starts), running runs are told to stop after the
page in hand, and the process stands by again. A page in flight may still commit: its own
connection holds the source's lock (`sync.pollers.poller`), so no other process runs that
source until it ends, and its watermark only advances from the value it read.

Jobs: `AsyncIOScheduler`, one job per source with the source's trigger (interval or crontab, in
`timezone`), `max_instances=1` (a tick that comes while the source's run still runs is skipped
and counted `overlapped`), `coalesce=True` (ticks missed while the process was busy or paused
run once, not once each: a run reads everything after the watermark anyway) and a misfire grace
of `misfire_grace` (None: a late tick runs however late — for a poller, late is always better
than skipped). A job runs the blocking `Poller.run` in a daemon thread, so the event loop stays
live and a source that hangs cannot keep the process from exiting.

After a failed run the job's next run is moved to the run's `retry_at` (exponential backoff,
capped), earlier or later than the schedule's next tick; a success goes back to the schedule.
A leader starts each job from what PostgreSQL knows (`Schedule.next_run`): a pending retry, at
once if the source never ran or a tick since its last run was missed (no leader at the time, a
restart), else the tick after its last run — a failover skips no tick's work.

The leader also prunes the run history every `prune_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, TypeVar

import psycopg
import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from sync.pollers import metrics
from sync.pollers.failures import describe_error
from sync.pollers.poller import PRUNE_HISTORY, Poller, RunResult

log = structlog.stdlib.get_logger("leadflow.scheduler")

#: The session advisory lock the running scheduler holds: the ASCII bytes "lfpoller" read as a
#: big-endian bigint. In pg_locks: locktype 'advisory', classid 0x6C66706F ("lfpo"),
#: objid 0x6C6C6572 ("ller"), objsubid 1. Advisory locks are per database.
SCHEDULER_LOCK_KEY = int.from_bytes(b"lfpoller", "big")

_DATABASE_ERRORS = (psycopg.OperationalError, psycopg.errors.AdminShutdown, OSError)

T = TypeVar("T")


@dataclass(frozen=True)
class SchedulerConfig:
    timezone: tzinfo = UTC
    misfire_grace: timedelta | None = None
    #: How often a standby tries the lock and the leader checks its lock connection.
    lock_interval: timedelta = timedelta(seconds=1)
    #: How long stopping waits for runs to finish their page.
    stop_timeout: timedelta = timedelta(seconds=30)
    history_retention: timedelta = timedelta(days=30)
    prune_interval: timedelta = timedelta(hours=1)


Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]


@dataclass
class _Running:
    stop: threading.Event
    done: asyncio.Future[RunResult]


class SchedulerService:
    """Runs the pollers' jobs while it holds the scheduler lock; stands by otherwise.

    `run(stop)` returns once `stop` is set and the runs in hand have ended (or `stop_timeout`
    passed); it raises only on bugs — every database failure is retried.
    """

    def __init__(self, pollers: Sequence[Poller], config: SchedulerConfig, connect: Connect):
        self.pollers: Mapping[str, Poller] = {p.spec.name: p for p in pollers}
        self.config = config
        self.connect = connect
        self.leader = False
        self.runs = 0  # runs started by this process
        self._running: dict[str, _Running] = {}
        self._scheduler: AsyncIOScheduler | None = None

    async def run(self, stop: asyncio.Event) -> None:
        if not self.pollers:
            log.info("no sources configured; the scheduler has nothing to run")
            await stop.wait()
            return
        log.info("scheduler started", sources=sorted(self.pollers))
        try:
            while not stop.is_set():
                lock = await self._acquire(stop)
                if lock is None:
                    break
                try:
                    await self._lead(lock, stop)
                finally:
                    await _close(lock)
        finally:
            for poller in self.pollers.values():
                await asyncio.to_thread(poller.dispose)
            log.info("scheduler stopped", runs=self.runs)

    # -- leadership --------------------------------------------------------------------------

    async def _acquire(self, stop: asyncio.Event) -> psycopg.AsyncConnection[Any] | None:
        """A connection holding the scheduler lock, or None once stopped."""
        standing_by = False
        while not stop.is_set():
            try:
                conn = await self.connect()
            except _DATABASE_ERRORS as exc:
                log.warning("cannot reach PostgreSQL; retrying", error=describe_error(exc))
                await _sleep(self.config.lock_interval.total_seconds(), stop)
                continue
            try:
                while not stop.is_set():
                    cursor = await conn.execute(
                        "SELECT pg_try_advisory_lock(%s)", (SCHEDULER_LOCK_KEY,)
                    )
                    row = await cursor.fetchone()
                    if row is not None and row[0]:
                        log.info("this scheduler leads: it holds the scheduler lock")
                        return conn
                    if not standing_by:
                        log.info("another scheduler holds the scheduler lock; standing by")
                        standing_by = True
                    await _sleep(self.config.lock_interval.total_seconds(), stop)
            except _DATABASE_ERRORS as exc:
                log.warning("lost the connection while standing by", error=describe_error(exc))
            await _close(conn)
        return None

    async def _lead(self, lock: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        config = self.config
        try:
            first_runs = await self._load_state(lock)
        except (*_DATABASE_ERRORS, psycopg.errors.UndefinedTable) as exc:
            log.warning("cannot read the sources' state; standing by", error=describe_error(exc))
            await _sleep(config.lock_interval.total_seconds(), stop)
            return
        scheduler = AsyncIOScheduler(timezone=config.timezone, logger=_quiet_logger())
        scheduler.add_listener(self._skipped, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        for name, poller in self.pollers.items():
            # Never run: at once; else as PostgreSQL says (a pending retry, a missed tick).
            first = first_runs.get(name, datetime.now(config.timezone))
            when = {} if first is None else {"next_run_time": first.astimezone(config.timezone)}
            scheduler.add_job(
                self._job,
                trigger=poller.spec.schedule.trigger(config.timezone),
                args=[name],
                id=name,
                name=name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=(
                    None
                    if config.misfire_grace is None
                    else max(1, int(config.misfire_grace.total_seconds()))
                ),
                **when,
            )
        self._scheduler = scheduler
        self.leader = True
        metrics.LEADER.set(1)
        lost: BaseException | None = None
        pruned_at = -1.0
        loop = asyncio.get_running_loop()
        scheduler.start()
        try:
            while not stop.is_set():
                tick = loop.time()
                try:
                    await asyncio.wait_for(
                        lock.execute("SELECT 1"),
                        timeout=max(1.0, config.lock_interval.total_seconds() * 3),
                    )
                    if pruned_at < 0 or tick - pruned_at >= config.prune_interval.total_seconds():
                        pruned_at = tick
                        await self._prune(lock)
                except (*_DATABASE_ERRORS, TimeoutError) as exc:
                    lost = exc
                    break
                await _sleep(config.lock_interval.total_seconds(), stop)
        finally:
            scheduler.pause()  # no job starts from here on
            self.leader = False
            metrics.LEADER.set(0)
            if lost is not None:
                log.error(
                    "lost the scheduler lock's connection: stopping every run after its page "
                    "in hand, then standing by",
                    error=describe_error(lost),
                )
            await self._stop_runs()
            scheduler.shutdown(wait=False)
            self._scheduler = None

    async def _prune(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            cursor = await conn.execute(PRUNE_HISTORY, (self.config.history_retention,))
        except psycopg.errors.DatabaseError as exc:
            if isinstance(exc, _DATABASE_ERRORS):
                raise
            log.warning("cannot prune the poller run history", error=describe_error(exc))
            return
        if cursor.rowcount:
            log.info("pruned the poller run history", runs=cursor.rowcount)

    async def _load_state(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, datetime | None]:
        """Set the gauges from PostgreSQL; return when each source it knows should run first:
        a pending retry, or at once when a tick since its last run was missed (while no
        scheduler led, or across a restart)."""
        names = sorted(self.pollers)
        for name in names:
            metrics.LAST_SUCCESS.labels(name).set(0)
            metrics.FAILURES.labels(name).set(0)
        cursor = await conn.execute(_STATE_SQL, (names,))
        now = datetime.now(self.config.timezone)
        first: dict[str, datetime | None] = {}
        for name, last_run, last_success, failures, retry_at in await cursor.fetchall():
            if last_success is not None:
                metrics.LAST_SUCCESS.labels(name).set(last_success.timestamp())
            metrics.FAILURES.labels(name).set(failures)
            poller = self.pollers[name]
            poller.failures = failures
            first[name] = poller.spec.schedule.next_run(
                now,
                self.config.timezone,
                last_run,
                retry_at if failures else None,
                self.config.misfire_grace,
            )
        return first

    async def _stop_runs(self) -> None:
        for running in self._running.values():
            running.stop.set()
        pending = [running.done for running in self._running.values()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.config.stop_timeout.total_seconds())
            if still:
                log.warning(
                    "runs still reading after the stop timeout; left to end with the process "
                    "(nothing of theirs is committed)",
                    sources=[n for n, r in self._running.items() if r.done in still],
                )

    # -- jobs --------------------------------------------------------------------------------

    async def _job(self, name: str) -> None:
        poller = self.pollers[name]
        stop = threading.Event()
        running = _Running(stop, _in_thread(lambda: poller.run(stop), f"poller-{name}"))
        self._running[name] = running
        self.runs += 1
        result = await asyncio.shield(running.done)  # a cancelled job leaves the run to _stop_runs
        if self._running.get(name) is running:
            del self._running[name]
        self._after(name, result)

    def _after(self, name: str, result: RunResult) -> None:
        scheduler = self._scheduler
        if scheduler is None or not self.leader:
            return
        if result.outcome == "failed" and result.retry_at is not None:
            retry_at = result.retry_at.astimezone(self.config.timezone)
            with contextlib.suppress(Exception):  # the job may be gone if stopping
                scheduler.modify_job(name, next_run_time=retry_at)

    def _skipped(self, event: JobEvent) -> None:
        outcome = "overlapped" if event.code == EVENT_JOB_MAX_INSTANCES else "missed"
        metrics.RUNS.labels(event.job_id, outcome).inc()
        log.debug("a tick of the source was skipped", source=event.job_id, why=outcome)


def _in_thread(run: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Start `run()` in a daemon thread; the future completes with its result. Daemon, so a run
    stuck in a source read never keeps the process from exiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, error = run(), None
        except BaseException as exc:  # reported through the future
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


def _quiet_logger() -> logging.Logger:
    # APScheduler logs every job start and end at INFO and every skipped tick at WARNING, once a
    # second with 1s intervals; the listener counts skips and the poller logs runs.
    logger = logging.getLogger("leadflow.scheduler.apscheduler")
    logger.setLevel(logging.ERROR)
    return logger


async def _sleep(seconds: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


_STATE_SQL = """
SELECT source, last_run_at, last_success_at, consecutive_failures, retry_at
FROM poller_state WHERE source = ANY(%s)
"""

__all__ = ["SCHEDULER_LOCK_KEY", "SchedulerConfig", "SchedulerService"]
