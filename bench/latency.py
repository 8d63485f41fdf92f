"""`leadflow bench latency`: produce time to committed assignment, under a steady stream.

Fresh embedded servers (PostgreSQL durable, and started with `track_commit_timestamp = on` so
that every transaction's commit time is recorded by the server itself), a generated
`leadflow.yaml` (one queue per business line of the demo rules, call windows null, SLAs long
enough not to expire during the run), enough agents with ample capacity, and a history: 100,000
customers of earlier weeks with closed leads, a few of this morning's assignments still open,
then VACUUM ANALYZE (a fresh, never analyzed database gets plans no live one runs with).
`leadflow run intake` and `leadflow run allocator` run as real subprocesses on that
configuration, as an operator would run them: intake consumes `leads.raw`, commits leads and
NOTIFYs; the allocator, woken by the NOTIFY, assigns them.

A producer (`ingest.publisher.LeadPublisher`, the product teams' client: acks=all, 10 ms
linger) then sends LeadEvents at a steady rate (default 2,000/s for 30 s), every event a new
customer so that each one becomes a new queued lead and then an assignment. Each event's
produce time is taken just before it is handed to the publisher (and also travels in the
event as `occurred_at` and `attributes.bench_sent_at`). Latency is that time to the commit of
the transaction that inserted the event's assignment: `pg_xact_commit_timestamp(xmin)` of
the assignment row, read from the server after the run, the same clock as the producer's (one
machine). The intake transaction's start (`lead_events.received_at`) and commit (the row's
xmin) split it in three: Kafka (publisher linger, broker, consumer fetch and batch wait), the
intake's write, and the allocator (wake-up and its pass).

Warm-up, excluded: before the steady stream, a trickle of warm-up events (20/s) runs until
the first of them is assigned. That covers the consumer group's first join (the embedded
broker holds it about 5 s, Kafka 3 s; nothing to do with the steady-state latency), the
processes' connections and prepared statements. Every event of the steady stream counts,
from its first second; the report also gives p99 per 5-second window, so a slow start or a
drift shows. After the stream the run waits until every produced event is assigned (or
fails, naming how many were not). The servers, the roles and the directory are removed at
the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql
from psycopg.types.json import Jsonb
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.common import goal, machine, write_report
from bench.intake import BenchFailed, Processes
from ingest.publisher import LeadPublisher
from leadflow.embedded import EmbeddedServers
from leadflow.kafka import ensure_topics
from leadflow.settings import Settings, load_settings
from schemas import migrate

DEFAULT_RATE = 2_000
DEFAULT_SECONDS = 30
GOALS = {"p99_ms": 250}
GROUP = "bench-latency"
WARMUP_RATE = 20  # events/s until the first warm-up event is assigned
WINDOW_SECONDS = 5  # p99 per window of the steady stream
SHANGHAI = timezone(timedelta(hours=8))

#: One queue per business line the demo rules give, each strategy present, no call window.
QUEUES: tuple[dict[str, Any], ...] = (
    {"name": "personal_credit", "business_line": "personal_credit_loan", "strategy": "round_robin"},
    {"name": "car_loan", "business_line": "car_loan", "strategy": "least_loaded"},
    {"name": "enterprise_loan", "business_line": "enterprise_loan", "strategy": "weighted"},
    {"name": "wealth", "business_line": "wealth_management", "strategy": "sticky",
     "fallback_strategy": "weighted"},
    {"name": "leasing", "business_line": "financial_leasing", "strategy": "least_loaded"},
)  # fmt: skip
AGENTS_PER_LINE = 20
HISTORY = 100_000  # customers of earlier weeks, with their closed leads
OPEN_PER_AGENT = 5  # of those, this morning's assignments still open
#: Products that the demo rules send to each line, weighted like real traffic.
_PRODUCTS: tuple[tuple[str, float], ...] = (
    ("personal_credit_loan", 20), ("cash_loan", 12), ("credit_card", 8), ("car_loan", 12),
    ("used_car_loan", 5), ("enterprise_loan", 6), ("sme_credit", 4), ("financial_leasing", 5),
    ("equipment_leasing", 3), ("wealth_management", 8), ("fund", 5), ("deposit_plus", 2),
)  # fmt: skip
_EVENT_TYPES: tuple[tuple[str, float], ...] = (
    ("order_pending_payment", 20), ("signup", 20), ("ad_click", 25), ("form_submit", 15),
    ("browse", 20),
)  # fmt: skip
_SOURCES = ("loan-app", "mall-web", "car-mall", "wealth-app", "partner-api")
_CHANNELS = ("app", "web", "ad", "partner")
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高"
_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛"


def _cumulative(weighted: Sequence[tuple[str, float]]) -> tuple[list[str], list[float]]:
    total, bounds = 0.0, []
    for _, weight in weighted:
        total += weight
        bounds.append(total)
    return [value for value, _ in weighted], [bound / total for bound in bounds]


def _event(n: int, prefix: str, sent: float) -> dict[str, Any]:
    """LeadEvent n of a stream: a new customer (a mainland mobile of their own) every time."""
    products, product_bounds = _PRODUCTS_CUMULATIVE
    types, type_bounds = _TYPES_CUMULATIVE
    roll = (n * 7919 % 10007) / 10007  # deterministic, spread
    product = next(p for p, b in zip(products, product_bounds, strict=True) if roll <= b)
    roll = (n * 104729 % 10009) / 10009
    event_type = next(t for t, b in zip(types, type_bounds, strict=True) if roll <= b)
    phone = f"{'139' if prefix == 'lat' else '137'}{n:08d}"
    return {
        "schema_version": 1,
        "event_id": f"{prefix}-{n}",
        "occurred_at": datetime.fromtimestamp(sent, SHANGHAI).isoformat(timespec="milliseconds"),
        "source": _SOURCES[n % len(_SOURCES)],
        "event_type": event_type,
        "channel": _CHANNELS[n % len(_CHANNELS)],
        "product": product,
        "customer": {
            "phone": f"{phone[:3]} {phone[3:7]} {phone[7:]}" if n % 3 else phone,
            "name": _SURNAMES[n % len(_SURNAMES)] + _GIVEN[n % len(_GIVEN)],
            "region": "CN-31",
        },
        "consent": {"telemarketing": True},
        "attributes": {"amount": n % 200_000, "bench_sent_at": sent},
    }


_PRODUCTS_CUMULATIVE = _cumulative(_PRODUCTS)
_TYPES_CUMULATIVE = _cumulative(_EVENT_TYPES)


# --- set-up ---------------------------------------------------------------------------------


def _enable_commit_timestamps(servers: EmbeddedServers) -> None:
    """`track_commit_timestamp` needs a server restart: set it and restart the embedded one."""
    assert servers.postgres is not None
    assert servers.database_url is not None
    with psycopg.connect(servers.database_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
    servers.postgres.stop()
    servers.postgres.start()
    with psycopg.connect(servers.database_url) as conn:
        row = conn.execute("SHOW track_commit_timestamp").fetchone()
    if not row or row[0] != "on":
        raise BenchFailed("could not turn track_commit_timestamp on in the embedded PostgreSQL")


def write_config(path: Path, database_url: str, bootstrap: str, data_dir: Path) -> None:
    """The leadflow.yaml both roles run with."""
    config = {
        "database": {"url": database_url},
        "kafka": {"bootstrap": bootstrap},
        "embedded": {"data_dir": str(data_dir)},
        "intake": {"consumer_group": GROUP},
        "log": {"level": "INFO", "format": "json"},
        "queues": [{**queue, "call_window": None, "sla": "30m"} for queue in QUEUES],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def add_agents(url: str, expected: int) -> list[tuple[str, str]]:
    """AGENTS_PER_LINE available agents per queue's line, no shift, each able to take every
    lead of their line twice over; returns their (id, line)."""
    capacity = max(100, math.ceil(2 * expected / AGENTS_PER_LINE))
    rows = []
    for queue in QUEUES:
        line = queue["business_line"]
        for i in range(AGENTS_PER_LINE):
            rows.append(
                (f"{line}-{i:02}", f"{line} {i}", [line], ["*"], capacity, capacity,
                 1.0 + i % 3, "Asia/Shanghai", "available")
            )  # fmt: skip
    _copy(
        url,
        "agents (id, name, business_lines, segments, capacity, daily_cap, weight, timezone,"
        " status)",
        rows,
    )
    return [(row[0], row[2][0]) for row in rows]


def seed_history(url: str, agents: Sequence[tuple[str, str]], count: int) -> None:
    """`count` customers of earlier weeks with a closed lead, its event and a completed
    assignment; the last OPEN_PER_AGENT per agent are this morning's, still open (agents
    mid-shift hold some work); a few thousand do-not-call phones; then VACUUM ANALYZE. A live
    database has history and statistics: a fresh one makes the planner pick plans (sequential
    scans, cached in prepared statements) that no production database would run with."""
    rng = random.Random(5)
    now = datetime.now(UTC)
    weeks_ago = now - timedelta(days=14)
    customers, leads, events, assignments = [], [], [], []
    open_from = count - OPEN_PER_AGENT * len(agents)
    for n in range(1, count + 1):
        customers.append((n, f"+86136{n:08d}", _SURNAMES[n % len(_SURNAMES)], "Asia/Shanghai"))
        if n > open_from:  # this morning's, open
            agent, line = agents[(n - open_from - 1) % len(agents)]
            at = now - timedelta(minutes=rng.uniform(1, 120))
            state, status, closed, closed_at = "assigned", "open", None, None
        else:
            agent, line = agents[rng.randrange(len(agents))]
            at = weeks_ago - timedelta(seconds=rng.uniform(0, 60 * 86400))
            state = rng.choice(("closed", "converted"))
            status, closed, closed_at = "completed", "converted", at + timedelta(hours=1)
        leads.append(
            (n, n, line, "general", 30, state, "realtime", at, at, at, closed_at)
        )  # fmt: skip
        events.append(
            (f"old-{n}", n, n, "realtime", "loan-app", "signup", at, Jsonb({"event_id": f"old-{n}"}))
        )  # fmt: skip
        assignments.append(
            (n, agent, line, "round_robin", "history", status, 1, at, at + timedelta(hours=8),
             closed_at, closed)
        )  # fmt: skip
    _copy(url, "customers (id, phone_e164, name, timezone)", customers)
    _copy(
        url,
        "leads (id, customer_id, business_line, segment, priority, state, intake, first_event_at,"
        " last_event_at, queued_at, closed_at)",
        leads,
    )
    _copy(
        url,
        "lead_events (event_id, customer_id, lead_id, intake, source, event_type, occurred_at,"
        " payload)",
        events,
    )
    _copy(
        url,
        "assignments (lead_id, agent_id, queue, strategy, reason, status, attempt, assigned_at,"
        " sla_deadline, closed_at, close_reason)",
        assignments,
    )
    _copy(url, "dnc (phone_e164, source)", [(f"+86135{n:08d}", "bench") for n in range(3000)])
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("customers", "leads"):
            conn.execute(
                sql.SQL("SELECT setval(pg_get_serial_sequence({}, 'id'), max(id)) FROM {}").format(
                    sql.Literal(table), sql.Identifier(table)
                )
            )
        conn.execute("VACUUM ANALYZE")


def _copy(url: str, target: str, rows: Sequence[tuple[Any, ...]]) -> None:
    with (
        psycopg.connect(url) as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY {target} FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(row)


def _clean_env() -> dict[str, str]:
    """This environment without LEADFLOW_* variables: the generated file is the configuration."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PDEATHSIG


