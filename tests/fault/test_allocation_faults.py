"""Four real `leadflow run allocator` processes at once for a minute, under a stream of new
leads and of agents working them (first contacts, every disposition, rejects, SLAs left to
expire, agents going away and coming back), one allocator killed with SIGKILL and restarted.

Afterwards the audit trail — not only the end state — must show that no lead ever had two open
assignments, no agent ever held more than their capacity or took more than their daily cap, no
agent got a lead while not available, and every lead that could be assigned was.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from allocate.work import (
    AssignmentClosed,
    AssignmentNotFound,
    WorkConfig,
    dispose,
    first_contact,
    reject,
)
from tests.fault.roles import RoleProcess

pytestmark = pytest.mark.fault

RUN_SECONDS = 60
AGENTS = {  # id: (capacity, daily cap, timezone)
    f"a{n:02d}": (2 + n % 4, 40 + 15 * (n % 3), ("Asia/Shanghai", "Europe/London")[n % 2])
    for n in range(10)
}
LINES = ("personal_credit_loan", "car_loan", "wealth_management")
SEGMENTS = ("new_signup", "ad_click", "silent_high_value")
CONFIG = """
allocation:
  sweep_interval: 200ms
  no_answer_delays: [1s]
queues:
  - {name: pc_hot, business_line: personal_credit_loan, segments: [new_signup], strategy: weighted,
     sla: 3s, max_attempts: 3, call_window: null}
  - {name: pc, business_line: personal_credit_loan, strategy: round_robin, sla: 3s,
     max_attempts: 3, call_window: null}
  - {name: cars, business_line: car_loan, strategy: least_loaded, sla: 3s, max_attempts: 3,
     call_window: null}
  - {name: wealth, business_line: wealth_management, strategy: sticky, sla: 3s, max_attempts: 3,
     call_window: null}
