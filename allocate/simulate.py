"""Replay leads against a roster on a simulated clock: the engine of `leadflow simulate`.

Ops want to try a roster, a strategy or an SLA before changing production, and no CRM lets
them. This module answers "what would have happened to these leads with these agents": it
runs the production decision (`allocate.decide.decide`) and recycling rule
(`allocate.policy.recycle`) with the allocator's semantics on a discrete-event clock. It is
pure: no I/O, no wall clock, no servers; the caller parses files, runs the intake chain and
hands in normalised leads, a classifier and the roster. The same inputs and seed give the
same report, to the digit.

Events (a heap ordered by time): lead arrivals (`occurred_at`), dials and call completions,
SLA deadlines, retry and callback due times, call-window openings (the `until` of a
`Defer`), shift starts and ends and local midnights (daily caps) of every agent. After the
events of an instant are applied, every queue something happened to gets an allocation pass
at that instant, exactly as the allocator would take it: due queued leads in service order,
`batch_size` at a time, `decide()` with the queue's `QueueState` carried over, until a batch
is short or places nothing. One shortcut: a pass stops as soon as no agent on shift with room
is skilled for any due lead's segment (the leads it did not reach are noted as waiting for
that reason). `decide` could assign nothing more there; the leads it would have deferred for
their call window are deferred by the next pass that can assign, which changes no assignment
(nothing could take them in between) and keeps a saturated day of 30,000 leads to seconds.
The report asks `decide` once more at the end why the leads still due wait.

Intake, as `ingest.merge` does it (CONTRACT.md §4): an event id seen before is a redelivery
(no-op); an event is classified at its arrival with the customer's context (returning
customer, lines with an open lead); it merges into the customer's open lead of the same
business line created within `dedup_window` (priority only rises and brings its segment; the
lead keeps its queue and assignment); otherwise it makes a new lead, queued, or
`do_not_call` when the phone is on the DNC list or consent is false. A merging event that
withdraws consent closes the lead and revokes its assignment. Routing is the allocator's:
the first configured queue that serves the lead, else an implicit queue named after the
business line (with a queue entry's defaults).

The behaviour model (`Behaviour`, every number configurable; the RNG is seeded):
- an agent works while the roster says `available` (a missing status counts as available:
  the roster describes who works that day) and the shift, in the agent's timezone, is on;
  `away` and `offline` agents never work and get no leads;
- a working agent takes their open assignments one at a time, highest lead priority first
  (then the nearest SLA deadline); `pickup` passes before each dial; the dial is the first
  contact (what the agent desktop reports as the call starts), so it meets the SLA if it
  happens strictly before the deadline; a call in progress at the end of the shift is
  finished, and no new call starts after it;
- a call is answered with probability `answer_rate`; an unanswered call takes `ring` and is
  `no_answer`; an answered one takes a lognormal talk time (mean `talk`, shape
  `talk_spread`; 0 makes every call exactly `talk`) and ends in one of `answered` outcomes by
  their weights; a callback is asked for a uniform time in `callback_after`;
- every call ends the assignment with its disposition, applied as `allocate.work.dispose`
  does: `no_answer` counts an attempt and retries after the n-th of `no_answer_delays` until
  the queue's `max_attempts`; `callback` returns at the asked time (no attempt counted);
  `converted`, `not_interested`, `invalid_number` close the lead; `do_not_call` closes it
  and puts the phone on the DNC list (its other open leads are then blocked by `decide`);
- an assignment not contacted before its deadline expires as in the allocator's SLA sweep:
  an attempt is counted, the agent is excluded from the lead, and the lead is queued again
  at once, or closed when that was its last attempt. Assignments held by an agent whose
  shift ended are therefore taken back at their deadline.
Not modelled: agents rejecting leads, status changes during the day, breaks, several dials
within one assignment, languages (events carry none), and the real system's own latency
(a pass happens at the instant of the event that called for it; production adds up to a
sweep interval).

Figures (`Report`): percentiles are nearest-rank over leads (p50 is the smallest value at
least half of them reach); speed to lead is arrival (the first event's `occurred_at`) to
first contact; SLA attainment is the share of decided assignments (contacted, or expired)
contacted before the deadline — assignments still open with time left at the end, or revoked,
are not decided; fairness is the Gini coefficient of assignments per available hour over the
agents with available time (0: every agent got the same number of leads per hour on shift;
1: one agent got them all; agents with different skills or weights differ by design, so
read it with the strategy in mind).
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from allocate import clock
from allocate.decide import decide
from allocate.model import (
    ANY,
    AgentSnapshot,
    Outcome,
    QueueSpec,
    QueueState,
    WaitingLead,
    Window,
    implicit_queue,
)
from allocate.policy import recycle
from schemas.lead import Classification, CustomerContext, Lead
from schemas.vocab import AgentStatus, Disposition, LeadState

#: Among answered calls: how they end, by weight (normalised when drawn).
DEFAULT_ANSWERED: Final[Mapping[Disposition, float]] = {
    "converted": 0.12,
    "not_interested": 0.50,
    "callback": 0.28,
    "invalid_number": 0.05,
    "do_not_call": 0.05,
}

#: A queue entry's default call window (`leadflow.settings.QueueSettings`).
_QUEUE_CALL_WINDOW: Final = Window.parse("09:00-21:00")

#: The lead's classification at its arrival: (lead, customer context, arrival time).
Classifier = Callable[[Lead, CustomerContext, datetime], Classification]


@dataclass(frozen=True)
class Behaviour:
    """How simulated agents and customers behave; see the module docstring for the model."""

    #: From being free with work to dialling the next lead (opening it, reading the notes).
    pickup: timedelta = timedelta(seconds=30)
    #: Mean time of an answered call, talk and wrap-up.
    talk: timedelta = timedelta(minutes=4)
    #: Shape (sigma) of the lognormal talk time; 0: every answered call takes `talk`.
    talk_spread: float = 0.5
    #: Time of an unanswered call (ringing out, leaving it).
    ring: timedelta = timedelta(seconds=30)
    answer_rate: float = 0.6
    #: How answered calls end, by weight; `no_answer` is not among them.
    answered: Mapping[Disposition, float] = field(default_factory=lambda: dict(DEFAULT_ANSWERED))
    #: A callback is asked for a uniformly drawn delay in this range.
    callback_after: tuple[timedelta, timedelta] = (timedelta(hours=1), timedelta(hours=4))

    def __post_init__(self) -> None:
        problems = []
        for name in ("pickup", "talk", "ring"):
            if getattr(self, name) < timedelta(0):
                problems.append(f"{name} must not be negative")
        if not 0 <= self.talk_spread <= 3:
            problems.append("talk_spread must be between 0 and 3")
        if not 0 <= self.answer_rate <= 1:
            problems.append("answer_rate must be between 0 and 1")
        if "no_answer" in self.answered:
            problems.append("answered outcomes cannot include no_answer")
        if any(w < 0 or not math.isfinite(w) for w in self.answered.values()):
            problems.append("answered weights must be finite and not negative")
        if self.answer_rate > 0 and sum(self.answered.values()) <= 0:
            problems.append("answered needs at least one outcome with a positive weight")
        low, high = self.callback_after
        if not timedelta(0) <= low <= high:
            problems.append("callback_after must be a range (low, high) with 0 <= low <= high")
        if problems:
            raise ValueError("invalid behaviour: " + "; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        return {
            "pickup_seconds": self.pickup.total_seconds(),
            "talk_mean_seconds": self.talk.total_seconds(),
            "talk_spread": self.talk_spread,
            "ring_seconds": self.ring.total_seconds(),
            "answer_rate": self.answer_rate,
            "answered": dict(self.answered),
            "callback_after_seconds": [d.total_seconds() for d in self.callback_after],
        }


@dataclass(frozen=True)
class SimConfig:
    """What the allocator is configured with, plus the behaviour model and the seed."""

    queues: Sequence[QueueSpec] = ()
    behaviour: Behaviour = field(default_factory=Behaviour)
    seed: int = 0
    batch_size: int = 1000
    #: As `allocate.allocator.AllocatorConfig`: leads no queue serves wait in an implicit
    #: queue named after their business line, with a queue entry's defaults.
    implicit_queues: bool = True
    default_timezone: str = "Asia/Shanghai"
    implicit_sla: timedelta = timedelta(minutes=5)
    implicit_max_attempts: int = 3
    implicit_call_window: Window | None = _QUEUE_CALL_WINDOW
    #: As `allocate.work.WorkConfig`: the wait before the n-th retry; the last one repeats.
    no_answer_delays: Sequence[timedelta] = (
        timedelta(minutes=30),
        timedelta(hours=2),
        timedelta(days=1),
    )
    dedup_window: timedelta = timedelta(days=30)

    def retry_delay(self, attempt: int) -> timedelta:
        delays = self.no_answer_delays
        return delays[min(max(attempt, 1), len(delays)) - 1]


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Percentiles:
    """Nearest-rank percentiles of durations in seconds; None when there are no values."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Percentiles:
        values = sorted(seconds)

        def rank(p: int) -> float | None:
            if not values:
                return None
            return values[max(1, math.ceil(p * len(values) / 100)) - 1]

        return cls(len(values), rank(50), rank(90), rank(99))

    def as_dict(self) -> dict[str, Any]:
        return {
            "leads": self.count,
            "p50_seconds": self.p50,
            "p90_seconds": self.p90,
            "p99_seconds": self.p99,
        }


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass(frozen=True)
class AgentFigures:
    id: str
    status: AgentStatus
    assignments: int
    #: Calls made (each the first contact of one assignment).
    contacts: int
    conversions: int
    sla_expired: int
    available_hours: float
    #: Share of the available time spent on calls.
    busy_share: float | None

    @property
    def per_hour(self) -> float | None:
        """Assignments per available hour."""
        return self.assignments / self.available_hours if self.available_hours > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "assignments": self.assignments,
            "contacts": self.contacts,
            "conversions": self.conversions,
            "sla_expired": self.sla_expired,
            "available_hours": round(self.available_hours, 3),
            "assignments_per_available_hour": _round(self.per_hour),
            "busy_share": _round(self.busy_share),
        }