@dataclass
class Role:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


async def start_role(role: str, config: Path, work_dir: Path) -> Role:
    log_path = work_dir / f"{role}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "leadflow.cli", "--config", str(config), "run", role,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=_clean_env(),
            preexec_fn=_die_with_parent,
        )  # fmt: skip
    return Role(role, process, log_path)


async def stop_role(role: Role) -> int | None:
    if role.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            role.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(role.process.wait(), 30)
        except TimeoutError:
            role.process.kill()
            await role.process.wait()
    return role.process.returncode


# --- the stream -----------------------------------------------------------------------------


@dataclass
class Stream:
    """What was produced: event id -> produce time (Unix seconds), per phase."""

    warmup: dict[str, float] = field(default_factory=dict)
    steady: dict[str, float] = field(default_factory=dict)
    started: float = 0.0  # first steady event handed to the publisher
    ended: float = 0.0  # last one
    acknowledged: float = 0.0  # every steady event acknowledged by the broker


async def _assigned_count(conn: psycopg.AsyncConnection[Any]) -> int:
    row = await (
        await conn.execute(
            "SELECT count(*) FROM assignments WHERE status = 'open' AND lead_id > %s", (HISTORY,)
        )
    ).fetchone()
    return int(row[0]) if row else 0


async def warm_up(
    publisher: LeadPublisher, poll: psycopg.AsyncConnection[Any], stream: Stream, roles: list[Role]
) -> float:
    """Trickle warm-up events until the first is assigned; returns how long that took."""
    started = time.time()
    n = 0
    deadline = time.monotonic() + 180
    while True:
        sent = time.time()
        await publisher.publish(_event(n, "warm", sent))
        stream.warmup[f"warm-{n}"] = sent
        n += 1
        await publisher.flush()
        if await _assigned_count(poll):
            return time.time() - started
        _check_alive(roles)
        if time.monotonic() > deadline:
            raise BenchFailed("no warm-up event was assigned within 3 minutes")
        await asyncio.sleep(1 / WARMUP_RATE)


