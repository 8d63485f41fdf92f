"""The allocator's database side: route queued leads to queues, decide, write, sweep SLAs.

One transaction per queue and batch. What makes several allocators at once safe:

- the batch's leads are taken `FOR UPDATE SKIP LOCKED`, so two allocators never hold one lead;
- a transaction-scoped advisory lock per queue serialises the queue's fairness state (round-robin
  cursor, fair-queueing clocks); an allocator finding it taken moves on to the next queue;
- the queue's available agents are locked `FOR NO KEY UPDATE` in id order before their open and
  today's assignments are counted, so two queues sharing an agent never both fill the agent's
  last slot (and, locking in one order, never deadlock); the foreign keys of assignments and
  dispositions take only KEY SHARE locks, which do not wait for these;
- the partial unique index "one open assignment per lead" turns any mistake into a rolled-back
  transaction rather than a lead held by two agents.

Assignments, the leads' state changes, their audit trail and the outbox rows the relay
publishes to `leads.assigned` commit together; a rolled-back decision leaves no trace.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from allocate.clock import in_window, local_day_start
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
from allocate.relay import OUTBOX_CHANNEL
from allocate.work import WAKE_CHANNEL
from schemas.vocab import AgentStatus, LeadState

ACTOR = "allocator"
#: First key of the per-queue advisory locks (the second is the hash of the queue name).
_QUEUE_LOCK = 0x1EAD_A110  # "lead allo(cation)"


_DEFAULT_WINDOW = Window(time(9), time(21))


@dataclass(frozen=True)
class AllocatorConfig:
    queues: Sequence[QueueSpec]
    assigned_topic: str
    batch_size: int = 1000
    #: Leads no configured queue serves wait in a queue named after their business line.
    implicit_queues: bool = True
    default_timezone: str = "Asia/Shanghai"
    #: The settings of implicit queues (a queue entry's defaults).
    implicit_sla: timedelta = timedelta(minutes=5)
    implicit_max_attempts: int = 3
    implicit_call_window: Window | None = _DEFAULT_WINDOW
    #: Batches of only-waiting leads a pass looks past, per queue, while agents have room.
    scan_batches: int = 10


@dataclass
class PassResult:
    """What one allocation pass did, for metrics and logs."""

    assigned: int = 0
    deferred: int = 0
    blocked: int = 0
    expired: int = 0
    routed: int = 0
    #: Assignments per (queue, strategy that chose the agent).
    by_queue_strategy: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (queue, seconds from entering the queue to the assignment) of first attempts.
    speeds: list[tuple[str, float]] = field(default_factory=list)

    #: Leads the decision left waiting (no eligible agent with room).
    waiting: int = 0
    #: Whether, after the batch, some available agent in shift still had room.
    room: bool = False

    @property
    def taken(self) -> int:
        """Leads that left the queue's waiting list (assigned, deferred or blocked)."""
        return self.assigned + self.deferred + self.blocked

    def add(self, other: PassResult) -> None:
        self.assigned += other.assigned
        self.deferred += other.deferred
        self.blocked += other.blocked
        self.expired += other.expired
        self.routed += other.routed
        for key, value in other.by_queue_strategy.items():
            self.by_queue_strategy[key] = self.by_queue_strategy.get(key, 0) + value
        self.speeds += other.speeds