@dataclass(frozen=True)
class QueueFigures:
    name: str
    business_line: str
    strategy: str
    #: Leads routed to the queue.
    leads: int
    assignments: int
    sla_met: int
    sla_expired: int
    conversions: int
    speed_to_lead: Percentiles
    #: Leads of the queue still waiting (queued) at the end.
    waiting: int

    @property
    def sla_attainment(self) -> float | None:
        return _share(self.sla_met, self.sla_met + self.sla_expired)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "business_line": self.business_line,
            "strategy": self.strategy,
            "leads": self.leads,
            "assignments": self.assignments,
            "sla_met": self.sla_met,
            "sla_expired": self.sla_expired,
            "sla_attainment": _round(self.sla_attainment),
            "conversions": self.conversions,
            "speed_to_lead": self.speed_to_lead.as_dict(),
            "waiting": self.waiting,
        }


@dataclass(frozen=True)
class IntakeFigures:
    #: Valid events in the period (duplicates included).
    events: int
    #: Redeliveries: an event id seen before.
    duplicates: int
    #: Events merged into an open lead of the customer.
    merged: int
    #: New leads.
    leads: int
    #: New leads never callable: phone on the DNC list, or no consent.
    not_callable: int
    #: Invalid records by rejection code (counted by the caller, which runs the intake chain).
    rejected: Mapping[str, int]
    #: Records outside [start, end), skipped.
    outside_period: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "duplicates": self.duplicates,
            "merged": self.merged,
            "leads": self.leads,
            "not_callable": self.not_callable,
            "rejected": dict(sorted(self.rejected.items())),
            "rejected_total": sum(self.rejected.values()),
            "outside_period": self.outside_period,
        }


