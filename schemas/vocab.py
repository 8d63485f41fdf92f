"""The fixed vocabularies every layer shares: lead states, dispositions, strategies, codes.

They are `Literal` types for the type checker and tuples for run-time checks; the database
CHECK constraints are generated from the same tuples, so the three can never drift apart.
"""

from __future__ import annotations

from typing import Literal, get_args

LeadState = Literal[
    "new", "queued", "assigned", "in_progress", "converted", "closed", "do_not_call"
]
LEAD_STATES: tuple[LeadState, ...] = get_args(LeadState)
#: States in which a lead is still being worked; a new event for the customer merges into it.
OPEN_LEAD_STATES: tuple[LeadState, ...] = ("new", "queued", "assigned", "in_progress")
CLOSED_LEAD_STATES: tuple[LeadState, ...] = ("converted", "closed", "do_not_call")

#: How a record entered leadflow (not the product's own `channel` field of the event).
Intake = Literal["realtime", "stock", "staging", "http"]
INTAKES: tuple[Intake, ...] = get_args(Intake)

AssignmentStatus = Literal["open", "completed", "expired", "revoked"]
ASSIGNMENT_STATUSES: tuple[AssignmentStatus, ...] = get_args(AssignmentStatus)

Disposition = Literal[
    "no_answer", "callback", "converted", "not_interested", "invalid_number", "do_not_call"
]
DISPOSITIONS: tuple[Disposition, ...] = get_args(Disposition)

Strategy = Literal["round_robin", "least_loaded", "weighted", "sticky"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)

AgentStatus = Literal["available", "away", "offline"]
AGENT_STATUSES: tuple[AgentStatus, ...] = get_args(AgentStatus)

Role = Literal["agent", "supervisor", "ops", "product"]
ROLES: tuple[Role, ...] = get_args(Role)

ExtractState = Literal["pending", "loading", "loaded", "failed"]
EXTRACT_STATES: tuple[ExtractState, ...] = get_args(ExtractState)

#: Machine codes of rejected input (CONTRACT.md §3); the DLQ `error` header carries one.
RejectCode = Literal[
    "invalid_json",
    "invalid_utf8",
    "schema_violation",
    "unsupported_schema_version",
    "invalid_phone",
    "too_large",
    "consent_missing",
]
REJECT_CODES: tuple[RejectCode, ...] = get_args(RejectCode)

#: How a poller run ended (`poller_runs.outcome`): `running` until it ends, `stopped` when shut
#: down between pages (its pages are kept), `interrupted` when its process died mid-run (marked
#: by the next run of the source).
PollerOutcome = Literal["running", "succeeded", "failed", "stopped", "interrupted"]
POLLER_OUTCOMES: tuple[PollerOutcome, ...] = get_args(PollerOutcome)

#: What started a poller run: its schedule, a retry after a failure, or `leadflow sources run`.
PollerTrigger = Literal["schedule", "retry", "cli"]
POLLER_TRIGGERS: tuple[PollerTrigger, ...] = get_args(PollerTrigger)
