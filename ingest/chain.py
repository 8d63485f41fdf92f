"""The intake chain's pure stages, shared by every channel: decode, validate, normalise.

Batch in, batch out, no I/O and no clock. Each input record comes out either `Accepted` with a
normalised `Lead` or `Rejected` with a code of CONTRACT.md §3 and a detail for people; details
name fields and problems, never the personal data in them (the DLQ keeps the original bytes).
Classification and persistence follow in `ingest.store`, which needs the database.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from pydantic import ValidationError
from pydantic_core import to_json

from ingest.phones import InvalidPhone, PhoneNormaliser
from schemas.events import LeadEvent
from schemas.lead import Hints, Lead
from schemas.vocab import Intake, RejectCode

MAX_ATTRIBUTES_BYTES = 16 * 1024
_MAX_DETAIL_ERRORS = 3


@dataclass(frozen=True, slots=True)
class Record:
    """One input record: the raw bytes of a Kafka message or HTTP body, or a mapped row."""

    value: bytes | None
    key: bytes | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    #: Staging row number or poller row, for rejects tables.
    row: int | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    record: Record
    lead: Lead
    payload: str  # the event as JSON text, stored in lead_events.payload


@dataclass(frozen=True, slots=True)
class Rejected:
    record: Record
    code: RejectCode
    detail: str


Outcome = Accepted | Rejected


@dataclass(frozen=True)
class ChainConfig:
    default_region: str = "CN"
    max_event_bytes: int = 64 * 1024
    require_consent: bool = False


class IntakeChain:
    """decode -> validate -> normalise, for one configuration (built once per worker)."""

    def __init__(self, config: ChainConfig) -> None:
        self.config = config
        self.phones = PhoneNormaliser(config.default_region)

    def process(self, records: Iterable[Record], intake: Intake) -> list[Outcome]:
        """Raw bytes (Kafka, HTTP) through the whole chain, in input order."""
        return [self._one(record, intake) for record in records]

    def _one(self, record: Record, intake: Intake) -> Outcome:
        value = record.value
        if value is None:
            return Rejected(record, "invalid_json", "empty message (null value)")
        if len(value) > self.config.max_event_bytes:
            return Rejected(
                record,
                "too_large",
                f"{len(value)} bytes, over the limit of {self.config.max_event_bytes}",
            )
        try:
            event = LeadEvent.model_validate_json(value)
        except ValidationError as exc:
            return _rejection(record, exc, value)
        if (
            len(value) > MAX_ATTRIBUTES_BYTES
            and _json_size(event.attributes) > MAX_ATTRIBUTES_BYTES
        ):
            return Rejected(record, "schema_violation", "attributes: larger than 16 KiB")
        return self.normalise(record, event, intake, value.decode("utf-8"))

    def process_objects(
        self,
        rows: Iterable[tuple[Record, Mapping[str, Any]]],
        intake: Intake,
        hints: Hints | None = None,
    ) -> list[Outcome]:
        """Already-decoded objects (staging rows, poller rows mapped to LeadEvent fields)."""
        outcomes: list[Outcome] = []
        for record, obj in rows:
            event: LeadEvent | PlainEvent
            plain = plain_event(obj)
            if plain is not None:
                event, payload = plain, plain.payload()
            else:  # not plainly valid: pydantic judges, and says what is wrong
                try:
                    event = LeadEvent.model_validate(obj)
                except ValidationError as exc:
                    outcomes.append(_rejection(record, exc, None))
                    continue
                payload = event.model_dump_json(exclude_none=True)
            # The payload holds the attributes: only a large one needs measuring on its own.
            if (
                len(payload) > MAX_ATTRIBUTES_BYTES // 2
                and _json_size(event.attributes) > MAX_ATTRIBUTES_BYTES
            ):
                outcomes.append(
                    Rejected(record, "schema_violation", "attributes: larger than 16 KiB")
                )
                continue
            outcomes.append(self.normalise(record, event, intake, payload, hints))
        return outcomes

    def normalise(
        self,
        record: Record,
        event: LeadEvent | PlainEvent,
        intake: Intake,
        payload: str,
        hints: Hints | None = None,
    ) -> Outcome:
        consent = event.consent.telemarketing if event.consent is not None else None
        if consent is None and self.config.require_consent:
            return Rejected(
                record, "consent_missing", "consent.telemarketing is required by configuration"
            )
        customer = event.customer
        try:
            phone = self.phones.normalise(customer.phone)
        except InvalidPhone as exc:
            return Rejected(record, "invalid_phone", f"customer.phone: {exc}")
        lead = Lead(
            event_id=event.event_id,
            occurred_at=event.occurred_at,
            source=event.source,
            event_type=event.event_type,
            phone=phone.e164,
            intake=intake,
            channel=event.channel,
            product=event.product,
            campaign=event.campaign,
            region=customer.region,
            timezone=customer.timezone or phone.timezone,
            country=phone.region,
            external_id=customer.external_id,
            name=clean_name(customer.name),
            email=clean_email(customer.email),
            consent=consent,
            attributes=event.attributes,
            hints=hints,
        )
        return Accepted(record, lead, payload)


@dataclass(frozen=True, slots=True)
class PlainCustomer:
    phone: str
    external_id: str | None = None
    name: str | None = None
    email: str | None = None
    region: str | None = None
    timezone: str | None = None


@dataclass(frozen=True, slots=True)
class PlainEvent:
    """A LeadEvent object that needed no validation work: what `LeadEvent.model_validate`
    would make of it, field for field (a property test holds `plain_event` to that)."""

    event_id: str
    occurred_at: datetime
    source: str
    event_type: str
    customer: PlainCustomer
    channel: str | None = None
    product: str | None = None
    campaign: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    consent: None = None

    def payload(self) -> str:
        """The event as `model_dump_json(exclude_none=True)` writes it."""
        customer = self.customer
        person = {"phone": customer.phone}
        for name in ("external_id", "name", "email", "region", "timezone"):
            value = getattr(customer, name)
            if value is not None:
                person[name] = value
        out: dict[str, Any] = {
            "schema_version": 1,
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "source": self.source,
            "event_type": self.event_type,
        }
        if self.channel is not None:
            out["channel"] = self.channel
        out["customer"] = person
        if self.product is not None:
            out["product"] = self.product
        if self.campaign is not None:
            out["campaign"] = self.campaign
        out["attributes"] = self.attributes
        return to_json(out).decode()


_SLUG_BODY = re.compile(r"[a-z0-9][a-z0-9_.\-]*")
_EVENT_KEYS = frozenset(
    ("schema_version", "event_id", "occurred_at", "source", "event_type", "channel",
     "customer", "product", "campaign", "consent", "attributes")
)  # fmt: skip
_CUSTOMER_KEYS = frozenset(("phone", "external_id", "name", "email", "region", "timezone"))


def _text(value: Any, low: int, high: int) -> bool:
    """A str pydantic would take as it is: no surrounding whitespace to strip, length within."""
    return (
        type(value) is str
        and low <= len(value) <= high
        and (not value or not (value[0].isspace() or value[-1].isspace()))
    )


def _optional(value: Any, low: int, high: int) -> bool:
    return value is None or _text(value, low, high)


def _slug(value: Any) -> bool:
    return _text(value, 1, 64) and _SLUG_BODY.fullmatch(value) is not None


def plain_event(obj: Mapping[str, Any]) -> PlainEvent | None:
    """The event, when `obj` is plainly a valid LeadEvent as it stands (plain types, nothing
    to strip or coerce); None when pydantic must judge it. Staging and poller rows are nearly
    always plain, and this costs a fraction of a model validation."""
    if type(obj) is not dict or not _EVENT_KEYS.issuperset(obj):
        return None
    customer = obj.get("customer")
    occurred_at = obj.get("occurred_at")
    attributes = obj.get("attributes", {})
    if not (
        type(obj.get("schema_version")) is int
        and obj["schema_version"] == 1
        and _text(obj.get("event_id"), 1, 128)
        and type(occurred_at) is datetime
        and occurred_at.utcoffset() is not None
        and _slug(obj.get("source"))
        and _slug(obj.get("event_type"))
        and (obj.get("channel") is None or _slug(obj["channel"]))
        and (obj.get("product") is None or _slug(obj["product"]))
        and _optional(obj.get("campaign"), 1, 128)
        and obj.get("consent") is None
        and type(attributes) is dict
        and all(type(key) is str for key in attributes)
        and type(customer) is dict
        and _CUSTOMER_KEYS.issuperset(customer)
        and _text(customer.get("phone"), 1, 64)
        and _optional(customer.get("external_id"), 1, 128)
        and _optional(customer.get("name"), 0, 256)
        and _optional(customer.get("email"), 0, 256)
        and _optional(customer.get("region"), 0, 64)
        and _optional(customer.get("timezone"), 0, 64)
    ):
        return None
    return PlainEvent(
        event_id=obj["event_id"],
        occurred_at=occurred_at,
        source=obj["source"],
        event_type=obj["event_type"],
        customer=PlainCustomer(**customer),
        channel=obj.get("channel"),
        product=obj.get("product"),
        campaign=obj.get("campaign"),
        attributes=attributes,
    )


def clean_name(name: str | None) -> str | None:
    """Collapse runs of whitespace; an empty name is no name."""
    if name is None:
        return None
    cleaned = " ".join(name.split())
    return cleaned or None


# An unquoted ASCII local part (RFC 5322 dot-atom) and a domain of ASCII labels: the shape of
# nearly every real address. Its domain is judged once by email_validator and remembered.
_PLAIN_EMAIL = re.compile(
    r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})"
)


@lru_cache(maxsize=8192)
def _email_domain(domain: str) -> str | None:
    """The normalised domain if email_validator accepts it, else None."""
    try:
        return validate_email(f"x@{domain}", check_deliverability=False).domain
    except EmailNotValidError:
        return None


def clean_email(email: str | None) -> str | None:
    """The normalised address, or None when it is not a syntactically valid address.

    A bad e-mail is dropped, not fatal: the phone is what the call center needs. Plain
    addresses take a fast path that agrees with email_validator (a property test holds it to
    that); everything else goes to email_validator itself.
    """
    if not email:
        return None
    match = _PLAIN_EMAIL.fullmatch(email)
    if (
        match
        and len(match[1]) <= 64
        and len(email) <= 254
        and match[1].lower() not in CASE_INSENSITIVE_MAILBOX_NAMES  # these get lowercased
    ):
        domain = _email_domain(match[2])
        return f"{match[1]}@{domain}" if domain is not None else None
    try:
        return validate_email(email, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


def slow_clean_email(email: str) -> str | None:
    """email_validator alone: the reference the fast path is tested against."""
    try:
        return validate_email(email, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


def _json_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _rejection(record: Record, exc: ValidationError, raw: bytes | None) -> Rejected:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid" and raw is not None:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return Rejected(record, "invalid_utf8", f"invalid UTF-8 at byte {bad.start}")
        return Rejected(record, "invalid_json", f"not JSON: {first['msg']}")
    for error in errors:
        if error["loc"] == ("schema_version",) and error["type"] == "literal_error":
            given = error.get("input")
            if isinstance(given, int) and not isinstance(given, bool):
                return Rejected(
                    record,
                    "unsupported_schema_version",
                    f"schema_version {given} is not supported (1 is)",
                )
    return Rejected(record, "schema_violation", describe(errors))


def describe(errors: Sequence[Mapping[str, Any]]) -> str:
    """Field paths and reasons, never the offending values (they may be personal data)."""
    parts = []
    for error in errors[:_MAX_DETAIL_ERRORS]:
        where = ".".join(str(part) for part in error["loc"]) or "event"
        parts.append(f"{where}: {error['msg']}")
    if len(errors) > _MAX_DETAIL_ERRORS:
        parts.append(f"and {len(errors) - _MAX_DETAIL_ERRORS} more")
    return "; ".join(parts)
