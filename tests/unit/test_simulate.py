"""The simulator on small inputs whose figures can be worked out by hand."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest

from allocate.model import ANY, AgentSnapshot, QueueSpec, Window
from allocate.simulate import Behaviour, Percentiles, Report, SimConfig, gini, simulate
from schemas.lead import Classification, CustomerContext, Lead

# 10:00 in Shanghai on a Tuesday.
T0 = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
SEC = timedelta(seconds=1)

#: Every call answered, 30 s to pick up, exactly 4 minutes of talk, nobody interested.
EXACT = Behaviour(
    pickup=timedelta(seconds=30),
    talk=timedelta(minutes=4),
    talk_spread=0,
    answer_rate=1,
    answered={"not_interested": 1},
)

_numbers = iter(range(10_000_000, 99_999_999))


def event(
    at: datetime,
    *,
    phone: str | None = None,
    event_id: str | None = None,
    line: str = "personal_credit_loan",
    priority: int = 50,
    timezone: str | None = "Asia/Shanghai",
    consent: bool | None = True,
    segment: str = "standard",
) -> Lead:
    phone = phone or f"+86138{next(_numbers)}"
    return Lead(
        event_id=event_id or f"e-{phone}-{at.timestamp()}",
        occurred_at=at,
        source="test",
        event_type="signup",
        phone=phone,
        intake="realtime",
        product=line,
        timezone=timezone,
        consent=consent,
        attributes={"priority": priority, "segment": segment},
    )


def classify(lead: Lead, context: CustomerContext, now: datetime) -> Classification:
    """Line from the product, priority from the attributes: the rules are not under test."""
    return Classification(
        business_line=lead.product or "general",
        segment=str(lead.attributes.get("segment", "standard")),
        priority=int(lead.attributes["priority"]),
        matched_rules=(),
        rules_version="test",
    )


def agent(agent_id: str, **values: Any) -> AgentSnapshot:
    spec = AgentSnapshot(
        id=agent_id,
        business_lines=frozenset({ANY}),
        segments=frozenset({ANY}),
        languages=frozenset(),
        capacity=10,
        daily_cap=1000,
        weight=1.0,
        timezone="Asia/Shanghai",
        shift=None,
        status="available",
        open_count=0,
        today_count=0,
    )
    return replace(spec, **values)


def queue(**values: Any) -> QueueSpec:
    spec = QueueSpec(
        name="loans",
        business_line="personal_credit_loan",
        segments=frozenset(),
        strategy="round_robin",
        fallback_strategy="least_loaded",
        sla=timedelta(minutes=15),
        max_attempts=3,
        call_window=None,
        default_timezone="Asia/Shanghai",
    )
    return replace(spec, **values)


def run(
    events: list[Lead],
    agents: list[AgentSnapshot],
    *,
    queues: tuple[QueueSpec, ...] | None = None,
    behaviour: Behaviour = EXACT,
    start: datetime = T0 - timedelta(hours=1),
    end: datetime = T0 + timedelta(hours=8),
    **config: Any,
) -> Report:
    settings = SimConfig(queues=queues or (queue(),), behaviour=behaviour, **config)
    return simulate(events, agents, classify, start=start, end=end, config=settings)


def by_id(report: Report) -> dict[str, Any]:
    return {a.id: a for a in report.agents}


def test_one_agent_three_leads_exact_speed_to_lead() -> None:
    # 10:00, 10:01, 10:02. The agent dials the first at 10:00:30 and talks until 10:04:30,
    # picks up the second and dials it at 10:05:00, the third at 10:09:30.
    leads = [event(T0), event(T0 + MIN), event(T0 + 2 * MIN)]
    report = run(leads, [agent("a1")])

    assert report.speed_to_lead == Percentiles(3, 240.0, 450.0, 450.0)
    assert report.time_to_assignment == Percentiles(3, 0.0, 0.0, 0.0)
    assert (report.assignments, report.sla_met, report.sla_expired) == (3, 3, 0)
    assert report.sla_attainment == 1.0
    (a1,) = report.agents
    assert (a1.assignments, a1.contacts, a1.conversions) == (3, 3, 0)
    assert a1.available_hours == 9.0
    assert a1.busy_share == pytest.approx(12 / 60 / 9)
    assert report.lead_states == {"closed": 3}
    assert report.dispositions == {"not_interested": 3}
    assert report.waiting == {}
    assert report.queues[0].speed_to_lead.p50 == 240.0


def test_the_highest_priority_lead_is_called_first() -> None:
    low, high = event(T0, priority=10), event(T0 + SEC, priority=90)
    report = run([low, high], [agent("a1")], behaviour=replace(EXACT, pickup=2 * SEC))
    # Both assigned by 10:00:01; the dial at 10:00:02 takes the high one (1 s after it came),
    # the low one waits for the 4-minute call: 10:04:04 is 244 s after it came.
    assert report.speed_to_lead == Percentiles(2, 1.0, 244.0, 244.0)


def test_sla_expiry_reassigns_to_another_agent_and_counts_an_attempt() -> None:
    # a1 gets both 10:00 leads (a2's shift starts 10:01), calls the urgent one from 10:00:30
    # to 10:10:30; the other's 5-minute SLA expires at 10:05 and it goes to a2, who dials at
    # 10:05:30 (330 s after it came).
    ten_minutes = replace(EXACT, talk=timedelta(minutes=10))
    leads = [event(T0, priority=90), event(T0, priority=50)]
    agents = [agent("a1"), agent("a2", shift=Window(time(10, 1), time(18)))]
    report = run(leads, agents, queues=(queue(sla=timedelta(minutes=5)),), behaviour=ten_minutes)

    agents_ = by_id(report)
    assert (agents_["a1"].assignments, agents_["a1"].contacts, agents_["a1"].sla_expired) == (
        2,
        1,
        1,
    )
    assert (agents_["a2"].assignments, agents_["a2"].contacts) == (1, 1)
    assert (report.assignments, report.sla_met, report.sla_expired) == (3, 2, 1)
    assert report.sla_attainment == pytest.approx(2 / 3)
    assert report.speed_to_lead == Percentiles(2, 30.0, 330.0, 330.0)
    assert report.time_to_assignment == Percentiles(2, 0.0, 0.0, 0.0)


def test_an_expired_lead_on_its_last_attempt_is_closed() -> None:
    # One agent, busy for 10 minutes with another lead: the SLA expires and nobody else may
    # take it (the agent who let it expire is excluded), so with one attempt allowed it closes.
    ten_minutes = replace(EXACT, talk=timedelta(minutes=10))
    leads = [event(T0, priority=90), event(T0, priority=50)]
    report = run(
        leads,
        [agent("a1")],
        queues=(queue(sla=timedelta(minutes=5), max_attempts=1),),
        behaviour=ten_minutes,
    )
    assert report.sla_expired == 1
    assert report.lead_states == {"closed": 2}


def test_an_expired_lead_nobody_else_may_take_waits_and_says_why() -> None:
    ten_minutes = replace(EXACT, talk=timedelta(minutes=10))
    leads = [event(T0, priority=90), event(T0, priority=50)]
    report = run(
        leads,
        [agent("a1")],
        queues=(queue(sla=timedelta(minutes=5)),),
        behaviour=ten_minutes,
    )
    assert report.waiting == {
        "waiting for an agent: only agents who already had it are available": 1
    }
    assert report.queues[0].waiting == 1


def test_a_lead_outside_its_call_window_waits_for_it_to_open() -> None:
    # 02:30 UTC is 21:30 the day before in New York: after 09:00-21:00. The window opens at
    # 09:00 New York time, 14:00 UTC, eleven and a half hours later.
    arrival = T0 + timedelta(minutes=30)
    late = event(arrival, timezone="America/New_York")
    windowed = (queue(call_window=Window(time(9), time(21))),)

    before = run([late], [agent("a1")], queues=windowed, end=T0 + timedelta(hours=11))
    assert before.assignments == 0
    assert before.waiting == {"outside the call window, not offered to an agent yet": 1}

    after = run([late], [agent("a1")], queues=windowed, end=T0 + timedelta(hours=13))
    wait = 11.5 * 3600
    assert after.time_to_assignment == Percentiles(1, wait, wait, wait)
    assert after.speed_to_lead == Percentiles(1, wait + 30, wait + 30, wait + 30)


def test_weighted_shares_follow_the_weights() -> None:
    leads = [event(T0 + n * 10 * SEC) for n in range(400)]
    agents = [agent("w1", weight=1, capacity=1000), agent("w3", weight=3, capacity=1000)]
    report = run(
        leads,
        agents,
        queues=(queue(strategy="weighted", sla=timedelta(days=1)),),
    )
    shares = {a.id: a.assignments for a in report.agents}
    assert shares == {"w1": 100, "w3": 300}
    # Unequal by design: the plain Gini sees it.
    assert report.gini == pytest.approx(0.25)


@pytest.mark.parametrize("strategy", ["round_robin", "least_loaded", "weighted"])
def test_an_agent_starting_mid_day_is_not_flooded(strategy: str) -> None:
    # A lead every 5 minutes from 09:00 to 18:00 Shanghai time; a and b work 09:00-18:00, c
    # joins at 13:00. Fair strategies give c its share of what comes after 13:00, not a
    # catch-up on the morning.
    nine = T0 - timedelta(hours=1)
    leads = [event(nine + n * 5 * MIN) for n in range(108)]
    day = Window(time(9), time(18))
    agents = [
        agent("a", shift=day, capacity=1000),
        agent("b", shift=day, capacity=1000),
        agent("c", shift=Window(time(13), time(18)), capacity=1000),
    ]
    report = run(
        leads,
        agents,
        queues=(queue(strategy=strategy, sla=timedelta(hours=8)),),
        start=nine,
        end=nine + timedelta(hours=9),
    )
    figures = by_id(report)
    assert [figures[a].available_hours for a in "abc"] == [9.0, 9.0, 5.0]
    assert sum(figures[a].assignments for a in "abc") == 108
    # From 13:00 on the 60 leads split three ways: c's 20 in 5 hours is a's rate (48 in 9).
    assert figures["c"].assignments == 20
    assert report.gini is not None
    assert report.gini < 0.05


@pytest.mark.parametrize(("batch_size", "cold_waits"), [(3, True), (4, False)])
def test_a_lead_behind_a_batch_nobody_can_take_waits_as_in_the_allocator(
    batch_size: int, cold_waits: bool
) -> None:
    # Three urgent leads only `hot` may take (off shift until 11:00), then one `cold` could
    # take now. The allocator decides the top `batch_size` leads; a batch that places nothing
    # ends the pass, so with a batch of 3 the cold lead is never reached before 11:00.
    hot = [event(T0, segment="hot", priority=90) for _ in range(3)]
    cold = event(T0 + SEC, segment="cold", priority=10)
    agents = [
        agent("cold", segments=frozenset({"cold"})),
        agent("hot", segments=frozenset({"hot"}), shift=Window(time(11), time(18))),
    ]
    report = run([*hot, cold], agents, batch_size=batch_size, end=T0 + timedelta(minutes=30))
    assert by_id(report)["cold"].assignments == (0 if cold_waits else 1)
    hot_wait = (
        "waiting for an agent: no agent skilled for personal_credit_loan/hot is available and "
        "on shift (1 off shift)"
    )
    behind = (
        f"waiting for an agent: behind {batch_size} leads no agent could take (one allocator batch)"
    )
    assert report.waiting == ({hot_wait: 3, behind: 1} if cold_waits else {hot_wait: 3})


def test_no_answer_retries_after_the_delays_then_closes() -> None:
    nobody = replace(EXACT, answer_rate=0, ring=timedelta(seconds=30))
    report = run(
        [event(T0)],
        [agent("a1")],
        behaviour=nobody,
        no_answer_delays=(timedelta(minutes=30), timedelta(hours=2)),
    )
    # Dialled 10:00:30, 10:31:30 (30 min after the 10:01:00 no answer, then 30 s pickup)
    # and 12:32:30 (2 h after 10:32:00); three attempts and the lead closes.
    assert report.dispositions == {"no_answer": 3}
    assert report.lead_states == {"closed": 1}
    assert report.assignments == 3
    assert report.speed_to_lead == Percentiles(1, 30.0, 30.0, 30.0)


def test_a_callback_comes_back_at_the_requested_time() -> None:
    callback = replace(
        EXACT,
        answered={"callback": 1},
        callback_after=(timedelta(hours=1), timedelta(hours=1)),
    )
    report = run([event(T0)], [agent("a1")], behaviour=callback, end=T0 + timedelta(hours=3))
    # Dialled at 10:00:30, 11:05:00 (an hour after the call ended at 10:04:30, then the
    # pickup) and 12:09:30; every answered call asks again, for 13:13:30 the last time.
    # Callbacks are not attempts: the queue's 3 would otherwise have closed the lead.
    assert report.dispositions == {"callback": 3}
    assert report.assignments == 3
    assert report.lead_states == {"queued": 1}
    assert report.waiting == {"callback, not due yet": 1}


def test_do_not_call_blocks_the_customers_other_open_leads() -> None:
    dnc = replace(EXACT, answered={"do_not_call": 1})
    phone = "+8613900000001"
    leads = [
        event(T0, phone=phone, event_id="credit", priority=90),
        event(T0, phone=phone, event_id="car", line="car_loan", priority=10),
    ]
    queues = (queue(), queue(name="cars", business_line="car_loan"))
    # One agent: the credit lead is called first; the car lead is then blocked at allocation.
    report = run(leads, [agent("a1", capacity=1)], queues=queues, behaviour=dnc)
    assert report.dispositions == {"do_not_call": 1}
    assert report.lead_states == {"do_not_call": 2}
    assert report.assignments == 1


def test_merges_duplicates_and_consent_at_intake() -> None:
    phone = "+8613900000002"
    first = event(T0, phone=phone, event_id="x1", priority=40)
    leads = [
        first,
        first,  # redelivered
        event(T0 + MIN, phone=phone, event_id="x2", priority=80),  # merges, priority rises
        event(T0 + MIN, consent=False),
        event(T0 - 2 * timedelta(hours=1)),  # before the period
    ]
    report = run(leads, [agent("a1")], start=T0, end=T0 + timedelta(hours=1))
    intake = report.intake
    assert (intake.events, intake.duplicates, intake.merged, intake.leads) == (4, 1, 1, 2)
    assert (intake.not_callable, intake.outside_period) == (1, 1)
    assert report.lead_states == {"closed": 1, "do_not_call": 1}


def test_consent_withdrawn_by_a_later_event_revokes_the_assignment() -> None:
    phone = "+8613900000003"
    leads = [event(T0, phone=phone), event(T0 + 10 * SEC, phone=phone, consent=False)]
    # Assigned at once, but the agent takes a minute to pick it up: by then it is revoked.
    report = run(leads, [agent("a1")], behaviour=replace(EXACT, pickup=MIN))
    assert report.lead_states == {"do_not_call": 1}
    assert report.assignments == 1
    assert report.dispositions == {}
    assert report.sla_met + report.sla_expired == 0


def test_away_and_offline_agents_get_nothing_and_have_no_time() -> None:
    agents = [agent("on"), agent("away", status="away"), agent("off", status="offline")]
    report = run([event(T0 + n * MIN) for n in range(5)], agents)
    figures = by_id(report)
    assert figures["on"].assignments == 5
    assert figures["away"].assignments == figures["off"].assignments == 0
    assert figures["away"].available_hours == figures["off"].available_hours == 0
    assert report.gini_agents == 1


def test_leads_no_agent_can_take_say_why() -> None:
    car_only = agent("a1", business_lines=frozenset({"car_loan"}))
    report = run([event(T0)], [car_only])
    assert report.waiting == {
        "waiting for an agent: no agent is skilled for personal_credit_loan/standard": 1
    }


def test_implicit_queues_are_named_after_the_line() -> None:
    report = run(
        [event(T0, line="car_loan"), event(T0 + MIN, line="car_loan")],
        [agent("a1")],
        queues=(queue(name="car_loan", business_line="wealth_management"),),
    )
    assert [q.name for q in report.queues] == ["car_loan", "car_loan.default"]
    assert report.queues[1].leads == 2
    assert report.queues[1].strategy == "round_robin"


def test_the_daily_cap_resets_at_the_agents_local_midnight() -> None:
    late = T0 + timedelta(hours=13, minutes=30)  # 23:30 in Shanghai
    leads = [event(late), event(late + MIN), event(late + 45 * MIN)]  # the last at 00:15
    report = run(
        leads,
        [agent("a1", daily_cap=1)],
        queues=(queue(sla=timedelta(hours=2)),),
        start=late,
        end=late + timedelta(hours=2),
    )
    # The first is taken on the 24th; the second waits for midnight, then the third.
    assert report.time_to_assignment == Percentiles(2, 0.0, 29 * 60.0, 29 * 60.0)
    assert report.waiting == {
        "waiting for an agent: the only eligible agent is at capacity or daily cap": 1
    }


def test_the_same_seed_gives_the_same_report_and_another_seed_another() -> None:
    leads = [
        event(T0 + n * 20 * SEC, phone=f"+86137{n % 150:08d}", line=line, priority=n % 100)
        for n, line in zip(
            range(600), ["personal_credit_loan", "car_loan", "wealth_management"] * 200, strict=True
        )
    ]
    agents = [agent(f"a{n}", capacity=3, weight=1 + n % 3) for n in range(6)]
    queues = (queue(strategy="weighted", sla=timedelta(minutes=5)),)

    def once(seed: int) -> dict[str, Any]:
        return run(leads, agents, queues=queues, behaviour=Behaviour(), seed=seed).as_dict()

    first = once(7)
    assert first == once(7)
    assert first != once(8)
    assert first["sla"]["assignments"] > 0
    assert first["dispositions"]


def test_the_pass_shortcuts_change_no_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A saturated day: more leads than agents, segments only some agents take, customers in
    # other timezones, a sticky queue. The passes stop early when nothing can be assigned and
    # skip decide on chunks it would leave waiting; without both, every figure but the
    # reasons for waiting must come out the same.
    zones = ["Asia/Shanghai"] * 8 + ["America/New_York", "Europe/London"]
    leads = [
        event(
            T0 - timedelta(hours=2) + n * 15 * SEC,
            phone=f"+86136{n % 700:08d}",
            event_id=f"s{n}",
            line=["personal_credit_loan", "car_loan"][n % 5 == 0],
            segment=["hot", "cold", "warm"][n % 3],
            priority=(n * 37) % 100,
            timezone=zones[n % len(zones)],
        )
        for n in range(1500)
    ]
    agents = [
        agent("a1", segments=frozenset({"hot"}), capacity=3, daily_cap=60),
        agent("a2", segments=frozenset({"hot", "warm"}), capacity=4, daily_cap=80),
        agent("a3", segments=frozenset({"cold"}), capacity=2, shift=Window(time(12), time(20))),
        agent("a4", capacity=5, daily_cap=50, weight=2, shift=Window(time(9), time(17))),
    ]
    queues = (
        queue(sla=timedelta(minutes=5), call_window=Window(time(9), time(21))),
        queue(name="cars", business_line="car_loan", strategy="sticky"),
    )

    def once() -> dict[str, Any]:
        report = run(leads, agents, queues=queues, behaviour=Behaviour(), seed=3, batch_size=40)
        figures = report.as_dict()
        del figures["waiting"]
        return figures

    fast = once()
    monkeypatch.setattr("allocate.simulate._Simulation._stuck", lambda *args: "")
    monkeypatch.setattr("allocate.simulate._Simulation._may_place", lambda *args: True)
    assert once() == fast
    assert fast["sla"]["expired"] > 0
    assert fast["lead_states"]["queued"] > 100


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        simulate([], [], classify, start=datetime(2026, 11, 24), end=T0)  # noqa: DTZ001
    with pytest.raises(ValueError, match="after start"):
        simulate([], [], classify, start=T0, end=T0)
    with pytest.raises(ValueError, match="unique"):
        simulate([], [agent("a"), agent("a")], classify, start=T0, end=T0 + MIN)
    with pytest.raises(ValueError, match="answer_rate"):
        Behaviour(answer_rate=1.5)
    with pytest.raises(ValueError, match="no_answer"):
        Behaviour(answered={"no_answer": 1})


def test_gini() -> None:
    assert gini([]) is None
    assert gini([0, 0]) is None
    assert gini([2, 2, 2]) == 0
    assert gini([0, 0, 3]) == pytest.approx(2 / 3)
    assert gini([1, 3]) == pytest.approx(0.25)


def test_percentiles_are_nearest_rank() -> None:
    assert Percentiles.of([]) == Percentiles(0, None, None, None)
    assert Percentiles.of(range(1, 101)) == Percentiles(100, 50, 90, 99)
    assert Percentiles.of([5, 1, 3]) == Percentiles(3, 3, 5, 5)
