"""The HTTP API (CONTRACT.md §9): bearer tokens and roles, agents' work, HTTP intake, queues.

Authentication: `Authorization: Bearer <token>`; only the token's SHA-256 is stored
(`api_tokens`), a revoked token is refused like an unknown one. Roles:

| role | may |
| --- | --- |
| agent | read and work their own assignments, set their own status |
| supervisor | read queues, agents and reports, set an agent's status |
| ops | what a supervisor may, plus HTTP intake and the pipeline view |
| product | HTTP intake only |

Every error is JSON `{"error": {"code": ..., "message": ...}}` with no stack trace and no personal
data: 401 without a valid token, 403 for a role that may not use the route, 404 for what does not
exist *or belongs to another agent* (existence does not leak), 409 for an action on a closed
assignment, 413 for an oversized body, 422 for a malformed one (which fields, never their values).

Handlers that touch PostgreSQL are plain functions: FastAPI runs them in its thread pool, so a
slow query never holds the event loop.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import psycopg
import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from allocate import work
from allocate.roster import UnknownAgent, set_status, token_hash
from ingest import metrics as intake_metrics
from ingest.chain import Accepted, IntakeChain, Record, Rejected
from ingest.store import Classifier, LeadStore
from leadflow import reports
from leadflow.db import queue_stats
from leadflow.errors import ServiceUnavailable
from leadflow.kafka import end_offsets
from leadflow.logs import get_logger
from leadflow.pipeline import snapshot
from leadflow.privacy import mask_phone
from leadflow.settings import Settings
from schemas.events import LeadEvent
from schemas.vocab import AgentStatus, Disposition, Role

log = get_logger("leadflow.api")

#: Most events one POST /api/v1/leads takes.
MAX_BATCH = 1000
#: Seconds between two writes of a token's `last_used_at` (a write per request is waste).
_LAST_USED_EVERY = 60


# --- errors ---------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as JSON with a machine code; never carries personal data."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ErrorDetail(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str = Field(examples=["assignment not found"])


class ErrorBody(BaseModel):
    error: ErrorDetail


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message, **extra}}
    return JSONResponse(body, status_code=status)


_STATUS_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    """JSON errors everywhere: ours, FastAPI's and Starlette's, and the unexpected ones."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        response = _error(exc.status, exc.code, exc.message)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return _error(exc.status_code, code, message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Where and what, never the submitted values (they may be personal data).
        problems = [
            {"loc": [str(part) for part in error.get("loc", ())], "msg": error.get("msg", "")}
            for error in exc.errors()
        ]
        return _error(422, "invalid_request", "the request is not valid", problems=problems)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, sa.exc.OperationalError | psycopg.OperationalError):
            log.warning("database unavailable", path=request.url.path, error=type(exc).__name__)
            return _error(503, "unavailable", "the database is not reachable; try again shortly")
        log.error("request failed", path=request.url.path, error=repr(exc))
        return _error(500, "internal_error", "the request failed; the server logged why")


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in [
        (401, "No token, or an unknown or revoked one"),
        (403, "The token's role may not use this route"),
        (422, "Malformed request"),
    ]
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        404: "No such assignment for this agent",
        409: "The assignment is no longer open",
        413: "Body too large",
    }
    extra: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": described[status]} for status in statuses
    }
    return {**_ERRORS, **extra}


# --- authentication -------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's role and, for agents, their id."""

    token_id: int
    role: Role
    agent_id: str | None


_TOKEN = sa.text("""
SELECT id, role, agent_id, last_used_at < now() - make_interval(secs => :every)
       OR last_used_at IS NULL AS stale
FROM api_tokens WHERE token_hash = :hash AND revoked_at IS NULL
""")
_TOUCH = sa.text("UPDATE api_tokens SET last_used_at = now() WHERE id = :id")

_bearer = HTTPBearer(auto_error=False, description="A token from `leadflow agents token`.")