@dataclass(frozen=True)
class Report:
    start: datetime
    end: datetime
    seed: int
    behaviour: Behaviour
    intake: IntakeFigures
    #: Arrival -> first contact, over the leads contacted.
    speed_to_lead: Percentiles
    #: Arrival -> first assignment, over the leads assigned.
    time_to_assignment: Percentiles
    assignments: int
    sla_met: int
    sla_expired: int
    #: Leads by state at the end.
    lead_states: Mapping[str, int]
    #: Calls by disposition.
    dispositions: Mapping[str, int]
    agents: Sequence[AgentFigures]
    #: Gini coefficient of assignments per available hour (see the module docstring).
    gini: float | None
    queues: Sequence[QueueFigures]
    #: Leads still open at the end, by why they are not done.
    waiting: Mapping[str, int]

    @property
    def sla_attainment(self) -> float | None:
        return _share(self.sla_met, self.sla_met + self.sla_expired)

    @property
    def gini_agents(self) -> int:
        return sum(1 for agent in self.agents if agent.available_hours > 0)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (times ISO 8601, durations in seconds)."""
        return {
            "period": {
                "from": self.start.isoformat(),
                "to": self.end.isoformat(),
                "hours": round((self.end - self.start).total_seconds() / 3600, 3),
            },
            "seed": self.seed,
            "behaviour": self.behaviour.as_dict(),
            "intake": self.intake.as_dict(),
            "speed_to_lead": self.speed_to_lead.as_dict(),
            "time_to_assignment": self.time_to_assignment.as_dict(),
            "sla": {
                "assignments": self.assignments,
                "met": self.sla_met,
                "expired": self.sla_expired,
                "attainment": _round(self.sla_attainment),
            },
            "lead_states": dict(self.lead_states),
            "dispositions": dict(self.dispositions),
            "agents": [agent.as_dict() for agent in self.agents],
            "fairness": {
                "gini": _round(self.gini),
                "agents": self.gini_agents,
                "measure": "Gini coefficient of assignments per available hour over agents "
                "with available time: 0 equal, 1 one agent got every lead",
            },
            "queues": [queue.as_dict() for queue in self.queues],
            "waiting": {"leads": sum(self.waiting.values()), "by_reason": dict(self.waiting)},
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def gini(values: Sequence[float]) -> float | None:
    """The Gini coefficient of non-negative values: mean absolute difference over twice the
    mean (0 all equal, up to (n-1)/n when one has everything); None for no values or all 0."""
    n = len(values)
    total = sum(values)
    if n == 0 or total <= 0:
        return None
    ordered = sorted(values)
    # sum over pairs |xi - xj| = 2 * sum_i (2i - n - 1) x_(i), i = 1..n over the sorted values
    weighted = sum((2 * i - n - 1) * x for i, x in enumerate(ordered, start=1))
    return weighted / (n * total)


# --- the simulation ---------------------------------------------------------------------------

# Event kinds, in the order they apply within one instant: capacity changes first, then the
# SLA sweep (as the allocator sweeps before allocating), then new and due leads; dials last,
# so a dial at an assignment's deadline finds it already expired (contact must come before).
_SHIFT, _CALL_DONE, _SLA, _ARRIVAL, _DUE, _DIAL = range(6)
_SHIFT_ON, _SHIFT_OFF, _NEW_DAY = "on", "off", "day"
_WINDOW = "outside the call window"


@dataclass(eq=False)
class _Agent:
    spec: AgentSnapshot
    #: The queues whose pool the agent is in (the allocator's agent query).
    queues: list[_Queue] = field(default_factory=list)
    open: list[_Assignment] = field(default_factory=list)
    today: int = 0
    day_next: datetime | None = None
    calling: _Assignment | None = None
    dialling: bool = False
    assignments: int = 0
    contacts: int = 0
    conversions: int = 0
    expired: int = 0
    busy_seconds: float = 0.0

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def works(self) -> bool:
        return self.spec.status == "available"


@dataclass(eq=False)
class _Queue:
    spec: QueueSpec
    agents: list[_Agent]
    state: QueueState = field(default_factory=QueueState)
    #: Queued leads offered now (no next_action_at in the future), by id.
    due: dict[int, _Lead] = field(default_factory=dict)
    #: Every due lead in service order, plus leads that left `due` since (skipped when met,
    #: dropped when they are half of it): kept in order as leads come, never sorted per pass.
    order: list[_Lead] = field(default_factory=list)
    #: Due leads by segment: which agents with room could take any of them.
    due_segments: Counter[str] = field(default_factory=Counter)
    #: Queued leads waiting for a retry, a callback or the call window.
    held: dict[int, _Lead] = field(default_factory=dict)
    dirty: bool = False
    #: (pass, why) of the passes that stopped before reaching every due lead.
    stalls: list[tuple[int, str]] = field(default_factory=list)
    leads: int = 0
    assignments: int = 0
    sla_met: int = 0
    sla_expired: int = 0
    conversions: int = 0


@dataclass(eq=False)
class _Lead:
    id: int
    customer_id: int
    phone: str
    business_line: str
    segment: str
    priority: int
    realtime: bool
    timezone: str | None
    arrived_at: datetime
    state: LeadState
    queue: _Queue | None = None
    attempts: int = 0
    next_action_at: datetime | None = None
    #: Why it waits until next_action_at.
    hold: str = ""
    #: Why no agent took it the last time decide left it waiting (cleared when assigned), and
    #: in which pass: what held it up when a call window closes on it.
    waited: str = ""
    waited_at: int = -1
    #: The pass counter when it last became due, and when it left `due` (None while due).
    due_since: int = 0
    left_due: int | None = None
    #: In its queue's `order` list.
    listed: bool = False
    excluded: list[str] = field(default_factory=list)
    assignment: _Assignment | None = None
    assigned_at: datetime | None = None
    contacted_at: datetime | None = None


@dataclass(eq=False)
class _Assignment:
    seq: int
    lead: _Lead
    agent: _Agent
    queue: _Queue
    deadline: datetime
    status: str = "open"  # open, completed, expired, revoked
    contacted_at: datetime | None = None


def simulate(
    events: Iterable[Lead],
    roster: Sequence[AgentSnapshot],
    classify: Classifier,
    *,
    start: datetime,
    end: datetime,
    config: SimConfig | None = None,
    rejected: Mapping[str, int] | None = None,
    outside_period: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Replay `events` (valid, normalised; arrival = `occurred_at`) against `roster` from
    `start` to `end` and report what happened.

    Events outside [start, end) are skipped and counted with `outside_period`; `rejected`
    (invalid records by code, counted by the caller's intake chain) is carried into the
    report. The roster's `open_count` and `today_count` are ignored: loads start empty.
    `progress(done, total)` is called now and then with the arrivals replayed so far.
    Raises ValueError for naive or reversed times or duplicate agent ids.
    """
    for name, moment in (("start", start), ("end", end)):
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError(f"{name} must be timezone-aware")
    if end <= start:
        raise ValueError("end must be after start")
    ids = [agent.id for agent in roster]
    if len(set(ids)) != len(ids):
        raise ValueError("agent ids must be unique")
    sim = _Simulation(roster, classify, config or SimConfig(), start, end, progress)
    return sim.run(events, rejected or {}, outside_period)