def _check_alive(roles: list[Role]) -> None:
    for role in roles:
        if role.process.returncode is not None:
            raise BenchFailed(
                f"`leadflow run {role.name}` exited with code {role.process.returncode}; its log "
                f"{role.log_path} ends:\n{role.tail()}"
            )


async def steady(
    publisher: LeadPublisher, rate: int, seconds: int, stream: Stream, progress: Progress
) -> None:
    """`rate` events/s for `seconds`, on a schedule: each tick sends what is due by now, so a
    late tick catches up rather than stretching the run."""
    total = rate * seconds
    task = progress.add_task("producing", total=total)
    loop = asyncio.get_running_loop()
    start = loop.time()
    stream.started = time.time()
    n = 0
    while n < total:
        due = min(total, int((loop.time() - start) * rate) + 1)
        while n < due:
            sent = time.time()
            await publisher.publish(_event(n, "lat", sent))
            stream.steady[f"lat-{n}"] = sent
            n += 1
        progress.update(task, completed=n)
        await asyncio.sleep(0.002)
    stream.ended = time.time()
    await publisher.flush()
    stream.acknowledged = time.time()


async def wait_assigned(
    poll: psycopg.AsyncConnection[Any],
    expected: int,
    roles: list[Role],
    progress: Progress | None = None,
) -> int:
    """Until `expected` assignments exist, or none came for 60 s; returns how many exist."""
    task = progress.add_task("assigned", total=expected) if progress is not None else None
    last, last_change = -1, time.monotonic()
    while True:
        count = await _assigned_count(poll)
        if progress is not None and task is not None:
            progress.update(task, completed=count)
        if count >= expected:
            return count
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > 60:
            return count
        _check_alive(roles)
        await asyncio.sleep(0.25)


