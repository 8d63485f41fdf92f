"""Properties of the allocation decision over generated rosters, queues, leads and clocks.

Two kinds of checks. The invariants of CONTRACT.md §8 are checked on `decide`'s outcome
directly (who may get a lead, capacity, DNC, call windows, order, fairness). And `decide`,
whose eligibility pools and lazily refreshed heaps exist for speed, is compared with
`reference` below: a plain reading of the rules that scans every agent for every lead, so
the two share nothing beyond the clock helpers (tested on their own) and the model.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocate import clock
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
from schemas.vocab import STRATEGIES, Strategy

ZONES = [
    "Asia/Shanghai",
    "America/New_York",
    "Europe/London",
    "America/Los_Angeles",
    "Australia/Sydney",
    "Asia/Kolkata",
    "Europe/Berlin",
    "Pacific/Auckland",
]
LINES = ["car_loan", "wealth"]
SEGMENTS = ["hot", "warm", "vip"]
LANGUAGES = ["zh", "en"]
AGENT_IDS = [f"a-{n:02d}" for n in range(12)]
#: Instants around 2026's DST changes in the zones above, and two ordinary ones.
ANCHORS = [
    datetime(2026, 3, 8, 6, 0, tzinfo=UTC),  # US spring forward
    datetime(2026, 3, 29, 0, 30, tzinfo=UTC),  # EU spring forward
    datetime(2026, 4, 4, 13, 0, tzinfo=UTC),  # AU/NZ fall back
    datetime(2026, 9, 26, 13, 0, tzinfo=UTC),  # NZ spring forward
    datetime(2026, 10, 25, 0, 30, tzinfo=UTC),  # EU fall back
    datetime(2026, 11, 1, 5, 0, tzinfo=UTC),  # US fall back
    datetime(2026, 6, 15, 12, 0, tzinfo=UTC),
    datetime(2026, 12, 31, 23, 0, tzinfo=UTC),
]
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- generators ------------------------------------------------------------------------------


@st.composite
def instants(draw: st.DrawFn) -> datetime:
    anchor = draw(st.sampled_from(ANCHORS))
    return anchor + timedelta(minutes=draw(st.integers(-36 * 60, 36 * 60)))


@st.composite
def windows(draw: st.DrawFn) -> Window:
    start, end = draw(st.lists(st.integers(0, 47), min_size=2, max_size=2, unique=True))
    return Window(time(start // 2, start % 2 * 30), time(end // 2, end % 2 * 30))


def sometimes(values: st.SearchStrategy[Window], one_in: int) -> st.SearchStrategy[Window | None]:
    """A value from `values` one time in `one_in`, else None."""
    return st.integers(1, one_in).flatmap(lambda n: values if n == 1 else st.none())


def skills(values: Sequence[str]) -> st.SearchStrategy[frozenset[str]]:
    """Mostly every value (ANY) or the first, sometimes any mix: most agents can take most
    leads, so that assignments, not waiting, are what the properties mostly see."""
    return st.sampled_from([frozenset({ANY}), frozenset({ANY}), frozenset(values[:1])]) | (
        st.frozensets(st.sampled_from([*values, ANY]), min_size=1, max_size=3)
    )


@st.composite
def agents(draw: st.DrawFn, ids: Sequence[str]) -> list[AgentSnapshot]:
    roster = []
    for agent_id in ids:
        capacity = draw(st.sampled_from([0, 2, 4, 8]))
        daily_cap = draw(st.sampled_from([0, 5, 20, 20]))
        roster.append(
            AgentSnapshot(
                id=agent_id,
                business_lines=draw(skills(LINES)),
                segments=draw(skills(SEGMENTS)),
                languages=draw(
                    st.just(frozenset[str]()) | st.frozensets(st.sampled_from(LANGUAGES))
                ),
                capacity=capacity,
                daily_cap=daily_cap,
                weight=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
                timezone=draw(st.sampled_from([*ZONES, "Not/A_Zone"])),
                shift=draw(sometimes(windows(), 4)),
                status=draw(st.sampled_from(["available"] * 5 + ["away", "offline"])),
                open_count=draw(st.sampled_from([0, 0, 1, capacity, capacity + 1])),
                today_count=draw(st.sampled_from([0, 0, 1, daily_cap])),
            )
        )
    return roster


@st.composite
def leads(draw: st.DrawFn, now: datetime, agent_ids: Sequence[str]) -> list[WaitingLead]:
    count = draw(st.integers(0, 25))
    people = st.sampled_from([*agent_ids, "a-99"]) if agent_ids else st.just("a-99")
    return [
        WaitingLead(
            id=lead_id,
            customer_id=lead_id,
            business_line=draw(st.sampled_from([LINES[0], *LINES])),
            segment=draw(st.sampled_from(SEGMENTS)),
            priority=draw(st.sampled_from([0, 50, 100])),
            realtime=draw(st.booleans()),
            queued_at=now - timedelta(minutes=draw(st.integers(0, 3))),
            attempts=draw(st.sampled_from([0, 0, 0, 1, 2, 4])),
            timezone=draw(st.sampled_from([*ZONES, None, "Mars/Olympus"])),
            language=draw(st.sampled_from([None, None, *LANGUAGES, "fr"])),
            excluded_agents=draw(st.just(frozenset[str]()) | st.frozensets(people, max_size=2)),
            last_agent=draw(st.none() | people),
            dnc=draw(st.integers(0, 9)) == 0,
        )
        for lead_id in draw(
            st.lists(st.integers(1, 10_000), min_size=count, max_size=count, unique=True)
        )
    ]


@st.composite
def queues(draw: st.DrawFn, strategy: Strategy | None = None) -> QueueSpec:
    return QueueSpec(
        name="q",
        business_line=LINES[0],
        segments=frozenset(),
        strategy=draw(st.sampled_from(STRATEGIES)) if strategy is None else strategy,
        fallback_strategy=draw(st.sampled_from(STRATEGIES)),
        sla=timedelta(minutes=30),
        max_attempts=draw(st.sampled_from([1, 3, 5])),
        call_window=draw(sometimes(windows(), 3)),
        default_timezone=draw(st.sampled_from(ZONES)),
    )


Case = tuple[QueueSpec, list[WaitingLead], list[AgentSnapshot], QueueState, datetime]


@st.composite
def cases(draw: st.DrawFn, strategy: Strategy | None = None) -> Case:
    now = draw(instants())
    ids = draw(st.lists(st.sampled_from(AGENT_IDS), min_size=1, max_size=10, unique=True))
    roster = draw(agents(ids))
    clocks = draw(st.dictionaries(st.sampled_from(AGENT_IDS), st.floats(0, 8), max_size=6))
    state = QueueState(
        rr_cursor=draw(st.none() | st.sampled_from([*AGENT_IDS, "a-99", ""])),
        virtual_time=draw(st.floats(0, 6)),
        agent_vtime=clocks,
    )
    return draw(queues(strategy)), draw(leads(now, ids)), roster, state, now


# --- the reference ---------------------------------------------------------------------------


def zone_of(name: str | None, fallback: str) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo(fallback)
    except (KeyError, ValueError, OSError):
        return ZoneInfo(fallback)


def candidate(
    agent: AgentSnapshot, lead: WaitingLead, load: Counter[str], queue: QueueSpec, now: datetime
) -> bool:
    local = now.astimezone(zone_of(agent.timezone, queue.default_timezone)).time()
    return (
        agent.status == "available"
        and (agent.shift is None or agent.shift.contains(local))
        and (lead.business_line in agent.business_lines or ANY in agent.business_lines)
        and (lead.segment in agent.segments or ANY in agent.segments)
        and (not agent.languages or lead.language is None or lead.language in agent.languages)
        and agent.open_count + load[agent.id] < agent.capacity
        and agent.today_count + load[agent.id] < agent.daily_cap
        and agent.id not in lead.excluded_agents
    )


def reference(
    queue: QueueSpec,
    leads: Sequence[WaitingLead],
    agents: Sequence[AgentSnapshot],
    state: QueueState,
    now: datetime,
) -> Outcome:
    outcome = Outcome()
    virtual, clocks, cursor = state.virtual_time, dict(state.agent_vtime), state.rr_cursor
    load: Counter[str] = Counter()

    def start(agent: AgentSnapshot) -> float:
        return max(clocks.get(agent.id, virtual), virtual)

    order = sorted(
        leads, key=lambda lead: (-lead.priority, not lead.realtime, lead.queued_at, lead.id)
    )
    for lead in order:
        if lead.dnc:
            outcome.blocked.append(Block(lead.id, "do_not_call", ""))
            continue
        if lead.attempts >= queue.max_attempts:
            outcome.blocked.append(Block(lead.id, "closed", ""))
            continue
        zone = zone_of(lead.timezone, queue.default_timezone)
        if queue.call_window and not queue.call_window.contains(now.astimezone(zone).time()):
            until = clock.next_opening(queue.call_window, now, zone.key)
            outcome.deferred.append(Defer(lead.id, until, ""))
            continue
        candidates = [agent for agent in agents if candidate(agent, lead, load, queue, now)]
        if not candidates:
            outcome.waiting[lead.id] = ""
            continue
        strategy = queue.strategy
        chosen = None
        if strategy == "sticky":
            chosen = next((agent for agent in candidates if agent.id == lead.last_agent), None)
            if chosen is None:
                strategy = (
                    "least_loaded"
                    if queue.fallback_strategy == "sticky"
                    else queue.fallback_strategy
                )
        if strategy == "round_robin":
            ordered = sorted(candidates, key=lambda agent: agent.id)
            after = [agent for agent in ordered if cursor is None or agent.id > cursor]
            chosen = (after or ordered)[0]
            cursor = chosen.id
        elif strategy == "least_loaded":
            chosen = min(
                candidates,
                key=lambda agent: (
                    (agent.open_count + load[agent.id]) / agent.capacity,
                    agent.open_count + load[agent.id],
                    start(agent),
                    agent.id,
                ),
            )
        elif strategy == "weighted":
            chosen = min(
                candidates,
                key=lambda agent: (start(agent), start(agent) + 1 / agent.weight, agent.id),
            )
        assert chosen is not None
        tag = start(chosen)
        clocks[chosen.id] = tag + 1 / chosen.weight
        virtual = tag
        load[chosen.id] += 1
        outcome.assignments.append(
            Assign(lead.id, chosen.id, strategy, "", lead.attempts + 1, now + queue.sla)
        )
    outcome.state = QueueState(cursor, virtual, clocks)
    return outcome


def summary(outcome: Outcome) -> object:
    return (
        [
            (a.lead_id, a.agent_id, a.strategy, a.attempt, a.sla_deadline)
            for a in outcome.assignments
        ],
        [(d.lead_id, d.until) for d in outcome.deferred],
        [(b.lead_id, b.state) for b in outcome.blocked],
        sorted(outcome.waiting),
        outcome.state,
    )


# --- properties ------------------------------------------------------------------------------


@PROPERTY
@given(cases())
def test_decide_agrees_with_the_plain_reading_of_the_rules(case: Case) -> None:
    assert summary(decide(*case)) == summary(reference(*case))


@PROPERTY
@given(cases())
def test_the_invariants_hold(case: Case) -> None:
    queue, leads, roster, state, now = case
    before = (list(leads), list(roster), dataclasses.astuple(state))
    outcome = decide(queue, leads, roster, state, now)
    assert (list(leads), list(roster), dataclasses.astuple(state)) == before, "inputs changed"

    by_id = {lead.id: lead for lead in leads}
    agents = {agent.id: agent for agent in roster}
    buckets = Counter(
        [a.lead_id for a in outcome.assignments]
        + [d.lead_id for d in outcome.deferred]
        + [b.lead_id for b in outcome.blocked]
        + list(outcome.waiting)
    )
    assert buckets == Counter(lead.id for lead in leads), "each lead in exactly one bucket"

    load: Counter[str] = Counter()
    for assign in outcome.assignments:
        lead, agent = by_id[assign.lead_id], agents[assign.agent_id]
        assert not lead.dnc
        assert lead.attempts < queue.max_attempts
        assert candidate(agent, lead, load, queue, now), "went to an agent who was not a candidate"
        if queue.call_window:
            assert clock.in_window(queue.call_window, now, lead.timezone, queue.default_timezone)
        if assign.strategy == "sticky":
            assert assign.agent_id == lead.last_agent
        load[agent.id] += 1
    for agent_id, count in load.items():
        agent = agents[agent_id]
        assert agent.open_count + count <= agent.capacity
        assert agent.today_count + count <= agent.daily_cap
    for deferral in outcome.deferred:
        assert deferral.until >= now
        assert queue.call_window is not None
        zone = by_id[deferral.lead_id].timezone
        assert clock.in_window(queue.call_window, deferral.until, zone, queue.default_timezone)
    assert outcome.state.virtual_time >= state.virtual_time

    # order: of leads alike (same line, segment, language and timezone, nobody excluded), an
    # earlier one never waits while a later one gets an agent
    assigned = {a.lead_id for a in outcome.assignments}
    order = sorted(
        leads, key=lambda lead: (-lead.priority, not lead.realtime, lead.queued_at, lead.id)
    )
    groups: dict[object, list[WaitingLead]] = {}
    for lead in order:
        if not lead.excluded_agents:
            key = (lead.business_line, lead.segment, lead.language, lead.timezone)
            groups.setdefault(key, []).append(lead)
    for group in groups.values():
        waited = False
        for lead in group:
            waited = waited or lead.id in outcome.waiting
            assert not (waited and lead.id in assigned), "a later lead got an agent first"


@PROPERTY
@given(cases(strategy="sticky"))
def test_sticky_keeps_the_last_agent_whenever_they_are_a_candidate(case: Case) -> None:
    queue, leads, roster, state, now = case
    outcome = decide(queue, leads, roster, state, now)
    agents = {agent.id: agent for agent in roster}
    by_id = {lead.id: lead for lead in leads}
    load: Counter[str] = Counter()
    for assign in outcome.assignments:
        lead = by_id[assign.lead_id]
        last = agents.get(lead.last_agent or "")
        if last is not None and candidate(last, lead, load, queue, now):
            assert (assign.agent_id, assign.strategy) == (last.id, "sticky")
        else:
            assert assign.strategy != "sticky"
        load[assign.agent_id] += 1


def plain_agents(weights: Sequence[float]) -> list[AgentSnapshot]:
    return [
        AgentSnapshot(
            id=f"p-{n:02d}",
            business_lines=frozenset({ANY}),
            segments=frozenset({ANY}),
            languages=frozenset(),
            capacity=10_000,
            daily_cap=10_000,
            weight=weight,
            timezone="UTC",
            shift=None,
            status="available",
            open_count=0,
            today_count=0,
        )
        for n, weight in enumerate(weights)
    ]


def plain_leads(count: int, first_id: int = 1) -> list[WaitingLead]:
    at = ANCHORS[0]
    return [
        WaitingLead(n, n, "car_loan", "hot", 50, True, at, 0)
        for n in range(first_id, first_id + count)
    ]


def plain_queue(strategy: Strategy) -> QueueSpec:
    return QueueSpec(
        "q",
        "car_loan",
        frozenset(),
        strategy,
        "least_loaded",
        timedelta(minutes=30),
        3,
        None,
        "UTC",
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9),
    st.lists(st.integers(0, 30), min_size=1, max_size=5),
    st.none() | st.sampled_from(AGENT_IDS),
)
def test_round_robin_keeps_equal_agents_within_one_across_calls(
    agents: int, batches: list[int], cursor: str | None
) -> None:
    roster = plain_agents([1.0] * agents)
    state = QueueState(rr_cursor=cursor)
    counts: Counter[str] = Counter()
    next_id = 1
    for size in batches:
        outcome = decide(
            plain_queue("round_robin"), plain_leads(size, next_id), roster, state, ANCHORS[0]
        )
        next_id += size
        counts.update(a.agent_id for a in outcome.assignments)
        state = outcome.state
        spread = [counts[agent.id] for agent in roster]
        assert max(spread) - min(spread) <= 1


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0]), min_size=1, max_size=6),
    st.integers(0, 400),
)
def test_weighted_shares_follow_the_weights(weights: list[float], total: int) -> None:
    """Agent i's count c_i is at most 1 above its exact share total*w_i/W and at most
    n*w_i/W below it (n agents, W the sum of weights): picking the smallest start tag keeps
    c_i/w_i - c_j/w_j <= 1/w_i for every pair, and summing over j bounds c_i both ways. The
    error does not grow with `total`, so the shares converge to the weights as 1/total."""
    roster = plain_agents(weights)
    outcome = decide(plain_queue("weighted"), plain_leads(total), roster, QueueState(), ANCHORS[0])
    counts = Counter(a.agent_id for a in outcome.assignments)
    whole = sum(weights)
    for agent in roster:
        share = total * agent.weight / whole
        slack = 1e-9 * max(total, 1)
        assert (
            share - len(weights) * agent.weight / whole - slack
            <= counts[agent.id]
            <= share + 1 + slack
        )


# --- the clock -------------------------------------------------------------------------------


def first_at_or_after(day: date, wall: time, zone: ZoneInfo) -> datetime:
    """By brute force: the first whole minute whose local reading is `day` `wall` or later."""
    probe = datetime.combine(day, wall, UTC) - timedelta(hours=15)
    while probe.astimezone(zone).replace(tzinfo=None) < datetime.combine(day, wall):
        probe += timedelta(minutes=1)
    return probe


@settings(max_examples=80, deadline=None)
@given(windows(), instants(), st.sampled_from(ZONES))
def test_next_opening_is_the_first_opening_at_or_after_now(
    window: Window, now: datetime, name: str
) -> None:
    zone = ZoneInfo(name)
    day = now.astimezone(zone).date()
    openings = (first_at_or_after(day + timedelta(days=n), window.start, zone) for n in range(3))
    expected = next(t for t in openings if t >= now and window.contains(t.astimezone(zone).time()))
    assert clock.next_opening(window, now, name) == expected


@settings(max_examples=80, deadline=None)
@given(instants(), st.sampled_from(ZONES))
def test_local_day_start_is_the_first_instant_of_the_local_date(now: datetime, name: str) -> None:
    zone = ZoneInfo(name)
    start = clock.local_day_start(now, name)
    assert start == first_at_or_after(now.astimezone(zone).date(), time(0), zone)
    assert start <= now < start + timedelta(hours=25)
