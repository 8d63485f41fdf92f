"""`leadflow bench allocate`: the allocator draining a full set of queues, on a fresh PostgreSQL.

A fresh embedded PostgreSQL (durable: fsync and synchronous commit on, as in production) gets
a realistic book of work, loaded set-based with COPY before anything is timed:

- N queued, unrouted leads (default 100,000) over the demo company's five business lines,
  each with its named segments plus campaign segments, priorities by segment with a real-time
  boost, a real-time/stock mix, queued over the last hours (stock: days); their customers have
  timezones (mostly Shanghai, some unknown, Urumqi, Hong Kong, Tokyo, Singapore) and a few a
  language; some customers have leads in two lines, some were worked before (sticky), some
  leads are a retry whose earlier agent let the SLA expire (that agent is excluded), and a few
  phones are on the do-not-call list;
- agents (default 1,000): one or two lines (a few every line), every segment or a specialist's
  few, some with languages, capacities and daily caps that together exceed the leads, weights,
  a shift that includes the benchmark's `now` or none, all available; a tenth already hold a
  few open assignments from earlier in the day;
- queues (default 50), spread over the lines, each line's specific segments first and a
  catch-all last, cycling through the four strategies, with call windows that are null or
  cover `now` in every lead's timezone.

That book is loaded once into a template database; each measured run gets its own clone, so
the runs start from the same state. Every run is the real `allocate.allocator.Allocator` (the
class `leadflow run allocator` drives) calling `allocate(conn, now)` on one psycopg connection
in a process of its own, pass after pass until a pass takes nothing: routing included, queue
configuration written beforehand as the service does on start. `now` is a fixed instant (a
Tuesday noon in Shanghai) so the book covers it; the decision, the SQL and the commits are
those of production. The primary figure is one allocator; a second run starts two allocator
processes at once on their own clone (several replicas are safe by construction; the figure
shows what that buys on this machine).

Afterwards the database is checked: no lead left queued; each assigned lead has exactly one
open assignment, to an agent skilled for it who is not the one it expired with, in the queue
that routes it; do-not-call leads are blocked and never assigned; no agent is above capacity
or daily cap; assignments, audit transitions and outbox rows match what the allocators
counted. Any difference fails the run.

Reported: assignments per wall-clock second, seconds, passes and batches, the allocator's CPU
seconds and peak RSS (its own process), and PostgreSQL's CPU seconds (the postmaster and all
its backends and helpers, Linux) while timed. `profile` records the single allocator with
py-spy and adds PostgreSQL's statement times (pg_stat_statements) to the report.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.queues
import os
import queue as queue_module
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time as timer
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from allocate.allocator import Allocator, AllocatorConfig, PassResult
from allocate.model import QueueSpec, Window, route
from bench.common import goal, machine, pick, write_report
from bench.intake import BenchFailed, Processes
from bench.intake_worker import _peak_rss_bytes
from leadflow.embedded import EmbeddedServers
from schemas import migrate
from schemas.vocab import Strategy

DEFAULT_LEADS = 100_000
DEFAULT_AGENTS = 1_000
DEFAULT_QUEUES = 50
DEFAULT_BATCH_SIZE = 1000  # allocation.batch_size's default
GOALS = {"assign_rate": 10_000}

#: The benchmark's instant: 12:00 in Shanghai, Hong Kong and Singapore, 10:00 in Urumqi,
#: 13:00 in Tokyo (a Tuesday). Windows and shifts below all include it.
NOW = datetime(2026, 11, 24, 4, 0, tzinfo=UTC)
TEMPLATE = "bench_allocate_template"
TOPIC = "leads.assigned"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# --- the book of work -----------------------------------------------------------------------

#: Business lines and their share of the leads (and of the agents).
LINES: dict[str, float] = {
    "personal_credit_loan": 40,
    "car_loan": 20,
    "enterprise_loan": 15,
    "wealth_management": 15,
    "financial_leasing": 10,
}
#: Each line's named segments (the demo rules'), with their base priority.
_NAMED_SEGMENTS: dict[str, tuple[tuple[str, int], ...]] = {
    "personal_credit_loan": (
        ("pending_payment_30d", 90), ("new_signup", 80), ("ad_click", 75), ("card_upgrade", 55),
        ("cash_evening", 45), ("browsed_10d_no_order", 60),
    ),
    "car_loan": (
        ("car_pending_7d", 92), ("test_drive", 85), ("pending_payment_30d", 90),
        ("new_signup", 80), ("ad_click", 75),
    ),
    "enterprise_loan": (
        ("key_account", 85), ("enterprise_form", 70), ("pending_payment_30d", 90),
        ("new_signup", 80), ("ad_click", 75),
    ),
    "wealth_management": (
        ("silent_high_value", 70), ("wealth_returning", 60), ("new_signup", 80), ("ad_click", 75),
    ),
    "financial_leasing": (
        ("equipment_quote", 80), ("leasing_form", 65), ("pending_payment_30d", 90),
        ("ad_click", 75),
    ),
}  # fmt: skip
_MIN_SEGMENTS = 12  # per line, named then campaign segments; "general" comes on top
_LEAD_TIMEZONES: tuple[tuple[str | None, float], ...] = (
    ("Asia/Shanghai", 70), (None, 15), ("Asia/Urumqi", 5), ("Asia/Hong_Kong", 5),
    ("Asia/Tokyo", 3), ("Asia/Singapore", 2),
)  # fmt: skip
_LANGUAGES: tuple[tuple[str | None, float], ...] = ((None, 92), ("zh", 6), ("en", 2))
_STRATEGIES: tuple[Strategy, ...] = ("round_robin", "least_loaded", "weighted", "sticky")
_FALLBACKS: tuple[Strategy, ...] = ("least_loaded", "weighted", "round_robin")
#: Null or covering NOW in every lead timezone above (10:00 to 13:00 local); one wraps midnight.
_CALL_WINDOWS = (
    None,
    Window(time(8), time(22)),
    None,
    Window(time(9), time(21)),
    Window(time(10), time(2)),
)
#: Shifts covering NOW in the agents' timezones (Shanghai 12:00, Urumqi 10:00); one wraps.
_SHIFTS = ((time(8), time(17)), (time(9), time(18)), (time(7), time(16)), (time(20), time(14)))
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹彭曾肖田董"
_GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超霞平刚华辉玉红梅海燕东"
_EVENT_TYPES = {
    "pending_payment_30d": "order_pending_payment",
    "car_pending_7d": "order_pending_payment",
    "new_signup": "signup",
    "ad_click": "ad_click",
    "browsed_10d_no_order": "browse",
    "test_drive": "form_submit",
    "enterprise_form": "form_submit",
    "leasing_form": "form_submit",
    "equipment_quote": "form_submit",
    "silent_high_value": "stock_profile",
}

SHARE_SECOND_LINE = 0.05  # of the leads: a customer who already has a lead in another line
SHARE_DNC = 0.003  # of the customers: phone on the do-not-call list
SHARE_STICKY = 0.10  # of the customers: worked before by an agent of the line
SHARE_RETRY = 0.02  # of the leads: a second attempt after an expired SLA
SHARE_REALTIME = 0.35
SHARE_BUSY_AGENTS = 0.10  # of the agents: already hold 1-8 open assignments from this morning
CAPACITY_MARGIN = 1.3  # each line's generalist agents can take this many times its leads


def line_segments(queues_per_line: int) -> dict[str, list[tuple[str, int]]]:
    """Each line's segments and base priorities: named, then campaigns, then "general"."""
    count = max(_MIN_SEGMENTS, queues_per_line)
    found: dict[str, list[tuple[str, int]]] = {}
    for line, named in _NAMED_SEGMENTS.items():
        segments = list(named)
        n = 0
        while len(segments) < count:
            segments.append((f"campaign_{n:02}", 55 + n % 20))
            n += 1
        found[line] = [*segments, ("general", 30)]
    return found