# --- the figures ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summary(values_ms: list[float]) -> dict[str, float]:
    ordered = sorted(values_ms)
    return {
        "p50_ms": round(percentile(ordered, 50), 1),
        "p95_ms": round(percentile(ordered, 95), 1),
        "p99_ms": round(percentile(ordered, 99), 1),
        "max_ms": round(ordered[-1], 1) if ordered else math.nan,
    }


_COMMITS = """
SELECT e.event_id,
       extract(epoch FROM e.received_at),
       extract(epoch FROM pg_xact_commit_timestamp(e.xmin)),
       extract(epoch FROM pg_xact_commit_timestamp(s.xmin))
FROM lead_events e JOIN assignments s ON s.lead_id = e.lead_id
WHERE e.event_id LIKE 'lat-%%'
"""


def read_commits(url: str) -> tuple[dict[str, tuple[float, float, float]], dict[str, int]]:
    """Event id -> (intake transaction start, its commit, the assignment's commit), and the
    counts that must add up."""
    with psycopg.connect(url) as conn:
        commits = {
            event_id: (float(received), float(lead), float(assignment))
            for event_id, received, lead, assignment in conn.execute(_COMMITS).fetchall()
        }

        def one(query: str) -> int:
            row = conn.execute(query, {"history": HISTORY}).fetchone()
            return int(row[0]) if row else 0

        # Rows of the run only: the history has ids up to HISTORY, and completed assignments.
        counts = {
            "lead_events": one("SELECT count(*) FROM lead_events WHERE lead_id > %(history)s"),
            "leads": one("SELECT count(*) FROM leads WHERE id > %(history)s"),
            "assignments": one("SELECT count(*) FROM assignments WHERE lead_id > %(history)s"),
            "leads_assigned_twice": one(
                "SELECT count(*) FROM (SELECT lead_id FROM assignments"
                " WHERE lead_id > %(history)s GROUP BY 1 HAVING count(*) > 1) twice"
            ),
            "leads_not_assigned": one(
                "SELECT count(*) FROM leads WHERE id > %(history)s AND state <> 'assigned'"
            ),
            "without_commit_timestamp": one(
                "SELECT count(*) FROM assignments WHERE lead_id > %(history)s"
                " AND pg_xact_commit_timestamp(xmin) IS NULL"
            ),
        }
    return commits, counts