@dataclass
class ApiContext:
    settings: Settings
    engine: Engine
    #: The classifier of the rules in force, asked once per intake request (None: no intake).
    classifier: Callable[[], Classifier] | None
    chain: IntakeChain
    store: LeadStore
    work: work.WorkConfig

    def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ApiError(401, "unauthorized", "a bearer token is required")
        with self.engine.connect() as conn:
            row = conn.execute(
                _TOKEN, {"hash": token_hash(credentials.credentials), "every": _LAST_USED_EVERY}
            ).first()
            if row is None:
                raise ApiError(401, "unauthorized", "the token is unknown or revoked")
            if row.stale:
                conn.execute(_TOUCH, {"id": row.id})
                conn.commit()
        return Principal(row.id, row.role, row.agent_id)

    @contextmanager
    def psycopg(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection as psycopg itself, for the functions of `allocate.work`."""
        raw = self.engine.raw_connection()
        try:
            conn = raw.driver_connection
            assert isinstance(conn, psycopg.Connection)
            yield conn
        finally:
            raw.close()


def _requires(*roles: Role) -> Callable[..., Principal]:
    allowed = ", ".join(roles)

    def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        context: ApiContext = request.app.state.api
        principal = context.authenticate(credentials)
        if principal.role not in roles:
            raise ApiError(403, "forbidden", f"this route is for: {allowed}")
        return principal

    return dependency


AgentOnly = Annotated[Principal, Depends(_requires("agent"))]
Anyone = Annotated[Principal, Depends(_requires("agent", "supervisor", "ops", "product"))]
Watchers = Annotated[Principal, Depends(_requires("supervisor", "ops"))]
Producers = Annotated[Principal, Depends(_requires("ops", "product"))]


def _context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.api
    return context


Context = Annotated[ApiContext, Depends(_context)]


# --- models ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatusChange(_Strict):
    status: AgentStatus = Field(examples=["available"])


class DispositionIn(_Strict):
    outcome: Disposition = Field(examples=["callback"])
    note: str | None = Field(default=None, max_length=2000, examples=["asked to call after 6pm"])
    callback_at: datetime | None = Field(
        default=None,
        description="Required for `callback`: when to call back, RFC 3339 with an offset.",
        examples=["2026-11-24T18:30:00+08:00"],
    )


class RejectIn(_Strict):
    reason: str = Field(min_length=1, max_length=500, examples=["customer speaks only Cantonese"])


class ActionResult(BaseModel):
    assignment_id: uuid.UUID
    lead_id: int
    lead_state: str = Field(examples=["queued"])
    next_action_at: datetime | None
    reason: str = Field(examples=["no answer: retry 1 of 3"])


class Me(BaseModel):
    role: Role
    agent_id: str | None
    name: str | None = None
    status: AgentStatus | None = None


class AssignmentView(BaseModel):
    """One open assignment as an agent's list shows it: the phone masked until opened."""

    id: uuid.UUID
    lead_id: int
    queue: str
    strategy: str
    reason: str = Field(description="Why it came to this agent.")
    attempt: int
    assigned_at: datetime
    sla_deadline: datetime | None
    first_contact_at: datetime | None
    priority: int
    business_line: str
    segment: str
    lead_state: str
    customer_name: str | None
    phone_masked: str | None = Field(examples=["+86138****8000"])
    source: str | None
    event_type: str | None
    campaign: str | None
    event_count: int


class EventView(BaseModel):
    event_id: str
    occurred_at: datetime
    intake: str
    source: str
    event_type: str
    channel: str | None


class TransitionView(BaseModel):
    at: datetime
    from_state: str | None
    to_state: str
    actor: str
    reason: str


class AssignmentDetail(AssignmentView):
    """An opened assignment: the phone to call, the customer's events and the lead's history."""

    phone: str = Field(examples=["+8613800138000"])
    email: str | None
    timezone: str | None
    attributes: dict[str, Any]
    events: list[EventView]
    history: list[TransitionView]


class LeadResult(BaseModel):
    index: int = Field(description="Position in the request (0 for a single event).")
    event_id: str | None
    status: Literal["accepted", "merged", "duplicate", "rejected"]
    lead_id: int | None = None
    code: str | None = Field(default=None, description="Rejection code (CONTRACT.md §3).")
    detail: str | None = None


class LeadsResponse(BaseModel):
    accepted: int
    merged: int
    duplicate: int
    rejected: int
    results: list[LeadResult]


class QueueView(BaseModel):
    queue: str
    waiting: int
    due: int
    oldest_seconds: float | None
    open: int
    sla_breached: int
    agents_available: int


# --- queries --------------------------------------------------------------------------------

# The list and the opened view read the same columns; the opened one adds what to call with.
_MY_ASSIGNMENTS = sa.text("""
SELECT s.id, s.lead_id, s.queue, s.strategy, s.reason, s.attempt, s.assigned_at, s.sla_deadline,
       s.first_contact_at, l.priority, l.business_line, l.segment, l.state AS lead_state,
       c.name AS customer_name, c.phone_e164, l.source, l.event_type, l.campaign, l.event_count
FROM assignments s JOIN leads l ON l.id = s.lead_id JOIN customers c ON c.id = l.customer_id
WHERE s.agent_id = :agent AND s.status = 'open'
ORDER BY l.priority DESC, s.sla_deadline NULLS LAST, s.assigned_at
""")
_ONE_ASSIGNMENT = sa.text("""
SELECT s.id, s.lead_id, s.queue, s.strategy, s.reason, s.attempt, s.assigned_at, s.sla_deadline,
       s.first_contact_at, l.priority, l.business_line, l.segment, l.state AS lead_state,
       c.name AS customer_name, c.phone_e164, l.source, l.event_type, l.campaign, l.event_count,
       c.email, c.timezone, l.attributes
FROM assignments s JOIN leads l ON l.id = s.lead_id JOIN customers c ON c.id = l.customer_id
WHERE s.id = :id AND s.agent_id = :agent AND s.status = 'open'
""")
_LEAD_EVENTS = sa.text("""
SELECT event_id, occurred_at, intake, source, event_type, channel FROM lead_events
WHERE lead_id = :lead ORDER BY occurred_at DESC, id DESC LIMIT 50
""")
_LEAD_HISTORY = sa.text("""
SELECT at, from_state, to_state, actor, reason FROM lead_transitions
WHERE lead_id = :lead ORDER BY at, id
""")
_AGENTS_AVAILABLE = sa.text("""
SELECT q.name, count(a.id)
FROM queues q LEFT JOIN agents a ON a.status = 'available'
     AND (a.business_lines @> ARRAY[q.business_line] OR a.business_lines @> ARRAY['*'])
GROUP BY q.name
""")


def _view(row: Any) -> dict[str, Any]:
    values = dict(row._mapping)
    values["phone_masked"] = mask_phone(values.pop("phone_e164"))
    return values


def _assignment_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        # Not an id at all: the same answer as an id that is not yours.
        raise ApiError(404, "not_found", "assignment not found") from None


def _act(action: Callable[[], work.Result]) -> ActionResult:
    try:
        result = action()
    except work.AssignmentNotFound:
        raise ApiError(404, "not_found", "assignment not found") from None
    except work.AssignmentClosed as exc:
        raise ApiError(409, "assignment_closed", str(exc)) from None
    return ActionResult(
        assignment_id=result.assignment_id,
        lead_id=result.lead_id,
        lead_state=result.lead_state,
        next_action_at=result.next_action_at,
        reason=result.reason,
    )


# --- routes ---------------------------------------------------------------------------------

router = APIRouter(prefix="/api/v1")


@router.get("/me", tags=["agents"], summary="Who the token belongs to", responses=_errors())
def me(principal: Anyone, context: Context) -> Me:
    if principal.agent_id is None:
        return Me(role=principal.role, agent_id=None)
    with context.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT name, status FROM agents WHERE id = :id"), {"id": principal.agent_id}
        ).first()
    return Me(
        role=principal.role,
        agent_id=principal.agent_id,
        name=row.name if row else None,
        status=row.status if row else None,
    )