def bench_queues(total: int) -> list[QueueSpec]:
    """`total` queues over the lines, in routing order: lines interleaved, each line's
    single-segment queues before its catch-all (the last of a line serves every segment)."""
    lines = list(LINES)
    per_line = [
        total // len(lines) + (1 if i < total % len(lines) else 0) for i in range(len(lines))
    ]
    segments = line_segments(max(per_line))
    by_line: list[list[QueueSpec]] = []
    n = 0
    for line, count in zip(lines, per_line, strict=True):
        specs = []
        for j in range(count):
            last = j == count - 1
            strategy = _STRATEGIES[n % len(_STRATEGIES)]
            specs.append(
                QueueSpec(
                    name=f"{line}.all" if last else f"{line}.{segments[line][j][0]}",
                    business_line=line,
                    segments=frozenset() if last else frozenset({segments[line][j][0]}),
                    strategy=strategy,
                    fallback_strategy=_FALLBACKS[n % len(_FALLBACKS)],
                    sla=timedelta(minutes=(5, 10, 15, 30)[n % 4]),
                    max_attempts=3 + n % 3,
                    call_window=_CALL_WINDOWS[n % len(_CALL_WINDOWS)],
                    default_timezone="Asia/Shanghai",
                )
            )
            n += 1
        by_line.append(specs)
    # Interleave the lines (routing order only matters within a line): two allocators then
    # start on queues of different lines, whose agents they do not share.
    ordered: list[QueueSpec] = []
    for k in range(max(len(specs) for specs in by_line)):
        for specs in by_line:
            if k < len(specs) - 1:
                ordered.append(specs[k])
    ordered += [specs[-1] for specs in by_line]
    return ordered


@dataclass
class Book:
    """The rows to load, and what the allocators must end up doing with them."""

    agents: list[tuple[Any, ...]] = field(default_factory=list)
    customers: list[tuple[Any, ...]] = field(default_factory=list)
    leads: list[tuple[Any, ...]] = field(default_factory=list)
    dnc: list[tuple[Any, ...]] = field(default_factory=list)
    assignments: list[tuple[Any, ...]] = field(default_factory=list)  # earlier ones
    queued: int = 0  # leads 1..queued are the queued ones
    expected_blocked: int = 0  # queued leads of customers on the DNC list
    expected_by_queue: Counter[str] = field(default_factory=Counter)  # assignable leads
    busy_agents: int = 0
    open_before: int = 0
    retries: int = 0
    sticky_customers: int = 0
    second_line_leads: int = 0
    realtime: int = 0
    segments: int = 0
    capacity: int = 0  # sum over agents of min(capacity, daily cap) - earlier load
    by_line: Counter[str] = field(default_factory=Counter)
    by_strategy: Counter[str] = field(default_factory=Counter)  # queued leads by queue strategy