# Arrays go as binary parameters (%b): psycopg dumps a list as a text literal by scanning every
# element for quoting, which for a batch's outbox payloads (JSON, full of quotes) cost more CPU
# than the rest of the allocator; in binary it is a copy.
_ROUTE_PAIRS = """
SELECT DISTINCT business_line, segment FROM leads WHERE state = 'queued' AND queue IS NULL
"""
_ROUTE = """
UPDATE leads SET queue = r.queue, updated_at = now()
FROM unnest(%b::text[], %b::text[], %b::text[]) AS r(business_line, segment, queue)
WHERE leads.state = 'queued' AND leads.queue IS NULL
  AND leads.business_line = r.business_line AND leads.segment = r.segment
"""
_UNROUTE = """
UPDATE leads SET queue = NULL, updated_at = now()
WHERE state = 'queued' AND queue IS NOT NULL AND NOT (queue = ANY(%b::text[]))
"""
_UPSERT_QUEUE = """
INSERT INTO queues AS q (name, business_line, segments, strategy, fallback_strategy, sla_seconds,
                         max_attempts, call_window_start, call_window_end, config)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE SET
    business_line = EXCLUDED.business_line, segments = EXCLUDED.segments,
    strategy = EXCLUDED.strategy, fallback_strategy = EXCLUDED.fallback_strategy,
    sla_seconds = EXCLUDED.sla_seconds, max_attempts = EXCLUDED.max_attempts,
    call_window_start = EXCLUDED.call_window_start, call_window_end = EXCLUDED.call_window_end,
    config = EXCLUDED.config, updated_at = now()
WHERE (q.business_line, q.segments, q.strategy, q.fallback_strategy, q.sla_seconds,
       q.max_attempts, q.call_window_start, q.call_window_end, q.config)
  IS DISTINCT FROM
      (EXCLUDED.business_line, EXCLUDED.segments, EXCLUDED.strategy, EXCLUDED.fallback_strategy,
       EXCLUDED.sla_seconds, EXCLUDED.max_attempts, EXCLUDED.call_window_start,
       EXCLUDED.call_window_end, EXCLUDED.config)
"""
_WAITING = """
SELECT l.id, l.customer_id, l.business_line, l.segment, l.priority, l.realtime, l.queued_at,
       l.attempts, c.timezone, c.language, c.last_agent_id, d.phone_e164 IS NOT NULL,
       c.phone_e164, c.name
FROM leads l
JOIN customers c ON c.id = l.customer_id
LEFT JOIN dnc d ON d.phone_e164 = c.phone_e164
WHERE l.state = 'queued' AND l.queue = %s AND (l.next_action_at IS NULL OR l.next_action_at <= %s)
ORDER BY l.priority DESC, l.realtime DESC, l.queued_at, l.id
LIMIT %s OFFSET %s
FOR UPDATE OF l SKIP LOCKED
"""
_EXCLUDED = """
SELECT lead_id, array_agg(DISTINCT agent_id) FROM assignments
WHERE lead_id = ANY(%b::bigint[]) AND status IN ('expired', 'revoked')
GROUP BY lead_id
"""
_AGENTS = """
SELECT id, business_lines, segments, languages, capacity, daily_cap, weight, timezone,
       shift_start, shift_end, status
FROM agents
WHERE status = 'available' AND (%s = ANY(business_lines) OR '*' = ANY(business_lines))
ORDER BY id
FOR NO KEY UPDATE
"""
# Open assignments are counted in one grouped pass over the agents' open ones. Counted per
# agent in a correlated subquery, a plan made while few assignments were open (statistics of a
# quiet hour, or of a fresh database) may read every open assignment of every agent once per
# agent: to the planner both partial indexes on open assignments (by lead and by agent) look
# equally cheap then. Grouped, the worst plan reads them once.
_LOADS = """
SELECT x.id, coalesce(o.open_count, 0),
       (SELECT count(*) FROM assignments s WHERE s.agent_id = x.id AND s.assigned_at >= x.day_start)
FROM unnest(%b::text[], %b::timestamptz[]) AS x(id, day_start)
LEFT JOIN (
    SELECT agent_id, count(*) AS open_count FROM assignments
    WHERE status = 'open' AND agent_id = ANY(%b::text[])
    GROUP BY agent_id
) o ON o.agent_id = x.id
"""
_QUEUE_STATE = "SELECT rr_cursor, virtual_time FROM queues WHERE name = %s"
_AGENT_VTIMES = """
SELECT agent_id, vtime FROM queue_agent_state WHERE queue = %s AND agent_id = ANY(%b::text[])
"""
_INSERT_ASSIGNMENTS = """
INSERT INTO assignments (id, lead_id, agent_id, queue, strategy, reason, attempt, assigned_at,
                         sla_deadline)
SELECT a.id, a.lead_id, a.agent_id, %s, a.strategy, a.reason, a.attempt, %s, a.sla_deadline
FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::text[], %b::text[], %b::int[],
            %b::timestamptz[]) AS a(id, lead_id, agent_id, strategy, reason, attempt, sla_deadline)
"""
_MARK_ASSIGNED = """
UPDATE leads SET state = 'assigned', next_action_at = NULL, updated_at = %s
WHERE id = ANY(%b::bigint[])
"""
_TRANSITIONS = """
INSERT INTO lead_transitions (lead_id, from_state, to_state, actor, reason, at)
SELECT t.lead_id, t.from_state, t.to_state, %s, t.reason, %s
FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[])
     AS t(lead_id, from_state, to_state, reason)
"""
_OUTBOX = """
INSERT INTO outbox (topic, key, payload)
SELECT %s, o.key, o.payload FROM unnest(%b::text[], %b::jsonb[]) AS o(key, payload)
"""
_DEFER = """
UPDATE leads SET next_action_at = d.until, updated_at = %s
FROM unnest(%b::bigint[], %b::timestamptz[]) AS d(id, until)
WHERE leads.id = d.id
"""
_BLOCK = """
UPDATE leads SET state = b.state, closed_at = %s, next_action_at = NULL, updated_at = %s
FROM unnest(%b::bigint[], %b::text[]) AS b(id, state)
WHERE leads.id = b.id
"""
_SAVE_QUEUE_STATE = "UPDATE queues SET rr_cursor = %s, virtual_time = %s WHERE name = %s"
_SAVE_AGENT_VTIMES = """
INSERT INTO queue_agent_state (queue, agent_id, vtime)
SELECT %s, v.agent_id, v.vtime FROM unnest(%s::text[], %s::float8[]) AS v(agent_id, vtime)
ON CONFLICT (queue, agent_id) DO UPDATE SET vtime = EXCLUDED.vtime
"""
_EXPIRE = """
WITH due AS (
    SELECT id FROM assignments
    WHERE status = 'open' AND first_contact_at IS NULL AND sla_deadline <= %s
    ORDER BY sla_deadline
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
UPDATE assignments s SET status = 'expired', closed_at = %s,
       close_reason = 'first-contact SLA expired'
FROM due WHERE s.id = due.id
RETURNING s.lead_id, s.agent_id, s.queue
"""
_LEADS_FOR_UPDATE = """
SELECT id, state, attempts, queue FROM leads WHERE id = ANY(%b::bigint[]) ORDER BY id FOR UPDATE
"""
_REQUEUE = """
UPDATE leads SET state = r.state, attempts = r.attempts, updated_at = %s,
       closed_at = CASE WHEN r.state = 'queued' THEN NULL ELSE %s END, next_action_at = NULL
FROM unnest(%b::bigint[], %b::text[], %b::int[]) AS r(id, state, attempts)
WHERE leads.id = r.id
"""