@router.get(
    "/me/assignments",
    tags=["agents"],
    summary="My open assignments, highest priority first",
    responses=_errors(),
)
def my_assignments(principal: AgentOnly, context: Context) -> list[AssignmentView]:
    with context.engine.connect() as conn:
        rows = conn.execute(_MY_ASSIGNMENTS, {"agent": principal.agent_id}).all()
    return [AssignmentView(**_view(row)) for row in rows]


@router.post("/me/status", tags=["agents"], summary="Set my status", responses=_errors())
def my_status(body: StatusChange, principal: AgentOnly, context: Context) -> Me:
    assert principal.agent_id is not None
    with context.engine.connect() as conn:
        set_status(conn, principal.agent_id, body.status)
        conn.commit()
    return me(principal, context)


@router.get(
    "/assignments/{assignment_id}",
    tags=["agents"],
    summary="Open one of my assignments: the phone, events and history",
    responses=_errors(404),
)
def open_assignment(assignment_id: str, principal: AgentOnly, context: Context) -> AssignmentDetail:
    key = _assignment_id(assignment_id)
    with context.engine.connect() as conn:
        row = conn.execute(_ONE_ASSIGNMENT, {"id": key, "agent": principal.agent_id}).first()
        if row is None:
            raise ApiError(404, "not_found", "assignment not found")
        events = conn.execute(_LEAD_EVENTS, {"lead": row.lead_id}).all()
        history = conn.execute(_LEAD_HISTORY, {"lead": row.lead_id}).all()
    values = _view(row)
    return AssignmentDetail(
        **values,
        phone=row.phone_e164,
        events=[EventView(**dict(e._mapping)) for e in events],
        history=[TransitionView(**dict(h._mapping)) for h in history],
    )


