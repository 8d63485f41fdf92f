"""The allocation decision, rule by rule and strategy by strategy, on a frozen clock.

NOW is 10:00 in Shanghai, 02:00 in London and 21:00 (the evening before) in New York.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from allocate.decide import decide
from allocate.model import (
    ANY,
    AgentSnapshot,
    Assign,
    Block,
    Defer,
    Outcome,
    QueueSpec,
    QueueState,
    WaitingLead,
    Window,
)
from schemas.vocab import Strategy

NOW = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


def queue(strategy: Strategy = "round_robin", **changes: Any) -> QueueSpec:
    spec = QueueSpec(
        name="car-hot",
        business_line="car_loan",
        segments=frozenset(),
        strategy=strategy,
        fallback_strategy="least_loaded",
        sla=timedelta(minutes=15),
        max_attempts=3,
        call_window=None,
        default_timezone="Asia/Shanghai",
    )
    return dataclasses.replace(spec, **changes)


def agent(agent_id: str, **changes: Any) -> AgentSnapshot:
    snapshot = AgentSnapshot(
        id=agent_id,
        business_lines=frozenset({"car_loan"}),
        segments=frozenset({ANY}),
        languages=frozenset(),
        capacity=10,
        daily_cap=100,
        weight=1.0,
        timezone="Asia/Shanghai",
        shift=None,
        status="available",
        open_count=0,
        today_count=0,
    )
    return dataclasses.replace(snapshot, **changes)


def lead(lead_id: int, **changes: Any) -> WaitingLead:
    waiting = WaitingLead(
        id=lead_id,
        customer_id=1000 + lead_id,
        business_line="car_loan",
        segment="hot",
        priority=50,
        realtime=False,
        queued_at=NOW - timedelta(minutes=10),
        attempts=0,
        timezone="Asia/Shanghai",
    )
    return dataclasses.replace(waiting, **changes)


def leads(count: int, first: int = 1) -> list[WaitingLead]:
    return [lead(n) for n in range(first, first + count)]


def assigned(outcome: Outcome) -> list[tuple[int, str]]:
    return [(a.lead_id, a.agent_id) for a in outcome.assignments]


def counts(outcome: Outcome) -> Counter[str]:
    return Counter(a.agent_id for a in outcome.assignments)


# --- the rules, in order -----------------------------------------------------------------------


def test_an_assignment_records_strategy_reason_attempt_and_sla() -> None:
    outcome = decide(queue(), [lead(1, attempts=1)], [agent("a-1")], QueueState(), NOW)
    assert outcome.assignments == [
        Assign(1, "a-1", "round_robin", "round robin, first turn", 2, NOW + timedelta(minutes=15))
    ]
    assert (outcome.deferred, outcome.blocked, outcome.waiting) == ([], [], {})


def test_leads_are_served_by_priority_then_real_time_then_age_then_id() -> None:
    early = NOW - timedelta(hours=1)
    batch = [
        lead(1, priority=10, realtime=True),
        lead(2, priority=90, queued_at=early),
        lead(3, priority=90, realtime=True),
        lead(4, priority=90, queued_at=early),
        lead(5, priority=90),
    ]
    outcome = decide(queue(), batch, [agent("a-1", capacity=4)], QueueState(), NOW)
    assert [a.lead_id for a in outcome.assignments] == [3, 2, 4, 5]
    assert outcome.waiting == {1: "the only eligible agent is at capacity or daily cap"}


def test_do_not_call_leads_are_blocked_whoever_is_free() -> None:
    outcome = decide(queue(), [lead(1, dnc=True)], [agent("a-1")], QueueState(), NOW)
    assert outcome.blocked == [Block(1, "do_not_call", "phone on the do-not-call list")]
    assert outcome.assignments == []


def test_leads_out_of_attempts_are_closed() -> None:
    batch = [lead(1, attempts=3), lead(2, attempts=2)]
    outcome = decide(queue(max_attempts=3), batch, [agent("a-1")], QueueState(), NOW)
    assert outcome.blocked == [Block(1, "closed", "3 attempts made, the queue allows 3")]
    assert [(a.lead_id, a.attempt) for a in outcome.assignments] == [(2, 3)]


def test_outside_the_call_window_leads_wait_for_it_in_their_own_timezone() -> None:
    batch = [
        lead(1, timezone="Asia/Shanghai"),  # 10:00: open
        lead(2, timezone="America/New_York"),  # 21:00: closed until 09:00 EST
        lead(3, timezone="Europe/London"),  # 02:00: closed until 09:00 GMT
        lead(4, timezone="Mars/Olympus"),  # unknown: the queue's default, Shanghai
    ]
    outcome = decide(
        queue(call_window=Window.parse("09:00-21:00")), batch, [agent("a-1")], QueueState(), NOW
    )
    assert [a.lead_id for a in outcome.assignments] == [1, 4]
    assert outcome.deferred == [
        Defer(
            2,
            datetime(2026, 11, 24, 14, 0, tzinfo=UTC),
            "outside the call window 09:00-21:00: 21:00 in America/New_York",
        ),
        Defer(
            3,
            datetime(2026, 11, 24, 9, 0, tzinfo=UTC),
            "outside the call window 09:00-21:00: 02:00 in Europe/London",
        ),
    ]


def test_a_lead_without_a_known_timezone_uses_the_queue_default() -> None:
    spec = queue(call_window=Window.parse("09:00-21:00"), default_timezone="America/New_York")
    outcome = decide(spec, [lead(1, timezone=None)], [agent("a-1")], QueueState(), NOW)
    assert outcome.deferred == [
        Defer(
            1,
            datetime(2026, 11, 24, 14, 0, tzinfo=UTC),
            "outside the call window 09:00-21:00: 21:00 in America/New_York (queue default)",
        )
    ]


def test_the_call_window_opening_on_a_spring_forward_day() -> None:
    """New York, 2026-03-08: 02:00 EST jumps to 03:00 EDT, so a 02:30 window opens at 03:00."""
    spec = queue(call_window=Window.parse("02:30-20:00"))
    now = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)  # 01:00 EST
    outcome = decide(
        spec, [lead(1, timezone="America/New_York")], [agent("a-1")], QueueState(), now
    )
    assert [d.until for d in outcome.deferred] == [datetime(2026, 3, 8, 7, 0, tzinfo=UTC)]


def test_shifts_are_read_on_the_agent_s_own_clock() -> None:
    roster = [
        agent("a-sh", shift=Window.parse("09:00-18:00")),  # 10:00 in Shanghai: on
        agent("a-ldn", timezone="Europe/London", shift=Window.parse("09:00-17:00")),  # 02:00: off
        agent("a-ny", timezone="America/New_York", shift=Window.parse("22:00-06:00")),  # 21:00: off
        agent("a-night", timezone="Europe/London", shift=Window.parse("22:00-06:00")),  # 02:00: on
    ]
    outcome = decide(queue(), leads(4), roster, QueueState(), NOW)
    assert counts(outcome) == {"a-night": 2, "a-sh": 2}


def test_nobody_on_shift_or_available_is_explained() -> None:
    roster = [
        agent("a-1", shift=Window.parse("12:00-20:00")),
        agent("a-2", status="away"),
        agent("a-3", status="offline"),
        agent("a-4", business_lines=frozenset({"wealth"})),
    ]
    outcome = decide(queue(), [lead(1)], roster, QueueState(), NOW)
    assert outcome.waiting == {
        1: "no agent skilled for car_loan/hot is available and on shift (1 away, 1 off shift, 1 offline)"
    }


def test_capacity_and_the_daily_cap_count_this_decision_s_assignments() -> None:
    roster = [agent("a-1", capacity=3, open_count=2), agent("a-2", daily_cap=5, today_count=4)]
    outcome = decide(queue(), leads(4), roster, QueueState(), NOW)
    assert counts(outcome) == {"a-1": 1, "a-2": 1}
    assert outcome.waiting == {
        3: "all 2 eligible agents at capacity or daily cap",
        4: "all 2 eligible agents at capacity or daily cap",
    }


def test_agents_who_already_had_a_lead_do_not_get_it_again() -> None:
    roster = [agent("a-1"), agent("a-2", capacity=1, open_count=1)]
    batch = [
        lead(1, excluded_agents=frozenset({"a-1"})),
        lead(2, excluded_agents=frozenset({"a-1", "a-2"})),
    ]
    outcome = decide(queue(), batch, roster, QueueState(), NOW)
    assert outcome.waiting == {
        1: "only agents who already had it have room; 1 more at capacity or daily cap",
        2: "only agents who already had it have room; 1 more at capacity or daily cap",
    }
    outcome = decide(queue(), batch[1:], [agent("a-1"), agent("a-2")], QueueState(), NOW)
    assert outcome.waiting == {2: "only agents who already had it are available"}
    outcome = decide(
        queue("least_loaded"),
        batch[:1],
        [agent("a-1"), agent("a-2", open_count=5)],
        QueueState(),
        NOW,
    )
    assert assigned(outcome) == [(1, "a-2")]


def test_languages_business_lines_and_segments() -> None:
    roster = [
        agent("a-en", languages=frozenset({"en"})),
        agent("a-vip", segments=frozenset({"vip"}), languages=frozenset({"zh"})),
        agent("a-any", business_lines=frozenset({ANY}), segments=frozenset({"vip"})),
    ]
    batch = [
        lead(1, language="zh"),  # hot in zh: nobody
        lead(2, language=None),  # hot, no language: a-en
        lead(3, segment="vip", language="zh"),  # a-vip or a-any (every language)
        lead(4, segment="vip", language="en"),  # a-any only
        lead(5, business_line="wealth", segment="vip", language="fr"),  # a-any (every line)
        lead(6, business_line="wealth", segment="hot"),  # nobody
    ]
    outcome = decide(queue("least_loaded"), batch, roster, QueueState(), NOW)
    assert assigned(outcome) == [(2, "a-en"), (3, "a-any"), (4, "a-any"), (5, "a-any")]
    assert outcome.waiting == {
        1: "no agent is skilled for car_loan/hot in zh",
        6: "no agent is skilled for wealth/hot",
    }


def test_inputs_are_not_changed_and_naive_now_is_refused() -> None:
    state = QueueState(rr_cursor="a-1", virtual_time=2.0, agent_vtime={"a-1": 3.0})
    decide(queue("weighted"), leads(3), [agent("a-1"), agent("a-2")], state, NOW)
    assert state == QueueState(rr_cursor="a-1", virtual_time=2.0, agent_vtime={"a-1": 3.0})
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(queue(), [], [], QueueState(), datetime(2026, 1, 1))  # noqa: DTZ001


# --- strategies --------------------------------------------------------------------------------


def test_round_robin_continues_across_calls_and_roster_changes() -> None:
    first = decide(queue(), leads(4), [agent("a-1"), agent("a-2"), agent("a-3")], QueueState(), NOW)
    assert [a.agent_id for a in first.assignments] == ["a-1", "a-2", "a-3", "a-1"]
    assert first.assignments[1].reason == "round robin after a-1"
    assert first.state.rr_cursor == "a-1"
    # a-2 leaves, a-0 and a-4 join: the rotation goes on after a-1 instead of restarting
    roster = [agent("a-0"), agent("a-1"), agent("a-3"), agent("a-4")]
    second = decide(queue(), leads(5, first=5), roster, first.state, NOW)
    assert [a.agent_id for a in second.assignments] == ["a-3", "a-4", "a-0", "a-1", "a-3"]
    # an agent at capacity is skipped without losing the turn order
    third = decide(
        queue(),
        leads(2, first=10),
        [agent("a-1"), agent("a-3", capacity=0), agent("a-4")],
        second.state,
        NOW,
    )
    assert [a.agent_id for a in third.assignments] == ["a-4", "a-1"]


def test_least_loaded_compares_load_relative_to_capacity() -> None:
    roster = [
        agent("a-1", capacity=10, open_count=3),  # 0.3
        agent("a-2", capacity=5, open_count=1),  # 0.2
        agent("a-3", capacity=10, open_count=1),  # 0.1
    ]
    outcome = decide(queue("least_loaded"), leads(3), roster, QueueState(), NOW)
    assert [a.agent_id for a in outcome.assignments] == ["a-3", "a-2", "a-3"]
    assert outcome.assignments[0].reason == "least loaded (1/10 open)"


def test_least_loaded_breaks_ties_by_open_count_then_fair_queueing_start_then_id() -> None:
    roster = [
        agent("a-1", capacity=4, open_count=2),
        agent("a-2", capacity=2, open_count=1),
        agent("a-3", capacity=2, open_count=1),
    ]
    # a-2 and a-3 tie on 1/2 and 1 open, below a-1's 2 open; a-2 started later on the clocks
    state = QueueState(virtual_time=1.0, agent_vtime={"a-2": 3.0, "a-3": 2.0})
    outcome = decide(queue("least_loaded"), leads(1), roster, state, NOW)
    assert assigned(outcome) == [(1, "a-3")]
    outcome = decide(queue("least_loaded"), leads(1), roster, QueueState(virtual_time=1.0), NOW)
    assert assigned(outcome) == [(1, "a-2")]


def test_weighted_shares_leads_by_weight() -> None:
    roster = [
        agent(f"a-{n}", weight=weight, capacity=100) for n, weight in [(1, 1.0), (2, 3.0), (3, 2.0)]
    ]
    outcome = decide(queue("weighted"), leads(60), roster, QueueState(), NOW)
    assert counts(outcome) == {"a-1": 10, "a-2": 30, "a-3": 20}
    assert outcome.assignments[0].reason == "weighted fair share (weight 3)"
    assert outcome.state.virtual_time == pytest.approx(29 / 3)  # the last start: a-2, 30th lead


def test_weighted_gives_a_light_agent_its_share_too() -> None:
    """Picking by finish tag with a start-tag clock would give a-1 nothing here."""
    roster = [agent("a-1", weight=1.0, capacity=200), agent("a-2", weight=10.0, capacity=200)]
    outcome = decide(queue("weighted"), leads(110), roster, QueueState(), NOW)
    assert counts(outcome) == {"a-1": 10, "a-2": 100}


@pytest.mark.parametrize("strategy", ["weighted", "least_loaded", "round_robin"])
def test_an_agent_back_from_a_break_is_not_flooded(strategy: Strategy) -> None:
    """a-3 was away while a-1 and a-2 took 50 leads each: it rejoins at the queue's virtual
    time and takes its third, not all the leads until it has caught up."""
    state = QueueState(
        rr_cursor="a-2", virtual_time=49.0, agent_vtime={"a-1": 50.0, "a-2": 50.0, "a-3": 0.0}
    )
    roster = [agent(f"a-{n}", capacity=200) for n in (1, 2, 3)]
    outcome = decide(queue(strategy), leads(30), roster, state, NOW)
    assert counts(outcome) == {"a-1": 10, "a-2": 10, "a-3": 10}
    assert outcome.state.agent_vtime["a-3"] > 49.0


def test_every_strategy_advances_the_fair_queueing_clocks() -> None:
    state = QueueState(virtual_time=5.0, agent_vtime={"a-1": 7.0, "gone": 1.0})
    roster = [agent("a-1", weight=2.0), agent("a-2", weight=4.0)]
    outcome = decide(queue("round_robin"), leads(2), roster, state, NOW)
    # a-1 starts at max(7, 5) = 7 and moves 1/2; a-2 (no clock) starts at 7 and moves 1/4
    assert outcome.state == QueueState("a-2", 7.0, {"a-1": 7.5, "a-2": 7.25, "gone": 1.0})


# --- sticky ------------------------------------------------------------------------------------


def test_sticky_keeps_the_customer_with_their_last_agent() -> None:
    roster = [agent("a-1"), agent("a-2", open_count=9)]
    outcome = decide(queue("sticky"), [lead(1, last_agent="a-2")], roster, QueueState(), NOW)
    assert outcome.assignments[0].agent_id == "a-2"
    assert outcome.assignments[0].strategy == "sticky"
    assert outcome.assignments[0].reason == "sticky: a-2 worked this customer last"


@pytest.mark.parametrize(
    ("last", "why"),
    [
        (None, "no previous agent"),
        ("a-9", "a-9 is not among this queue's agents"),
        ("a-away", "a-away is away"),
        ("a-off", "a-off is off shift"),
        ("a-full", "a-full is at capacity"),
        ("a-capped", "a-capped reached the daily cap"),
        ("a-wealth", "a-wealth is not skilled for car_loan/hot in zh"),
        ("a-had", "a-had already had this lead"),
    ],
)
def test_sticky_falls_through_to_the_fallback_and_says_why(last: str | None, why: str) -> None:
    roster = [
        agent("a-away", status="away"),
        agent("a-off", shift=Window.parse("18:00-23:00")),
        agent("a-full", capacity=2, open_count=2),
        agent("a-capped", daily_cap=8, today_count=8),
        agent("a-wealth", business_lines=frozenset({"wealth"})),
        agent("a-had"),
        agent("a-free", open_count=1),
    ]
    waiting = lead(1, last_agent=last, language="zh", excluded_agents=frozenset({"a-had"}))
    outcome = decide(queue("sticky"), [waiting], roster, QueueState(), NOW)
    assert outcome.assignments == [
        Assign(
            1,
            "a-free",
            "least_loaded",
            f"sticky fell through ({why}); least loaded (1/10 open)",
            1,
            NOW + timedelta(minutes=15),
        )
    ]


@pytest.mark.parametrize(
    ("fallback", "used"),
    [("round_robin", "round_robin"), ("weighted", "weighted"), ("sticky", "least_loaded")],
)
def test_sticky_records_the_fallback_actually_used(fallback: Strategy, used: Strategy) -> None:
    outcome = decide(
        queue("sticky", fallback_strategy=fallback), [lead(1)], [agent("a-1")], QueueState(), NOW
    )
    assert outcome.assignments[0].strategy == used


def test_sticky_waits_when_neither_the_last_agent_nor_anyone_else_can_take_it() -> None:
    roster = [agent("a-1", status="away")]
    outcome = decide(queue("sticky"), [lead(1, last_agent="a-1")], roster, QueueState(), NOW)
    assert outcome.waiting == {
        1: "no agent skilled for car_loan/hot is available and on shift (1 away)"
    }
