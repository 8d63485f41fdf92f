"""The allocator and agents' work on a real PostgreSQL, on a frozen clock: exact database state."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from allocate.allocator import Allocator, AllocatorConfig
from allocate.model import QueueSpec, Window
from allocate.service import AllocatorService
from allocate.work import (
    AssignmentClosed,
    AssignmentNotFound,
    WorkConfig,
    dispose,
    first_contact,
    reject,
)
from leadflow.db import agent_counts, make_engine, queue_stats
from schemas.events import AssignmentEvent

pytestmark = pytest.mark.integration

# 10:00 in Shanghai, 22:00 the day before in New York.
NOW = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
TOPIC = "leads.assigned"


def queue(name: str = "loans", **values: Any) -> QueueSpec:
    spec = QueueSpec(
        name=name,
        business_line="personal_credit",
        segments=frozenset(),
        strategy="round_robin",
        fallback_strategy="least_loaded",
        sla=timedelta(minutes=5),
        max_attempts=3,
        call_window=Window(time(9), time(21)),
        default_timezone="Asia/Shanghai",
    )
    return replace(spec, **values)


def allocator(*queues: QueueSpec, **values: Any) -> Allocator:
    return Allocator(AllocatorConfig(queues=queues or (queue(),), assigned_topic=TOPIC, **values))


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


_phones = iter(range(10_000_000, 99_999_999))


def add_lead(
    conn: psycopg.Connection[Any],
    *,
    line: str = "personal_credit",
    segment: str = "standard",
    priority: int = 50,
    realtime: bool = True,
    queued_at: datetime = NOW - timedelta(minutes=1),
    timezone: str | None = "Asia/Shanghai",
    phone: str | None = None,
    customer_id: int | None = None,
) -> int:
    if customer_id is None:
        phone = phone or f"+86138{next(_phones)}"
        customer_id = conn.execute(
            "INSERT INTO customers (phone_e164, name, timezone) VALUES (%s, %s, %s) RETURNING id",
            (phone, "王小明", timezone),
        ).fetchone()[0]  # type: ignore[index]
    row = conn.execute(
        "INSERT INTO leads (customer_id, business_line, segment, priority, state, intake,"
        " realtime, first_event_at, last_event_at, queued_at)"
        " VALUES (%s, %s, %s, %s, 'queued', %s, %s, %s, %s, %s) RETURNING id",
        (
            customer_id,
            line,
            segment,
            priority,
            "realtime" if realtime else "stock",
            realtime,
            queued_at,
            queued_at,
            queued_at,
        ),
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_agent(
    conn: psycopg.Connection[Any],
    agent_id: str,
    *,
    lines: tuple[str, ...] = ("personal_credit",),
    segments: tuple[str, ...] = ("*",),
    capacity: int = 100,
    daily_cap: int = 1000,
    weight: float = 1.0,
    status: str = "available",
    shift: tuple[time, time] | None = None,
    timezone: str = "Asia/Shanghai",
) -> str:
    conn.execute(
        "INSERT INTO agents (id, name, business_lines, segments, capacity, daily_cap, weight,"
        " status, shift_start, shift_end, timezone) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s,"
        " %s, %s)",
        (
            agent_id,
            f"Agent {agent_id}",
            list(lines),
            list(segments),
            capacity,
            daily_cap,
            weight,
            status,
            shift[0] if shift else None,
            shift[1] if shift else None,
            timezone,
        ),
    )
    return agent_id


def open_assignments(conn: psycopg.Connection[Any]) -> dict[int, str]:
    """lead id -> agent id of every open assignment."""
    rows = conn.execute("SELECT lead_id, agent_id FROM assignments WHERE status = 'open'")
    return {lead: agent for lead, agent in rows}


def lead_row(conn: psycopg.Connection[Any], lead_id: int) -> dict[str, Any]:
    cur = conn.execute(
        "SELECT state, attempts, queue, next_action_at, closed_at FROM leads WHERE id = %s",
        (lead_id,),
    )
    row = cur.fetchone()
    assert row is not None
    return dict(
        zip(("state", "attempts", "queue", "next_action_at", "closed_at"), row, strict=True)
    )


def assignment_of(conn: psycopg.Connection[Any], lead_id: int) -> tuple[uuid.UUID, str]:
    row = conn.execute(
        "SELECT id, agent_id FROM assignments WHERE lead_id = %s AND status = 'open'", (lead_id,)
    ).fetchone()
    assert row is not None, f"lead {lead_id} has no open assignment"
    return row[0], row[1]


def test_round_robin_assigns_writes_transitions_and_the_outbox(
    conn: psycopg.Connection[Any],
) -> None:
    for agent in ("a1", "a2", "a3"):
        add_agent(conn, agent)
    leads = [add_lead(conn) for _ in range(9)]

    result = allocator().allocate(conn, NOW)

    assert result.assigned == 9
    assigned = open_assignments(conn)
    assert sorted(assigned) == leads
    assert Counter(assigned.values()) == {"a1": 3, "a2": 3, "a3": 3}
    assert {lead_row(conn, lead)["state"] for lead in leads} == {"assigned"}
    assert {lead_row(conn, lead)["queue"] for lead in leads} == {"loans"}
    transitions = conn.execute(
        "SELECT count(*) FROM lead_transitions WHERE to_state = 'assigned' AND actor = 'allocator'"
    ).fetchone()
    assert transitions == (9,)
    rows = conn.execute("SELECT topic, key, payload FROM outbox ORDER BY id").fetchall()
    assert len(rows) == 9
    for topic, key, payload in rows:
        event = AssignmentEvent.model_validate(payload)
        assert topic == TOPIC
        assert key == event.agent_id
        assert assigned[event.lead_id] == event.agent_id
        assert event.sla_deadline == NOW + timedelta(minutes=5)
        assert event.attempt == 1
        assert event.strategy == "round_robin"
    deadlines = conn.execute("SELECT DISTINCT sla_deadline FROM assignments").fetchall()
    assert deadlines == [(NOW + timedelta(minutes=5),)]


def test_the_rotation_survives_a_restart(conn: psycopg.Connection[Any]) -> None:
    for agent in ("a1", "a2", "a3"):
        add_agent(conn, agent)
    first = add_lead(conn)
    allocator().allocate(conn, NOW)
    second = add_lead(conn)
    allocator().allocate(conn, NOW)  # a new allocator: state comes from the database
    third = add_lead(conn)
    allocator().allocate(conn, NOW)

    assigned = open_assignments(conn)
    assert [assigned[first], assigned[second], assigned[third]] == ["a1", "a2", "a3"]


def test_serving_order_priority_then_realtime_then_age(conn: psycopg.Connection[Any]) -> None:
    add_agent(conn, "a1", capacity=3)
    old_stock = add_lead(conn, realtime=False, queued_at=NOW - timedelta(hours=5))
    new_realtime = add_lead(conn, realtime=True, queued_at=NOW - timedelta(minutes=1))
    old_realtime = add_lead(conn, realtime=True, queued_at=NOW - timedelta(minutes=9))
    urgent = add_lead(conn, priority=90, realtime=False, queued_at=NOW)

    allocator().allocate(conn, NOW)

    assert sorted(open_assignments(conn)) == sorted([urgent, old_realtime, new_realtime])
    assert lead_row(conn, old_stock)["state"] == "queued"


def test_capacity_and_daily_cap_hold_and_freed_capacity_is_used(
    conn: psycopg.Connection[Any],
) -> None:
    add_agent(conn, "a1", capacity=2, daily_cap=3)
    leads = [add_lead(conn) for _ in range(5)]
    config = WorkConfig()
    alloc = allocator(queue(call_window=None))

    alloc.allocate(conn, NOW)
    assert len(open_assignments(conn)) == 2

    assignment_id, _ = assignment_of(conn, leads[0])
    dispose(conn, assignment_id, "a1", "converted", NOW, config)
    alloc.allocate(conn, NOW)
    assert len(open_assignments(conn)) == 2  # capacity 2 again, 3 assigned today

    assignment_id, _ = assignment_of(conn, leads[1])
    dispose(conn, assignment_id, "a1", "not_interested", NOW, config)
    alloc.allocate(conn, NOW)
    assert len(open_assignments(conn)) == 1  # the daily cap (3) is reached
    # The agent's next local day starts at 16:00 UTC (midnight in Shanghai).
    alloc.allocate(conn, datetime(2026, 11, 24, 15, 59, 59, tzinfo=UTC))
    assert len(open_assignments(conn)) == 1
    alloc.allocate(conn, datetime(2026, 11, 24, 16, 0, 1, tzinfo=UTC))
    assert len(open_assignments(conn)) == 2


def test_only_skilled_available_in_shift_agents_get_leads(conn: psycopg.Connection[Any]) -> None:
    add_agent(conn, "away", status="away")
    add_agent(conn, "cars", lines=("car_loan",))
    add_agent(conn, "vip-only", segments=("vip",))
    add_agent(conn, "night", shift=(time(22), time(6)))
    add_agent(conn, "day", shift=(time(9), time(18)))
    leads = [add_lead(conn, segment="standard") for _ in range(4)]

    allocator().allocate(conn, NOW)

    assert set(open_assignments(conn).values()) == {"day"}
    assert len(open_assignments(conn)) == len(leads)


def test_a_phone_put_on_the_dnc_list_after_queueing_is_never_assigned(
    conn: psycopg.Connection[Any],
) -> None:
    add_agent(conn, "a1")
    lead = add_lead(conn, phone="+8613911112222")
    conn.execute("INSERT INTO dnc (phone_e164, reason) VALUES ('+8613911112222', 'complaint')")

    result = allocator().allocate(conn, NOW)

    assert result.assigned == 0
    assert result.blocked == 1
    assert lead_row(conn, lead)["state"] == "do_not_call"
    assert open_assignments(conn) == {}


def test_a_lead_outside_its_call_window_waits_until_it_opens(
    conn: psycopg.Connection[Any],
) -> None:
    add_agent(conn, "a1")
    # 21:00 in New York on 2026-11-23: after the 09:00-21:00 window.
    lead = add_lead(conn, timezone="America/New_York")
    in_shanghai = add_lead(conn, timezone="Asia/Shanghai")

    allocator().allocate(conn, NOW)

    assert open_assignments(conn) == {in_shanghai: "a1"}
    opens = datetime(2026, 11, 24, 14, 0, tzinfo=UTC)  # 09:00 EST
    assert lead_row(conn, lead)["next_action_at"] == opens
    allocator().allocate(conn, opens - timedelta(seconds=1))
    assert lead not in open_assignments(conn)
    allocator().allocate(conn, opens)
    assert open_assignments(conn)[lead] == "a1"


def test_sla_expiry_reassigns_to_another_agent_and_closes_after_max_attempts(
    conn: psycopg.Connection[Any],
) -> None:
    for agent in ("a1", "a2", "a3"):
        add_agent(conn, agent)
    lead = add_lead(conn)
    alloc = allocator(queue(max_attempts=3))
    agents_seen = []
    clock = NOW
    for attempt in (1, 2, 3):
        alloc.allocate(conn, clock)
        _, agent = assignment_of(conn, lead)
        agents_seen.append(agent)
        clock += timedelta(minutes=5)
        assert alloc.expire_slas(conn, clock - timedelta(seconds=1)) == 0
        assert alloc.expire_slas(conn, clock) == 1
        assert lead_row(conn, lead)["attempts"] == attempt

    assert len(set(agents_seen)) == 3  # never back to one who let it expire
    assert lead_row(conn, lead)["state"] == "closed"
    statuses = conn.execute("SELECT status, close_reason FROM assignments").fetchall()
    assert statuses == [("expired", "first-contact SLA expired")] * 3


def test_a_contacted_assignment_does_not_expire(conn: psycopg.Connection[Any]) -> None:
    add_agent(conn, "a1")
    lead = add_lead(conn)
    alloc = allocator()
    alloc.allocate(conn, NOW)
    assignment_id, _ = assignment_of(conn, lead)

    first_contact(conn, assignment_id, "a1", NOW + timedelta(minutes=1))

    assert alloc.expire_slas(conn, NOW + timedelta(hours=1)) == 0
    assert lead_row(conn, lead)["state"] == "in_progress"


def test_a_rejected_lead_goes_to_another_agent_not_counted_as_an_attempt(
    conn: psycopg.Connection[Any],
) -> None:
    add_agent(conn, "a1")
    lead = add_lead(conn)
    alloc = allocator()
    alloc.allocate(conn, NOW)
    assignment_id, agent = assignment_of(conn, lead)

    reject(conn, assignment_id, agent, "speaks only Cantonese", NOW, WorkConfig())
    alloc.allocate(conn, NOW)
    assert open_assignments(conn) == {}  # the only agent rejected it: it waits
    add_agent(conn, "a2")
    alloc.allocate(conn, NOW)

    assert open_assignments(conn) == {lead: "a2"}
    assert lead_row(conn, lead)["attempts"] == 0


def test_dispositions_recycle_as_configured(conn: psycopg.Connection[Any]) -> None:
    add_agent(conn, "a1")
    leads = {
        outcome: add_lead(conn, phone=f"+86150{n:08d}")
        for n, outcome in enumerate(
            (
                "no_answer",
                "callback",
                "converted",
                "not_interested",
                "invalid_number",
                "do_not_call",
            )
        )
    }
    allocator().allocate(conn, NOW)
    config = WorkConfig(no_answer_delays=(timedelta(minutes=30), timedelta(hours=2)))
    callback_at = NOW + timedelta(days=1)
    for outcome, lead in leads.items():
        assignment_id, _ = assignment_of(conn, lead)
        dispose(
            conn,
            assignment_id,
            "a1",
            outcome,  # type: ignore[arg-type]
            NOW,
            config,
            note=f"called: {outcome}",
            callback_at=callback_at if outcome == "callback" else None,
        )

    states = {outcome: lead_row(conn, lead) for outcome, lead in leads.items()}
    assert states["no_answer"]["state"] == "queued"
    assert states["no_answer"]["attempts"] == 1
    assert states["no_answer"]["next_action_at"] == NOW + timedelta(minutes=30)
    assert states["callback"]["state"] == "queued"
    assert states["callback"]["next_action_at"] == callback_at
    assert states["callback"]["attempts"] == 0
    assert states["converted"]["state"] == "converted"
    assert states["not_interested"]["state"] == "closed"
    assert states["invalid_number"]["state"] == "closed"
    assert states["do_not_call"]["state"] == "do_not_call"
    assert conn.execute("SELECT phone_e164 FROM dnc").fetchall() == [("+8615000000005",)]
    notes = conn.execute("SELECT outcome, note, agent_id FROM dispositions ORDER BY id").fetchall()
    assert [n[0] for n in notes] == list(leads)
    assert all(note == f"called: {outcome}" and agent == "a1" for outcome, note, agent in notes)

    # The retries come back when due, not before.
    alloc = allocator()
    alloc.allocate(conn, NOW + timedelta(minutes=29))
    assert open_assignments(conn) == {}
    alloc.allocate(conn, NOW + timedelta(minutes=30))
    assert open_assignments(conn) == {leads["no_answer"]: "a1"}


def test_no_answer_closes_the_lead_at_max_attempts(conn: psycopg.Connection[Any]) -> None:
    add_agent(conn, "a1")
    lead = add_lead(conn)
    alloc = allocator(queue(max_attempts=2))
    config = WorkConfig(max_attempts={"loans": 2}, no_answer_delays=(timedelta(minutes=1),))
    clock = NOW
    for _ in range(2):
        alloc.allocate(conn, clock)
        assignment_id, _ = assignment_of(conn, lead)
        dispose(conn, assignment_id, "a1", "no_answer", clock, config)
        clock += timedelta(minutes=2)

    assert lead_row(conn, lead)["state"] == "closed"
    assert lead_row(conn, lead)["attempts"] == 2


def test_agents_act_only_on_their_own_open_assignments(conn: psycopg.Connection[Any]) -> None:
    add_agent(conn, "a1")
    add_agent(conn, "a2", status="away")
    lead = add_lead(conn)
    allocator().allocate(conn, NOW)
    assignment_id, _ = assignment_of(conn, lead)
    config = WorkConfig()

    with pytest.raises(AssignmentNotFound):
        dispose(conn, assignment_id, "a2", "converted", NOW, config)
    with pytest.raises(AssignmentNotFound):
        first_contact(conn, uuid.uuid4(), "a1", NOW)
    dispose(conn, assignment_id, "a1", "converted", NOW, config)
    with pytest.raises(AssignmentClosed):
        dispose(conn, assignment_id, "a1", "not_interested", NOW, config)
    assert lead_row(conn, lead)["state"] == "converted"


def test_sticky_sends_a_returning_customer_to_the_agent_who_worked_them(
    conn: psycopg.Connection[Any],
) -> None:
    for agent in ("a1", "a2", "a3"):
        add_agent(conn, agent)
    alloc = allocator(queue(strategy="sticky"))
    first = add_lead(conn)
    alloc.allocate(conn, NOW)
    assignment_id, agent = assignment_of(conn, first)
    dispose(conn, assignment_id, agent, "not_interested", NOW, WorkConfig())
    customer = conn.execute("SELECT customer_id FROM leads WHERE id = %s", (first,)).fetchone()
    assert customer is not None
    for _ in range(3):  # other customers move the rotation on
        add_lead(conn)
    returning = add_lead(conn, customer_id=customer[0], queued_at=NOW - timedelta(hours=1))

    alloc.allocate(conn, NOW)

    assert open_assignments(conn)[returning] == agent
    reason = conn.execute(
        "SELECT strategy, reason FROM assignments WHERE lead_id = %s AND status = 'open'",
        (returning,),
    ).fetchone()
    assert reason is not None
    assert reason[0] == "sticky"
    assert agent in reason[1]


def test_routing_first_matching_queue_then_implicit_queues(conn: psycopg.Connection[Any]) -> None:
    add_agent(conn, "a1", lines=("*",))
    vip = add_lead(conn, segment="vip")
    standard = add_lead(conn, segment="standard")
    car = add_lead(conn, line="car_loan")
    queues = (queue("vip", segments=frozenset({"vip"})), queue("loans"))

    allocator(*queues).allocate(conn, NOW)
    assert [lead_row(conn, lead)["queue"] for lead in (vip, standard, car)] == [
        "vip",
        "loans",
        "car_loan",
    ]

    leftover = add_lead(conn, line="car_loan")
    allocator(*queues, implicit_queues=False).allocate(conn, NOW)
    assert lead_row(conn, leftover)["queue"] is None
    assert lead_row(conn, leftover)["state"] == "queued"


def test_a_removed_queue_sends_its_leads_back_to_routing(conn: psycopg.Connection[Any]) -> None:
    lead = add_lead(conn, segment="vip")
    allocator(queue("vip", segments=frozenset({"vip"}))).route(conn)
    assert lead_row(conn, lead)["queue"] == "vip"

    alloc = allocator(queue("loans"))
    alloc.sync_queues(conn)
    alloc.route(conn)

    assert lead_row(conn, lead)["queue"] == "loans"


def test_concurrent_allocators_never_double_assign_or_overfill(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as setup:
        for n in range(8):
            add_agent(setup, f"a{n}", capacity=20, daily_cap=25)
        for n in range(300):
            add_lead(setup, segment="vip" if n % 3 else "standard")
    queues = (queue("vip", segments=frozenset({"vip"}), strategy="weighted"), queue("loans"))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                alloc = allocator(*queues, batch_size=17)
                for _ in range(5):
                    alloc.allocate(conn, NOW)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    with psycopg.connect(db_url) as conn:
        per_agent: dict[str, int] = dict(
            conn.execute("SELECT agent_id, count(*) FROM assignments GROUP BY agent_id").fetchall()
        )
        assert per_agent
        assert max(per_agent.values()) <= 20
        assert sum(per_agent.values()) == 8 * 20  # every slot filled: leads were plenty
        double = conn.execute(
            "SELECT lead_id FROM assignments GROUP BY lead_id HAVING count(*) > 1"
        ).fetchall()
        assert double == []


def test_queue_stats_show_depth_due_open_and_breaches(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    add_agent(conn, "a1", capacity=2)
    for _ in range(3):
        add_lead(conn)
    later = add_lead(conn)
    allocator(queue(call_window=None)).allocate(conn, NOW)  # two assigned, two waiting
    conn.execute(
        "UPDATE leads SET next_action_at = now() + interval '1 hour' WHERE id = %s", (later,)
    )
    conn.execute("UPDATE assignments SET sla_deadline = now() - interval '1 second'")
    engine = make_engine(db_url)
    try:
        stats = queue_stats(engine)
        agents = agent_counts(engine)
    finally:
        engine.dispose()

    (loans,) = stats
    assert loans["queue"] == "loans"
    assert (loans["waiting"], loans["due"], loans["open"], loans["sla_breached"]) == (2, 1, 2, 2)
    assert loans["oldest_seconds"] is not None
    assert agents == {"available": 1, "away": 0, "offline": 0}


def test_an_implicit_queue_is_reused_pass_after_pass(conn: psycopg.Connection[Any]) -> None:
    add_agent(conn, "a1", lines=("*",))
    alloc = allocator()
    first = add_lead(conn, line="car_loan")
    alloc.allocate(conn, NOW)
    second = add_lead(conn, line="car_loan")
    alloc.allocate(conn, NOW)

    assert [lead_row(conn, lead)["queue"] for lead in (first, second)] == ["car_loan", "car_loan"]
    assert sorted(alloc.queues) == ["car_loan", "loans"]


def test_leads_nobody_may_take_do_not_hide_the_ones_behind_them(
    conn: psycopg.Connection[Any],
) -> None:
    add_agent(conn, "vip-desk", segments=("vip",))
    for _ in range(5):  # first in line, but no agent is skilled for them
        add_lead(conn, segment="standard", priority=90)
    vip = add_lead(conn, segment="vip", priority=10)

    allocator(batch_size=2, scan_batches=1).allocate(conn, NOW)
    assert open_assignments(conn) == {}  # looked at one batch only
    allocator(batch_size=2).allocate(conn, NOW)
    assert open_assignments(conn) == {vip: "vip-desk"}


def test_the_scan_stops_when_no_agent_has_room(conn: psycopg.Connection[Any]) -> None:
    add_agent(conn, "a1", capacity=1)
    leads = [add_lead(conn) for _ in range(7)]
    alloc = allocator(batch_size=2)
    queries: list[str] = []

    original = conn.execute

    def counting(query: Any, *args: Any, **kwargs: Any) -> Any:
        queries.append(str(query))
        return original(query, *args, **kwargs)

    conn.execute = counting  # type: ignore[method-assign]
    alloc.allocate(conn, NOW)
    conn.execute = original  # type: ignore[method-assign]

    assert len(open_assignments(conn)) == 1
    assert leads[0] in open_assignments(conn)
    # One batch placed the lead, the next found the agent full and stopped the scan.
    assert sum("FOR UPDATE OF l SKIP LOCKED" in q for q in queries) == 2


def test_a_service_pass_sweeps_allocates_and_counts(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as setup:
        add_agent(setup, "a1")
        add_lead(setup, phone="+8613911113333")
        setup.execute("INSERT INTO dnc (phone_e164) VALUES ('+8613911113333')")
        for _ in range(2):
            add_lead(setup)

    def sample(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    before = (
        sample("leadflow_assignments_total", {"queue": "loans", "strategy": "round_robin"}),
        sample("leadflow_allocation_blocked_total"),
        sample("leadflow_speed_to_lead_seconds_count", {"queue": "loans"}),
        sample("leadflow_speed_to_lead_seconds_sum", {"queue": "loans"}),
    )
    service = AllocatorService(
        allocator(queue(call_window=None)), lambda: psycopg.connect(db_url, autocommit=True)
    )
    try:
        result = service.run_pass()
    finally:
        service._drop_connection()

    assert (result.assigned, result.blocked) == (2, 1)
    after = (
        sample("leadflow_assignments_total", {"queue": "loans", "strategy": "round_robin"}),
        sample("leadflow_allocation_blocked_total"),
        sample("leadflow_speed_to_lead_seconds_count", {"queue": "loans"}),
        sample("leadflow_speed_to_lead_seconds_sum", {"queue": "loans"}),
    )
    assert after[0] - before[0] == 2
    assert after[1] - before[1] == 1
    assert after[2] - before[2] == 2  # two first assignments, each waited since queued_at
    assert after[3] - before[3] >= 2 * 60  # queued a minute before NOW, assigned after it
    assert sample("leadflow_queue_depth", {"queue": "loans"}) == 0