@router.post(
    "/assignments/{assignment_id}/contact",
    tags=["agents"],
    summary="Record first contact (the SLA is met)",
    responses=_errors(404, 409),
)
def contact(assignment_id: str, principal: AgentOnly, context: Context) -> ActionResult:
    key = _assignment_id(assignment_id)
    assert principal.agent_id is not None
    agent = principal.agent_id
    with context.psycopg() as conn:
        return _act(lambda: work.first_contact(conn, key, agent, datetime.now(UTC)))


@router.post(
    "/assignments/{assignment_id}/disposition",
    tags=["agents"],
    summary="Record the outcome of a call; the lead is recycled or closed",
    responses=_errors(404, 409),
)
def disposition(
    assignment_id: str, body: DispositionIn, principal: AgentOnly, context: Context
) -> ActionResult:
    key = _assignment_id(assignment_id)
    assert principal.agent_id is not None
    agent = principal.agent_id
    if body.outcome == "callback":
        if body.callback_at is None:
            raise ApiError(422, "invalid_request", "a callback needs callback_at")
        if body.callback_at.tzinfo is None:
            raise ApiError(422, "invalid_request", "callback_at needs a timezone offset")
    with context.psycopg() as conn:
        return _act(
            lambda: work.dispose(
                conn,
                key,
                agent,
                body.outcome,
                datetime.now(UTC),
                context.work,
                note=body.note,
                callback_at=body.callback_at,
            )
        )


@router.post(
    "/assignments/{assignment_id}/reject",
    tags=["agents"],
    summary="Hand a lead back; it goes to another agent",
    responses=_errors(404, 409),
)
def reject(
    assignment_id: str, body: RejectIn, principal: AgentOnly, context: Context
) -> ActionResult:
    key = _assignment_id(assignment_id)
    assert principal.agent_id is not None
    agent = principal.agent_id
    if not body.reason.strip():
        raise ApiError(422, "invalid_request", "a reject needs a reason")
    with context.psycopg() as conn:
        return _act(
            lambda: work.reject(conn, key, agent, body.reason, datetime.now(UTC), context.work)
        )


@router.get(
    "/queues",
    tags=["ops"],
    summary="Depth, oldest waiting age, agents available and SLA breaches per queue",
    responses=_errors(),
)
def queues(principal: Watchers, context: Context) -> list[QueueView]:
    stats = queue_stats(context.engine)
    with context.engine.connect() as conn:
        available = {str(name): int(count) for name, count in conn.execute(_AGENTS_AVAILABLE)}
    return [QueueView(**s, agents_available=available.get(s["queue"], 0)) for s in stats]


@router.get(
    "/pipeline",
    tags=["ops"],
    summary="The pipeline at a glance: intake per channel per minute, rejects, classification "
    "mix, queues, agents, SLA, speed to lead, pollers, staging extracts",
    responses=_errors(),
)
async def pipeline(principal: Watchers, context: Context) -> dict[str, Any]:
    specs = context.settings.source_specs()
    picture = await run_in_threadpool(snapshot, context.engine, specs)
    picture["intake"]["consumer_lag"] = await _consumer_lag(context)
    return picture


