"""Event contracts: the pydantic models, and the checked-in JSON Schemas exported from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.events import EXPORTED, LEAD_EVENT_EXAMPLE, AssignmentEvent, LeadEvent
from schemas.export import render

SCHEMA_DIR = Path(__file__).parents[2] / "schemas" / "json"


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_checked_in_json_schema_matches_the_model(name: str) -> None:
    checked_in = (SCHEMA_DIR / name).read_text(encoding="utf-8")
    assert checked_in == render(name), f"run `python -m schemas.export` to refresh {name}"


def test_contract_example_validates() -> None:
    event = LeadEvent.model_validate(LEAD_EVENT_EXAMPLE)
    assert event.customer.phone == "138 0013 8000"
    assert event.consent is not None
    assert event.consent.telemarketing is True
    assert event.occurred_at.utcoffset() is not None


def test_unknown_fields_are_ignored() -> None:
    event = LeadEvent.model_validate_json(
        json.dumps({**LEAD_EVENT_EXAMPLE, "new_field": 1, "customer": {"phone": "1", "x": 2}})
    )
    assert not hasattr(event, "new_field")


@pytest.mark.parametrize(
    "change",
    [
        {"schema_version": 2},
        {"event_id": ""},
        {"event_id": "x" * 129},
        {"occurred_at": "2026-11-23T09:15:02"},  # no offset
        {"source": "Not A Slug"},
        {"customer": {"name": "no phone"}},
        {"attributes": []},
    ],
)
def test_structural_violations_are_rejected(change: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        LeadEvent.model_validate({**LEAD_EVENT_EXAMPLE, **change})


def test_required_fields_match_the_contract() -> None:
    schema = json.loads((SCHEMA_DIR / "lead_event.v1.json").read_text(encoding="utf-8"))
    assert set(schema["required"]) == {
        "schema_version", "event_id", "occurred_at", "source", "event_type", "customer",
    }  # fmt: skip
    assert schema["$defs"]["Customer"]["required"] == ["phone"]


def test_assignment_event_round_trips() -> None:
    event = AssignmentEvent.model_validate(
        {
            "assignment_id": "0d4f6f1e-8c1b-4a53-9a43-2f7f3c1f1a10",
            "lead_id": 7,
            "agent_id": "a-1",
            "queue": "credit-hot",
            "strategy": "round_robin",
            "reason": "round robin: next available agent",
            "business_line": "personal_credit_loan",
            "segment": "hot",
            "priority": 90,
            "attempt": 1,
            "assigned_at": "2026-11-23T09:15:03+08:00",
            "customer_phone": "+8613800138000",
        }
    )
    assert AssignmentEvent.model_validate_json(event.model_dump_json()) == event
