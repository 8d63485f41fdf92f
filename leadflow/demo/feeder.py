"""The demo feeder: traffic on all three channels, and agents working their queues.

Five concurrent loops, all stopping within a few seconds of SIGTERM/SIGINT:

- **events**: LeadEvents on the raw topic, a few a second with a burst now and then (a
  campaign push), from `traffic.EventStream`;
- **warehouse**: every `stock_interval`, new silent high-value users in the demo warehouse
  (and a few updated), for the stock poller's next tick;
- **data team**: soon after start and then every `staging_interval`, a staging table of a few
  hundred rows submitted as an extract, as `leadflow staging submit` does; the demo's tables
  that were loaded are dropped (the newest few kept to look at);
- **agents**: each simulated agent polls its assignments through the HTTP API, opens one,
  calls, records first contact and a disposition, sometimes hands one back or lets one expire,
  and takes a break now and then;
- **pace**: reads the backlog of queued leads and slows every producer when agents fall
  behind, so the demo can run for hours without its queues growing without bound.

Failures are transient here (a role restarting, a server away): each loop backs off quietly and
carries on. Nothing here is on a lead's path; the feeder is just another producer and client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import aiohttp
import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from psycopg import sql
from sqlalchemy.engine import make_url

from leadflow.demo.setup import (
    CRM_INSERT,
    CRM_URL_VARIABLE,
    SOURCE_NAME,
    TOKENS_FILE,
    WEB_URL_VARIABLE,
    crm_rows,
    read_tokens,
)
from leadflow.demo.traffic import (
    EXTRACT_KINDS,
    POISON,
    STAGING_COLUMNS,
    EventStream,
    Plan,
    crm_user,
    plan_assignment,
    staging_extract,
)
from leadflow.errors import LeadflowError
from leadflow.logs import configure, get_logger
from leadflow.settings import Settings, load_settings
from sync.staging import Submission, submit

log = get_logger("leadflow.demo")

SHANGHAI: Final = ZoneInfo("Asia/Shanghai")
TABLE_PREFIX: Final = "demo_"


@dataclass(frozen=True)
class FeederConfig:
    """Rates of the demo; the defaults show every channel within a minute and stay bounded."""

    events_per_second: float = 1.2
    burst_every: tuple[float, float] = (60.0, 150.0)  # seconds between campaign pushes
    burst_seconds: float = 3.0
    burst_factor: float = 8.0  # the rate during a push
    stock_first: float = 5.0
    stock_interval: float = 30.0
    stock_new: tuple[int, int] = (2, 6)
    stock_updated: tuple[int, int] = (1, 3)
    stock_cap: int = 5000  # warehouse rows kept; the oldest go beyond it
    staging_first: float = 10.0
    staging_interval: float = 300.0
    staging_rows: tuple[int, int] = (80, 160)
    staging_keep: int = 2  # loaded demo tables kept to look at
    agent_poll: tuple[float, float] = (1.0, 3.0)  # with nothing to do
    next_lead: tuple[float, float] = (0.3, 1.0)  # after a lead, before the next
    breaks_per_hour: float = 3.0
    break_seconds: tuple[float, float] = (30.0, 90.0)
    back_from_away: tuple[float, float] = (20.0, 60.0)  # agents who start away come back
    pace_interval: float = 5.0
    backlog_soft: int = 100  # queued leads ready to call: full pace up to here
    backlog_hard: int = 400  # a tenth of the pace from here on
    report_interval: float = 60.0
    request_timeout: float = 5.0
    stop_grace: float = 3.0


def pace_for(backlog: int, soft: int, hard: int) -> float:
    """1.0 up to `soft` queued leads, falling linearly to 0.1 at `hard` and beyond."""
    if backlog <= soft:
        return 1.0
    if backlog >= hard:
        return 0.1
    return 1.0 - 0.9 * (backlog - soft) / (hard - soft)


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson-distributed count (Knuth's method; the demo's means are small)."""
    if mean <= 0:
        return 0
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


@dataclass
class Stats:
    counts: Counter[str] = field(default_factory=Counter)
    pace: float = 1.0
    backlog: int = 0

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n


@dataclass(frozen=True)
class Endpoints:
    database_url: str  # leadflow's PostgreSQL (libpq form)
    kafka_bootstrap: str
    web_url: str
    crm_url: str  # the demo warehouse (libpq form)