"""
WORK = WorkConfig(
    max_attempts={"pc_hot": 3, "pc": 3, "cars": 3, "wealth": 3},
    no_answer_delays=(timedelta(seconds=1),),
)


def setup_agents(conn: psycopg.Connection[Any]) -> None:
    for agent_id, (capacity, daily_cap, timezone) in AGENTS.items():
        conn.execute(
            "INSERT INTO agents (id, name, business_lines, segments, capacity, daily_cap, weight,"
            " timezone, status) VALUES (%s, %s, '{*}', '{*}', %s, %s, %s, %s, 'available')",
            (
                agent_id,
                f"坐席 {agent_id}",
                capacity,
                daily_cap,
                1 + int(agent_id[-1]) % 3,
                timezone,
            ),
        )


def feed_leads(db_url: str, stop: threading.Event, errors: list[BaseException]) -> None:
    rng = random.Random(1)
    customers: list[int] = []
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                with conn.transaction():
                    for _ in range(rng.randint(1, 6)):
                        n += 1
                        if customers and rng.random() < 0.15:  # a returning customer
                            customer = rng.choice(customers)
                        else:
                            row = conn.execute(
                                "INSERT INTO customers (phone_e164, timezone) VALUES (%s, %s)"
                                " RETURNING id",
                                (f"+86139{n:08d}", "Asia/Shanghai"),
                            ).fetchone()
                            assert row is not None
                            customer = row[0]
                            customers.append(customer)
                        realtime = rng.random() < 0.7
                        conn.execute(
                            "INSERT INTO leads (customer_id, business_line, segment, priority,"
                            " state, intake, realtime, first_event_at, last_event_at, queued_at)"
                            " VALUES (%s, %s, %s, %s, 'queued', %s, %s, now(), now(), now())",
                            (
                                customer,
                                rng.choice(LINES),
                                rng.choice(SEGMENTS),
                                rng.randint(0, 100),
                                "realtime" if realtime else "stock",
                                realtime,
                            ),
                        )
                    conn.execute("SELECT pg_notify('leadflow_queued', '')")
                time.sleep(rng.uniform(0.05, 0.25))
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


def work_leads(
    db_url: str, stop: threading.Event, errors: list[BaseException], counts: dict[str, int]
) -> None:
    """Agents at work: most assignments are contacted and dispositioned, some rejected, some
    left to expire; now and then an agent goes away and comes back."""
    rng = random.Random(2)
    outcomes = ("no_answer", "callback", "converted", "not_interested", "invalid_number")
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT id, agent_id, lead_id FROM assignments WHERE status = 'open'"
                ).fetchall()
                for assignment_id, agent_id, lead_id in rng.sample(rows, min(len(rows), 6)):
                    now = datetime.now(UTC)
                    roll = rng.random()
                    try:
                        if lead_id % 6 == 0:
                            continue  # never called: its SLA will expire
                        if roll < 0.1:
                            reject(conn, assignment_id, agent_id, "not my customer", now, WORK)
                            counts["reject"] += 1
                            continue
                        first_contact(conn, assignment_id, agent_id, now)
                        outcome = rng.choice(outcomes)
                        dispose(
                            conn,
                            assignment_id,
                            agent_id,
                            outcome,  # type: ignore[arg-type]
                            datetime.now(UTC),
                            WORK,
                            callback_at=now + timedelta(seconds=2),
                        )
                        counts[outcome] += 1
                    except (AssignmentClosed, AssignmentNotFound):
                        counts["raced"] += 1  # expired or taken back meanwhile: as in life
                if rng.random() < 0.1:
                    agent_id = rng.choice(sorted(AGENTS))
                    status = rng.choice(("available", "available", "away", "offline"))
                    conn.execute("UPDATE agents SET status = %s WHERE id = %s", (status, agent_id))
                    conn.execute("SELECT pg_notify('leadflow_queued', '')")
                time.sleep(0.05)
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


def test_four_allocators_keep_every_invariant_under_load_and_sigkill(
    db_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    config = tmp_path / "leadflow.yaml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    suffix = uuid.uuid4().hex[:8]
    env.update(
        LEADFLOW_CONFIG=str(config),
        LEADFLOW_DATABASE_URL=db_url,
        LEADFLOW_KAFKA_BOOTSTRAP=kafka_bootstrap,
        LEADFLOW_TOPICS_RAW=f"alloc.raw.{suffix}",
        LEADFLOW_TOPICS_DLQ=f"alloc.dlq.{suffix}",
        LEADFLOW_TOPICS_ASSIGNED=f"alloc.assigned.{suffix}",
        LEADFLOW_TOPICS_PARTITIONS="1",
        LEADFLOW_LOG_LEVEL="WARNING",
        PYTHONWARNINGS="ignore",
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        setup_agents(conn)
    allocators = [RoleProcess("allocator", env, tmp_path / f"allocator-{n}.log") for n in range(4)]
    stop = threading.Event()
    errors: list[BaseException] = []
    counts: dict[str, int] = defaultdict(int)
    threads = [
        threading.Thread(target=feed_leads, args=(db_url, stop, errors)),
        threading.Thread(target=work_leads, args=(db_url, stop, errors, counts)),
    ]
    for allocator in allocators:
        allocator.start()
    try:
        for thread in threads:
            thread.start()
        time.sleep(RUN_SECONDS / 3)
        allocators[1].kill()
        allocators[1].start()
        time.sleep(RUN_SECONDS * 2 / 3)
        stop.set()
        for thread in threads:
            thread.join()
        assert errors == []
        # Everyone back at work with room: the allocators must place what can be placed.
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("UPDATE agents SET status = 'available'")
            conn.execute("SELECT pg_notify('leadflow_queued', '')")
        time.sleep(3)
        for allocator in allocators:
            assert allocator.process is not None
            assert allocator.process.poll() is None, allocator.log.read_text()[-3000:]
    finally:
        stop.set()
        codes = [allocator.stop() for allocator in allocators]
    assert codes == [0, 0, 0, 0], [a.log.read_text()[-2000:] for a in allocators]

    with psycopg.connect(db_url) as conn:
        assignments = conn.execute(
            "SELECT lead_id, agent_id, assigned_at, closed_at FROM assignments"
        ).fetchall()
        status_log = conn.execute(
            "SELECT agent_id, status, at FROM agent_status_log ORDER BY at, id"
        ).fetchall()
        assert len(assignments) > 500, counts  # the run did real work
        assert counts["converted"] > 0
        assert counts["reject"] > 0
        expired = conn.execute("SELECT count(*) FROM assignments WHERE status = 'expired'")
        assert expired.fetchone() != (0,)

        assert_one_open_assignment_per_lead_at_every_moment(assignments)
        assert_capacity_and_daily_cap_never_exceeded(assignments)
        assert_only_available_agents_got_leads(assignments, status_log)
        assert_every_assignable_lead_was_assigned(conn)


def _intervals(rows: list[tuple[Any, ...]], key: int) -> dict[Any, list[tuple[datetime, datetime]]]:
    far = datetime.max.replace(tzinfo=UTC)
    by: dict[Any, list[tuple[datetime, datetime]]] = defaultdict(list)
    for row in rows:
        by[row[key]].append((row[2], row[3] or far))
    return by


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    # A close and an open at the same instant: the close comes first (capacity was freed).
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def assert_one_open_assignment_per_lead_at_every_moment(rows: list[tuple[Any, ...]]) -> None:
    doubled = {lead for lead, spans in _intervals(rows, 0).items() if _max_overlap(spans) > 1}
    assert doubled == set(), f"leads held by two agents at once: {sorted(doubled)[:10]}"


def assert_capacity_and_daily_cap_never_exceeded(rows: list[tuple[Any, ...]]) -> None:
    for agent_id, spans in _intervals(rows, 1).items():
        capacity, daily_cap, timezone = AGENTS[agent_id]
        assert _max_overlap(spans) <= capacity, f"{agent_id} held more than {capacity}"
        per_day: dict[Any, int] = defaultdict(int)
        for start, _ in spans:
            per_day[start.astimezone(ZoneInfo(timezone)).date()] += 1
        assert max(per_day.values()) <= daily_cap, f"{agent_id} took more than {daily_cap}/day"


def assert_only_available_agents_got_leads(
    rows: list[tuple[Any, ...]], status_log: list[tuple[Any, ...]]
) -> None:
    history: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    for agent_id, status, at in status_log:
        history[agent_id].append((at, status))
    for _, agent_id, assigned_at, _ in rows:
        before = [status for at, status in history[agent_id] if at <= assigned_at]
        assert before, f"{agent_id} had no status before {assigned_at}"
        assert before[-1] == "available", (
            f"{agent_id} got a lead at {assigned_at} while {before[-1]}"
        )


def assert_every_assignable_lead_was_assigned(conn: psycopg.Connection[Any]) -> None:
    """A lead still queued and due must have no agent with room who may take it."""
    waiting = conn.execute(
        """
        SELECT l.id, array_remove(array_agg(s.agent_id) FILTER (
                   WHERE s.status IN ('expired', 'revoked')), NULL)
        FROM leads l LEFT JOIN assignments s ON s.lead_id = l.id
        WHERE l.state = 'queued' AND (l.next_action_at IS NULL OR l.next_action_at <= now())
        GROUP BY l.id
        """
    ).fetchall()
    room = {
        agent_id
        for agent_id, open_count, capacity in conn.execute(
            """
            SELECT a.id, count(s.id) FILTER (WHERE s.status = 'open'), a.capacity
            FROM agents a LEFT JOIN assignments s ON s.agent_id = a.id
            WHERE a.status = 'available' GROUP BY a.id
            """
        )
        if open_count < capacity
    }
    today = conn.execute(
        "SELECT agent_id, count(*) FROM assignments WHERE assigned_at > now() - interval '1 hour'"
        " GROUP BY agent_id"
    ).fetchall()
    room -= {agent_id for agent_id, count in today if count >= AGENTS[agent_id][1]}
    stuck = [lead for lead, excluded in waiting if room - set(excluded or ())]
    assert stuck == [], f"{len(stuck)} leads waited although an agent had room, e.g. {stuck[:5]}"
