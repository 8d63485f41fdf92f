"""The values the allocation decision works on: queues, waiting leads, agents, and its outcome.

Plain frozen dataclasses, built by the allocator from the database (or by the simulator from
files) and handed to `allocate.decide.decide`, which is pure: no I/O, no clock (`now` is an
argument). The same decision therefore runs in production, in the simulator and in tests.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta

from schemas.vocab import AgentStatus, LeadState, Strategy

#: In an agent's `business_lines` or `segments`: every one.
ANY: str = "*"


@dataclass(frozen=True, slots=True)
class Window:
    """Local clock hours [start, end); `end <= start` wraps past midnight (22:00-06:00)."""

    start: time
    end: time

    def contains(self, local: time) -> bool:
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    @classmethod
    def parse(cls, text: str) -> Window:
        """'09:00-21:00' -> Window(09:00, 21:00); a clear ValueError otherwise."""
        try:
            start, end = (part.strip() for part in text.split("-"))
            window = cls(time.fromisoformat(start), time.fromisoformat(end))
        except ValueError:
            raise ValueError(f"{text!r} is not a window such as 09:00-21:00") from None
        if window.start == window.end:
            raise ValueError(f"{text!r} is an empty window (start equals end)")
        return window

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One queue of `leadflow.yaml`'s `queues:` list."""

    name: str
    business_line: str
    #: Segments of the business line this queue serves; empty means all of them.
    segments: frozenset[str]
    strategy: Strategy
    #: Used by `sticky` when the customer's last agent cannot take the lead.
    fallback_strategy: Strategy
    #: First-contact SLA: an assignment not contacted within it is taken back.
    sla: timedelta
    max_attempts: int
    #: When leads may be called, in the lead's local time; None means any time.
    call_window: Window | None
    #: The timezone of a lead whose own timezone is unknown.
    default_timezone: str

    def serves(self, business_line: str, segment: str) -> bool:
        return business_line == self.business_line and (
            not self.segments or segment in self.segments
        )


def route(queues: list[QueueSpec], business_line: str, segment: str) -> QueueSpec | None:
    """The first queue, in configuration order, that serves a lead; None when none does."""
    for queue in queues:
        if queue.serves(business_line, segment):
            return queue
    return None


def implicit_queue(
    business_line: str,
    configured: Collection[str],
    *,
    sla: timedelta,
    max_attempts: int,
    call_window: Window | None,
    default_timezone: str,
) -> QueueSpec:
    """The queue a lead waits in when no configured queue serves it: named after its business
    line (plus `.default` if a configured queue already has that name), round robin, every
    segment, with the defaults of a queue entry."""
    return QueueSpec(
        name=f"{business_line}.default" if business_line in configured else business_line,
        business_line=business_line,
        segments=frozenset(),
        strategy="round_robin",
        fallback_strategy="least_loaded",
        sla=sla,
        max_attempts=max_attempts,
        call_window=call_window,
        default_timezone=default_timezone,
    )


@dataclass(frozen=True, slots=True)
class WaitingLead:
    """A queued lead of one queue, as the decision needs it."""

    id: int
    customer_id: int
    business_line: str
    segment: str
    priority: int  # 0..100, higher first
    realtime: bool  # real-time (and HTTP) leads go before stock/staging of equal priority
    queued_at: datetime
    attempts: int  # failed attempts so far (no answer, SLA expired)
    timezone: str | None = None  # IANA; None means the queue's default
    language: str | None = None
    #: Agents who must not get it again: they rejected it or let its SLA expire.
    excluded_agents: frozenset[str] = frozenset()
    #: The agent who last worked this customer (any lead), for `sticky`.
    last_agent: str | None = None
    #: The phone is on the do-not-call list now (checked at assignment time, not only at intake).
    dnc: bool = False


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """An agent and their load at the moment of the decision."""

    id: str
    business_lines: frozenset[str]  # may hold ANY
    segments: frozenset[str]  # may hold ANY
    languages: frozenset[str]  # empty: takes every language
    capacity: int  # most open assignments at once
    daily_cap: int  # most assignments per local day
    weight: float  # > 0; share under `weighted`
    timezone: str  # IANA, for the shift and the day of the daily cap
    shift: Window | None  # None: no shift limit
    status: AgentStatus
    open_count: int  # open assignments now
    today_count: int  # assignments since the start of the agent's local day


@dataclass(slots=True)
class QueueState:
    """What a queue's strategies remember between decisions; persisted with the assignments.

    `rr_cursor` is the id of the agent round robin served last (the next one is the first
    eligible id after it, wrapping), so agents joining or leaving never reset the rotation.
    `virtual_time` and `agent_vtime` implement start-time fair queueing: every assignment
    advances its agent's virtual time by 1/weight from max(own, queue's), so an agent who
    was away resumes at the queue's current virtual time instead of catching up.
    """

    rr_cursor: str | None = None
    virtual_time: float = 0.0
    agent_vtime: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Assign:
    lead_id: int
    agent_id: str
    strategy: Strategy  # the strategy that chose the agent (a sticky queue's fallback if used)
    reason: str  # for people: why this agent, e.g. "round robin after a-07"
    attempt: int  # 1 for the first try
    sla_deadline: datetime


@dataclass(frozen=True, slots=True)
class Defer:
    """A lead that may not be called now; it is offered again at `until`."""

    lead_id: int
    until: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Block:
    """A lead that must never be allocated (DNC, attempts exhausted): it leaves the queue."""

    lead_id: int
    state: LeadState
    reason: str


@dataclass(slots=True)
class Outcome:
    assignments: list[Assign] = field(default_factory=list)
    deferred: list[Defer] = field(default_factory=list)
    blocked: list[Block] = field(default_factory=list)
    #: Leads left waiting this time (no eligible agent with room), with the reason.
    waiting: dict[int, str] = field(default_factory=dict)
    state: QueueState = field(default_factory=QueueState)