class Feeder:
    def __init__(
        self,
        settings: Settings,
        endpoints: Endpoints,
        tokens: Mapping[str, str],
        config: FeederConfig | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.tokens = dict(tokens)
        self.config = config or FeederConfig()
        self.rng = random.Random(seed)  # noqa: S311 - demo data, not secrets
        self.stats = Stats()
        self.stop = asyncio.Event()
        self._web_down = False

    # --- plumbing --------------------------------------------------------------------------

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless told to stop; True when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(seconds, 0.0))
        return self.stop.is_set()

    async def _forever(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run a loop body again after a transient failure, backing off up to 30 s."""
        delay = 1.0
        while not self.stop.is_set():
            try:
                await body()
                return
            except (OSError, psycopg.Error, KafkaError, aiohttp.ClientError, TimeoutError) as exc:
                log.debug("demo loop failed; retrying", loop=name, error=repr(exc))
                self.stats.add(f"{name}_retries")
            if await self.sleep(delay * self.rng.uniform(0.8, 1.2)):
                return
            delay = min(delay * 2, 30.0)

    async def _db(self, url: str) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            url,
            autocommit=True,
            connect_timeout=5,
            options="-c statement_timeout=5000 -c lock_timeout=2000",
            application_name="leadflow-demo",
        )

    async def run(self) -> Counter[str]:
        """Every loop until `stop` is set; the counts of what was done."""
        config = self.config
        loops = [
            asyncio.create_task(self._forever("events", self.events), name="events"),
            asyncio.create_task(self._forever("warehouse", self.warehouse), name="warehouse"),
            asyncio.create_task(self._forever("staging", self.data_team), name="staging"),
            asyncio.create_task(self._forever("pace", self.pace), name="pace"),
            asyncio.create_task(self.report(), name="report"),
            asyncio.create_task(self.agents(), name="agents"),
        ]
        log.info(
            "demo feeder started",
            events_per_second=config.events_per_second,
            agents=len(self.tokens),
            web=self.endpoints.web_url,
        )
        try:
            await self.stop.wait()
        finally:
            self.stop.set()
            _, pending = await asyncio.wait(loops, timeout=config.stop_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
        log.info("demo feeder stopped", **dict(sorted(self.stats.counts.items())))
        return self.stats.counts

    async def report(self) -> None:
        while not await self.sleep(self.config.report_interval):
            counts = self.stats.counts
            log.info(
                "demo traffic",
                events=counts["events"],
                poison=counts["poison"],
                warehouse_rows=counts["warehouse_rows"],
                extracts=counts["extracts"],
                dispositions=counts["dispositions"],
                backlog=self.stats.backlog,
                pace=round(self.stats.pace, 2),
            )

    # --- pace ------------------------------------------------------------------------------

    async def pace(self) -> None:
        config = self.config
        async with await self._db(self.endpoints.database_url) as conn:
            while not self.stop.is_set():
                row = await (
                    await conn.execute(
                        "SELECT count(*) FROM leads WHERE state = 'queued' "
                        "AND (next_action_at IS NULL OR next_action_at <= now())"
                    )
                ).fetchone()
                backlog = int(row[0]) if row else 0
                pace = pace_for(backlog, config.backlog_soft, config.backlog_hard)
                if (pace < 1.0) != (self.stats.pace < 1.0):
                    log.info("demo pace", backlog=backlog, pace=round(pace, 2))
                self.stats.backlog, self.stats.pace = backlog, pace
                if await self.sleep(config.pace_interval):
                    return

    # --- real-time events ------------------------------------------------------------------

    async def events(self) -> None:
        config, rng = self.config, self.rng
        producer = AIOKafkaProducer(
            **{
                **self.settings.kafka.client_options(),
                "bootstrap_servers": self.endpoints.kafka_bootstrap,
            },
            linger_ms=20,
            acks=1,
        )
        await producer.start()
        try:
            stream = EventStream(rng)
            topic = self.settings.topics.raw
            tick = 0.2
            next_burst = time.monotonic() + rng.uniform(15.0, 30.0)
            burst_until = 0.0
            pending: list[asyncio.Future[Any]] = []
            while not self.stop.is_set():
                started = time.monotonic()
                if started >= next_burst:
                    burst_until = started + config.burst_seconds
                    next_burst = started + rng.uniform(*config.burst_every)
                    self.stats.add("bursts")
                factor = config.burst_factor if started < burst_until else 1.0
                count = poisson(rng, config.events_per_second * factor * self.stats.pace * tick)
                now = datetime.now(SHANGHAI)
                for _ in range(count):
                    message = stream.next(now)
                    pending.append(await producer.send(topic, message.value, key=message.key))
                    self.stats.add("events")
                    if message.kind in POISON:
                        self.stats.add("poison")
                    elif message.kind == "redelivery":
                        self.stats.add("redeliveries")
                if pending:
                    for outcome in await asyncio.gather(*pending, return_exceptions=True):
                        if isinstance(outcome, BaseException):
                            self.stats.add("events_failed")
                    pending.clear()
                if await self.sleep(tick - (time.monotonic() - started)):
                    return
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 2.0)

    # --- the warehouse (stock source) ------------------------------------------------------

    async def warehouse(self) -> None:
        config, rng = self.config, self.rng
        if await self.sleep(config.stock_first):
            return
        while not self.stop.is_set():
            if rng.random() < self.stats.pace:
                async with await self._db(self.endpoints.crm_url) as conn:
                    await self._warehouse_tick(conn)
            if await self.sleep(config.stock_interval * rng.uniform(0.8, 1.2)):
                return

    async def _warehouse_tick(self, conn: psycopg.AsyncConnection[Any]) -> None:
        config, rng = self.config, self.rng
        stamp = int(time.time() * 1000)
        count = rng.randint(*config.stock_new)
        users = [crm_user(rng, f"crm-{stamp}-{n}", silent=0.9) for n in range(count)]
        now = datetime.now(UTC)
        async with conn.transaction():
            async with conn.cursor() as cursor:
                await cursor.executemany(CRM_INSERT, crm_rows(users, now))
            # A few known users changed (or fell silent): the poller reads them (again), and
            # the events of those it read before merge into their leads.
            await conn.execute(
                "UPDATE crm_silent_users "
                "SET ltv = ltv * 1.1, silent = true, updated_at = clock_timestamp() "
                "WHERE user_id IN (SELECT user_id FROM crm_silent_users "
                "ORDER BY random() LIMIT %s)",
                (rng.randint(*config.stock_updated),),
            )
            await conn.execute(
                "DELETE FROM crm_silent_users WHERE user_id IN (SELECT user_id "
                "FROM crm_silent_users ORDER BY updated_at DESC OFFSET %s)",
                (config.stock_cap,),
            )
        self.stats.add("warehouse_rows", len(users))

    # --- the data team (staging) -----------------------------------------------------------

    async def data_team(self) -> None:
        config, rng = self.config, self.rng
        if await self.sleep(config.staging_first):
            return
        kinds = itertools.cycle(EXTRACT_KINDS)
        kind = next(kinds)
        while not self.stop.is_set():
            if self.stats.pace >= 0.7:
                rows = rng.randint(*config.staging_rows)
                extract = staging_extract(rng, datetime.now(UTC), kind, rows)
                await asyncio.to_thread(self._submit_extract, extract)
                kind = next(kinds)
            if await self.sleep(config.staging_interval * rng.uniform(0.8, 1.2)):
                return

    def _submit_extract(self, extract: Any) -> None:
        """Drop the demo's loaded tables but the newest few, create and fill a new table, and
        submit it (blocking: run in a thread; every statement has a timeout)."""
        schema = self.settings.staging.schema_name
        table = extract.table_name(datetime.now(UTC))
        with psycopg.connect(
            self.endpoints.database_url,
            autocommit=True,
            connect_timeout=5,
            options="-c statement_timeout=10000 -c lock_timeout=2000",
            application_name="leadflow-demo",
        ) as conn:
            self._drop_loaded(conn, schema)
            columns = sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
                for name, kind in STAGING_COLUMNS
            )
            target = sql.Identifier(schema, table)
            with conn.transaction():
                conn.execute(sql.SQL("CREATE TABLE {} ({})").format(target, columns))
                names = sql.SQL(", ").join(sql.Identifier(name) for name, _ in STAGING_COLUMNS)
                with conn.cursor().copy(
                    sql.SQL("COPY {} ({}) FROM STDIN").format(target, names)
                ) as copy:
                    for row in extract.rows:
                        copy.write_row(row)
            extract_id = submit(
                conn,
                schema,
                Submission(
                    table,
                    extract.source,
                    extract.event_type,
                    extract.business_line,
                    extract.segment,
                    extract.priority,
                    extract.campaign,
                ),
            )
        self.stats.add("extracts")
        self.stats.add("extract_rows", len(extract.rows))
        log.info(
            "demo extract submitted",
            extract=extract_id,
            table=f"{schema}.{table}",
            rows=len(extract.rows),
        )

    def _drop_loaded(self, conn: psycopg.Connection[Any], schema: str) -> None:
        rows = conn.execute(
            """
            SELECT t.tablename, max(e.id) AS extract, bool_and(e.state IN ('loaded', 'failed'))
            FROM pg_tables t
            LEFT JOIN staging.extracts e ON e.table_name = t.tablename
            WHERE t.schemaname = %s AND t.tablename LIKE %s
            GROUP BY t.tablename
            ORDER BY max(e.id) DESC NULLS LAST
            """,
            (schema, TABLE_PREFIX.replace("_", r"\_") + "%"),
        ).fetchall()
        # Newest first: keep the newest few submitted tables to look at; drop older ones once
        # loaded (or failed), and tables never submitted (a feeder stopped in between).
        submitted = [name for name, extract, _ in rows if extract is not None]
        newest = set(submitted[: self.config.staging_keep])
        done = [
            name
            for name, extract, finished in rows
            if extract is None or (finished and name not in newest)
        ]
        for name in done:
            try:
                conn.execute(
                    sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(schema, name))
                )
                self.stats.add("tables_dropped")
            except psycopg.errors.LockNotAvailable:
                pass  # still being read; next time

    # --- simulated agents ------------------------------------------------------------------

    async def agents(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout)
        connector = aiohttp.TCPConnector(limit=max(len(self.tokens), 10))
        async with aiohttp.ClientSession(
            base_url=self.endpoints.web_url, timeout=timeout, connector=connector
        ) as session:
            await asyncio.gather(
                *(
                    self._forever(f"agent {agent}", self._agent_loop(session, agent, token))
                    for agent, token in sorted(self.tokens.items())
                )
            )

    def _agent_loop(
        self, session: aiohttp.ClientSession, agent: str, token: str
    ) -> Callable[[], Awaitable[None]]:
        rng = random.Random(f"{agent}-{self.rng.random()}")  # noqa: S311 - not secrets
        client = AgentClient(session, token, self)
        ignored: set[str] = set()

        async def body() -> None:
            config = self.config
            if await self.sleep(rng.uniform(0.0, 3.0)):  # not all at once
                return
            me = await client.get("/api/v1/me")
            if me is None:
                return  # the token is gone (a newer demo issued new ones)
            status = me.get("status")
            if status == "away":  # back from a break that began before the demo
                if await self.sleep(rng.uniform(*config.back_from_away)):
                    return
                await client.post("/api/v1/me/status", {"status": "available"})
            elif status == "offline":
                await self.stop.wait()  # not working today
                return
            while not self.stop.is_set():
                items = await client.get("/api/v1/me/assignments")
                if items is None:
                    return
                listed = {item["id"] for item in items}
                ignored.intersection_update(listed)
                todo = [item for item in items if item["id"] not in ignored]
                pause = config.agent_poll
                if todo:
                    plan = plan_assignment(rng)
                    if plan.action == "ignore":
                        ignored.add(todo[0]["id"])
                        self.stats.add("left_to_expire")
                    else:
                        await self._work(client, todo[0]["id"], plan)
                    pause = config.next_lead
                elif not items and rng.random() < self._break_chance():
                    await self._break(client, rng)
                if await self.sleep(rng.uniform(*pause)):
                    return

        return body

    def _break_chance(self) -> float:
        config = self.config
        polls_per_hour = 3600 / (sum(config.agent_poll) / 2)
        return config.breaks_per_hour / polls_per_hour

    async def _break(self, client: AgentClient, rng: random.Random) -> None:
        await client.post("/api/v1/me/status", {"status": "away"})
        self.stats.add("breaks")
        await self.sleep(rng.uniform(*self.config.break_seconds))
        # Back even when stopping: the next demo finds the agent available.
        await client.post("/api/v1/me/status", {"status": "available"})

    async def _work(self, client: AgentClient, assignment: str, plan: Plan) -> None:
        path = f"/api/v1/assignments/{assignment}"
        if plan.action == "reject":
            if await client.post(f"{path}/reject", {"reason": plan.note}) is not None:
                self.stats.add("rejects")
            return
        if await client.get(path) is None:  # opened: the phone, the events, the history
            return
        if await self.sleep(plan.dial_seconds):
            return
        if plan.contact:
            if await client.post(f"{path}/contact", {}) is None:
                return
            self.stats.add("contacts")
            if await self.sleep(plan.talk_seconds):
                return
        body: dict[str, Any] = {"outcome": plan.outcome, "note": plan.note}
        if plan.callback_in is not None:
            body["callback_at"] = (datetime.now(SHANGHAI) + plan.callback_in).isoformat(
                timespec="seconds"
            )
        if await client.post(f"{path}/disposition", body) is not None:
            self.stats.add("dispositions")
            self.stats.add(f"outcome_{plan.outcome}")

    def web_failed(self, exc: BaseException) -> None:
        if not self._web_down:
            self._web_down = True
            log.info("demo agents: the web role does not answer; retrying", error=repr(exc))

    def web_answered(self) -> None:
        if self._web_down:
            self._web_down = False
            log.info("demo agents: the web role answers again")


class TokenRevoked(LeadflowError):
    """The agent's token was revoked (a newer demo issued new ones)."""


class AgentClient:
    """One agent's calls to the API. None: not found, or the assignment is no longer open
    (expired, taken back) or the token is gone; transient failures raise."""

    def __init__(self, session: aiohttp.ClientSession, token: str, feeder: Feeder) -> None:
        self.session = session
        self.headers = {"Authorization": f"Bearer {token}"}
        self.feeder = feeder

    async def get(self, path: str) -> Any:
        return await self._call("GET", path, None)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._call("POST", path, body)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        try:
            async with self.session.request(
                method, path, json=body, headers=self.headers
            ) as response:
                if response.status >= 500:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status
                    )
                self.feeder.web_answered()
                if response.status == 401:
                    await self.feeder.stop.wait()  # revoked: this agent is done
                    return None
                if response.status in (404, 409, 422):
                    self.feeder.stats.add(f"http_{response.status}")
                    return None
                response.raise_for_status()
                return await response.json()
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            self.feeder.web_failed(exc)
            raise


