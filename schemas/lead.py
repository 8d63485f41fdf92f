"""The internal lead values that flow between the intake chain and the classifier.

Plain frozen dataclasses, not pydantic: they are built after validation, on the hot path, once
per event. `Lead` is a normalised event (phone in E.164, timezone resolved); `CustomerContext`
is what the database knows about the customer before the batch; `Classification` is the
classifier's decision for one lead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.vocab import Intake


@dataclass(frozen=True, slots=True)
class Hints:
    """Fixed classification given by the submitter (staging extracts); None means "classify"."""

    business_line: str | None = None
    segment: str | None = None
    priority: int | None = None


@dataclass(frozen=True, slots=True)
class Lead:
    """One valid, normalised lead event."""

    event_id: str
    occurred_at: datetime
    source: str
    event_type: str
    phone: str  # E.164, e.g. +8613800138000
    intake: Intake
    channel: str | None = None
    product: str | None = None
    campaign: str | None = None
    region: str | None = None  # the customer's region (ISO 3166-2) if the event gave one
    timezone: str | None = None  # IANA; from the event, else from the phone number
    country: str | None = None  # ISO 3166-1 region of the phone number
    external_id: str | None = None
    name: str | None = None
    email: str | None = None
    consent: bool | None = None  # consent.telemarketing; False => never allocated
    attributes: Mapping[str, Any] = field(default_factory=dict)
    hints: Hints | None = None

    @property
    def realtime(self) -> bool:
        return self.intake in ("realtime", "http")


@dataclass(frozen=True, slots=True)
class CustomerContext:
    """What is known about a customer from before the batch being classified."""

    is_returning_customer: bool = False
    #: Business lines in which the customer has an open lead.
    open_lead_lines: frozenset[str] = frozenset()


NEW_CUSTOMER = CustomerContext()


@dataclass(frozen=True, slots=True)
class Classification:
    """Business line, segment and priority of one lead, with the rules that decided them."""

    business_line: str
    segment: str
    priority: int  # 0..100
    matched_rules: tuple[str, ...]  # ids of the business-line and segment rules that matched
    rules_version: str  # hash of the rule set
    sla_class: str | None = None
