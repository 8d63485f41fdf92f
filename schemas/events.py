"""Versioned event contracts at the Kafka edges: LeadEvent v1 (in) and AssignmentEvent v1 (out).

These pydantic models are the single source of truth; the JSON Schemas in `schemas/json/` are
exported from them (`python -m schemas.export`) and a test fails when the two drift apart.
Validation here is structural only: phone normalisation, consent policy and size limits belong
to the intake chain, which turns each failure into a rejection code.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from schemas.vocab import Strategy

Slug = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.\-]*$"
    ),
]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=256)]
Id128 = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
PhoneText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Code = Annotated[str, StringConstraints(strip_whitespace=True, max_length=64)]

LEAD_EVENT_EXAMPLE: dict[str, Any] = {
    "schema_version": 1,
    "event_id": "7b0f2c9e-5d1a-4c1e-9f43-0b7a2d6e9c11",
    "occurred_at": "2026-11-23T09:15:02+08:00",
    "source": "loan-app",
    "event_type": "order_pending_payment",
    "channel": "app",
    "customer": {
        "phone": "138 0013 8000",
        "external_id": "u-42",
        "name": "张三",
        "email": "z@example.com",
        "region": "CN-31",
        "timezone": "Asia/Shanghai",
    },
    "product": "personal_credit_loan",
    "campaign": "2026-double-11",
    "consent": {"telemarketing": True},
    "attributes": {"amount": 5000, "tags": ["silent", "high_value"]},
}


class _Lenient(BaseModel):
    """Unknown fields are ignored, never fatal: producers may add fields before we read them."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Customer(_Lenient):
    phone: PhoneText = Field(
        description="Any human format; the intake normalises it to E.164 (default region configurable)."
    )
    external_id: Id128 | None = None
    name: ShortText | None = None
    email: ShortText | None = Field(
        default=None,
        description="Checked for syntax by the intake; a bad address is dropped, not fatal.",
    )
    region: Code | None = Field(default=None, description="ISO 3166-2 code such as CN-31.")
    timezone: Code | None = Field(
        default=None,
        description="IANA name; when absent the intake derives it from the phone number.",
    )


class Consent(_Lenient):
    telemarketing: bool | None = Field(
        default=None, description="false means the lead is stored but never allocated for calls."
    )


class LeadEvent(_Lenient):
    """A lead event published by a product team to `leads.raw` (CONTRACT.md §3)."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        title="LeadEvent",
        json_schema_extra={"examples": [LEAD_EVENT_EXAMPLE]},
    )

    schema_version: Literal[1] = Field(description="Contract version; anything but 1 is rejected.")
    event_id: Id128 = Field(description="Idempotency key: the same event_id again is a no-op.")
    occurred_at: AwareDatetime = Field(description="RFC 3339 timestamp with a UTC offset.")
    source: Slug = Field(description="The producing system.")
    event_type: Slug = Field(
        description="signup, browse, order_created, order_pending_payment, ad_click, form_submit, ..."
    )
    channel: Slug | None = Field(default=None, description="web, app, ad, partner, ...")
    customer: Customer
    product: Slug | None = None
    campaign: Id128 | None = None
    consent: Consent | None = None
    attributes: dict[str, Any] = Field(
        default_factory=dict, description="Free-form object, at most 16 KiB once serialised."
    )


class AssignmentEvent(BaseModel):
    """Published to `leads.assigned` (keyed by agent id) once an assignment is committed."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="AssignmentEvent")

    schema_version: Literal[1] = 1
    assignment_id: UUID = Field(description="Stable across redeliveries of the same assignment.")
    lead_id: int
    agent_id: str
    queue: str
    strategy: Strategy
    reason: str
    business_line: str
    segment: str
    priority: Annotated[int, Field(ge=0, le=100)]
    attempt: Annotated[int, Field(ge=1)]
    assigned_at: AwareDatetime
    sla_deadline: AwareDatetime | None = None
    customer_phone: str = Field(description="E.164")
    customer_name: str | None = None
    customer_timezone: str | None = None
    lead_queued_at: AwareDatetime | None = Field(
        default=None,
        description="When the lead entered the queue; on attempt 1, assigned_at minus this is "
        "the speed to lead.",
    )


#: The checked-in JSON Schemas, by file name under schemas/json/.
EXPORTED: dict[str, type[BaseModel]] = {
    "lead_event.v1.json": LeadEvent,
    "assignment_event.v1.json": AssignmentEvent,
}


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema of an event model, with a stable `$id` for publishers' validators."""
    schema = model.model_json_schema(mode="validation")
    name = next(file for file, cls in EXPORTED.items() if cls is model)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"leadflow/{name}",
        **schema,
    }


__all__ = ["EXPORTED", "AssignmentEvent", "Consent", "Customer", "LeadEvent", "json_schema"]
