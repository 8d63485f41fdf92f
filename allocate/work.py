"""What agents do with their assignments: first contact, dispositions, rejects.

The functions behind the API (and usable from tests and the CLI): each is one transaction on a
psycopg connection, locks the assignment, then its lead (the order the SLA sweep uses too), and
acts only on an open assignment of the calling agent. Another agent's assignment is reported as
not found, never as "not yours", so its existence does not leak.

A disposition is the follow-up record of a call (outcome, note, time, agent — the seed's sales
records table) and applies the recycling rule of `allocate.policy.recycle`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from allocate.policy import recycle
from ingest.store import QUEUED_CHANNEL
from schemas.vocab import Disposition, LeadState

#: Intake and agents' actions notify it when leads are queued or capacity frees; the
#: allocator listens.
WAKE_CHANNEL = QUEUED_CHANNEL


class AssignmentNotFound(LookupError):
    """No such assignment for this agent (it may exist for another: that is not said)."""


class AssignmentClosed(RuntimeError):
    """The assignment is no longer open (disposition recorded, SLA expired, rejected)."""


@dataclass(frozen=True)
class WorkConfig:
    #: Max attempts of each queue; a queue not listed uses `default_max_attempts`.
    max_attempts: Mapping[str, int] = field(default_factory=dict)
    default_max_attempts: int = 3
    #: Wait before the n-th retry after no answer; the last one repeats.
    no_answer_delays: Sequence[timedelta] = (
        timedelta(minutes=30),
        timedelta(hours=2),
        timedelta(days=1),
    )
    reject_delay: timedelta = timedelta(0)

    def retry_delay(self, attempt: int) -> timedelta:
        delays = self.no_answer_delays
        return delays[min(max(attempt, 1), len(delays)) - 1]


@dataclass(frozen=True)
class Result:
    """What an action did to the lead."""

    assignment_id: uuid.UUID
    lead_id: int
    lead_state: LeadState
    next_action_at: datetime | None
    reason: str


_LOCK_ASSIGNMENT = """
SELECT s.lead_id, s.status, s.first_contact_at, s.queue
FROM assignments s WHERE s.id = %s AND s.agent_id = %s
FOR UPDATE
"""
# The customer before the lead, the order intake locks them in, so an agent's action and an
# event merging into the same lead wait for each other instead of deadlocking.
_LOCK_CUSTOMER = """
SELECT c.id, c.phone_e164 FROM customers c JOIN leads l ON l.customer_id = c.id
WHERE l.id = %s FOR NO KEY UPDATE OF c
"""
_LOCK_LEAD = "SELECT state, attempts FROM leads WHERE id = %s FOR NO KEY UPDATE"
_TRANSITION = """
INSERT INTO lead_transitions (lead_id, from_state, to_state, actor, reason, at)
VALUES (%s, %s, %s, %s, %s, %s)
"""


def _lock(
    conn: psycopg.Connection[Any], assignment_id: uuid.UUID, agent_id: str
) -> tuple[int, datetime | None, str, LeadState, int, int, str]:
    row = conn.execute(_LOCK_ASSIGNMENT, (assignment_id, agent_id)).fetchone()
    if row is None:
        raise AssignmentNotFound(f"assignment {assignment_id} not found")
    lead_id, status, first_contact_at, queue = row
    if status != "open":
        raise AssignmentClosed(f"assignment {assignment_id} is {status}, no longer open")
    customer = conn.execute(_LOCK_CUSTOMER, (lead_id,)).fetchone()
    lead = conn.execute(_LOCK_LEAD, (lead_id,)).fetchone()
    assert customer is not None  # foreign keys
    assert lead is not None
    customer_id, phone = customer
    state, attempts = lead
    return lead_id, first_contact_at, queue, state, attempts, customer_id, phone


def first_contact(
    conn: psycopg.Connection[Any], assignment_id: uuid.UUID, agent_id: str, now: datetime
) -> Result:
    """The agent reached (or is calling) the customer: the SLA is met, the lead in progress.
    Marking it again changes nothing."""
    with conn.transaction():
        lead_id, contacted, _, state, _, customer_id, _ = _lock(conn, assignment_id, agent_id)
        if contacted is None:
            conn.execute(
                "UPDATE assignments SET first_contact_at = %s WHERE id = %s", (now, assignment_id)
            )
            conn.execute(
                "UPDATE customers SET last_agent_id = %s WHERE id = %s", (agent_id, customer_id)
            )
        if state == "assigned":
            conn.execute(
                "UPDATE leads SET state = 'in_progress', updated_at = %s WHERE id = %s",
                (now, lead_id),
            )
            conn.execute(
                _TRANSITION,
                (lead_id, state, "in_progress", agent_id, "first contact", now),
            )
            state = "in_progress"
    return Result(assignment_id, lead_id, state, None, "first contact")


def dispose(
    conn: psycopg.Connection[Any],
    assignment_id: uuid.UUID,
    agent_id: str,
    outcome: Disposition,
    now: datetime,
    config: WorkConfig,
    *,
    note: str | None = None,
    callback_at: datetime | None = None,
) -> Result:
    """Record the outcome of a call and recycle the lead (CONTRACT.md §8)."""
    if outcome == "callback" and (callback_at is None or callback_at.tzinfo is None):
        raise ValueError("a callback needs callback_at with a timezone")
    with conn.transaction():
        lead_id, _, queue, state, attempts, customer_id, phone = _lock(
            conn, assignment_id, agent_id
        )
        tried = attempts + 1 if outcome == "no_answer" else attempts
        decision = recycle(
            outcome,
            attempts=tried,
            max_attempts=config.max_attempts.get(queue, config.default_max_attempts),
            now=now,
            retry_delay=config.retry_delay(tried),
            callback_at=callback_at,
        )
        conn.execute(
            "INSERT INTO dispositions (assignment_id, lead_id, agent_id, outcome, note,"
            " callback_at, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (assignment_id, lead_id, agent_id, outcome, note, callback_at, now),
        )
        conn.execute(
            "UPDATE assignments SET status = 'completed', closed_at = %s, close_reason = %s,"
            " first_contact_at = COALESCE(first_contact_at, %s) WHERE id = %s",
            (now, outcome, now, assignment_id),
        )
        conn.execute(
            "UPDATE customers SET last_agent_id = %s WHERE id = %s", (agent_id, customer_id)
        )
        closed = decision.state != "queued"
        conn.execute(
            "UPDATE leads SET state = %s, attempts = %s, next_action_at = %s, updated_at = %s,"
            " closed_at = %s WHERE id = %s",
            (decision.state, tried, decision.next_action_at, now, now if closed else None, lead_id),
        )
        conn.execute(_TRANSITION, (lead_id, state, decision.state, agent_id, decision.reason, now))
        if decision.add_to_dnc:
            conn.execute(
                "INSERT INTO dnc (phone_e164, reason, source, added_at) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (phone_e164) DO NOTHING",
                (phone, "customer asked not to be called", f"agent:{agent_id}", now),
            )
        # Capacity freed (and maybe a lead queued): the allocator looks at once.
        conn.execute("SELECT pg_notify(%s, '')", (WAKE_CHANNEL,))
    return Result(assignment_id, lead_id, decision.state, decision.next_action_at, decision.reason)


def reject(
    conn: psycopg.Connection[Any],
    assignment_id: uuid.UUID,
    agent_id: str,
    reason: str,
    now: datetime,
    config: WorkConfig,
) -> Result:
    """The agent hands the lead back (wrong language, knows the customer, ...). It goes to
    another agent — the allocator never gives it back to this one — and is not counted as an
    attempt, since nobody called."""
    reason = reason.strip()
    if not reason:
        raise ValueError("a reject needs a reason")
    with conn.transaction():
        lead_id, _, _, state, _, _, _ = _lock(conn, assignment_id, agent_id)
        conn.execute(
            "UPDATE assignments SET status = 'revoked', closed_at = %s, close_reason = %s"
            " WHERE id = %s",
            (now, f"rejected: {reason}", assignment_id),
        )
        until = now + config.reject_delay if config.reject_delay > timedelta(0) else None
        conn.execute(
            "UPDATE leads SET state = 'queued', next_action_at = %s, updated_at = %s WHERE id = %s",
            (until, now, lead_id),
        )
        why = f"rejected by {agent_id}: {reason}"
        conn.execute(_TRANSITION, (lead_id, state, "queued", agent_id, why, now))
        conn.execute("SELECT pg_notify(%s, '')", (WAKE_CHANNEL,))
    return Result(assignment_id, lead_id, "queued", until, why)