def endpoints(settings: Settings, environ: Mapping[str, str]) -> Endpoints:
    """Where the feeder's servers are: the settings first, else a running `leadflow up`."""
    database = settings.database.url.get_secret_value() if settings.database.url else None
    kafka = settings.kafka.bootstrap
    web = environ.get(WEB_URL_VARIABLE)
    if database is None or kafka is None or web is None:
        from leadflow.stack import resolve_endpoints

        found = resolve_endpoints(settings)
        database, kafka, web = (
            database or found.database_url,
            kafka or found.kafka_bootstrap,
            web or found.web_url,
        )
    source = next((s for s in settings.sources if s.name == SOURCE_NAME), None)
    crm = environ.get(CRM_URL_VARIABLE) or (source.url.get_secret_value() if source else None)
    missing = [
        name
        for name, value in (
            ("database.url", database),
            ("kafka.bootstrap", kafka),
            (WEB_URL_VARIABLE, web),
            (f"{CRM_URL_VARIABLE} (or the {SOURCE_NAME} source)", crm),
        )
        if not value
    ]
    if missing:
        raise LeadflowError(
            f"The demo feeder does not know where to send its traffic: {', '.join(missing)} "
            "unset. It is started by `leadflow up --demo`, which sets them."
        )
    assert database
    assert kafka
    assert web
    assert crm
    return Endpoints(_libpq(database), kafka, web.rstrip("/"), _libpq(crm))


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def tokens_path(environ: Mapping[str, str]) -> Path:
    from leadflow.demo import TOKENS_VARIABLE

    if environ.get(TOKENS_VARIABLE):
        return Path(environ[TOKENS_VARIABLE])
    config = environ.get("LEADFLOW_CONFIG")
    if not config:
        raise LeadflowError(
            "The demo feeder needs LEADFLOW_CONFIG (the demo's leadflow.yaml) or "
            "LEADFLOW_DEMO_TOKENS: `leadflow up --demo` sets them."
        )
    return Path(config).parent / TOKENS_FILE


async def _serve(feeder: Feeder) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, feeder.stop.set)
    await feeder.run()


def main() -> None:
    """`python -m leadflow.demo`: feed the demo until SIGTERM/SIGINT; exit 0 (1 when it
    cannot start: no configuration, no servers, no tokens)."""
    environ = os.environ
    try:
        settings = load_settings(environ=environ)
        configure(settings.log.level, settings.log.format)
        feeder = Feeder(settings, endpoints(settings, environ), read_tokens(tokens_path(environ)))
    except (LeadflowError, OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"error: leadflow demo feeder: {exc}\n")
        raise SystemExit(1) from None
    asyncio.run(_serve(feeder))


__all__ = ["Feeder", "FeederConfig", "endpoints", "main", "pace_for", "poisson"]