def figures(stream: Stream, commits: dict[str, tuple[float, float, float]]) -> dict[str, Any]:
    total, to_intake, in_intake, to_assignment = [], [], [], []
    windows: dict[int, list[float]] = {}
    for event_id, sent in stream.steady.items():
        found = commits.get(event_id)
        if found is None:
            continue
        received, lead, assignment = found
        latency = (assignment - sent) * 1000
        total.append(latency)
        to_intake.append((received - sent) * 1000)
        in_intake.append((lead - received) * 1000)
        to_assignment.append((assignment - lead) * 1000)
        windows.setdefault(int((sent - stream.started) // WINDOW_SECONDS), []).append(latency)
    return {
        **summary(total),
        "mean_ms": round(sum(total) / len(total), 1) if total else math.nan,
        "p999_ms": round(percentile(sorted(total), 99.9), 1),
        "produce_to_intake_transaction": summary(to_intake),
        "intake_transaction_to_lead_committed": summary(in_intake),
        "lead_committed_to_assignment_committed": summary(to_assignment),
        "p99_ms_by_window": [
            {
                "from_s": k * WINDOW_SECONDS,
                "events": len(v),
                "p99_ms": round(percentile(sorted(v), 99), 1),
            }
            for k, v in sorted(windows.items())
        ],
    }


# --- the run --------------------------------------------------------------------------------


async def _measure(
    settings: Settings,
    config: Path,
    work_dir: Path,
    rate: int,
    seconds: int,
    processes: Processes,
    console: Console,
) -> dict[str, Any]:
    assert settings.database.url is not None
    url = settings.database.url.get_secret_value()
    await ensure_topics(settings.kafka, settings.topics)
    roles = [await start_role(role, config, work_dir) for role in ("intake", "allocator")]
    stream = Stream()
    progress = Progress(
        TextColumn("[progress.description]{task.description:<12}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    publisher = LeadPublisher(
        settings.topics.raw, max_in_flight=2**31, **settings.kafka.client_options()
    )
    try:
        async with publisher:
            poll = await psycopg.AsyncConnection.connect(url, autocommit=True)
            async with poll:
                console.log("roles started; warming up until the first lead is assigned")
                warmup_seconds = await warm_up(publisher, poll, stream, roles)
                count = await wait_assigned(poll, len(stream.warmup), roles)
                if count < len(stream.warmup):
                    raise BenchFailed(f"{len(stream.warmup) - count} warm-up events not assigned")
                console.log(
                    f"warm-up: {len(stream.warmup)} events, first assigned after "
                    f"{warmup_seconds:.1f}s; producing {rate:,}/s for {seconds}s"
                )
                pids = {role.name: role.process.pid for role in roles}
                processes = processes.but(producer=os.getpid(), **pids)
                cpu_start = processes.cpu_seconds()
                with progress:
                    await steady(publisher, rate, seconds, stream, progress)
                    expected = len(stream.warmup) + len(stream.steady)
                    count = await wait_assigned(poll, expected, roles, progress)
                drained = time.time()
                cpu_end = processes.cpu_seconds()
    finally:
        exits = {role.name: await stop_role(role) for role in roles}
    if count < expected:
        raise BenchFailed(
            f"{expected - count:,} of {expected:,} produced events were not assigned "
            "within 60 s of the last assignment"
        )
    for name, code in exits.items():
        if code != 0:
            raise BenchFailed(f"`leadflow run {name}` exited with code {code} when told to stop")
    commits, counts = await asyncio.to_thread(read_commits, url)
    problems = []
    if counts["leads_assigned_twice"]:
        problems.append(f"{counts['leads_assigned_twice']} leads assigned more than once")
    if counts["leads_not_assigned"]:
        problems.append(f"{counts['leads_not_assigned']} leads not assigned")
    if counts["lead_events"] != expected or counts["leads"] != expected:
        problems.append(f"{counts['leads']} leads from {counts['lead_events']} events, {expected} produced")  # fmt: skip
    if len(commits) != len(stream.steady):
        problems.append(f"{len(commits)} steady events with a commit time, {len(stream.steady)} produced")  # fmt: skip
    if problems:
        raise BenchFailed("the latency benchmark does not add up: " + "; ".join(problems))

    measured = figures(stream, commits)
    produce_seconds = stream.ended - stream.started
    timed = drained - stream.started
    used = {name: cpu_end[name] - cpu_start[name] for name in cpu_start if name in cpu_end}
    return {
        "scenario": "latency",
        "rate": rate,
        "seconds": seconds,
        "p50_ms": measured["p50_ms"],
        "p95_ms": measured["p95_ms"],
        "p99_ms": measured["p99_ms"],
        "max_ms": measured["max_ms"],
        "produce_rate": round(len(stream.steady) / produce_seconds) if produce_seconds else 0,
        "produced": len(stream.steady),
        "assigned": len(commits),
        "details": {
            "measured": "produce time (just before the publisher takes the event) to the "
            "commit of the transaction that inserted its assignment, "
            "pg_xact_commit_timestamp(xmin), same machine clock",
            "warmup": {
                "events": len(stream.warmup),
                "seconds_to_first_assignment": round(warmup_seconds, 3),
                "excluded": "a 20/s trickle until its first event was assigned: the consumer "
                "group's first join (held ~5 s by the embedded broker), connections and "
                "prepared statements; every event of the steady stream counts",
            },
            "mean_ms": measured["mean_ms"],
            "p999_ms": measured["p999_ms"],
            "produce_to_intake_transaction": measured["produce_to_intake_transaction"],
            "intake_transaction_to_lead_committed": measured[
                "intake_transaction_to_lead_committed"
            ],
            "lead_committed_to_assignment_committed": measured[
                "lead_committed_to_assignment_committed"
            ],
            "p99_ms_by_window": measured["p99_ms_by_window"],
            "produce_seconds": round(produce_seconds, 3),
            "acknowledged_after_seconds": round(stream.acknowledged - stream.started, 3),
            "drained_after_seconds": round(timed, 3),
            "cpu_seconds": {name: round(value, 2) for name, value in used.items()},
            "cores_busy": round(sum(used.values()) / timed, 2) if timed > 0 else None,
            "roles": "`leadflow run intake` and `leadflow run allocator`, one process each",
            "intake": {
                "batch_size": settings.intake.batch_size,
                "batch_wait_ms": settings.intake.batch_wait.total_seconds() * 1000,
                "partitions": settings.topics.partitions,
            },
            "allocation": {
                "batch_size": settings.allocation.batch_size,
                "sweep_interval_s": settings.allocation.sweep_interval.total_seconds(),
                "queues": [queue["name"] for queue in QUEUES],
                "agents": len(QUEUES) * AGENTS_PER_LINE,
            },
            "postgres": "embedded PostgreSQL 18, durable (fsync and synchronous_commit on), "
            "track_commit_timestamp on",
            "publisher": "ingest.publisher.LeadPublisher (acks=all, linger 10 ms)",
            "database": counts,
            "verified": True,
            "goals": GOALS,
            "machine": machine(),
        },
    }


def run(
    rate: int = DEFAULT_RATE,
    seconds: int = DEFAULT_SECONDS,
    json_path: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Start the servers and the roles, measure, verify, clean up; write the report, return it."""
    console = console or Console()
    work_dir = Path(tempfile.mkdtemp(prefix="leadflow-bench-latency-"))
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        console.log(f"starting embedded PostgreSQL (durable) and Kafka in {work_dir}")
        with EmbeddedServers(work_dir / "servers", durable=True) as servers:
            assert servers.database_url is not None
            assert servers.kafka_bootstrap is not None
            assert servers.postgres is not None
            _enable_commit_timestamps(servers)
            migrate.upgrade(servers.database_url)
            agents = add_agents(servers.database_url, rate * seconds + 10_000)
            seed_history(servers.database_url, agents, HISTORY)
            config = work_dir / "leadflow.yaml"
            write_config(config, servers.database_url, servers.kafka_bootstrap, work_dir / "data")
            settings = load_settings(config, environ={})
            console.log(
                f"{len(agents)} agents, {len(QUEUES)} queues, {HISTORY:,} customers of earlier "
                "weeks; starting the roles"
            )
            pids: dict[str, tuple[int, bool]] = {}
            if servers.postgres.pid is not None:
                pids["postgres"] = (servers.postgres.pid, True)
            if servers.kafka is not None and servers.kafka.pid is not None:
                pids["broker"] = (servers.kafka.pid, False)
            report = asyncio.run(
                _measure(settings, config, work_dir, rate, seconds, Processes(pids), console)
            )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    write_report(json_path, report)
    return report


def show(console: Console, report: dict[str, Any]) -> None:
    """The report as a table, for people."""
    details = report["details"]

    table = Table(title="leadflow bench latency", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal")
    table.add_row(
        "steady stream",
        f"{report['rate']:,}/s for {report['seconds']} s",
        f"achieved {report['produce_rate']:,}/s",
    )
    table.add_row(
        "produced / assigned",
        f"{report['produced']:,} / {report['assigned']:,}",
        "every event a new customer, each assigned once",
    )
    table.add_row("latency p50 / p95", f"{report['p50_ms']} / {report['p95_ms']} ms", "")
    table.add_row(
        "latency p99",
        f"[bold]{report['p99_ms']} ms[/]",
        f"<= {GOALS['p99_ms']} ms: " + goal(report["p99_ms"] <= GOALS["p99_ms"]),
    )
    table.add_row("latency p99.9 / max", f"{details['p999_ms']} / {report['max_ms']} ms", "")
    for name, key, what in (
        (
            "produce -> intake transaction",
            "produce_to_intake_transaction",
            "publisher, broker, consumer",
        ),
        (
            "intake transaction -> committed",
            "intake_transaction_to_lead_committed",
            "the intake's write",
        ),
        (
            "lead -> assignment committed",
            "lead_committed_to_assignment_committed",
            "wake-up, allocator",
        ),
    ):
        part = details[key]
        table.add_row(f"{name} p50 / p99", f"{part['p50_ms']} / {part['p99_ms']} ms", what)
    table.add_row(
        "p99 by 5 s window",
        " ".join(str(round(w["p99_ms"])) for w in details["p99_ms_by_window"]),
        "ms",
    )
    warmup = details["warmup"]
    table.add_row(
        "warm-up (excluded)",
        f"{warmup['events']} events, {warmup['seconds_to_first_assignment']} s",
        "until the first assignment: the consumer group's join",
    )
    table.add_row(
        "CPU seconds while timed",
        ", ".join(f"{k} {v}" for k, v in details["cpu_seconds"].items()),
        f"{details['cores_busy']} of {details['machine']['cores']} cores busy",
    )
    table.add_row("PostgreSQL", "durable", details["postgres"])
    machine_ = details["machine"]
    table.add_row(
        "machine", f"{machine_['cores']} cores", f"{machine_['cpu']}, Python {machine_['python']}"
    )
    console.print(table)