_REPORT_DESCRIPTION = """
The lead funnel over `[from, to)` broken down by one or two dimensions: the leads created in the
period followed until now (events, merged, queued, assigned, first contacted, converted, closed
by outcome, recycled, expired by SLA, attempts, rates between steps, speed to first assignment
and to first contact p50/p90), beside the input rejected in the period where the database knows
it (staging extracts and pollers; real-time rejects are in the DLQ and `/api/v1/pipeline`).
With `agent` among the dimensions: each agent's assignments made in the period, contacts,
conversions and conversions per available hour. `from` and `to` are dates (days in
`allocation.default_timezone`) or RFC 3339 times with an offset; without them, the last 30 days
up to today included. CSV with `format=csv` or `Accept: text/csv` (UTF-8 with a BOM, so Excel
shows Chinese).
"""


@router.get(
    "/reports/funnel",
    tags=["reports"],
    summary="The lead funnel and speed to lead by a dimension over a period (JSON or CSV)",
    description=_REPORT_DESCRIPTION,
    responses={
        **_errors(),
        200: {
            "description": "The report",
            "content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}},
        },
    },
    response_class=Response,
)
def report_funnel(
    request: Request,
    principal: Watchers,
    context: Context,
    start: Annotated[
        str | None, Query(alias="from", max_length=40, examples=["2026-11-01"])
    ] = None,
    end: Annotated[str | None, Query(alias="to", max_length=40, examples=["2026-12-01"])] = None,
    by: Annotated[
        str | None,
        Query(
            max_length=100,
            description=f"One or two of: {', '.join(reports.DIMENSIONS)} (comma-separated).",
            examples=["source", "source,segment"],
        ),
    ] = None,
    output: Annotated[Literal["json", "csv"] | None, Query(alias="format")] = None,
) -> Response:
    settings = context.settings
    zone = ZoneInfo(settings.allocation.default_timezone)
    try:
        period = reports.parse_period(start, end, zone, datetime.now(UTC))
        names = reports.parse_by(by)
    except reports.ReportError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    with context.psycopg() as conn:
        report = reports.funnel(conn, period, names, staging_source=settings.staging.default_source)
    wants_csv = output == "csv" or (
        output is None and "text/csv" in request.headers.get("accept", "")
    )
    if wants_csv:
        return Response(
            reports.to_csv(report).encode("utf-8"),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="{reports.csv_filename(report)}"'
            },
        )
    return JSONResponse(report.as_dict())


_COMMITTED = sa.text("""
SELECT partition, next_offset FROM consumer_offsets WHERE consumer_group = :group AND topic = :topic
""")


async def _consumer_lag(context: ApiContext) -> dict[str, Any]:
    """Records on the raw topic the intake group has not stored yet, per partition; the
    committed side is the offsets stored with the batches in PostgreSQL."""
    settings = context.settings
    topic, group = settings.topics.raw, settings.intake.consumer_group
    try:
        ends = await asyncio.wait_for(end_offsets(settings.kafka, topic), 5)
    except (ServiceUnavailable, TimeoutError) as exc:
        return {"total": None, "partitions": {}, "error": str(exc) or "the broker did not answer"}

    def committed() -> dict[int, int]:
        with context.engine.connect() as conn:
            rows = conn.execute(_COMMITTED, {"group": group, "topic": topic})
            return {int(p): int(o) for p, o in rows}

    done = await run_in_threadpool(committed)
    # The embedded broker may report an end offset short of its last batch: never below zero.
    lag = {str(p): max(end - done.get(p, 0), 0) for p, end in sorted(ends.items())}
    return {"total": sum(lag.values()), "partitions": lag, "error": None}


@router.post(
    "/agents/{agent_id}/status",
    tags=["ops"],
    summary="Set an agent's status (supervisors)",
    responses=_errors(404),
)
def agent_status(
    agent_id: str, body: StatusChange, principal: Watchers, context: Context
) -> dict[str, Any]:
    with context.engine.connect() as conn:
        try:
            changed = set_status(conn, agent_id, body.status)
        except UnknownAgent:
            raise ApiError(404, "not_found", "agent not found") from None
        conn.commit()
    return {"agent_id": agent_id, "status": body.status, "changed": changed}


