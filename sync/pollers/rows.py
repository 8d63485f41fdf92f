"""Source rows to LeadEvent-shaped objects, and their deterministic event ids. Pure.

A result column named like a LeadEvent field (`FIELDS`; `user_id AS external_id` in the query
does it) fills that field, as does a column the source's `columns` mapping sends there; a
mapping to `attributes.NAME` renames a column inside `attributes`, a mapping to null drops it.
Every other column goes into `attributes` under its own name, its value as the closest JSON
value (`sync.staging.rows.jsonable`: numbers stay numbers, timestamps become ISO 8601 text).

The event id of a row is a digest of the source, the row's identity and its watermark value:
the same row read again gives the same id (a no-op in the store), while the same row updated
— a new watermark value — is a new event that merges into the customer's open lead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, tzinfo
from decimal import Decimal
from typing import Any

from sync.pollers.watermark import PagingError, encode
from sync.staging.rows import jsonable

#: LeadEvent fields a column can fill; `consent` fills consent.telemarketing.
CUSTOMER_FIELDS = ("phone", "name", "email", "external_id", "region", "timezone")
EVENT_FIELDS = ("event_type", "occurred_at", "product", "campaign", "channel", "consent")
FIELDS = CUSTOMER_FIELDS + EVENT_FIELDS
ATTRIBUTES_PREFIX = "attributes."


def check_target(target: str | None) -> None:
    """ValueError unless `target` is somewhere a column may go (for the settings' checks)."""
    if target is None or target in FIELDS:
        return
    if target.startswith(ATTRIBUTES_PREFIX) and len(target) > len(ATTRIBUTES_PREFIX):
        return
    raise ValueError(
        f"{target!r} is not a LeadEvent field ({', '.join(FIELDS)}), "
        "attributes.NAME, or null (drop the column)"
    )


@dataclass(frozen=True)
class RowSpec:
    """How one source's rows become events."""

    source: str
    event_type: str
    watermark: str  # the watermark column
    key: str | None = None  # the column identifying a row (and the tiebreak of keyed queries)
    columns: Mapping[str, str | None] = field(default_factory=dict)  # column -> target
    timezone: tzinfo | None = None  # of naive timestamps; None: UTC


class RowMapper:
    """Maps the rows of one result, given its column names in select order."""

    def __init__(self, spec: RowSpec, columns: Sequence[str]) -> None:
        self.spec = spec
        self.columns = tuple(columns)
        missing = [c for c in (spec.watermark, spec.key) if c is not None and c not in columns]
        if missing:
            raise PagingError(
                f"the query's result has no column {missing[0]!r} (the source's "
                f"{'watermark' if missing[0] == spec.watermark else 'key'}); it has "
                f"{', '.join(self.columns) or 'no columns'}"
            )
        self.watermark_index = self.columns.index(spec.watermark)
        self.key_index = None if spec.key is None else self.columns.index(spec.key)
        #: (position, field) for fields, (position, attribute name) for attributes.
        self.fields: list[tuple[int, str]] = []
        self.attributes: list[tuple[int, str]] = []
        for position, column in enumerate(self.columns):
            target = spec.columns.get(column, column)
            if target is None:
                continue
            if target in FIELDS:
                self.fields.append((position, target))
            else:
                self.attributes.append((position, target.removeprefix(ATTRIBUTES_PREFIX)))
        self.external_id_index = next((i for i, f in self.fields if f == "external_id"), None)

    def watermark_of(self, row: Sequence[Any]) -> Any:
        return row[self.watermark_index]

    def key_of(self, row: Sequence[Any]) -> Any:
        assert self.key_index is not None
        return row[self.key_index]

    def identity(self, row: Sequence[Any]) -> str:
        """What identifies the row in its source: the key column, else the external id, else
        the digest of every column."""
        index = self.key_index if self.key_index is not None else self.external_id_index
        if index is not None and row[index] is not None:
            return _key_text(row[index])
        content = json.dumps(
            [jsonable(value) for value in row], ensure_ascii=False, separators=(",", ":")
        )
        return "row:" + hashlib.sha256(content.encode()).hexdigest()

    def event(self, row: Sequence[Any], now: datetime) -> dict[str, Any]:
        """The LeadEvent-shaped object of one row; `now` is its time when it has none."""
        spec = self.spec
        values: dict[str, Any] = {}
        for position, name in self.fields:
            value = row[position]
            if value is not None:
                values[name] = value
        customer = {name: _text(values[name]) for name in CUSTOMER_FIELDS if name in values}
        occurred = values.get("occurred_at", self.watermark_of(row))
        event: dict[str, Any] = {
            "schema_version": 1,
            "event_id": event_id(spec.source, self.identity(row), self.watermark_of(row)),
            "occurred_at": _when(occurred, spec.timezone, now),
            "source": spec.source,
            "event_type": _text(values.get("event_type")) or spec.event_type,
            "customer": customer,
            "attributes": {
                name: jsonable(row[position])
                for position, name in self.attributes
                if row[position] is not None
            },
        }
        for name in ("product", "campaign", "channel"):
            if name in values:
                event[name] = _text(values[name])
        if "consent" in values:
            event["consent"] = {"telemarketing": jsonable(values["consent"])}
        return event


def event_id(source: str, identity: str, watermark_value: Any) -> str:
    """`<source>:<32 hex digits>`, at most 97 characters (LeadEvent allows 128)."""
    value = encode(watermark_value) if watermark_value is not None else None
    content = json.dumps([source, identity, value], ensure_ascii=False, separators=(",", ":"))
    return f"{source}:{hashlib.sha256(content.encode()).hexdigest()[:32]}"


def _key_text(value: Any) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def _text(value: Any) -> Any:
    """A text field: a number (a phone or an id kept as a number) becomes its digits; other
    values are left for validation to judge."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return str(int(value))
    return jsonable(value)


def _when(value: Any, zone: tzinfo | None, now: datetime) -> Any:
    """A row's time as an aware datetime: naive ones are in the source's timezone; a row
    without a time (no occurred_at, a watermark that is not a time) happened `now`."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=zone or UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=zone or UTC)
    if isinstance(value, str):
        return value  # validation parses it or rejects it
    return now