def build_book(
    leads: int, agents: int, queues: Sequence[QueueSpec], seed: int = 7, now: datetime = NOW
) -> Book:
    """Deterministic rows for `leads` queued leads, `agents` agents, routed by `queues`."""
    rng = random.Random(seed)
    book = Book(queued=leads)
    per_line = Counter(queue.business_line for queue in queues)
    segments = line_segments(max(per_line.values()))
    book.segments = sum(len(s) for s in segments.values())
    line_weights = list(LINES.items())

    # Agents.
    agent_lines: dict[str, list[int]] = {line: [] for line in LINES}  # agent indexes per line
    rows: list[list[Any]] = []
    for i in range(agents):
        primary = pick(rng, line_weights)
        roll = rng.random()
        if roll < 0.03:
            lines = ["*"]
        elif roll < 0.13:
            lines = [primary, pick(rng, [(x, w) for x, w in line_weights if x != primary])]
        else:
            lines = [primary]
        named = [s for s, _ in segments[primary][:-1]]
        skills = ["*"] if rng.random() < 0.7 else sorted(rng.sample(named, rng.randint(2, 5)))
        roll = rng.random()
        languages = [] if roll < 0.85 else ["zh"] if roll < 0.95 else ["en", "zh"]
        capacity = rng.randint(40, 200)
        daily_cap = rng.randint(capacity // 2, capacity * 3)
        shift = None if rng.random() < 0.4 else rng.choice(_SHIFTS)
        tz = "Asia/Shanghai" if rng.random() < 0.9 else "Asia/Urumqi"
        weight = rng.choice((0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 3.0))
        rows.append(
            [
                f"a-{i:04}", _name(rng), f"team-{primary}", lines, skills, languages, capacity,
                daily_cap, weight, tz, shift[0] if shift else None, shift[1] if shift else None,
                "available",
            ]
        )  # fmt: skip
        for line in LINES if lines == ["*"] else lines:
            agent_lines[line].append(i)

    # Leads by line, so that each line's generalists can be given room for them.
    line_of = [pick(rng, line_weights) for _ in range(leads)]
    wanted = Counter(line_of)

    def effective(row: list[Any]) -> int:
        return min(int(row[6]), int(row[7]))

    for line, count in wanted.items():
        generalists = [
            i
            for i in agent_lines[line]
            if rows[i][4] == ["*"] and not rows[i][5] and rows[i][3][0] in (line, "*")
        ]
        if not generalists:
            raise BenchFailed(f"no generalist agent for {line}: give more agents")
        room = sum(effective(rows[i]) for i in generalists)
        if room < CAPACITY_MARGIN * count:
            factor = CAPACITY_MARGIN * count / room
            for i in generalists:
                rows[i][6] = int(rows[i][6] * factor) + 1
                rows[i][7] = int(rows[i][7] * factor) + 1
    book.agents = [tuple(row) for row in rows]

    # Customers and queued leads.
    customer_lines: list[set[str]] = []
    customer_dnc: list[bool] = []
    customer_rows: list[list[Any]] = []

    def new_customer() -> int:
        n = len(customer_rows)
        tz = pick(rng, _LEAD_TIMEZONES)
        customer_rows.append(
            [n + 1, f"+861{3 + n % 7}{n:09}", _name(rng), tz, pick(rng, _LANGUAGES), None]
        )
        customer_lines.append(set())
        dnc = rng.random() < SHARE_DNC
        customer_dnc.append(dnc)
        if dnc:
            book.dnc.append((customer_rows[-1][1], "customer request", "bench"))
        return n

    yesterday = now - timedelta(days=1)
    for lead_id, line in enumerate(line_of, 1):
        c = -1
        if customer_rows and rng.random() < SHARE_SECOND_LINE:
            c = rng.randrange(len(customer_rows))
            if line in customer_lines[c]:
                c = -1
            else:
                book.second_line_leads += 1
        if c < 0:
            c = new_customer()
            if rng.random() < SHARE_STICKY:
                customer_rows[c][5] = rows[rng.choice(agent_lines[line])][0]
                book.sticky_customers += 1
        customer_lines[c].add(line)
        segment, base = _segment(rng, segments[line])
        realtime = rng.random() < SHARE_REALTIME
        priority = min(100, base + (10 if realtime else 0) + rng.randint(-3, 3))
        age = timedelta(
            seconds=rng.uniform(1, 6 * 3600) if realtime else rng.uniform(3600, 3 * 86400)
        )
        queued_at = now - age
        attempts = 0
        if rng.random() < SHARE_RETRY:
            attempts = 1
            book.retries += 1
            agent = rows[rng.choice(agent_lines[line])][0]
            expired_at = yesterday + timedelta(minutes=10)
            book.assignments.append(
                (lead_id, agent, "retry", "round_robin", "earlier attempt", "expired", 1,
                 yesterday, expired_at, expired_at, "first-contact SLA expired")
            )  # fmt: skip
        book.leads.append(
            (lead_id, c + 1, line, segment, priority, "queued", "realtime" if realtime else "stock",
             "app" if realtime else "crm", _EVENT_TYPES.get(segment, "browse"), realtime, attempts,
             queued_at - timedelta(seconds=2), queued_at, queued_at)
        )  # fmt: skip
        book.realtime += realtime
        book.by_line[line] += 1
        target = route(list(queues), line, segment)
        assert target is not None  # every line ends with a catch-all
        book.by_strategy[target.strategy] += 1
        if customer_dnc[c]:
            book.expected_blocked += 1
        else:
            book.expected_by_queue[target.name] += 1

    # This morning's work: open assignments of busy agents, on leads of their own.
    this_morning = now - timedelta(hours=2)
    lead_id = leads
    for row in rows:
        if rng.random() >= SHARE_BUSY_AGENTS:
            continue
        book.busy_agents += 1
        line = row[3][0] if row[3] != ["*"] else "personal_credit_loan"
        for _ in range(rng.randint(1, 8)):
            lead_id += 1
            c = new_customer()
            book.leads.append(
                (lead_id, c + 1, line, "general", 30, "assigned", "stock", "crm", "browse", False,
                 0, this_morning, this_morning, this_morning)
            )  # fmt: skip
            book.assignments.append(
                (lead_id, row[0], "morning", "round_robin", "this morning", "open", 1,
                 this_morning, this_morning + timedelta(hours=8), None, None)
            )  # fmt: skip
            book.open_before += 1
    book.customers = [tuple(row) for row in customer_rows]
    opened = Counter(a[1] for a in book.assignments if a[5] == "open")
    book.capacity = sum(
        max(0, min(int(r[6]) - opened[r[0]], int(r[7]) - opened[r[0]])) for r in rows
    )
    return book


def _segment(rng: random.Random, segments: list[tuple[str, int]]) -> tuple[str, int]:
    """Skewed: "general" about a quarter, then the named segments more than campaigns."""
    if rng.random() < 0.25:
        return segments[-1]
    weights = [1 / (k + 1) ** 0.8 for k in range(len(segments) - 1)]
    return rng.choices(segments[:-1], weights)[0]


def _name(rng: random.Random) -> str:
    return rng.choice(_SURNAMES) + "".join(rng.choice(_GIVEN) for _ in range(rng.randint(1, 2)))


# --- loading --------------------------------------------------------------------------------

_COPIES = (
    (
        "agents",
        "id, name, team, business_lines, segments, languages, capacity, daily_cap, weight,"
        " timezone, shift_start, shift_end, status",
    ),
    ("customers", "id, phone_e164, name, timezone, language, last_agent_id"),
    (
        "leads",
        "id, customer_id, business_line, segment, priority, state, intake, source, event_type,"
        " realtime, attempts, first_event_at, last_event_at, queued_at",
    ),
    ("dnc", "phone_e164, reason, source"),
    (
        "assignments",
        "lead_id, agent_id, queue, strategy, reason, status, attempt, assigned_at, sla_deadline,"
        " closed_at, close_reason",
    ),
)


def load(url: str, book: Book) -> dict[str, float]:
    """COPY the book into the (migrated, empty) database; ANALYZE. Returns seconds per table."""
    seconds: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for table, columns in _COPIES:
            started = timer.perf_counter()
            rows: list[tuple[Any, ...]] = getattr(book, table)
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                if table in ("customers", "leads"):
                    cur.execute(
                        sql.SQL(
                            "SELECT setval(pg_get_serial_sequence({}, 'id'), max(id)) FROM {}"
                        ).format(sql.Literal(table), sql.Identifier(table))
                    )
            seconds[table] = round(timer.perf_counter() - started, 3)
        # Transitions of the earlier work, as intake and the allocator would have written them.
        conn.execute(
            "INSERT INTO lead_transitions (lead_id, from_state, to_state, actor, reason, at)"
            " SELECT id, NULL, 'queued', 'intake', 'new lead', queued_at FROM leads"
        )
        conn.execute("VACUUM ANALYZE")
    return seconds


def database_url(url: str, name: str) -> str:
    """The URL of database `name` on the server of `url`."""
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def clone(url: str, name: str) -> str:
    """A copy of the template database called `name`; its URL."""
    with psycopg.connect(database_url(url, "postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE)
            )
        )
        conn.execute("CHECKPOINT")  # the run does not pay for the copy's writes
    return database_url(url, name)


# --- the allocators -------------------------------------------------------------------------


class _CountingAllocator(Allocator):
    """The real allocator, counting its batches and the queues another allocator held."""

    def __init__(self, config: AllocatorConfig) -> None:
        super().__init__(config)
        self.batches = 0
        self.held_elsewhere = 0
        self.route_seconds = 0.0

    def route(self, conn: psycopg.Connection[Any]) -> int:
        started = timer.perf_counter()
        try:
            return super().route(conn)
        finally:
            self.route_seconds += timer.perf_counter() - started

    def allocate_batch(
        self,
        conn: psycopg.Connection[Any],
        queue: QueueSpec,
        at: datetime | None = None,
        *,
        skip: int = 0,
    ) -> tuple[PassResult, int] | None:
        step = super().allocate_batch(conn, queue, at, skip=skip)
        if step is None:
            self.held_elsewhere += 1
        else:
            self.batches += 1
        return step


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _allocator_process(
    url: str,
    config: AllocatorConfig,
    now: datetime,
    ready: multiprocessing.queues.Queue[Any],
    go: Any,
    results: multiprocessing.queues.Queue[Any],
    finished: Any,
) -> None:
    """One allocator in a process of its own: connect, say ready, wait for the start, allocate
    pass after pass until a pass takes nothing (and no queue was held by another allocator),
    report, and keep the connection until told (its backend's CPU time is counted until it
    exits; the parent reads it first)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    try:
        conn = psycopg.connect(url, autocommit=True, application_name="bench-allocator")
        allocator = _CountingAllocator(config)
        ready.put(os.getpid())
        go.wait()
        started, cpu = timer.time(), _cpu_seconds()
        totals, passes = PassResult(), 0
        while True:
            held = allocator.held_elsewhere
            result = allocator.allocate(conn, now)
            passes += 1
            totals.add(result)
            if result.taken == 0 and allocator.held_elsewhere == held:
                break
        ended, cpu = timer.time(), _cpu_seconds() - cpu
        by_strategy: Counter[str] = Counter()
        for (_, strategy), count in totals.by_queue_strategy.items():
            by_strategy[strategy] += count
        results.put(
            {
                "pid": os.getpid(),
                "started": started,
                "ended": ended,
                "cpu_seconds": cpu,
                "assigned": totals.assigned,
                "blocked": totals.blocked,
                "deferred": totals.deferred,
                "routed": totals.routed,
                "passes": passes,
                "batches": allocator.batches,
                "queues_held_elsewhere": allocator.held_elsewhere,
                "route_seconds": allocator.route_seconds,
                "by_strategy": dict(by_strategy),
                "peak_rss_bytes": _peak_rss_bytes(),
            }
        )
        finished.wait(60)
        conn.close()
    except BaseException as exc:
        results.put({"pid": os.getpid(), "error": repr(exc)})
        raise


@dataclass
class Run:
    """One measured run: its allocators' reports and PostgreSQL's CPU while timed."""

    allocators: list[dict[str, Any]]
    postgres_cpu_seconds: float | None
    #: CPU seconds every process of the machine used meanwhile (Linux), ours included.
    machine_cpu_seconds: float | None = None

    @property
    def seconds(self) -> float:
        ended = max(float(a["ended"]) for a in self.allocators)
        return ended - min(float(a["started"]) for a in self.allocators)

    def total(self, key: str) -> int:
        return sum(int(a[key]) for a in self.allocators)

    def figures(self) -> dict[str, Any]:
        assigned = self.total("assigned")
        cpu = {f"allocator_{n}": a["cpu_seconds"] for n, a in enumerate(self.allocators, 1)}
        if len(self.allocators) == 1:
            cpu = {"allocator": self.allocators[0]["cpu_seconds"]}
        if self.postgres_cpu_seconds is not None:
            cpu["postgres"] = self.postgres_cpu_seconds
        others = {}
        if self.machine_cpu_seconds is not None:
            others["other_processes_cpu_seconds"] = round(
                max(0.0, self.machine_cpu_seconds - sum(cpu.values())), 3
            )
        by_strategy: Counter[str] = Counter()
        for a in self.allocators:
            by_strategy.update(a["by_strategy"])
        return {
            "allocators": len(self.allocators),
            "seconds": round(self.seconds, 3),
            "assign_rate": round(assigned / self.seconds),
            "assigned": assigned,
            "blocked": self.total("blocked"),
            "deferred": self.total("deferred"),
            "routed": self.total("routed"),
            "route_seconds": round(sum(a["route_seconds"] for a in self.allocators), 3),
            "passes": self.total("passes"),
            "batches": self.total("batches"),
            "queues_held_by_the_other": self.total("queues_held_elsewhere"),
            "by_strategy": dict(sorted(by_strategy.items())),
            "cpu_seconds": {name: round(value, 3) for name, value in cpu.items()},
            "cpu_us_per_assignment": {
                name: round(value * 1e6 / max(1, assigned), 1) for name, value in cpu.items()
            },
            "cores_busy": round(sum(cpu.values()) / self.seconds, 2),
            "peak_rss_mb": round(max(a["peak_rss_bytes"] for a in self.allocators) / 2**20, 1),
            **others,
        }


def measure(
    url: str,
    config: AllocatorConfig,
    count: int,
    postgres: Processes,
    profile: Path | None = None,
) -> Run:
    """`count` allocator processes started at once on the database at `url`."""
    context = multiprocessing.get_context("spawn")  # nothing of this process leaks into them
    ready: multiprocessing.queues.Queue[Any] = context.Queue()
    results: multiprocessing.queues.Queue[Any] = context.Queue()
    go, finished = context.Event(), context.Event()
    children = [
        context.Process(
            target=_allocator_process,
            args=(url, config, NOW, ready, go, results, finished),
            name=f"bench-allocator-{n}",
            daemon=True,
        )
        for n in range(count)
    ]
    spy: subprocess.Popen[bytes] | None = None
    try:
        for child in children:
            child.start()
        pids = [_get(ready, children, 120) for _ in children]
        if profile is not None:
            spy = subprocess.Popen(
                [_py_spy(), "record", "--nonblocking", "--idle", "--rate", "250",
                 "--format", "raw", "--output", str(profile), "--pid", str(pids[0])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            timer.sleep(2)  # py-spy attaches
        before, busy = postgres.cpu_seconds().get("postgres"), machine_busy_seconds()
        go.set()
        reports = [_get(results, children, 3600) for _ in children]
        after, busy_after = postgres.cpu_seconds().get("postgres"), machine_busy_seconds()
        finished.set()
        for child in children:
            child.join(30)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile and exits
            spy.wait(60)
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(10)
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise BenchFailed("an allocator failed: " + "; ".join(errors))
    pg = after - before if before is not None and after is not None else None
    machine_cpu = busy_after - busy if busy is not None and busy_after is not None else None
    return Run(reports, pg, machine_cpu)


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of this machine have used since boot (Linux): what the
    others on a shared machine took from a run is this minus our processes' share."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise BenchFailed("profiling needs py-spy: pip install py-spy")
    return found


def _get(
    channel: multiprocessing.queues.Queue[Any],
    children: Sequence[multiprocessing.process.BaseProcess],
    timeout: float,
) -> Any:
    """The next message of a child, failing early when a child died without one."""
    deadline = timer.monotonic() + timeout
    while True:
        with contextlib.suppress(queue_module.Empty):
            return channel.get(timeout=0.2)
        dead = [c for c in children if c.exitcode not in (None, 0)]
        if dead or timer.monotonic() > deadline:
            raise BenchFailed(
                f"an allocator process {'exited with code ' + str(dead[0].exitcode) if dead else 'timed out'}"
            )


# --- verifying ------------------------------------------------------------------------------

_CHECKS = {
    "leads still queued": "SELECT count(*) FROM leads WHERE state = 'queued'",
    "assigned leads without exactly one open assignment": """
        SELECT count(*) FROM leads l
        WHERE l.id <= %(queued)s AND l.state = 'assigned'
          AND (SELECT count(*) FROM assignments s WHERE s.lead_id = l.id AND s.status = 'open') <> 1
    """,
    "open assignments of leads not assigned": """
        SELECT count(*) FROM assignments s JOIN leads l ON l.id = s.lead_id
        WHERE s.status = 'open' AND l.state <> 'assigned'
    """,
    "do-not-call leads not blocked": """
        SELECT count(*) FROM leads l JOIN customers c ON c.id = l.customer_id
        JOIN dnc d ON d.phone_e164 = c.phone_e164
        WHERE l.id <= %(queued)s AND l.state <> 'do_not_call'
    """,
    "agents above capacity": """
        SELECT count(*) FROM agents a
        WHERE (SELECT count(*) FROM assignments s WHERE s.agent_id = a.id AND s.status = 'open')
              > a.capacity
    """,
    "agents above their daily cap": """
        SELECT count(*) FROM agents a
        WHERE (SELECT count(*) FROM assignments s WHERE s.agent_id = a.id
               AND s.assigned_at >= (date_trunc('day', %(now)s AT TIME ZONE a.timezone)
                                     AT TIME ZONE a.timezone)) > a.daily_cap
    """,
    "assignments to an agent not skilled for the lead": """
        SELECT count(*) FROM assignments s JOIN leads l ON l.id = s.lead_id
        JOIN customers c ON c.id = l.customer_id JOIN agents a ON a.id = s.agent_id
        WHERE s.assigned_at = %(now)s AND NOT (
            (l.business_line = ANY(a.business_lines) OR '*' = ANY(a.business_lines))
            AND (l.segment = ANY(a.segments) OR '*' = ANY(a.segments))
            AND (c.language IS NULL OR a.languages = '{}' OR c.language = ANY(a.languages)))
    """,
    "assignments to the agent the lead expired with": """
        SELECT count(*) FROM assignments s JOIN assignments e
          ON e.lead_id = s.lead_id AND e.agent_id = s.agent_id AND e.status = 'expired'
        WHERE s.assigned_at = %(now)s
    """,
    "assignments in a queue other than the lead's": """
        SELECT count(*) FROM assignments s JOIN leads l ON l.id = s.lead_id
        WHERE s.assigned_at = %(now)s AND s.queue IS DISTINCT FROM l.queue
    """,
}


def verify(url: str, book: Book, run: Run) -> dict[str, Any]:
    """Check the run's outcome in the database; BenchFailed listing every difference."""
    problems: list[str] = []
    args = {"queued": book.queued, "now": NOW}
    with psycopg.connect(url) as conn:

        def one(query: str) -> int:
            row = conn.execute(query, args).fetchone()
            return int(row[0]) if row else 0

        for what, query in _CHECKS.items():
            if found := one(query):
                problems.append(f"{what}: {found:,}")
        counts = {
            "assignments_made": one("SELECT count(*) FROM assignments WHERE assigned_at = %(now)s"),
            "distinct_leads_assigned": one(
                "SELECT count(DISTINCT lead_id) FROM assignments WHERE assigned_at = %(now)s"
            ),
            "assignments_open_before": one(
                "SELECT count(*) FROM assignments WHERE status = 'open' AND assigned_at < %(now)s"
            ),
            "leads_assigned": one(
                "SELECT count(*) FROM leads WHERE id <= %(queued)s AND state = 'assigned'"
            ),
            "leads_do_not_call": one("SELECT count(*) FROM leads WHERE state = 'do_not_call'"),
            "transitions_to_assigned": one(
                "SELECT count(*) FROM lead_transitions WHERE actor = 'allocator'"
                " AND to_state = 'assigned'"
            ),
            "transitions_to_do_not_call": one(
                "SELECT count(*) FROM lead_transitions WHERE actor = 'allocator'"
                " AND to_state = 'do_not_call'"
            ),
            "outbox_rows": one("SELECT count(*) FROM outbox"),
            "agents_used": one(
                "SELECT count(DISTINCT agent_id) FROM assignments WHERE assigned_at = %(now)s"
            ),
        }
        by_queue: Counter[str] = Counter(
            dict(
                conn.execute(
                    "SELECT queue, count(*) FROM assignments WHERE assigned_at = %(now)s GROUP BY 1",
                    args,
                ).fetchall()
            )
        )
    expected = book.queued - book.expected_blocked

    def expect(what: str, got: int, wanted: int) -> None:
        if got != wanted:
            problems.append(f"{what}: {got:,}, expected {wanted:,}")

    expect("assignments made vs assignable leads", counts["assignments_made"], expected)
    expect("assignments counted by the allocators", run.total("assigned"), expected)
    expect("distinct leads assigned", counts["distinct_leads_assigned"], expected)
    expect("leads in state assigned", counts["leads_assigned"], expected)
    expect("leads blocked as do-not-call", counts["leads_do_not_call"], book.expected_blocked)
    expect("blocked as counted by the allocators", run.total("blocked"), book.expected_blocked)
    expect("deferred as counted by the allocators", run.total("deferred"), 0)
    expect("open assignments from before, untouched", counts["assignments_open_before"], book.open_before)  # fmt: skip
    expect("audit transitions to assigned", counts["transitions_to_assigned"], expected)
    expect("audit transitions to do_not_call", counts["transitions_to_do_not_call"], book.expected_blocked)  # fmt: skip
    expect("outbox rows", counts["outbox_rows"], expected)
    for name in sorted(set(by_queue) | set(book.expected_by_queue)):
        expect(f"assignments in queue {name}", by_queue[name], book.expected_by_queue[name])
    if problems:
        raise BenchFailed("the allocate benchmark does not add up:\n  " + "\n  ".join(problems))
    return counts


# --- profiling: PostgreSQL's side -----------------------------------------------------------


def _enable_statement_stats(servers: EmbeddedServers) -> None:
    """Restart the embedded PostgreSQL with pg_stat_statements loaded."""
    assert servers.postgres is not None
    assert servers.database_url is not None
    with psycopg.connect(servers.database_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
    servers.postgres.stop()
    servers.postgres.start()


def _statement_stats(url: str, top: int = 12) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        rows = conn.execute(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time, rows"
            " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
            " WHERE d.datname = current_database()"
            " ORDER BY total_exec_time DESC LIMIT %s",
            (top,),
        ).fetchall()
    return [
        {"query": q[:160], "calls": calls, "ms": round(ms, 1), "rows": n}
        for q, calls, ms, n in rows
    ]


def _reset_statement_stats(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")


# --- the run --------------------------------------------------------------------------------


def run(
    leads: int = DEFAULT_LEADS,
    agents: int = DEFAULT_AGENTS,
    queues: int = DEFAULT_QUEUES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    json_path: Path | None = None,
    console: Console | None = None,
    *,
    two_allocators: bool = True,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Start PostgreSQL, load, measure, verify, clean up; write the JSON report and return it.

    `profile` records the single allocator with py-spy (raw format) into that file and adds
    PostgreSQL's top statements (pg_stat_statements) to the report.
    """
    if queues < len(LINES):
        raise BenchFailed(f"give at least {len(LINES)} queues: one per business line")
    console = console or Console()
    work_dir = Path(tempfile.mkdtemp(prefix="leadflow-bench-allocate-"))
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        console.log(f"starting embedded PostgreSQL (durable) in {work_dir}")
        with EmbeddedServers(work_dir / "servers", kafka_bootstrap="unused") as servers:
            assert servers.database_url is not None
            assert servers.postgres is not None
            if profile is not None:
                _enable_statement_stats(servers)
            report = _measure(
                servers, leads, agents, queues, batch_size, console, two_allocators, profile
            )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    write_report(json_path, report)
    return report


def _measure(
    servers: EmbeddedServers,
    leads: int,
    agents: int,
    queues: int,
    batch_size: int,
    console: Console,
    two_allocators: bool,
    profile: Path | None,
) -> dict[str, Any]:
    assert servers.database_url is not None
    assert servers.postgres is not None
    assert servers.postgres.pid is not None
    specs = bench_queues(queues)
    config = AllocatorConfig(queues=specs, assigned_topic=TOPIC, batch_size=batch_size)
    started = timer.perf_counter()
    book = build_book(leads, agents, specs)
    build_seconds = timer.perf_counter() - started
    console.log(
        f"built {leads:,} queued leads ({book.expected_blocked} on the DNC list), {agents:,} "
        f"agents, {queues} queues in {build_seconds:.1f}s"
    )
    with psycopg.connect(database_url(servers.database_url, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    template = database_url(servers.database_url, TEMPLATE)
    migrate.upgrade(template)
    started = timer.perf_counter()
    load_seconds = load(template, book)
    with psycopg.connect(template, autocommit=True) as conn:
        Allocator(config).sync_queues(conn)  # as the allocator service does when it starts
    console.log(f"loaded with COPY in {timer.perf_counter() - started:.1f}s: {load_seconds}")
    postgres = Processes({"postgres": (servers.postgres.pid, True)})

    runs: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    statements: list[dict[str, Any]] = []
    plan = [("single", 1)] + ([("two_allocators", 2)] if two_allocators else [])
    for name, count in plan:
        url = clone(servers.database_url, f"bench_allocate_{name}")
        if profile is not None and count == 1:
            _reset_statement_stats(url)
        console.log(f"allocating with {count} allocator process{'es' if count > 1 else ''}")
        measured = measure(url, config, count, postgres, profile if count == 1 else None)
        if profile is not None and count == 1:
            statements = _statement_stats(url)
        figures = measured.figures()
        console.log(
            f"{figures['assigned']:,} assigned in {figures['seconds']}s: "
            f"{figures['assign_rate']:,}/s; verifying"
        )
        counts[name] = verify(url, book, measured)
        runs[name] = figures

    single = runs["single"]
    details: dict[str, Any] = {
        "batch_size": batch_size,
        "now": NOW.isoformat(),
        "postgres": "embedded PostgreSQL 18, durable (fsync and synchronous_commit on)",
        "timed_from": "all allocator processes connected and released at once, to the end of "
        "the pass that found nothing left (routing included; queue configuration written "
        "before, as the service does when it starts)",
        "single": single,
        "two_allocators": runs.get("two_allocators"),
        "workload": {
            "queued_leads": book.queued,
            "by_line": dict(book.by_line.most_common()),
            "segments": book.segments,
            "realtime": book.realtime,
            "second_line_leads": book.second_line_leads,
            "sticky_customers": book.sticky_customers,
            "retries_with_excluded_agent": book.retries,
            "dnc_customers": len(book.dnc),
            "dnc_leads": book.expected_blocked,
            "queues_by_strategy": dict(Counter(q.strategy for q in specs)),
            "queues_with_call_window": sum(q.call_window is not None for q in specs),
            "queued_leads_by_queue_strategy": dict(book.by_strategy.most_common()),
            "agents": agents,
            "agents_busy_before": book.busy_agents,
            "open_assignments_before": book.open_before,
            "agents_room": book.capacity,
            "build_seconds": round(build_seconds, 3),
            "load_seconds": load_seconds,
        },
        "database": counts,
        "verified": True,
        "goals": GOALS,
        "machine": machine(),
    }
    if statements:
        details["postgres_top_statements"] = statements
    return {
        "scenario": "allocate",
        "leads": book.queued,
        "agents": agents,
        "queues": queues,
        "assign_rate": single["assign_rate"],
        "seconds": single["seconds"],
        "peak_rss_mb": single["peak_rss_mb"],
        "details": details,
    }


def show(console: Console, report: dict[str, Any]) -> None:
    """The report as a table, for people."""
    details = report["details"]

    table = Table(title="leadflow bench allocate", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal")
    workload = details["workload"]
    table.add_row(
        "queued leads / agents / queues",
        f"{report['leads']:,} / {report['agents']:,} / {report['queues']}",
        f"{workload['dnc_leads']} on the DNC list, {workload['segments']} segments",
    )
    single = details["single"]
    table.add_row(
        "assignments/s, one allocator",
        f"[bold]{report['assign_rate']:,}[/]",
        f">= {GOALS['assign_rate']:,}: " + goal(report["assign_rate"] >= GOALS["assign_rate"]),
    )
    runs = [("one allocator", single)]
    if details.get("two_allocators"):
        two = details["two_allocators"]
        table.add_row("assignments/s, two allocators at once", f"{two['assign_rate']:,}", "")
        runs.append(("two allocators", two))
    for name, figures in runs:
        table.add_row(
            f"{name}: seconds / passes / batches",
            f"{figures['seconds']} s / {figures['passes']} / {figures['batches']}",
            f"routing {figures['route_seconds']} s",
        )
        others = figures.get("other_processes_cpu_seconds")
        table.add_row(
            f"{name}: CPU µs per assignment",
            ", ".join(f"{k} {v}" for k, v in figures["cpu_us_per_assignment"].items()),
            f"{figures['cores_busy']} of {details['machine']['cores']} cores busy"
            + (f"; other processes {others} s" if others is not None else ""),
        )
    table.add_row("allocator peak RSS", f"{report['peak_rss_mb']:,.0f} MB", "its own process")
    table.add_row(
        "outcome (checked against the database)",
        f"{single['assigned']:,} assigned / {single['blocked']:,} blocked",
        "each lead once, no agent over capacity or daily cap",
    )
    table.add_row(
        "by strategy",
        ", ".join(f"{k} {v:,}" for k, v in single["by_strategy"].items()),
        "",
    )
    table.add_row("batch size", f"{details['batch_size']:,}", "")
    table.add_row("PostgreSQL", "durable", details["postgres"])
    machine_ = details["machine"]
    table.add_row(
        "machine", f"{machine_['cores']} cores", f"{machine_['cpu']}, Python {machine_['python']}"
    )
    console.print(table)