_LEADS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/LeadEventIn"},
                        {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/LeadEventIn"},
                            "maxItems": MAX_BATCH,
                        },
                    ]
                },
                "examples": {
                    "one": {
                        "summary": "one event",
                        "value": {
                            "schema_version": 1,
                            "event_id": "7b0f3c1e-web-1",
                            "occurred_at": "2026-11-23T09:15:02+08:00",
                            "source": "loan-app",
                            "event_type": "order_pending_payment",
                            "customer": {"phone": "138 0013 8000", "name": "张三"},
                            "product": "personal_credit_loan",
                        },
                    }
                },
            }
        },
    }
}


@router.post(
    "/leads",
    tags=["intake"],
    summary="HTTP intake: one LeadEvent or a list of up to 1,000",
    description=(
        "The same chain as Kafka intake. A single event answers 200 with its result, or 422 with "
        "its rejection code. A list answers 200 with a result per event, in order: the valid "
        "events are stored even when others are rejected (each event stands alone, as on Kafka); "
        "an event sent again is a `duplicate`, a no-op. Rejected events are answered, not sent "
        "to the DLQ."
    ),
    openapi_extra=_LEADS_BODY,
    responses=_errors(413),
)
async def post_leads(request: Request, principal: Producers) -> LeadsResponse:
    context: ApiContext = request.app.state.api
    limit = context.settings.intake.max_event_bytes * MAX_BATCH
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, "too_large", f"the body is over {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        raise ApiError(413, "too_large", f"the body is over {limit} bytes")
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(422, "invalid_json", "the body is not JSON (UTF-8)") from None
    single = isinstance(parsed, dict)
    items = [parsed] if single else parsed
    if not isinstance(items, list) or not items:
        raise ApiError(422, "invalid_request", "send one LeadEvent object or a non-empty list")
    if len(items) > MAX_BATCH:
        raise ApiError(413, "too_large", f"at most {MAX_BATCH} events per request")
    response = await run_in_threadpool(_intake, context, items)
    if single and response.rejected:
        result = response.results[0]
        raise ApiError(422, result.code or "rejected", result.detail or "rejected")
    return response


def _intake(context: ApiContext, items: Sequence[Any]) -> LeadsResponse:
    if context.classifier is None:
        raise ApiError(503, "unavailable", "HTTP intake is not configured in this process")
    records = [
        Record(json.dumps(item, ensure_ascii=False).encode(), row=index)
        for index, item in enumerate(items)
    ]
    outcomes = context.chain.process(records, "http")
    accepted = [o for o in outcomes if isinstance(o, Accepted)]
    results: list[LeadResult] = []
    stored = None
    if accepted:
        with context.psycopg() as conn:
            stored = context.store.write(conn, accepted, context.classifier())
    position = 0
    for outcome in outcomes:
        index = outcome.record.row or 0
        if isinstance(outcome, Rejected):
            results.append(
                LeadResult(
                    index=index,
                    event_id=_event_id(items[index]),
                    status="rejected",
                    code=outcome.code,
                    detail=outcome.detail,
                )
            )
            intake_metrics.REJECTS.labels("http", outcome.code).inc()
            continue
        assert stored is not None
        kind = stored.outcomes[position]
        results.append(
            LeadResult(
                index=index,
                event_id=outcome.lead.event_id,
                status="accepted" if kind == "new" else kind,
                lead_id=stored.lead_ids[position],
            )
        )
        position += 1
    counts = {
        status: sum(1 for r in results if r.status == status)
        for status in ("accepted", "merged", "duplicate", "rejected")
    }
    intake_metrics.count_stored(
        "http",
        {"new": counts["accepted"], "merged": counts["merged"], "duplicate": counts["duplicate"]},
        stored.new_leads if stored is not None else {},
    )
    if counts["rejected"]:
        intake_metrics.EVENTS.labels("http", "rejected").inc(counts["rejected"])
    return LeadsResponse(**counts, results=results)


def _event_id(item: Any) -> str | None:
    value = item.get("event_id") if isinstance(item, dict) else None
    return value if isinstance(value, str) and len(value) <= 128 else None


def install(app: FastAPI, context: ApiContext) -> None:
    """Add the API routes, their error handling and the LeadEvent schema to `app`."""
    app.state.api = context
    install_error_handlers(app)
    app.include_router(router)
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            event = LeadEvent.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(event.pop("$defs", {}))
            components["LeadEventIn"] = event
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