class Allocator:
    """Decides and writes assignments; stateless between calls (the state is in PostgreSQL)."""

    def __init__(
        self, config: AllocatorConfig, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.config = config
        self.clock = clock
        self.queues: dict[str, QueueSpec] = {queue.name: queue for queue in config.queues}
        self._configured = list(config.queues)
        self._synced: set[str] = set()

    # -- queues ---------------------------------------------------------------------------

    def implicit_queue(self, business_line: str) -> QueueSpec:
        """The queue of a lead no configured queue serves (named after its business line)."""
        config = self.config
        queue = implicit_queue(
            business_line,
            # Configured names only: the implicit queue registered on the first call must be
            # found again on the next, not shadowed by a second one.
            {queue.name for queue in self._configured},
            sla=config.implicit_sla,
            max_attempts=config.implicit_max_attempts,
            call_window=config.implicit_call_window,
            default_timezone=config.default_timezone,
        )
        return self.queues.setdefault(queue.name, queue)

    def route_to(self, business_line: str, segment: str) -> QueueSpec | None:
        for queue in self._configured:
            if queue.serves(business_line, segment):
                return queue
        return self.implicit_queue(business_line) if self.config.implicit_queues else None

    def sync_queues(self, conn: psycopg.Connection[Any]) -> None:
        """Write the configuration of queues into `queues`, and send leads waiting in a queue
        that no longer exists back to routing."""
        with conn.transaction():
            for queue in self.queues.values():
                self._upsert_queue(conn, queue)
            known = [q.name for q in self._configured]
            if self.config.implicit_queues:
                # Implicit queues come back by routing; only unknown names are unrouted.
                rows = conn.execute(
                    "SELECT DISTINCT business_line, queue FROM leads"
                    " WHERE state = 'queued' AND queue IS NOT NULL"
                ).fetchall()
                known += [q for line, q in rows if self.implicit_queue(line).name == q]
            conn.execute(_UNROUTE, (known,))

    def _upsert_queue(self, conn: psycopg.Connection[Any], queue: QueueSpec) -> None:
        window = queue.call_window
        conn.execute(
            _UPSERT_QUEUE,
            (
                queue.name,
                queue.business_line,
                sorted(queue.segments),
                queue.strategy,
                queue.fallback_strategy,
                max(1, int(queue.sla.total_seconds())),
                queue.max_attempts,
                window.start if window else None,
                window.end if window else None,
                Jsonb({"default_timezone": queue.default_timezone}),
            ),
        )
        self._synced.add(queue.name)

    def route(self, conn: psycopg.Connection[Any]) -> int:
        """Give every unrouted queued lead its queue; returns how many were routed."""
        with conn.transaction():
            pairs = conn.execute(_ROUTE_PAIRS).fetchall()
            lines, segments, names = [], [], []
            for line, segment in pairs:
                queue = self.route_to(line, segment)
                if queue is None:
                    continue
                if queue.name not in self._synced:
                    self._upsert_queue(conn, queue)
                lines.append(line)
                segments.append(segment)
                names.append(queue.name)
            if not names:
                return 0
            return conn.execute(_ROUTE, (lines, segments, names)).rowcount

    # -- allocation -----------------------------------------------------------------------

    def allocate(self, conn: psycopg.Connection[Any], now: datetime | None = None) -> PassResult:
        """Route, then allocate every queue until it has no lead it can place now.

        Without `now` (production) each batch reads the clock twice: to pick due leads, and
        again once its agents are locked and counted, for the decision and the timestamps it
        writes. So an assignment is never stamped earlier than the close of an assignment whose
        freed capacity it used, and the audit trail can prove capacity was never exceeded.
        """
        result = PassResult(routed=self.route(conn))
        for queue in list(self.queues.values()):
            skip = scanned = 0
            while True:
                step = self.allocate_batch(conn, queue, now, skip=skip)
                if step is None:
                    break
                done, seen = step
                result.add(done)
                if seen < self.config.batch_size:
                    break  # a short batch was the rest of the queue
                # Leads left waiting stay at the head of the queue: the next batch starts
                # after them, so one lead nobody may take cannot hide the leads behind it.
                skip += done.waiting
                if done.taken == 0:
                    # Nothing placed: go deeper only while agents still have room, and not
                    # beyond `scan_batches` batches; anything else changes by a wake-up.
                    scanned += 1
                    if not done.room or scanned >= self.config.scan_batches:
                        break
        return result

    def allocate_batch(
        self,
        conn: psycopg.Connection[Any],
        queue: QueueSpec,
        at: datetime | None = None,
        *,
        skip: int = 0,
    ) -> tuple[PassResult, int] | None:
        """One decision over one batch of a queue (after its first `skip` due leads): what it
        did and how many leads it looked at; None when another allocator holds the queue."""
        now = at or self.clock()
        with conn.transaction():
            locked = conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (_QUEUE_LOCK, queue.name)
            ).fetchone()
            if not locked or not locked[0]:
                return None
            rows = conn.execute(
                _WAITING, (queue.name, now, self.config.batch_size, skip)
            ).fetchall()
            if not rows:
                return PassResult(), 0
            ids = [row[0] for row in rows]
            excluded: dict[int, list[str]] = dict(conn.execute(_EXCLUDED, (ids,)).fetchall())
            leads = [
                WaitingLead(
                    id=row[0],
                    customer_id=row[1],
                    business_line=row[2],
                    segment=row[3],
                    priority=row[4],
                    realtime=row[5],
                    queued_at=row[6],
                    attempts=row[7],
                    timezone=row[8],
                    language=row[9],
                    last_agent=row[10],
                    dnc=row[11],
                    excluded_agents=frozenset(excluded.get(row[0], ())),
                )
                for row in rows
            ]
            agents = self._agents(conn, queue, now)
            now = at or self.clock()
            state = self._state(conn, queue, [agent.id for agent in agents])
            outcome = decide(queue, leads, agents, state, now)
            customers = {row[0]: (row[12], row[13], row[8]) for row in rows}
            self._write(conn, queue, {lead.id: lead for lead in leads}, customers, outcome, now)
        result = PassResult(
            assigned=len(outcome.assignments),
            deferred=len(outcome.deferred),
            blocked=len(outcome.blocked),
            waiting=len(outcome.waiting),
            room=_room(queue, agents, now) > len(outcome.assignments),
        )
        counts = result.by_queue_strategy
        waited = {lead.id: lead.queued_at for lead in leads}
        for assign in outcome.assignments:
            key = (queue.name, assign.strategy)
            counts[key] = counts.get(key, 0) + 1
            if assign.attempt == 1:
                seconds = (now - waited[assign.lead_id]).total_seconds()
                result.speeds.append((queue.name, seconds))
        return result, len(rows)

    def _agents(
        self, conn: psycopg.Connection[Any], queue: QueueSpec, now: datetime
    ) -> list[AgentSnapshot]:
        rows = conn.execute(_AGENTS, (queue.business_line,)).fetchall()
        rows = [row for row in rows if _serves_any(queue, row[2])]
        if not rows:
            return []
        # The same zone the decision reads the shift in, so the day and the shift agree.
        day_starts = [local_day_start(now, row[7], queue.default_timezone) for row in rows]
        ids = [row[0] for row in rows]
        loads = {
            agent_id: (open_count, today_count)
            for agent_id, open_count, today_count in conn.execute(_LOADS, (ids, day_starts, ids))
        }
        agents = []
        for row in rows:
            open_count, today_count = loads[row[0]]
            status: AgentStatus = row[10]
            agents.append(
                AgentSnapshot(
                    id=row[0],
                    business_lines=frozenset(row[1]),
                    segments=frozenset(row[2]),
                    languages=frozenset(row[3]),
                    capacity=row[4],
                    daily_cap=row[5],
                    weight=row[6],
                    timezone=row[7],
                    shift=Window(row[8], row[9]) if row[8] is not None else None,
                    status=status,
                    open_count=open_count,
                    today_count=today_count,
                )
            )
        return agents

    def _state(
        self, conn: psycopg.Connection[Any], queue: QueueSpec, agent_ids: list[str]
    ) -> QueueState:
        row = conn.execute(_QUEUE_STATE, (queue.name,)).fetchone()
        if row is None:
            self._upsert_queue(conn, queue)
            row = (None, 0.0)
        vtimes: dict[str, float] = dict(
            conn.execute(_AGENT_VTIMES, (queue.name, agent_ids)).fetchall()
        )
        return QueueState(rr_cursor=row[0], virtual_time=row[1], agent_vtime=vtimes)

    def _write(
        self,
        conn: psycopg.Connection[Any],
        queue: QueueSpec,
        leads: dict[int, WaitingLead],
        customers: dict[int, tuple[str, str | None, str | None]],
        outcome: Outcome,
        now: datetime,
    ) -> None:
        transitions: list[tuple[int, LeadState, LeadState, str]] = []
        if assignments := outcome.assignments:
            ids = [uuid.uuid4() for _ in assignments]
            conn.execute(
                _INSERT_ASSIGNMENTS,
                (
                    queue.name,
                    now,
                    ids,
                    [a.lead_id for a in assignments],
                    [a.agent_id for a in assignments],
                    [a.strategy for a in assignments],
                    [a.reason for a in assignments],
                    [a.attempt for a in assignments],
                    [a.sla_deadline for a in assignments],
                ),
            )
            conn.execute(_MARK_ASSIGNED, (now, [a.lead_id for a in assignments]))
            transitions += [
                (a.lead_id, "queued", "assigned", f"assigned to {a.agent_id}: {a.reason}")
                for a in assignments
            ]
            payloads = []
            for assignment_id, a in zip(ids, assignments, strict=True):
                lead = leads[a.lead_id]
                phone, name, timezone = customers[a.lead_id]
                payloads.append(
                    json.dumps(
                        {
                            "schema_version": 1,
                            "assignment_id": str(assignment_id),
                            "lead_id": a.lead_id,
                            "agent_id": a.agent_id,
                            "queue": queue.name,
                            "strategy": a.strategy,
                            "reason": a.reason,
                            "business_line": lead.business_line,
                            "segment": lead.segment,
                            "priority": lead.priority,
                            "attempt": a.attempt,
                            "assigned_at": now.isoformat(),
                            "sla_deadline": a.sla_deadline.isoformat(),
                            "customer_phone": phone,
                            "customer_name": name,
                            "customer_timezone": timezone,
                            "lead_queued_at": lead.queued_at.isoformat(),
                        },
                        ensure_ascii=False,
                    )
                )
            conn.execute(
                _OUTBOX, (self.config.assigned_topic, [a.agent_id for a in assignments], payloads)
            )
            conn.execute("SELECT pg_notify(%s, '')", (OUTBOX_CHANNEL,))
        if deferred := outcome.deferred:
            conn.execute(_DEFER, (now, [d.lead_id for d in deferred], [d.until for d in deferred]))
        if blocked := outcome.blocked:
            conn.execute(
                _BLOCK, (now, now, [b.lead_id for b in blocked], [b.state for b in blocked])
            )
            transitions += [(b.lead_id, "queued", b.state, b.reason) for b in blocked]
        if transitions:
            self._transitions(conn, transitions, now)
        if assignments:
            state = outcome.state
            conn.execute(_SAVE_QUEUE_STATE, (state.rr_cursor, state.virtual_time, queue.name))
            changed = sorted({a.agent_id for a in assignments})
            conn.execute(
                _SAVE_AGENT_VTIMES,
                (queue.name, changed, [state.agent_vtime[agent] for agent in changed]),
            )

    @staticmethod
    def _transitions(
        conn: psycopg.Connection[Any],
        transitions: Sequence[tuple[int, LeadState | None, LeadState, str]],
        now: datetime,
        actor: str = ACTOR,
    ) -> None:
        conn.execute(
            _TRANSITIONS,
            (
                actor,
                now,
                [t[0] for t in transitions],
                [t[1] for t in transitions],
                [t[2] for t in transitions],
                [t[3] for t in transitions],
            ),
        )

    # -- the SLA sweep ----------------------------------------------------------------------

    def expire_slas(self, conn: psycopg.Connection[Any], now: datetime, limit: int = 1000) -> int:
        """Take back assignments not contacted before their deadline; the lead is queued again
        for another agent (the one who let it expire is excluded), counted as an attempt, or
        closed when that was its last attempt. Returns how many expired."""
        total = 0
        while True:
            with conn.transaction():
                expired = conn.execute(_EXPIRE, (now, limit, now)).fetchall()
                if not expired:
                    return total
                by_lead = {lead_id: (agent_id, queue) for lead_id, agent_id, queue in expired}
                rows = conn.execute(_LEADS_FOR_UPDATE, (sorted(by_lead),)).fetchall()
                ids, states, attempts = [], [], []
                transitions: list[tuple[int, LeadState | None, LeadState, str]] = []
                for lead_id, state, tried, queue_name in rows:
                    agent_id, _ = by_lead[lead_id]
                    tried += 1
                    queue = self.queues.get(queue_name) if queue_name else None
                    limit_attempts = (
                        queue.max_attempts if queue else self.config.implicit_max_attempts
                    )
                    to_state: LeadState = "queued" if tried < limit_attempts else "closed"
                    reason = (
                        f"first-contact SLA expired with {agent_id}; attempt {tried} of "
                        f"{limit_attempts}" + ("" if to_state == "queued" else "; no attempts left")
                    )
                    ids.append(lead_id)
                    states.append(to_state)
                    attempts.append(tried)
                    transitions.append((lead_id, state, to_state, reason))
                conn.execute(_REQUEUE, (now, now, ids, states, attempts))
                self._transitions(conn, transitions, now)
                if "queued" in states:
                    conn.execute("SELECT pg_notify(%s, '')", (WAKE_CHANNEL,))
                total += len(expired)


def _room(queue: QueueSpec, agents: Sequence[AgentSnapshot], now: datetime) -> int:
    """How many more leads the queue's available, in-shift agents could take in total."""
    return sum(
        max(0, min(agent.capacity - agent.open_count, agent.daily_cap - agent.today_count))
        for agent in agents
        if agent.status == "available"
        and (
            agent.shift is None
            or in_window(agent.shift, now, agent.timezone, queue.default_timezone)
        )
    )


def _serves_any(queue: QueueSpec, agent_segments: Sequence[str]) -> bool:
    """Whether an agent skilled for these segments could take any lead of the queue."""
    if ANY in agent_segments:
        return True
    if not queue.segments:
        return bool(agent_segments)
    return not queue.segments.isdisjoint(agent_segments)