class _Simulation:
    def __init__(
        self,
        roster: Sequence[AgentSnapshot],
        classify: Classifier,
        config: SimConfig,
        start: datetime,
        end: datetime,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.config = config
        self.behaviour = config.behaviour
        self.classify = classify
        self.period = (start, end)
        self.start = start.astimezone(UTC)
        self.end = end.astimezone(UTC)
        self.progress = progress
        self.rng = random.Random(config.seed)  # noqa: S311 (reproducible draws, not secrets)
        # The allocator reads agents ordered by id.
        self.agents = [_Agent(spec) for spec in sorted(roster, key=lambda a: a.id)]
        self.agent_by_id = {agent.id: agent for agent in self.agents}
        self.queues: list[_Queue] = []
        self.queue_by_name: dict[str, _Queue] = {}
        for spec in config.queues:
            self._add_queue(spec)
        self.configured = list(self.queues)
        self.heap: list[tuple[datetime, int, int, Any]] = []
        self.seq = 0
        self.leads: list[_Lead] = []
        self.assignments: list[_Assignment] = []
        self.event_ids: set[str] = set()
        self.customers: dict[str, int] = {}
        #: Open leads by phone, then business line.
        self.open: dict[str, dict[str, _Lead]] = {}
        self.dnc: set[str] = set()
        self.last_agent: dict[str, str] = {}
        self.nudged: dict[str, _Agent] = {}
        self.dispositions: Counter[str] = Counter()
        self.events = self.duplicates = self.merged = self.not_callable = 0
        self.arrivals = self.replayed = 0
        #: Allocation passes made so far: the clock of the leads' waiting reasons.
        self.passes = 0

    # --- scheduling -------------------------------------------------------------------------

    def _push(self, at: datetime, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, kind, self.seq, payload))

    def run(
        self, events: Iterable[Lead], rejected: Mapping[str, int], outside_period: int
    ) -> Report:
        for lead in events:
            at = lead.occurred_at.astimezone(UTC)
            if self.start <= at < self.end:
                self._push(at, _ARRIVAL, lead)
                self.arrivals += 1
            else:
                outside_period += 1
        for agent in self.agents:
            self._schedule_agent(agent)
        handlers: dict[int, Callable[[datetime, Any], None]] = {
            _SHIFT: self._on_shift,
            _CALL_DONE: self._on_call_done,
            _SLA: self._on_sla,
            _ARRIVAL: self._on_arrival,
            _DUE: self._on_due,
            _DIAL: self._on_dial,
        }
        heap = self.heap
        step = max(1, self.arrivals // 100)
        if self.progress is not None:
            self.progress(0, self.arrivals)
        while heap and heap[0][0] < self.end:
            now = heap[0][0]
            while heap and heap[0][0] == now:
                _, kind, _, payload = heapq.heappop(heap)
                handlers[kind](now, payload)
                if kind == _ARRIVAL and self.progress is not None and self.replayed % step == 0:
                    self.progress(self.replayed, self.arrivals)
            for queue in self.queues:
                if queue.dirty:
                    self._allocate(queue, now)
            self._dial(now)
        if self.progress is not None:
            self.progress(self.arrivals, self.arrivals)
        return self._report(rejected, outside_period)

    def _schedule_agent(self, agent: _Agent) -> None:
        if not agent.works:
            return
        spec = agent.spec
        day_start = clock.local_day_start(self.start, spec.timezone)
        agent.day_next = _next_day(day_start, spec.timezone)
        self._push(agent.day_next, _SHIFT, (agent, _NEW_DAY))
        if spec.shift is not None:
            for kind, window in ((_SHIFT_ON, spec.shift), (_SHIFT_OFF, _inverse(spec.shift))):
                self._push(
                    clock.next_opening(window, self.start, spec.timezone), _SHIFT, (agent, kind)
                )

    def _working(self, agent: _Agent, now: datetime) -> bool:
        spec = agent.spec
        return agent.works and (
            spec.shift is None or clock.in_window(spec.shift, now, spec.timezone)
        )

    # --- queues -----------------------------------------------------------------------------

    def _add_queue(self, spec: QueueSpec) -> _Queue:
        # The allocator's agent query: available, taking the line, skilled for some segment.
        pool = [
            agent
            for agent in self.agents
            if agent.works
            and (
                spec.business_line in agent.spec.business_lines or ANY in agent.spec.business_lines
            )
            and _serves_any(spec, agent.spec.segments)
        ]
        queue = _Queue(spec, pool)
        for agent in pool:
            agent.queues.append(queue)
        self.queues.append(queue)
        self.queue_by_name[spec.name] = queue
        return queue

    def _route(self, business_line: str, segment: str) -> _Queue | None:
        """`Allocator.route_to`: the first configured queue serving the lead, else the
        implicit queue of its business line."""
        for queue in self.configured:
            if queue.spec.serves(business_line, segment):
                return queue
        if not self.config.implicit_queues:
            return None
        config = self.config
        spec = implicit_queue(
            business_line,
            {queue.spec.name for queue in self.configured},
            sla=config.implicit_sla,
            max_attempts=config.implicit_max_attempts,
            call_window=config.implicit_call_window,
            default_timezone=config.default_timezone,
        )
        existing = self.queue_by_name.get(spec.name)
        return existing if existing is not None else self._add_queue(spec)

    def _mark(self, queues: Iterable[_Queue]) -> None:
        for queue in queues:
            queue.dirty = True

    def _queue_lead(self, lead: _Lead, now: datetime) -> None:
        """Put `lead` (state queued) into its queue: offered now or held until next_action_at."""
        queue = lead.queue
        if queue is None:
            return
        if lead.next_action_at is None or lead.next_action_at <= now:
            lead.next_action_at = None
            if lead.id not in queue.due:
                queue.due_segments[lead.segment] += 1
            queue.due[lead.id] = lead
            lead.due_since, lead.left_due = self.passes, None
            if not lead.listed:
                insort(queue.order, lead, key=_service_order)
                lead.listed = True
            queue.dirty = True
        else:
            queue.held[lead.id] = lead
            self._push(lead.next_action_at, _DUE, (lead, lead.next_action_at))

    def _undue(self, queue: _Queue, lead_id: int) -> _Lead:
        """Take a lead out of `due` (its `order` entry is dropped later)."""
        lead = queue.due.pop(lead_id)
        queue.due_segments[lead.segment] -= 1
        lead.left_due = self.passes
        return lead

    def _dequeue(self, lead: _Lead) -> None:
        queue = lead.queue
        if queue is not None:
            if lead.id in queue.due:
                self._undue(queue, lead.id)
            queue.held.pop(lead.id, None)

    def _reorder(self, lead: _Lead, priority: int, segment: str) -> None:
        """A merged event raised the priority: the lead moves up its queue."""
        queue = lead.queue
        if queue is not None and lead.listed:
            queue.order.remove(lead)
        if queue is not None and lead.id in queue.due:
            queue.due_segments[lead.segment] -= 1
            queue.due_segments[segment] += 1
        lead.priority, lead.segment = priority, segment
        if queue is not None and lead.listed:
            insort(queue.order, lead, key=_service_order)

    def _has_room(self, agent: _Agent, now: datetime) -> bool:
        self._roll_day(agent, now)
        spec = agent.spec
        return len(agent.open) < spec.capacity and agent.today < spec.daily_cap

    def _roll_day(self, agent: _Agent, now: datetime) -> None:
        if agent.day_next is not None and now >= agent.day_next:
            # Assignments are made in time order: none of the earlier ones is in the new day.
            agent.today = 0
            agent.day_next = _next_day(
                clock.local_day_start(now, agent.spec.timezone), agent.spec.timezone
            )

    def _snapshots(self, queue: _Queue, now: datetime) -> list[AgentSnapshot]:
        snapshots = []
        for agent in queue.agents:
            self._roll_day(agent, now)
            spec = agent.spec
            snapshots.append(
                AgentSnapshot(
                    id=spec.id,
                    business_lines=spec.business_lines,
                    segments=spec.segments,
                    languages=spec.languages,
                    capacity=spec.capacity,
                    daily_cap=spec.daily_cap,
                    weight=spec.weight,
                    timezone=spec.timezone,
                    shift=spec.shift,
                    status="available",
                    open_count=len(agent.open),
                    today_count=agent.today,
                )
            )
        return snapshots

    def _waiting(self, lead: _Lead) -> WaitingLead:
        return WaitingLead(
            id=lead.id,
            customer_id=lead.customer_id,
            business_line=lead.business_line,
            segment=lead.segment,
            priority=lead.priority,
            realtime=lead.realtime,
            queued_at=lead.arrived_at,
            attempts=lead.attempts,
            timezone=lead.timezone,
            excluded_agents=frozenset(lead.excluded),
            last_agent=self.last_agent.get(lead.phone),
            dnc=lead.phone in self.dnc,
        )

    def _allocate(self, queue: _Queue, now: datetime) -> None:
        """One allocator pass over a queue, as `Allocator.allocate` makes it.

        The allocator decides the top `batch_size` due leads, then the top of what is left
        (the leads it left waiting come first again), until a batch is short or places nothing.
        `decide` is a fold over leads in service order (each assignment counts against its
        agent at once, the strategies' clocks carry over in `QueueState`), so the same fold is
        made here chunk by chunk, each chunk decided with the loads and state the previous one
        left: chunks are counted into batches exactly as the allocator's, and the pass stops
        early once no agent on shift with room is skilled for any due lead's segment, since
        nothing after that can be assigned.
        """
        queue.dirty = False
        self.passes += 1
        tick = self.passes
        if len(queue.order) > 256 and len(queue.order) > 2 * len(queue.due):
            for lead in queue.order:
                lead.listed = lead.id in queue.due
            queue.order = [lead for lead in queue.order if lead.listed]
        batch_size = self.config.batch_size
        room = batch_size  # leads the allocator's current batch has yet to take
        placed = 0  # leads the current batch assigned, deferred or blocked
        waiting = 0  # leads of this pass left waiting: the next batch starts with them
        chunk = 16
        position = 0
        order = queue.order
        while True:
            leads: list[_Lead] = []
            while position < len(order) and len(leads) < min(chunk, room):
                lead = order[position]
                position += 1
                if lead.id in queue.due:
                    leads.append(lead)
            if not leads:
                break  # every due lead was met: the allocator's last batch was short
            skills = self._room_skills(queue, now)
            if stuck := self._stuck(queue, skills, now):
                queue.stalls.append((tick, stuck))
                break
            if self._may_place(queue, leads, skills, now):
                outcome = decide(
                    queue.spec,
                    [self._waiting(lead) for lead in leads],
                    self._snapshots(queue, now),
                    queue.state,
                    now,
                )
                self._apply(queue, outcome, now)
                left = len(outcome.waiting)
            else:  # decide would leave every one waiting and change nothing
                reasons: dict[str, str] = {}
                for lead in leads:
                    if (why := reasons.get(lead.segment)) is None:
                        why = reasons[lead.segment] = self._no_agent(queue, lead, now)
                    lead.waited, lead.waited_at = why, tick
                left = len(leads)
            placed += len(leads) - left
            waiting += left
            room -= len(leads)
            if room == 0:  # the allocator's batch is complete
                room = batch_size - waiting
                if placed == 0 or room <= 0:
                    why = f"behind {batch_size} leads no agent could take (one allocator batch)"
                    queue.stalls.append((tick, why))
                    break
                placed = 0
            chunk *= 2
        # Entries that left `due` (this pass or before) are dropped from the front.
        stale = 0
        while stale < len(order) and order[stale].id not in queue.due:
            order[stale].listed = False
            stale += 1
        del order[:stale]

    def _room_skills(self, queue: _Queue, now: datetime) -> frozenset[str] | None:
        """The segments the queue's agents on shift with room are skilled for; None: every one."""
        segments: set[str] = set()
        for agent in queue.agents:
            if self._working(agent, now) and self._has_room(agent, now):
                if ANY in agent.spec.segments:
                    return None
                segments |= agent.spec.segments
        return frozenset(segments)

    def _stuck(self, queue: _Queue, skills: frozenset[str] | None, now: datetime) -> str:
        """Why no due lead of `queue` can be assigned now, or "" when one may be: an agent on
        shift with room is skilled for the segment of some due lead."""
        if skills is None or any(queue.due_segments[segment] > 0 for segment in skills):
            return ""
        if not queue.agents:
            return "no agent takes this queue's leads"
        if not any(self._working(agent, now) for agent in queue.agents):
            return "no agent of the queue is on shift"
        return "every agent on shift skilled for it is at capacity or daily cap"

    def _may_place(
        self, queue: _Queue, leads: list[_Lead], skills: frozenset[str] | None, now: datetime
    ) -> bool:
        """Whether `decide` could assign, defer or block any of `leads`: a skilled agent has
        room, or a lead is on the DNC list, out of attempts or outside its call window."""
        if skills is None:
            return True
        spec = queue.spec
        window = spec.call_window
        closed: dict[str | None, bool] = {}
        for lead in leads:
            if lead.segment in skills or lead.phone in self.dnc:
                return True
            if lead.attempts >= spec.max_attempts:
                return True
            if window is not None:
                if lead.timezone not in closed:
                    closed[lead.timezone] = not clock.in_window(
                        window, now, lead.timezone, spec.default_timezone
                    )
                if closed[lead.timezone]:
                    return True
        return False

    def _no_agent(self, queue: _Queue, lead: _Lead, now: datetime) -> str:
        """Why no agent can take `lead` when none skilled for it has room (decide's words)."""
        skilled = [
            a for a in queue.agents if lead.segment in a.spec.segments or ANY in a.spec.segments
        ]
        if not skilled:
            return f"no agent is skilled for {lead.business_line}/{lead.segment}"
        if not any(self._working(agent, now) for agent in skilled):
            return "no agent skilled for it is on shift"
        return "every agent on shift skilled for it is at capacity or daily cap"

    def _apply(self, queue: _Queue, outcome: Outcome, now: datetime) -> None:
        queue.state = outcome.state
        for assign in outcome.assignments:
            lead = self._undue(queue, assign.lead_id)
            agent = self.agent_by_id[assign.agent_id]
            assignment = _Assignment(len(self.assignments), lead, agent, queue, assign.sla_deadline)
            self.assignments.append(assignment)
            lead.state = "assigned"
            lead.assignment = assignment
            lead.waited, lead.waited_at = "", -1
            if lead.assigned_at is None:
                lead.assigned_at = now
            agent.open.append(assignment)
            agent.today += 1
            agent.assignments += 1
            queue.assignments += 1
            self._push(assign.sla_deadline, _SLA, assignment)
            self.nudged[agent.id] = agent
        for defer in outcome.deferred:
            lead = self._undue(queue, defer.lead_id)
            lead.next_action_at = defer.until
            lead.hold = _WINDOW
            self._queue_lead(lead, now)
        for block in outcome.blocked:
            self._close(queue.due[block.lead_id], block.state)
        for lead_id, reason in outcome.waiting.items():
            lead = queue.due[lead_id]
            lead.waited, lead.waited_at = reason, self.passes

    def _close(self, lead: _Lead, state: LeadState) -> None:
        self._dequeue(lead)
        lead.state = state
        lead.next_action_at = None
        lines = self.open.get(lead.phone)
        if lines is not None and lines.get(lead.business_line) is lead:
            del lines[lead.business_line]
            if not lines:
                del self.open[lead.phone]

    # --- agents at work ---------------------------------------------------------------------

    def _dial(self, now: datetime) -> None:
        """Agents given work, or free again, start on their next lead after `pickup`."""
        for agent in self.nudged.values():
            if (
                agent.open
                and agent.calling is None
                and not agent.dialling
                and self._working(agent, now)
            ):
                agent.dialling = True
                self._push(now + self.behaviour.pickup, _DIAL, agent)
        self.nudged.clear()

    def _on_dial(self, now: datetime, agent: _Agent) -> None:
        agent.dialling = False
        if agent.calling is not None or not agent.open or not self._working(agent, now):
            return
        assignment = min(agent.open, key=lambda a: (-a.lead.priority, a.deadline, a.seq))
        lead = assignment.lead
        assignment.contacted_at = now
        lead.state = "in_progress"
        if lead.contacted_at is None:
            lead.contacted_at = now
        self.last_agent[lead.phone] = agent.id
        agent.contacts += 1
        assignment.queue.sla_met += 1
        disposition, duration = self._call()
        agent.calling = assignment
        agent.busy_seconds += max(0.0, (min(now + duration, self.end) - now).total_seconds())
        self._push(now + duration, _CALL_DONE, (assignment, disposition))

    def _call(self) -> tuple[Disposition, timedelta]:
        """One call's outcome and duration, from the behaviour model."""
        b = self.behaviour
        rng = self.rng
        if rng.random() >= b.answer_rate:
            return "no_answer", b.ring
        total = sum(b.answered.values())
        pick = rng.random() * total
        outcome: Disposition = "not_interested"
        for disposition, weight in b.answered.items():
            if weight <= 0:
                continue
            outcome = disposition
            pick -= weight
            if pick < 0:
                break
        mean = b.talk.total_seconds()
        if b.talk_spread > 0 and mean > 0:
            mu = math.log(mean) - b.talk_spread**2 / 2
            return outcome, timedelta(seconds=round(rng.lognormvariate(mu, b.talk_spread)))
        return outcome, b.talk

    def _on_call_done(self, now: datetime, payload: tuple[_Assignment, Disposition]) -> None:
        assignment, disposition = payload
        agent = assignment.agent
        agent.calling = None
        if assignment in agent.open:
            agent.open.remove(assignment)
        self._mark(agent.queues)
        self.nudged[agent.id] = agent
        if assignment.status != "open":
            return  # revoked while on the call (consent withdrawn): the disposition is refused
        assignment.status = "completed"
        lead = assignment.lead
        queue = assignment.queue
        lead.assignment = None
        self.dispositions[disposition] += 1
        callback_at = None
        if disposition == "callback":
            low, high = self.behaviour.callback_after
            callback_at = now + low + (high - low) * self.rng.random()
        # allocate.work.dispose: only no_answer counts an attempt.
        tried = lead.attempts + 1 if disposition == "no_answer" else lead.attempts
        decision = recycle(
            disposition,
            attempts=tried,
            max_attempts=queue.spec.max_attempts,
            now=now,
            retry_delay=self.config.retry_delay(tried),
            callback_at=callback_at,
        )
        self.last_agent[lead.phone] = agent.id
        lead.attempts = tried
        if disposition == "converted":
            agent.conversions += 1
            queue.conversions += 1
        if decision.add_to_dnc:
            self.dnc.add(lead.phone)
        if decision.state == "queued":
            lead.state = "queued"
            lead.next_action_at = decision.next_action_at
            lead.hold = (
                "callback, not due yet"
                if disposition == "callback"
                else "retry after no answer, not due yet"
            )
            self._queue_lead(lead, now)
        else:
            self._close(lead, decision.state)

    def _on_sla(self, now: datetime, assignment: _Assignment) -> None:
        """`Allocator.expire_slas` for one assignment."""
        if assignment.status != "open" or assignment.contacted_at is not None:
            return
        assignment.status = "expired"
        agent, lead, queue = assignment.agent, assignment.lead, assignment.queue
        agent.open.remove(assignment)
        agent.expired += 1
        queue.sla_expired += 1
        self._mark(agent.queues)
        lead.assignment = None
        lead.attempts += 1
        lead.excluded.append(agent.id)
        if lead.attempts < queue.spec.max_attempts:
            lead.state = "queued"
            lead.next_action_at = None
            self._queue_lead(lead, now)
        else:
            self._close(lead, "closed")

    def _on_shift(self, now: datetime, payload: tuple[_Agent, str]) -> None:
        agent, kind = payload
        spec = agent.spec
        later = now + timedelta(microseconds=1)
        if kind == _NEW_DAY:
            self._roll_day(agent, now)
            assert agent.day_next is not None
            self._push(agent.day_next, _SHIFT, (agent, _NEW_DAY))
        else:
            assert spec.shift is not None
            window = spec.shift if kind == _SHIFT_ON else _inverse(spec.shift)
            self._push(clock.next_opening(window, later, spec.timezone), _SHIFT, (agent, kind))
        if kind != _SHIFT_OFF:
            self._mark(agent.queues)
            self.nudged[agent.id] = agent

    def _on_due(self, now: datetime, payload: tuple[_Lead, datetime]) -> None:
        lead, at = payload
        if lead.state == "queued" and lead.next_action_at == at and lead.queue is not None:
            lead.queue.held.pop(lead.id, None)
            self._queue_lead(lead, now)

    # --- intake -----------------------------------------------------------------------------

    def _on_arrival(self, now: datetime, event: Lead) -> None:
        self.replayed += 1
        self.events += 1
        if event.event_id in self.event_ids:
            self.duplicates += 1
            return
        self.event_ids.add(event.event_id)
        phone = event.phone
        open_here = self.open.get(phone, {})
        context = CustomerContext(
            is_returning_customer=phone in self.customers,
            open_lead_lines=frozenset(open_here),
        )
        decision = self.classify(event, context, now)
        customer_id = self.customers.setdefault(phone, len(self.customers) + 1)
        blocked = phone in self.dnc or event.consent is False
        current = open_here.get(decision.business_line)
        if current is not None and current.arrived_at < now - self.config.dedup_window:
            current = None  # too old to merge into: a new lead (the old one stays open)
        if current is not None:
            self.merged += 1
            if decision.priority > current.priority:
                self._reorder(current, decision.priority, decision.segment)
            if blocked:
                if current.assignment is not None:
                    self._revoke(current.assignment)
                self._close(current, "do_not_call")
            return
        lead = _Lead(
            id=len(self.leads) + 1,
            customer_id=customer_id,
            phone=phone,
            business_line=decision.business_line,
            segment=decision.segment,
            priority=decision.priority,
            realtime=event.realtime,
            timezone=event.timezone,
            arrived_at=now,
            state="do_not_call" if blocked else "queued",
        )
        self.leads.append(lead)
        if blocked:
            self.not_callable += 1
            return
        self.open.setdefault(phone, {})[decision.business_line] = lead
        lead.queue = self._route(lead.business_line, lead.segment)
        if lead.queue is not None:
            lead.queue.leads += 1
            self._queue_lead(lead, now)

    def _revoke(self, assignment: _Assignment) -> None:
        assignment.status = "revoked"
        agent = assignment.agent
        if assignment is not agent.calling:
            agent.open.remove(assignment)
        self._mark(agent.queues)
        assignment.lead.assignment = None

    # --- the report -------------------------------------------------------------------------

    def _report(self, rejected: Mapping[str, int], outside_period: int) -> Report:
        agents = [
            AgentFigures(
                id=agent.id,
                status=agent.spec.status,
                assignments=agent.assignments,
                contacts=agent.contacts,
                conversions=agent.conversions,
                sla_expired=agent.expired,
                available_hours=(hours := self._available_seconds(agent) / 3600),
                busy_share=agent.busy_seconds / (hours * 3600) if hours > 0 else None,
            )
            for agent in self.agents
        ]
        rates = [a.per_hour for a in agents if a.per_hour is not None]
        queues = [
            QueueFigures(
                name=q.spec.name,
                business_line=q.spec.business_line,
                strategy=q.spec.strategy,
                leads=q.leads,
                assignments=q.assignments,
                sla_met=q.sla_met,
                sla_expired=q.sla_expired,
                conversions=q.conversions,
                speed_to_lead=Percentiles.of(
                    (lead.contacted_at - lead.arrived_at).total_seconds()
                    for lead in self.leads
                    if lead.queue is q and lead.contacted_at is not None
                ),
                waiting=len(q.due) + len(q.held),
            )
            for q in self.queues
        ]
        return Report(
            start=self.period[0],
            end=self.period[1],
            seed=self.config.seed,
            behaviour=self.behaviour,
            intake=IntakeFigures(
                events=self.events,
                duplicates=self.duplicates,
                merged=self.merged,
                leads=len(self.leads),
                not_callable=self.not_callable,
                rejected=dict(rejected),
                outside_period=outside_period,
            ),
            speed_to_lead=Percentiles.of(
                (lead.contacted_at - lead.arrived_at).total_seconds()
                for lead in self.leads
                if lead.contacted_at is not None
            ),
            time_to_assignment=Percentiles.of(
                (lead.assigned_at - lead.arrived_at).total_seconds()
                for lead in self.leads
                if lead.assigned_at is not None
            ),
            assignments=len(self.assignments),
            sla_met=sum(q.sla_met for q in self.queues),
            sla_expired=sum(q.sla_expired for q in self.queues),
            lead_states=dict(Counter(lead.state for lead in self.leads).most_common()),
            dispositions=dict(self.dispositions.most_common()),
            agents=agents,
            gini=gini(rates),
            queues=queues,
            waiting=dict(self._waiting_reasons().most_common()),
        )

    def _available_seconds(self, agent: _Agent) -> float:
        """Time in [start, end) during which the agent works (status and shift)."""
        if not agent.works:
            return 0.0
        spec = agent.spec
        if spec.shift is None:
            return (self.end - self.start).total_seconds()
        total = 0.0
        at = self.start
        on = clock.in_window(spec.shift, at, spec.timezone)
        while at < self.end:
            window = _inverse(spec.shift) if on else spec.shift
            change = clock.next_opening(window, at, spec.timezone)
            if change <= at:
                change = at + timedelta(seconds=1)
            if on:
                total += (min(change, self.end) - at).total_seconds()
            at, on = change, not on
        return total

    def _last_wait(self, lead: _Lead) -> str:
        """What kept `lead` from an agent the last time it was due: decide's reason, or that
        of a later pass that stopped before reaching it; "" if nothing ever did."""
        why, when = lead.waited, lead.waited_at
        queue = lead.queue
        if queue is not None and queue.stalls:
            upper = lead.left_due if lead.left_due is not None else self.passes + 1
            i = bisect_left(queue.stalls, (upper,)) - 1
            if i >= 0 and queue.stalls[i][0] > max(lead.due_since, when):
                why = queue.stalls[i][1]
        return why

    def _waiting_reasons(self) -> Counter[str]:
        """Why each lead still open at the end is not done. Due leads are asked of `decide` as
        it would see them at the end; a lead the call window closed on is put down to what
        kept it from an agent while the window was open, if anything did."""
        end = self.end
        reasons: Counter[str] = Counter()

        def closed_on(lead: _Lead) -> str:
            if why := self._last_wait(lead):
                return f"call window closed while waiting for an agent: {why}"
            return "outside the call window, not offered to an agent yet"

        for lead in self.leads:
            queue = lead.queue
            if lead.state == "in_progress":
                reasons["on a call at the end"] += 1
            elif lead.state == "assigned":
                assert lead.assignment is not None
                if self._working(lead.assignment.agent, end):
                    reasons["assigned, the agent is busy with other leads"] += 1
                else:
                    reasons["assigned to an agent now off shift (taken back at the SLA)"] += 1
            elif lead.state != "queued":
                continue
            elif queue is None:
                reasons[f"no queue serves {lead.business_line}/{lead.segment}"] += 1
            elif lead.id in queue.held:
                reasons[closed_on(lead) if lead.hold == _WINDOW else lead.hold] += 1
        for queue in self.queues:
            if not queue.due:
                continue
            # The allocator's next batch; the leads behind it wait for what it last said.
            due = [lead for lead in queue.order if lead.id in queue.due]
            batch, behind = due[: self.config.batch_size], due[self.config.batch_size :]
            for lead in behind:
                reasons[f"waiting for an agent: {self._last_wait(lead) or 'not reached'}"] += 1
            outcome = decide(
                queue.spec,
                [self._waiting(lead) for lead in batch],
                self._snapshots(queue, end),
                queue.state,
                end,
            )
            for _ in outcome.assignments:
                reasons["an agent has room for it now"] += 1
            for defer in outcome.deferred:
                reasons[closed_on(queue.due[defer.lead_id])] += 1
            for block in outcome.blocked:
                reasons[block.reason] += 1
            for reason in outcome.waiting.values():
                reasons[f"waiting for an agent: {reason}"] += 1
        return reasons


def _service_order(lead: _Lead) -> tuple[int, bool, datetime, int]:
    """The allocator's order of waiting leads (and decide's)."""
    return (-lead.priority, not lead.realtime, lead.arrived_at, lead.id)


def _inverse(window: Window) -> Window:
    """The hours outside `window`: it opens when `window` closes."""
    return Window(window.end, window.start)


def _next_day(day_start: datetime, tz: str) -> datetime:
    """The start of the local day after the one starting at `day_start` (days are 23-25 h)."""
    return clock.local_day_start(day_start + timedelta(hours=36), tz)


def _serves_any(queue: QueueSpec, agent_segments: frozenset[str]) -> bool:
    """`allocate.allocator._serves_any`: could an agent with these segments take any lead."""
    if ANY in agent_segments:
        return True
    if not queue.segments:
        return bool(agent_segments)
    return not queue.segments.isdisjoint(agent_segments)


__all__ = [
    "DEFAULT_ANSWERED",
    "AgentFigures",
    "Behaviour",
    "Classifier",
    "IntakeFigures",
    "Percentiles",
    "QueueFigures",
    "Report",
    "SimConfig",
    "gini",
    "simulate",
]
