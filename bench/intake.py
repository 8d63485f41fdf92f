"""`leadflow bench intake`: the real-time intake against its raw limit, on fresh embedded servers.

A fresh PostgreSQL (durable: fsync and synchronous commit on, as in production) and a fresh
Kafka-protocol broker are started in a temporary directory, the schema is migrated, and N
LeadEvents are pre-produced to `leads.raw` (6 partitions, keyed per CONTRACT.md §2) with a
realistic mix: about 5% invalid spread over every reject code the default configuration can
give (`consent_missing` needs `intake.require_consent`, which is off by default and here), 10%
redeliveries of an earlier event (same bytes, same event_id), 20% of the new events from
returning customers (a phone seen before, written another way), Chinese mobiles in mixed human
formats with some landlines and foreign numbers, and the demo rules' event types, products,
sources, channels and campaigns so that classification does real work. Then, in the same run
and on the same servers, each with its own consumer group:

- the raw limit: an aiokafka consumer reading the whole topic with `getmany`, `json.loads` of
  every value, and a COPY of (event_id, payload jsonb) into an unindexed table, one transaction
  per batch of the intake's batch size;
- the pipeline: the real intake worker (`leadflow.stack.intake_worker` with the demo rules) in a
  child process, until the offsets it stored in `consumer_offsets` reach the topic's end
  offsets, i.e. every event committed as a lead, a merge, a duplicate or a DLQ record. The
  child reports its own peak RSS.

Both rates are events per wall-clock second over all N messages, timed from the moment the
consumer group gives the consumer its partitions to its last commit: the broker holds the first
join of a group for a fixed few seconds (5 s on the embedded broker, 3 s by default on Kafka),
which says nothing about throughput; the details give that wait and the rates including it. On
Linux they also give the CPU time per event of each process (consumer or worker, PostgreSQL
with its backends, the broker) while timed, and how many cores were busy: what bounds a rate.

The outcomes the worker counted are checked against the database, the DLQ and what was
produced; any difference fails the run. The servers and the directory are removed at the end,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bench.classify import _CAMPAIGNS, _CHANNELS, _PRODUCTS, _REGIONS, _SOURCES, _TAGS
from bench.common import goal, machine, pick, write_report
from bench.intake_worker import bench_settings
from ingest.chain import MAX_ATTRIBUTES_BYTES
from ingest.phones import InvalidPhone, PhoneNormaliser
from leadflow.embedded import EmbeddedServers
from leadflow.errors import LeadflowError
from leadflow.kafka import ensure_topics
from leadflow.settings import Settings
from schemas import migrate
from schemas.vocab import RejectCode

DEFAULT_EVENTS = 200_000
RAW_GROUP = "bench-raw"
PIPELINE_GROUP = "bench-intake"
GOALS = {"pipeline_rate": 30_000, "ratio": 0.5, "peak_rss_mb": 300}

#: Shares of all messages, about 5% in all. Oversized messages are rare in real traffic (and
#: each is over 64 KiB), so they get a small share.
REJECT_MIX: dict[RejectCode, float] = {
    "invalid_json": 0.012,
    "invalid_utf8": 0.006,
    "schema_violation": 0.015,
    "unsupported_schema_version": 0.005,
    "invalid_phone": 0.0115,
    "too_large": 0.0005,
}
REDELIVERED = 0.10  # of all messages: an earlier valid event again, byte for byte
RETURNING = 0.20  # of the new valid events: a customer seen before
_RECENT = 20_000  # redeliveries repeat one of the last this many valid events

SHANGHAI = timezone(timedelta(hours=8))


class BenchFailed(LeadflowError):
    """The benchmark could not run, or what it measured does not add up."""


# --- the workload ---------------------------------------------------------------------------

_EVENT_TYPES = [
    ("browse", 35),
    ("signup", 12),
    ("order_created", 8),
    ("order_pending_payment", 14),
    ("ad_click", 18),
    ("form_submit", 10),
    ("partner_referral", 3),
]
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高"
_GIVEN = ("伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛")
_DOMAINS = ("qq.com", "163.com", "126.com", "gmail.com", "outlook.com", "sina.com")
_BAD_EMAILS = ("not-an-email", "a@b", "张三@", "x@@example.com", "name at example.com")
_MOBILE_PREFIXES = tuple(
    str(prefix)
    for prefix in (
        *range(130, 140), 150, 151, 152, 153, *range(155, 160), 166, 176, 177, 178,
        *range(180, 190), 191, 198, 199,
    )
)  # fmt: skip
# Ways people write a mainland mobile, weighted; `d` is the 11-digit national number.
_MOBILE_FORMATS: list[tuple[Callable[[str], str], float]] = [
    (lambda d: d, 35),
    (lambda d: f"{d[:3]} {d[3:7]} {d[7:]}", 15),
    (lambda d: f"{d[:3]}-{d[3:7]}-{d[7:]}", 10),
    (lambda d: f"+86{d}", 12),
    (lambda d: f"+86 {d[:3]} {d[3:7]} {d[7:]}", 8),
    (lambda d: f"0086{d}", 5),
    (lambda d: f"0086 {d[:3]}-{d[3:7]}-{d[7:]}", 3),
    (lambda d: f"+86-{d[:3]}-{d[3:7]}-{d[7:]}", 4),
    (lambda d: f"(+86) {d}", 3),
    (lambda d: f" {d[:3]} {d[3:]} ", 5),
]
_INVALID_PHONES = ("12345", "110", "1380013800", "call me", "+86 999", "0000000000000", "138-001")
_LANDLINE_AREAS = ("10", "21", "20", "755", "571", "28", "27", "25")


@dataclass
class _Customer:
    phone: str  # as the customer first gave it
    national: str | None  # the 11 digits of a mainland mobile, for rewriting it
    key: bytes  # the partition key: external id, else E.164
    external_id: str | None
    name: str | None
    email: str | None
    region: str | None


@dataclass
class Workload:
    """What was produced: the ground truth the measured outcomes are checked against."""

    messages: int = 0
    valid: int = 0  # distinct valid event ids
    redelivered: int = 0
    returning: int = 0
    landline_or_foreign: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    bytes: int = 0

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

    @property
    def json_parseable(self) -> int:
        """Messages whose value `json.loads` takes (what the raw limit stores)."""
        return self.messages - self.rejects["invalid_json"] - self.rejects["invalid_utf8"]


class Generator:
    """Deterministic LeadEvent messages (key, value) with the mix described above."""

    def __init__(self, seed: int = 11, now: datetime | None = None) -> None:
        self.rng = random.Random(seed)
        self.now = now or datetime.now(UTC)
        self.phones = PhoneNormaliser("CN")
        self.workload = Workload()
        self.customers: list[_Customer] = []
        self.recent: deque[tuple[bytes, bytes]] = deque(maxlen=_RECENT)
        self.other_numbers = self._other_numbers()
        self.invalid_phones = [p for p in _INVALID_PHONES if not self._valid(p)]
        self._thresholds: list[tuple[float, RejectCode]] = []
        total = 0.0
        for code, share in REJECT_MIX.items():
            total += share
            self._thresholds.append((total, code))
        self._invalid_share = total

    def _valid(self, text: str) -> bool:
        try:
            self.phones.normalise(text)
        except InvalidPhone:
            return False
        return True

    def _other_numbers(self) -> list[str]:
        """Landlines and foreign mobiles (phonenumbers' slow path), each checked valid."""
        rng, found = self.rng, list[str]()
        while len(found) < 300:
            kind = rng.random()
            if kind < 0.6:
                area = rng.choice(_LANDLINE_AREAS)
                digits = 8 if len(area) == 2 else rng.choice((7, 8))
                sub = str(rng.randrange(2, 9)) + "".join(
                    rng.choice("0123456789") for _ in range(digits - 1)
                )
                text = rng.choice(
                    (f"0{area} {sub[:4]} {sub[4:]}", f"+86 {area} {sub}", f"(0{area}) {sub}")
                )
            elif kind < 0.85:
                sub = rng.choice("569") + "".join(rng.choice("0123456789") for _ in range(7))
                text = f"+852 {sub[:4]} {sub[4:]}"
            else:
                sub = rng.choice("89") + "".join(rng.choice("0123456789") for _ in range(7))
                text = f"+65 {sub[:4]} {sub[4:]}"
            if self._valid(text):
                found.append(text)
        return found

    # -- customers ---------------------------------------------------------------------------

    def _new_customer(self) -> _Customer:
        rng = self.rng
        national: str | None
        if rng.random() < 0.03:
            phone, national = rng.choice(self.other_numbers), None
            self.workload.landline_or_foreign += 1
        else:
            while True:
                national = rng.choice(_MOBILE_PREFIXES) + f"{rng.randrange(10**8):08d}"
                if self.phones.fast(national) is not None:
                    break
            phone = pick(rng, _MOBILE_FORMATS)(national)
        n = len(self.customers)
        external_id = f"u-{n}" if rng.random() < 0.6 else None
        e164 = self.phones.normalise(phone).e164
        name = None
        if rng.random() < 0.8:
            name = rng.choice(_SURNAMES) + rng.choice(_GIVEN) * rng.randrange(1, 3)
            if rng.random() < 0.05:
                name = f"  {name[0]} {name[1:]} "  # spaces to clean up
        email = None
        roll = rng.random()
        if roll < 0.45:
            email = f"user{n}.{rng.randrange(1000)}@{rng.choice(_DOMAINS)}"
        elif roll < 0.5:
            email = rng.choice(_BAD_EMAILS)  # dropped by the intake, not fatal
        customer = _Customer(
            phone,
            national,
            (external_id or e164).encode(),
            external_id,
            name,
            email,
            pick(rng, _REGIONS),
        )
        self.customers.append(customer)
        return customer

    def _returning_phone(self, customer: _Customer) -> str:
        if customer.national is None:
            return customer.phone
        return str(pick(self.rng, _MOBILE_FORMATS)(customer.national))

    # -- events ------------------------------------------------------------------------------

    def _event(self, event_id: str, customer: _Customer, phone: str) -> dict[str, Any]:
        rng = self.rng
        event_type = pick(rng, _EVENT_TYPES)
        roll = rng.random()
        if roll < 0.9:
            age = timedelta(seconds=rng.uniform(0.05, 600))
        elif roll < 0.98:
            age = timedelta(hours=rng.uniform(1, 240))
        else:
            age = timedelta(days=rng.uniform(31, 60))
        attributes: dict[str, Any] = {"amount": rng.randrange(200_000)}
        if rng.random() < 0.5:
            attributes["tags"] = rng.sample(_TAGS, rng.randrange(0, 4))
        if event_type == "form_submit":
            attributes["form"] = rng.choice(("test_drive", "callback", "quote"))
        if event_type == "browse":
            attributes["ordered"] = rng.random() < 0.2
        if rng.random() < 0.05:
            attributes["customer_type"] = "business"
            attributes["annual_revenue"] = rng.randrange(100_000, 50_000_000)
        person: dict[str, Any] = {"phone": phone}
        if customer.external_id:
            person["external_id"] = customer.external_id
        if customer.name:
            person["name"] = customer.name
        if customer.email:
            person["email"] = customer.email
        if customer.region:
            person["region"] = customer.region
        if rng.random() < 0.3:
            person["timezone"] = "Asia/Shanghai"
        event: dict[str, Any] = {
            "schema_version": 1,
            "event_id": event_id,
            "occurred_at": (self.now - age).astimezone(SHANGHAI).isoformat(timespec="milliseconds"),
            "source": pick(rng, _SOURCES),
            "event_type": event_type,
            "customer": person,
            "attributes": attributes,
        }
        for name, value in (
            ("channel", pick(rng, _CHANNELS)),
            ("product", pick(rng, _PRODUCTS)),
            ("campaign", pick(rng, _CAMPAIGNS)),
        ):
            if value is not None:
                event[name] = value
        consent = rng.random()
        if consent < 0.85:
            event["consent"] = {"telemarketing": True}
        elif consent < 0.88:
            event["consent"] = {"telemarketing": False}
        return event

    def _invalid(self, code: RejectCode, n: int) -> tuple[bytes, bytes | None]:
        rng = self.rng
        customer = self._new_customer() if not self.customers else rng.choice(self.customers)
        event = self._event(f"bad-{n}", customer, customer.phone)
        key = customer.key
        if code == "invalid_json":
            text = _dumps(event).decode()
            roll = rng.random()
            if roll < 0.05:
                return key, None  # a tombstone
            if roll < 0.1:
                return key, b""
            if roll < 0.2:
                return key, repr(event).encode()  # a Python dict, not JSON
            return key, text[: rng.randrange(1, len(text) - 1)].encode()  # truncated, still UTF-8
        if code == "invalid_utf8":
            event["customer"]["name"] = customer.name or "张伟"
            value = json.dumps(event, ensure_ascii=False).encode("gb18030")  # a GBK producer
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return key, value
            return key, value[:-1] + b"\xff}"
        if code == "schema_violation":
            roll = rng.random()
            if roll < 0.3:
                event["occurred_at"] = event["occurred_at"][:19]  # no UTC offset
            elif roll < 0.5:
                del event["customer"]
            elif roll < 0.7:
                event["event_type"] = "Order Created"
            elif roll < 0.85:
                event["attributes"] = [event["attributes"]]
            elif roll < 0.95:
                del event["source"]
            else:
                event["attributes"]["notes"] = "y" * (MAX_ATTRIBUTES_BYTES + 100)
            return key, _dumps(event)
        if code == "unsupported_schema_version":
            event["schema_version"] = rng.choice((2, 3))
            return key, _dumps(event)
        if code == "invalid_phone":
            event["customer"] = {"phone": rng.choice(self.invalid_phones)}
            return f"bad-{n}".encode(), _dumps(event)
        if code == "too_large":
            event["attributes"]["blob"] = "x" * 70_000
            return key, _dumps(event)
        raise ValueError(code)

    def message(self, n: int) -> tuple[bytes, bytes | None]:
        """The n-th message."""
        rng, workload = self.rng, self.workload
        roll = rng.random()
        key: bytes
        value: bytes | None
        if roll < self._invalid_share:
            code = next(code for limit, code in self._thresholds if roll < limit)
            key, value = self._invalid(code, n)
            workload.rejects[code] += 1
        elif roll < self._invalid_share + REDELIVERED and self.recent:
            key, value = rng.choice(self.recent)
            workload.redelivered += 1
        else:
            if self.customers and rng.random() < RETURNING:
                customer = rng.choice(self.customers)
                phone = self._returning_phone(customer)
                workload.returning += 1
            else:
                customer = self._new_customer()
                phone = customer.phone
            key, value = customer.key, _dumps(self._event(f"ev-{n}", customer, phone))
            self.recent.append((key, value))
            workload.valid += 1
        workload.messages += 1
        workload.bytes += len(value or b"")
        return key, value

    def messages(self, count: int) -> Iterator[tuple[bytes, bytes | None]]:
        for n in range(count):
            yield self.message(n)


def _dumps(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


# --- the phases -----------------------------------------------------------------------------


class _Phases:
    """A rich progress bar per phase, with the phase's rate since its first event."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[progress.description]{task.description:<34}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>10}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.first: dict[TaskID, tuple[float, int]] = {}

    def add(self, description: str, total: int | None) -> TaskID:
        return self.progress.add_task(description, total=total, rate="")

    def update(self, task: TaskID, completed: int) -> None:
        rate = ""
        if completed:
            since, base = self.first.setdefault(task, (time.perf_counter(), completed))
            elapsed = time.perf_counter() - since
            if elapsed > 0 and completed > base:
                rate = f"{(completed - base) / elapsed:,.0f}/s"
        self.progress.update(task, completed=completed, rate=rate)

    def log(self, message: str) -> None:
        self.progress.console.log(message)


async def produce(
    settings: Settings, generator: Generator, count: int, phases: _Phases
) -> dict[int, int]:
    """Pre-produce `count` messages to the raw topic; return its end offset per partition.

    The end offsets come from the broker's acknowledgements (last offset + 1): the embedded
    broker (Tansu) answers ListOffsets(latest) with the base offset of a partition's last record
    batch, short of the high watermark, so `end_offsets()` cannot be trusted here.
    """
    topic = settings.topics.raw
    task = phases.add(f"producing to {topic}", count)
    producer = AIOKafkaProducer(
        **settings.kafka.client_options(),
        acks="all",
        linger_ms=20,
        max_batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    ends: dict[int, int] = {}

    def acknowledged(sent: Sequence[Any]) -> None:
        for metadata in sent:
            ends[metadata.partition] = max(ends.get(metadata.partition, 0), metadata.offset + 1)

    await producer.start()
    try:
        pending: list[asyncio.Future[Any]] = []
        for n, (key, value) in enumerate(generator.messages(count), 1):
            pending.append(await producer.send(topic, value=value, key=key))
            if len(pending) >= 10_000:
                acknowledged(await asyncio.gather(*pending))
                pending.clear()
                phases.update(task, n)
        await producer.flush()
        acknowledged(await asyncio.gather(*pending))
        phases.update(task, count)
    finally:
        await producer.stop()
    if sum(ends.values()) != count:
        raise BenchFailed(
            f"produced {count:,} messages but the topic {topic} ends at {sum(ends.values()):,}"
        )
    return ends


_RAW_TABLE = "CREATE TABLE bench_raw (event_id text, payload jsonb)"  # no key, no index


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _cpu_ticks(pid: int, tree: bool) -> int | None:
    fields = _proc_stat(pid)
    if fields is None:
        return None
    ticks = int(fields[11]) + int(fields[12])  # utime + stime, all threads
    if tree:
        ticks += int(fields[13]) + int(fields[14])  # children that have exited
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                child = _proc_stat(int(entry.name))
                if child is not None and int(child[1]) == pid:
                    ticks += int(child[11]) + int(child[12])
    return ticks


@dataclass(frozen=True)
class Processes:
    """The processes whose CPU time a measurement accounts for: name -> (pid, with children).
    PostgreSQL counts its backends and helpers. Linux only; elsewhere nothing is counted."""

    pids: dict[str, tuple[int, bool]]

    def but(self, **more: int) -> Processes:
        return Processes({**self.pids, **{name: (pid, False) for name, pid in more.items()}})

    def cpu_seconds(self) -> dict[str, float]:
        found = {}
        for name, (pid, tree) in self.pids.items():
            ticks = _cpu_ticks(pid, tree)
            if ticks is not None:
                found[name] = ticks / _CLOCK_TICKS
        return found


@dataclass
class Timing:
    """Wall-clock moments (Unix time) of one measured consumer."""

    started: float  # the consumer (or the worker) starts
    assigned: float = 0.0  # the group has given it its partitions
    first: float = 0.0  # its first batch is committed
    first_events: int = 0  # the events that batch took
    ended: float = 0.0  # every event is committed
    cpu_start: dict[str, float] = field(default_factory=dict)  # CPU seconds by process at
    cpu_end: dict[str, float] = field(default_factory=dict)  # `assigned` and at `ended`

    @property
    def seconds(self) -> float:
        """From the partition assignment to the last commit: what the rates are measured on."""
        return self.ended - self.assigned

    @property
    def join_seconds(self) -> float:
        return self.assigned - self.started

    def rates(self, events: int) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "group_join_seconds": round(self.join_seconds, 3),
            "first_batch_seconds": round(self.first - self.assigned, 3),
            "rate_including_group_join": round(events / (self.ended - self.started)),
            "rate_after_first_batch": round(
                (events - self.first_events) / (self.ended - self.first)
            )
            if self.ended > self.first
            else None,
            **self.cpu(events),
        }

    def cpu(self, events: int) -> dict[str, Any]:
        """CPU time per event of each process while timed, and how many cores were busy."""
        used = {
            name: self.cpu_end[name] - self.cpu_start[name]
            for name in self.cpu_start
            if name in self.cpu_end
        }
        if not used:
            return {}
        return {
            "cpu_us_per_event": {name: round(cpu * 1e6 / events, 1) for name, cpu in used.items()},
            "cores_busy": round(sum(used.values()) / self.seconds, 2),
        }


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, timing: Timing, processes: Processes) -> None:
        self.timing = timing
        self.processes = processes

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned and not self.timing.assigned:
            self.timing.assigned = time.time()
            self.timing.cpu_start = self.processes.cpu_seconds()


async def raw_limit(
    settings: Settings, total: int, batch_size: int, phases: _Phases, processes: Processes
) -> tuple[Timing, int]:
    """aiokafka getmany + json.loads + COPY (event_id, payload) into an unindexed table, one
    transaction per batch. Returns the timing and the rows stored."""
    assert settings.database.url is not None
    conn = psycopg.connect(settings.database.url.get_secret_value(), autocommit=True)
    conn.execute(_RAW_TABLE)

    def store(rows: list[tuple[Any, str]]) -> None:
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy("COPY bench_raw (event_id, payload) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)

    task = phases.add("raw limit (consume, parse, COPY)", total)
    timing = Timing(time.time())
    consumer = AIOKafkaConsumer(
        **settings.kafka.client_options(),
        group_id=RAW_GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=batch_size,
    )
    read = stored = 0
    try:
        await consumer.start()
        processes = processes.but(consumer=os.getpid())
        consumer.subscribe([settings.topics.raw], listener=_Assigned(timing, processes))
        while read < total:
            fetched = await consumer.getmany(timeout_ms=50, max_records=batch_size)
            rows: list[tuple[Any, str]] = []
            for messages in fetched.values():
                for message in messages:
                    read += 1
                    value = message.value
                    if value is None:
                        continue
                    try:
                        event = json.loads(value)
                    except ValueError:  # not JSON, or not UTF-8
                        continue
                    event_id = event.get("event_id") if isinstance(event, dict) else None
                    rows.append((event_id, value.decode()))
            if rows:
                await asyncio.to_thread(store, rows)
                stored += len(rows)
            if read and not timing.first:
                timing.first, timing.first_events = time.time(), read
            phases.update(task, read)
        timing.ended = time.time()
        timing.cpu_end = processes.cpu_seconds()
    finally:
        await consumer.stop()
        conn.close()
    if read != total:
        raise BenchFailed(f"the raw consumer read {read:,} messages of {total:,}")
    return timing, stored


@dataclass
class PipelineRun:
    timing: Timing
    worker: dict[str, Any]  # what the worker reported: outcomes, batches, peak RSS


async def pipeline(
    settings: Settings,
    total: int,
    batch_size: int,
    phases: _Phases,
    log_path: Path,
    processes: Processes,
    profile: Path | None = None,
) -> PipelineRun:
    """The real intake worker in a child process, until the offsets it stored in PostgreSQL
    reach the end of the topic. `profile`: record the worker with py-spy into this file."""
    assert settings.database.url is not None
    assert settings.kafka.bootstrap is not None
    url = settings.database.url.get_secret_value()
    command = [
        sys.executable,
        "-m",
        "bench.intake_worker",
        "--database-url",
        url,
        "--bootstrap",
        settings.kafka.bootstrap,
        "--group",
        PIPELINE_GROUP,
        "--batch-size",
        str(batch_size),
    ]
    task = phases.add("pipeline (intake worker to leads)", total)
    with log_path.open("wb") as log:
        child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL
        )
    said: dict[str, Any] = {}

    async def listen() -> None:
        assert child.stdout is not None
        async for line in child.stdout:
            with contextlib.suppress(ValueError):
                said.update(json.loads(line))

    def failed(what: str) -> BenchFailed:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        return BenchFailed(f"the intake worker {what}; its log {log_path} ends:\n{tail}")

    listener = asyncio.create_task(listen())
    spy: asyncio.subprocess.Process | None = None
    try:
        deadline = time.monotonic() + 120
        while "started" not in said:
            if listener.done() or time.monotonic() > deadline:
                raise failed("did not start")
            await asyncio.sleep(0.01)
        timing = Timing(float(said["started"]))
        processes = processes.but(worker=child.pid)
        if profile is not None:
            spy = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--nonblocking", "--idle", "--threads", "--rate", "250",
                "--format", "raw",
                "--output", str(profile), "--pid", str(child.pid),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        poll = await psycopg.AsyncConnection.connect(url, autocommit=True)
        last_progress, last_done = time.monotonic(), -1
        try:
            while True:
                row = await (
                    await poll.execute(
                        "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
                        "WHERE consumer_group = %s AND topic = %s",
                        (PIPELINE_GROUP, settings.topics.raw),
                    )
                ).fetchone()
                now = time.time()
                done = int(row[0]) if row else 0
                if "assigned" in said and not timing.cpu_start:
                    timing.cpu_start = processes.cpu_seconds()
                if done and not timing.first:
                    timing.first, timing.first_events = now, done
                phases.update(task, done)
                if done >= total:
                    timing.ended = now
                    timing.cpu_end = processes.cpu_seconds()
                    break
                if child.returncode is not None:
                    raise failed(f"exited with code {child.returncode} at {done:,} of {total:,}")
                if done != last_done:
                    last_progress, last_done = time.monotonic(), done
                elif time.monotonic() - last_progress > 120:
                    raise failed(f"made no progress for 2 minutes at {done:,} of {total:,}")
                await asyncio.sleep(0.02)
        finally:
            await poll.close()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile and exits
            await asyncio.wait_for(spy.wait(), 60)
        child.send_signal(signal.SIGTERM)
        await asyncio.wait_for(child.wait(), 60)
        await asyncio.wait_for(listener, 10)
        if child.returncode != 0:
            raise failed(f"exited with code {child.returncode} when told to stop")
        if "peak_rss_bytes" not in said or "assigned" not in said:
            raise failed("did not report its figures")
        timing.assigned = float(said["assigned"])
    finally:
        for process in (spy, child):
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        listener.cancel()
    return PipelineRun(timing, said)


async def read_dlq(settings: Settings, expected: int) -> Counter[str]:
    """The `error` header of every DLQ record, counted by code: read until `expected` records
    and then until nothing more comes for a second (more than expected would be a finding)."""
    consumer = AIOKafkaConsumer(
        settings.topics.dlq,
        **settings.kafka.client_options(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    codes: Counter[str] = Counter()
    seen = 0
    await consumer.start()
    try:
        deadline = time.monotonic() + 60
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=200)
            for messages in fetched.values():
                for message in messages:
                    seen += 1
                    headers = dict(message.headers or ())
                    codes[headers.get("error", b"(none)").decode()] += 1
            if any(fetched.values()):
                quiet_since = time.monotonic()
            elif seen >= expected and time.monotonic() - quiet_since > 1:
                break
    finally:
        await consumer.stop()
    return codes


def database_counts(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:

        def one(query: str) -> int:
            row = conn.execute(query).fetchone()
            return int(row[0]) if row else 0

        return {
            "lead_events": one("SELECT count(*) FROM lead_events"),
            "distinct_event_ids": one("SELECT count(DISTINCT event_id) FROM lead_events"),
            "leads": one("SELECT count(*) FROM leads"),
            "customers": one("SELECT count(*) FROM customers"),
            "bench_raw": one("SELECT count(*) FROM bench_raw"),
            "leads_by_state": dict(
                conn.execute("SELECT state, count(*) FROM leads GROUP BY 1 ORDER BY 1").fetchall()
            ),
            "leads_by_line": dict(
                conn.execute(
                    "SELECT business_line, count(*) FROM leads GROUP BY 1 ORDER BY 2 DESC"
                ).fetchall()
            ),
            "segments": one("SELECT count(DISTINCT segment) FROM leads"),
        }


def verify(
    workload: Workload,
    outcomes: dict[str, int],
    counts: dict[str, Any],
    dlq: Counter[str],
    raw_stored: int,
) -> None:
    """Every figure must add up; otherwise the run fails with every difference listed."""
    problems = []

    def expect(what: str, got: int, wanted: int) -> None:
        if got != wanted:
            problems.append(f"{what}: {got:,}, expected {wanted:,}")

    expect("stored lead_events vs distinct valid event_ids produced", counts["lead_events"], workload.valid)  # fmt: skip
    expect("distinct event_ids stored", counts["distinct_event_ids"], workload.valid)
    expect("events the worker counted new + merged", outcomes["new"] + outcomes["merged"], workload.valid)  # fmt: skip
    expect("leads stored vs events counted new", counts["leads"], outcomes["new"])
    expect("events counted duplicate vs redeliveries produced", outcomes["duplicate"], workload.redelivered)  # fmt: skip
    expect("events counted rejected vs invalid produced", outcomes["rejected"], workload.rejected)
    expect("DLQ records vs invalid produced", sum(dlq.values()), workload.rejected)
    for code in sorted(set(dlq) | set(workload.rejects)):
        expect(f"DLQ records with code {code}", dlq[code], workload.rejects[code])
    expect("raw limit: rows stored vs JSON messages produced", raw_stored, workload.json_parseable)
    expect("raw limit: rows in bench_raw", counts["bench_raw"], raw_stored)
    if problems:
        raise BenchFailed("the intake benchmark does not add up:\n  " + "\n  ".join(problems))


# --- the run --------------------------------------------------------------------------------


async def _measure(
    settings: Settings,
    events: int,
    batch_size: int,
    phases: _Phases,
    work_dir: Path,
    processes: Processes,
    profile: Path | None,
) -> dict[str, Any]:
    created = await ensure_topics(settings.kafka, settings.topics)
    phases.log(f"topics {', '.join(created)} created")
    generator = Generator()
    started = time.perf_counter()
    await produce(settings, generator, events, phases)
    produce_seconds = time.perf_counter() - started
    workload = generator.workload

    raw, raw_stored = await raw_limit(settings, events, batch_size, phases, processes)
    assert settings.database.url is not None
    url = settings.database.url.get_secret_value()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")  # the pipeline does not pay for the raw limit's writes
    run = await pipeline(
        settings, events, batch_size, phases, work_dir / "intake-worker.log", processes, profile
    )

    phases.log("verifying the outcomes against the database and the DLQ")
    counts = await asyncio.to_thread(database_counts, url)
    dlq = await read_dlq(settings, workload.rejected)
    outcomes = {k: int(v) for k, v in run.worker["outcomes"].items()}
    verify(workload, outcomes, counts, dlq, raw_stored)

    raw_rate = events / raw.seconds
    pipeline_rate = events / run.timing.seconds
    return {
        "scenario": "intake",
        "events": events,
        "raw_rate": round(raw_rate),
        "pipeline_rate": round(pipeline_rate),
        "ratio": round(pipeline_rate / raw_rate, 3),
        "peak_rss_mb": round(run.worker["peak_rss_bytes"] / 2**20, 1),
        "details": {
            "batch_size": batch_size,
            "partitions": settings.topics.partitions,
            "postgres": "embedded PostgreSQL, durable (fsync and synchronous_commit on)",
            "require_consent": settings.intake.require_consent,
            "rules": "demo rules (deploy/rules.example.yaml)",
            "timed_from": "the consumer's partition assignment to its last commit",
            "raw": raw.rates(events),
            "pipeline": run.timing.rates(events),
            "produce_seconds": round(produce_seconds, 3),
            "produce_rate": round(events / produce_seconds),
            "megabytes_produced": round(workload.bytes / 2**20, 1),
            "worker_batches": run.worker["batches"],
            "mix": {
                "valid_distinct": workload.valid,
                "redelivered": workload.redelivered,
                "returning_customer_events": workload.returning,
                "landline_or_foreign_customers": workload.landline_or_foreign,
                "invalid": dict(sorted(workload.rejects.items())),
            },
            "outcomes": outcomes,
            "rejects_by_code": dict(sorted(dlq.items())),
            "database": counts,
            "verified": True,
            "goals": GOALS,
            "machine": machine(),
        },
    }


def _server_processes(servers: EmbeddedServers) -> Processes:
    pids: dict[str, tuple[int, bool]] = {}
    if servers.postgres is not None and servers.postgres.pid is not None:
        pids["postgres"] = (servers.postgres.pid, True)
    if servers.kafka is not None and servers.kafka.pid is not None:
        pids["broker"] = (servers.kafka.pid, False)
    return Processes(pids)


def run(
    events: int = DEFAULT_EVENTS,
    json_path: Path | None = None,
    console: Console | None = None,
    *,
    batch_size: int | None = None,
    profile_worker: Path | None = None,
) -> dict[str, Any]:
    """Start the servers, measure, verify, clean up; write the JSON report and return it.

    `batch_size` overrides the intake's default; `profile_worker` records the intake worker
    with py-spy (which must be installed) into that file, in py-spy's raw format.
    """
    console = console or Console()
    work_dir = Path(tempfile.mkdtemp(prefix="leadflow-bench-intake-"))
    phases = _Phases(console)
    # SIGTERM cleans up as Ctrl-C does (the servers and the worker would die with this process
    # anyway, but the directory would stay).
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with phases.progress:
            phases.log(f"starting embedded PostgreSQL (durable) and Kafka in {work_dir}")
            with EmbeddedServers(work_dir / "servers", durable=True) as servers:
                assert servers.database_url is not None
                assert servers.kafka_bootstrap is not None
                migrate.upgrade(servers.database_url)
                settings = bench_settings(
                    servers.database_url, servers.kafka_bootstrap, PIPELINE_GROUP, batch_size
                )
                report = asyncio.run(
                    _measure(
                        settings,
                        events,
                        settings.intake.batch_size,
                        phases,
                        work_dir,
                        _server_processes(servers),
                        profile_worker,
                    )
                )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    write_report(json_path, report)
    return report


def show(console: Console, report: dict[str, Any]) -> None:
    """The report as a table, for people."""
    details = report["details"]

    table = Table(title="leadflow bench intake", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal")
    table.add_row("events (pre-produced)", f"{report['events']:,}", "")
    table.add_row(
        "raw limit, events/s",
        f"{report['raw_rate']:,}",
        "consume + json.loads + COPY, unindexed",
    )
    table.add_row(
        "pipeline, events/s",
        f"[bold]{report['pipeline_rate']:,}[/]",
        f">= {GOALS['pipeline_rate']:,}: "
        + goal(report["pipeline_rate"] >= GOALS["pipeline_rate"]),
    )
    table.add_row(
        "pipeline / raw limit",
        f"[bold]{report['ratio']:.2f}[/]",
        f">= {GOALS['ratio']}: " + goal(report["ratio"] >= GOALS["ratio"]),
    )
    table.add_row(
        "intake worker peak RSS",
        f"[bold]{report['peak_rss_mb']:,.0f} MB[/]",
        f"<= {GOALS['peak_rss_mb']} MB: " + goal(report["peak_rss_mb"] <= GOALS["peak_rss_mb"]),
    )
    for name in ("raw", "pipeline"):
        timing = details[name]
        table.add_row(
            f"{name}: seconds / group join (untimed)",
            f"{timing['seconds']} s / {timing['group_join_seconds']} s",
            f"{timing['rate_including_group_join']:,}/s including the join",
        )
        if "cpu_us_per_event" in timing:
            table.add_row(
                f"{name}: CPU µs per event",
                ", ".join(f"{k} {v}" for k, v in timing["cpu_us_per_event"].items()),
                f"{timing['cores_busy']} of {details['machine']['cores']} cores busy",
            )
    outcomes = details["outcomes"]
    table.add_row(
        "outcomes (checked against the database)",
        " / ".join(f"{outcomes[k]:,}" for k in ("new", "merged", "duplicate", "rejected")),
        "new / merged / duplicate / rejected",
    )
    table.add_row(
        "rejects by code",
        ", ".join(f"{code} {count:,}" for code, count in details["rejects_by_code"].items()),
        "",
    )
    table.add_row(
        "produced", f"{details['produce_rate']:,}/s", f"{details['megabytes_produced']} MB"
    )
    table.add_row(
        "batch size, partitions", f"{details['batch_size']:,}, {details['partitions']}", ""
    )
    table.add_row("PostgreSQL", "durable", details["postgres"])
    machine = details["machine"]
    table.add_row(
        "machine",
        f"{machine['cores']} cores",
        f"{machine['cpu']}, Python {machine['python']}",
    )
    console.print(table)
