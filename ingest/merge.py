"""Lead identity and merging (CONTRACT.md §4) as a pure fold over a batch of events.

For each event, in order: an open lead of the same customer and business line created within
`dedup_window` absorbs it (event count, last event time, attributes; priority only rises, and
a higher-priority event brings its segment and rules along); otherwise the event starts a new
lead, `queued`, or `do_not_call` when the phone is on the DNC list or the event withdraws
consent. A withdrawal of consent also moves an open lead it merges into to `do_not_call`.
Folding event by event is what makes a batch come out exactly as the events one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from schemas.lead import Classification, CustomerContext, Lead
from schemas.vocab import LeadState


@dataclass(frozen=True, slots=True)
class OpenLead:
    """An open lead as stored before the batch."""

    id: int
    phone: str
    business_line: str
    segment: str
    priority: int
    state: LeadState
    created_at: datetime
    last_event_at: datetime


@dataclass(slots=True)
class PlannedLead:
    """A lead as the batch leaves it: new (ref < 0 until stored) or an existing one changed."""

    ref: int  # the lead id, or -(n + 1) for the n-th new lead of the batch
    phone: str
    business_line: str
    segment: str
    priority: int
    state: LeadState
    created_at: datetime
    matched_rules: tuple[str, ...]
    rules_version: str
    first: Lead | None  # the event that created it, or the first one merged into it
    last_event_at: datetime
    events: int = 0  # events of this batch merged in
    attributes: dict[str, Any] = field(default_factory=dict)
    initial_state: LeadState | None = None  # None for new leads
    reclassified: bool = False

    @property
    def is_new(self) -> bool:
        return self.ref < 0


@dataclass(frozen=True, slots=True)
class Transition:
    index: int  # of the event that caused it
    ref: int
    from_state: LeadState | None
    to_state: LeadState
    reason: str


@dataclass
class Plan:
    leads: list[PlannedLead]
    targets: list[int]  # per event: the ref of the lead it went to
    merged: list[bool]  # per event: merged into an existing or earlier lead
    transitions: list[Transition]

    @property
    def new_leads(self) -> list[PlannedLead]:
        return [lead for lead in self.leads if lead.is_new]

    @property
    def changed_leads(self) -> list[PlannedLead]:
        return [lead for lead in self.leads if not lead.is_new]


Classify = Callable[[Sequence[Lead], Mapping[str, CustomerContext]], list[Classification]]


class Planner:
    """The fold: customer by customer state, fed one event at a time in order."""

    def __init__(
        self,
        open_leads: Iterable[OpenLead],
        dnc: frozenset[str] | set[str],
        known_customers: frozenset[str] | set[str],
        now: datetime,
        dedup_window: timedelta,
    ) -> None:
        self.now = now
        self.dnc = dnc
        self.known = set(known_customers)
        self.cutoff = now - dedup_window
        self.by_key: dict[tuple[str, str], PlannedLead] = {}
        self.open_lines: dict[str, set[str]] = {}
        for lead in sorted(open_leads, key=lambda o: o.created_at):
            self.open_lines.setdefault(lead.phone, set()).add(lead.business_line)
            if lead.created_at >= self.cutoff:  # the newest open lead within the window wins
                self.by_key[(lead.phone, lead.business_line)] = PlannedLead(
                    ref=lead.id,
                    phone=lead.phone,
                    business_line=lead.business_line,
                    segment=lead.segment,
                    priority=lead.priority,
                    state=lead.state,
                    created_at=lead.created_at,
                    matched_rules=(),
                    rules_version="",
                    first=None,
                    last_event_at=lead.last_event_at,
                    initial_state=lead.state,
                )
        self.touched: dict[int, PlannedLead] = {}
        self.transitions: list[Transition] = []
        self.new_count = 0

    def context(self, phone: str) -> CustomerContext:
        return CustomerContext(
            is_returning_customer=phone in self.known,
            open_lead_lines=frozenset(self.open_lines.get(phone, ())),
        )

    def apply(self, index: int, event: Lead, decision: Classification) -> tuple[int, bool]:
        """Take one event; return (ref of its lead, merged into an existing one)."""
        self.known.add(event.phone)
        key = (event.phone, decision.business_line)
        on_dnc = event.phone in self.dnc
        blocked = on_dnc or event.consent is False
        current = self.by_key.get(key)
        if current is None:
            self.new_count += 1
            state: LeadState = "do_not_call" if blocked else "queued"
            current = PlannedLead(
                ref=-self.new_count,
                phone=event.phone,
                business_line=decision.business_line,
                segment=decision.segment,
                priority=decision.priority,
                state=state,
                created_at=self.now,
                matched_rules=decision.matched_rules,
                rules_version=decision.rules_version,
                first=event,
                last_event_at=event.occurred_at,
                events=1,
                attributes=dict(event.attributes),
            )
            reason = f"new lead from {event.event_type} via {event.intake}"
            if blocked:
                reason += "; phone on the do-not-call list" if on_dnc else "; no consent"
            self.transitions.append(Transition(index, current.ref, None, state, reason))
            self.touched[current.ref] = current
            if state != "do_not_call":  # a closed lead takes no more events
                self.by_key[key] = current
                self.open_lines.setdefault(event.phone, set()).add(decision.business_line)
            return current.ref, False

        if current.first is None:
            current.first = event
        current.events += 1
        current.last_event_at = max(current.last_event_at, event.occurred_at)
        current.attributes.update(event.attributes)
        if decision.priority > current.priority:
            current.priority = decision.priority
            current.segment = decision.segment
            current.matched_rules = decision.matched_rules
            current.rules_version = decision.rules_version
            current.reclassified = True
        self.touched[current.ref] = current
        if blocked:
            why = "phone on the do-not-call list" if on_dnc else "consent withdrawn"
            self.transitions.append(
                Transition(index, current.ref, current.state, "do_not_call", why)
            )
            current.state = "do_not_call"
            del self.by_key[key]
            if not any(k[0] == event.phone for k in self.by_key):
                self.open_lines.pop(event.phone, None)
            else:
                self.open_lines[event.phone].discard(decision.business_line)
        return current.ref, True


def plan(
    events: Sequence[Lead],
    classify: Classify,
    open_leads: Iterable[OpenLead],
    dnc: frozenset[str] | set[str],
    known_customers: frozenset[str] | set[str],
    now: datetime,
    dedup_window: timedelta,
) -> Plan:
    """Classify and place each event, in order, exactly as if the events came one at a time.

    A customer's later events see what its earlier ones left (a returning customer, an open
    line). Classification stays batched: it runs in waves that hold at most one event per
    customer, so a batch with no repeated customer is classified in one call.
    """
    planner = Planner(open_leads, dnc, known_customers, now, dedup_window)
    targets = [0] * len(events)
    merged = [False] * len(events)
    pending: dict[str, list[int]] = {}
    for index, event in enumerate(events):
        pending.setdefault(event.phone, []).append(index)
    depth = 0
    while pending:
        wave = sorted(indexes[depth] for indexes in pending.values())
        leads = [events[i] for i in wave]
        decisions = classify(leads, {lead.phone: planner.context(lead.phone) for lead in leads})
        for index, decision in zip(wave, decisions, strict=True):
            targets[index], merged[index] = planner.apply(index, events[index], decision)
        depth += 1
        pending = {phone: idx for phone, idx in pending.items() if len(idx) > depth}
    # New leads are numbered, and the audit trail written, in event order, as one by one would.
    order = list(dict.fromkeys(targets))
    renumber = {ref: -(n + 1) for n, ref in enumerate(r for r in order if r < 0)}
    placed = [planner.touched[ref] for ref in order]
    for lead in placed:
        lead.ref = renumber.get(lead.ref, lead.ref)
    transitions = [
        Transition(t.index, renumber.get(t.ref, t.ref), t.from_state, t.to_state, t.reason)
        for t in sorted(planner.transitions, key=lambda t: t.index)
    ]
    targets = [renumber.get(ref, ref) for ref in targets]
    return Plan(placed, targets, merged, transitions)
