"""Persist and merge (CONTRACT.md §4) on a real PostgreSQL: exact database state."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.chain import Accepted, ChainConfig, IntakeChain, Record
from ingest.store import LeadStore, Offset
from schemas.lead import Classification, CustomerContext, Lead

CHAIN = IntakeChain(ChainConfig(default_region="CN"))
PHONES = ["138 0013 8000", "139 1234 5678", "+86 186 0000 1111", "150-2222-3333"]


def by_product(
    leads: Sequence[Lead], now: datetime, context: Mapping[str, CustomerContext]
) -> list[Classification]:
    """A small real classifier: line from the product, priority from an attribute."""
    return [
        Classification(
            business_line=lead.product or "general",
            segment="returning" if context[lead.phone].is_returning_customer else "new",
            priority=int(lead.attributes.get("priority", 50)),
            matched_rules=(f"line:{lead.product or 'default'}",),
            rules_version="test-v1",
        )
        for lead in leads
    ]


def event(phone: str = PHONES[0], product: str = "car_loan", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "schema_version": 1,
        "event_id": str(uuid.uuid4()),
        "occurred_at": "2026-11-23T09:15:02+08:00",
        "source": "loan-app",
        "event_type": "browse",
        "customer": {"phone": phone, "external_id": f"u-{phone[-4:]}", "name": " 张  三 "},
        "product": product,
    }
    base.update(extra)
    return base


def accepted(*events: dict[str, Any]) -> list[Accepted]:
    outcomes = CHAIN.process(
        [Record(json.dumps(e, ensure_ascii=False).encode()) for e in events], "realtime"
    )
    assert all(isinstance(o, Accepted) for o in outcomes)
    return outcomes  # type: ignore[return-value]


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url) as connection:
        yield connection


def rows(conn: psycopg.Connection, query: str, *args: Any) -> list[tuple[Any, ...]]:
    return conn.execute(query, args).fetchall()


def test_new_merged_and_redelivered_events(conn: psycopg.Connection) -> None:
    store = LeadStore()
    e1, e2, e3 = event(), event(attributes={"amount": 1}), event(phone=PHONES[1])
    result = store.write(conn, accepted(e1, e2, e3), by_product)
    assert result.outcomes == ["new", "merged", "new"]
    assert result.lead_ids[0] == result.lead_ids[1] != result.lead_ids[2]

    leads = rows(
        conn,
        "SELECT c.phone_e164, l.business_line, l.segment, l.state, l.event_count, l.matched_rules,"
        " l.rules_version, l.attributes, l.queued_at IS NOT NULL FROM leads l JOIN customers c"
        " ON c.id = l.customer_id ORDER BY l.id",
    )
    assert leads == [
        (
            "+8613800138000",
            "car_loan",
            "new",
            "queued",
            2,
            ["line:car_loan"],
            "test-v1",
            {"amount": 1},
            True,
        ),
        ("+8613912345678", "car_loan", "new", "queued", 1, ["line:car_loan"], "test-v1", {}, True),
    ]
    assert rows(conn, "SELECT name FROM customers ORDER BY id") == [("张 三",), ("张 三",)]
    assert rows(conn, "SELECT count(*) FROM customer_identities") == [(2,)]
    transitions = rows(conn, "SELECT from_state, to_state, actor FROM lead_transitions ORDER BY id")
    assert transitions == [(None, "queued", "intake"), (None, "queued", "intake")]
    assert {r[0] for r in rows(conn, "SELECT event_id FROM lead_events")} == {
        e1["event_id"], e2["event_id"], e3["event_id"],
    }  # fmt: skip

    again = store.write(conn, accepted(e1, e2, e3, e1), by_product)
    assert again.outcomes == ["duplicate"] * 4
    assert rows(conn, "SELECT count(*) FROM lead_events") == [(3,)]
    assert rows(conn, "SELECT sum(event_count) FROM leads") == [(3,)]


def test_returning_customer_other_line_and_duplicate_in_one_batch(conn: psycopg.Connection) -> None:
    store = LeadStore()
    store.write(conn, accepted(event()), by_product)
    first = event(product="wealth_management")
    result = store.write(conn, accepted(first, first), by_product)
    assert result.outcomes == ["new", "duplicate"]
    assert rows(conn, "SELECT business_line, segment FROM leads ORDER BY id") == [
        ("car_loan", "new"),
        ("wealth_management", "returning"),
    ]


def test_window_and_closed_leads_start_new_leads(conn: psycopg.Connection) -> None:
    store = LeadStore()
    store.write(conn, accepted(event()), by_product)
    conn.execute("UPDATE leads SET created_at = now() - interval '31 days'")
    conn.commit()
    assert store.write(conn, accepted(event()), by_product).outcomes == ["new"]
    conn.execute("UPDATE leads SET state = 'closed' WHERE created_at > now() - interval '1 day'")
    conn.commit()
    assert store.write(conn, accepted(event()), by_product).outcomes == ["new"]
    assert rows(conn, "SELECT count(*) FROM leads") == [(3,)]


def test_priority_only_rises_and_brings_its_segment(conn: psycopg.Connection) -> None:
    store = LeadStore()
    store.write(conn, accepted(event(attributes={"priority": 40})), by_product)
    store.write(conn, accepted(event(attributes={"priority": 90})), by_product)
    store.write(conn, accepted(event(attributes={"priority": 10})), by_product)
    assert rows(conn, "SELECT priority, segment, event_count FROM leads") == [(90, "returning", 3)]


def test_dnc_and_consent(conn: psycopg.Connection) -> None:
    store = LeadStore()
    conn.execute("INSERT INTO dnc (phone_e164, reason) VALUES ('+8613912345678', 'asked')")
    conn.commit()
    result = store.write(
        conn,
        accepted(event(phone=PHONES[1]), event(phone=PHONES[2], consent={"telemarketing": False})),
        by_product,
    )
    assert result.outcomes == ["new", "new"]
    assert rows(conn, "SELECT state, closed_at IS NOT NULL, queued_at FROM leads ORDER BY id") == [
        ("do_not_call", True, None),
        ("do_not_call", True, None),
    ]
    reasons = [r[0] for r in rows(conn, "SELECT reason FROM lead_transitions ORDER BY id")]
    assert "do-not-call list" in reasons[0]
    assert "no consent" in reasons[1]


def test_consent_withdrawn_closes_the_open_lead_and_revokes_its_assignment(
    conn: psycopg.Connection,
) -> None:
    store = LeadStore()
    [lead_id] = store.write(conn, accepted(event()), by_product).lead_ids
    conn.execute(
        "INSERT INTO agents (id, name, capacity, daily_cap) VALUES ('a1', 'Agent', 5, 50);"
    )
    conn.execute(
        "INSERT INTO assignments (lead_id, agent_id, queue, strategy, reason, attempt)"
        " VALUES (%s, 'a1', 'q', 'round_robin', 'test', 1)",
        (lead_id,),
    )
    conn.execute("UPDATE leads SET state = 'assigned' WHERE id = %s", (lead_id,))
    conn.commit()
    result = store.write(conn, accepted(event(consent={"telemarketing": False})), by_product)
    assert result.outcomes == ["merged"]
    assert rows(conn, "SELECT state FROM leads") == [("do_not_call",)]
    assert rows(conn, "SELECT status, closed_at IS NOT NULL FROM assignments") == [
        ("revoked", True)
    ]
    last = rows(
        conn, "SELECT from_state, to_state, reason FROM lead_transitions ORDER BY id DESC LIMIT 1"
    )
    assert last == [("assigned", "do_not_call", "consent withdrawn")]


def test_offsets_commit_with_the_batch_and_roll_back_with_it(conn: psycopg.Connection) -> None:
    store = LeadStore()
    store.write(
        conn,
        accepted(event()),
        by_product,
        offsets=[Offset("leads.raw", 0, 11)],
        consumer_group="g",
    )
    assert rows(conn, "SELECT topic, partition, next_offset FROM consumer_offsets") == [
        ("leads.raw", 0, 11)
    ]

    def broken(
        leads: Sequence[Lead], now: datetime, context: Mapping[str, CustomerContext]
    ) -> list[Classification]:
        raise RuntimeError("classifier bug")

    with pytest.raises(RuntimeError):
        store.write(
            conn,
            accepted(event()),
            broken,
            offsets=[Offset("leads.raw", 0, 12)],
            consumer_group="g",
        )
    assert rows(conn, "SELECT next_offset FROM consumer_offsets") == [(11,)]
    assert rows(conn, "SELECT count(*) FROM lead_events") == [(1,)]


def snapshot(conn: psycopg.Connection) -> dict[str, Any]:
    """The database state with ids replaced by stable keys."""
    leads = rows(
        conn,
        "SELECT l.id, c.phone_e164, l.business_line, l.segment, l.priority, l.state, l.event_count,"
        " l.first_event_at, l.last_event_at, l.attributes, l.matched_rules FROM leads l"
        " JOIN customers c ON c.id = l.customer_id ORDER BY l.id",
    )
    key = {row[0]: n for n, row in enumerate(leads)}
    return {
        "leads": [row[1:] for row in leads],
        "events": sorted(
            (e, key[lead]) for e, lead in rows(conn, "SELECT event_id, lead_id FROM lead_events")
        ),
        "transitions": [
            (key[lead], f, t)
            for lead, f, t in rows(
                conn, "SELECT lead_id, from_state, to_state FROM lead_transitions ORDER BY id"
            )
        ],
        "customers": rows(conn, "SELECT phone_e164, name FROM customers ORDER BY phone_e164"),
    }


event_strategy = st.builds(
    lambda phone, product, priority, consent, day, repeat: (
        event(
            phone=phone,
            product=product,
            attributes={"priority": priority},
            consent={"telemarketing": consent},
            occurred_at=f"2026-11-{day:02d}T10:00:00+08:00",
        ),
        repeat,
    ),
    phone=st.sampled_from(PHONES[:3]),
    product=st.sampled_from(["car_loan", "wealth_management"]),
    priority=st.integers(0, 100),
    consent=st.sampled_from([True, True, True, None, False]),
    day=st.integers(1, 28),
    repeat=st.booleans(),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(event_strategy, min_size=1, max_size=12))
def test_a_batch_equals_its_events_one_by_one(
    conn: psycopg.Connection, draws: list[tuple[dict[str, Any], bool]]
) -> None:
    events: list[dict[str, Any]] = []
    for item, repeat in draws:
        events.append(item)
        if repeat:  # a redelivery inside the batch
            events.append(item)
    states = []
    for batches in ([events], [[e] for e in events]):
        # Each write's transaction nests as a savepoint inside one that is always rolled back.
        with conn.transaction(force_rollback=True):
            store = LeadStore()
            for batch in batches:
                store.write(conn, accepted(*batch), by_product)
            states.append(snapshot(conn))
    assert states[0] == states[1]
