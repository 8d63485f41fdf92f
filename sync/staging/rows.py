"""Staging rows to LeadEvent-shaped objects: column mapping, JSON values, event ids. Pure.

A staging table's recognised columns (`RECOGNISED`) fill the event's fields; every other column
goes into `attributes` under its own name, its value as JSON of the closest type (`jsonable`).
Missing fields take the extract's values, then the loader's defaults; a NULL occurred_at is the
submission time. The event id of a row is its place in one physical version of one table
(`event_id_prefix`), so the same table loaded again, or a chunk replayed after a crash, yields
the same ids and the store turns them into no-ops.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from typing import Any

from ingest.chain import Record

#: Columns with a meaning of their own (CONTRACT.md §5); every other column is an attribute.
RECOGNISED = (
    "phone",
    "name",
    "email",
    "external_id",
    "product",
    "event_type",
    "occurred_at",
    "region",
    "campaign",
)
_CUSTOMER_FIELDS = ("phone", "name", "email", "external_id", "region")
_PLAIN = frozenset((str, int, bool))  # JSON as they are


@dataclass(frozen=True, slots=True)
class EventDefaults:
    """What a row without its own value gets: the extract's values, then the loader's."""

    source: str
    event_type: str
    campaign: str | None
    occurred_at: datetime  # the submission time
    timezone: tzinfo  # of naive timestamps in the table


def event_id_prefix(table: str, relid: int, filenode: int) -> str:
    """`staging:<table>:<oid>:<filenode>:`, completed by a row's `<block>:<offset>`.

    The file node changes when the table is rewritten (TRUNCATE, VACUUM FULL, CLUSTER), and the
    oid when it is dropped and created again: new content is a new extract, while the same
    table submitted twice keeps its ids. The parts after the name are digits, so two different
    tables can never give the same id.
    """
    return f"staging:{table}:{relid}:{filenode}:"


def jsonable(value: Any) -> Any:
    """A column value as the closest JSON value: numbers stay numbers (Decimal too, as an int
    when integral), booleans and text stay, timestamps, dates and times become ISO 8601 text,
    intervals a number of seconds, arrays lists, json/jsonb as they are, bytes `\\x` + hex;
    anything else its text. NaN and infinities, which JSON lacks, become text."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        if value == value.to_integral_value():
            return int(value)
        return float(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
        return int(seconds) if seconds.is_integer() else seconds
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def _text(value: Any) -> Any:
    """A recognised text field: numbers (a phone or an id stored as a number) become their
    digits; anything else is left for validation to judge."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return value  # rejected by validation: a boolean is no phone or name
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return str(int(value))
    return jsonable(value)


def _occurred_at(value: Any, defaults: EventDefaults) -> Any:
    if value is None:
        return defaults.occurred_at
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=defaults.timezone)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=defaults.timezone)
    return value  # text: validation parses it or rejects it


class RowMapper:
    """Maps the rows of one table. A row is `(ctid, *columns)`, as the loader selects it:
    the ctid as PostgreSQL writes it, '(12,5)', then the columns in `columns` order."""

    def __init__(self, columns: Sequence[str], defaults: EventDefaults, id_prefix: str) -> None:
        self.columns = tuple(columns)
        self.defaults = defaults
        self.id_prefix = id_prefix
        position = {name: i + 1 for i, name in enumerate(self.columns)}
        self.index = {name: position.get(name) for name in RECOGNISED}
        self.extra = tuple(
            (i + 1, name) for i, name in enumerate(self.columns) if name not in RECOGNISED
        )

    def event(self, row: Sequence[Any]) -> dict[str, Any]:
        """The LeadEvent-shaped object of one row."""
        index, defaults = self.index, self.defaults
        customer = {}
        for name in _CUSTOMER_FIELDS:
            i = index[name]
            if i is not None and (value := row[i]) is not None:
                customer[name] = value if type(value) is str else _text(value)
        i = index["event_type"]
        event_type = row[i] if i is not None else None
        i = index["occurred_at"]
        event: dict[str, Any] = {
            "schema_version": 1,
            "event_id": self.id_prefix + row[0][1:-1].replace(",", ":"),
            "occurred_at": _occurred_at(row[i] if i is not None else None, defaults),
            "source": defaults.source,
            "event_type": _text(event_type) if event_type else defaults.event_type,
            "customer": customer,
            "attributes": {
                name: value if type(value) in _PLAIN else jsonable(value)
                for i, name in self.extra
                if (value := row[i]) is not None
            },
        }
        i = index["product"]
        if i is not None and (product := row[i]) is not None:
            event["product"] = _text(product)
        i = index["campaign"]
        campaign = row[i] if i is not None else None
        if campaign:
            event["campaign"] = _text(campaign)
        elif defaults.campaign is not None:
            event["campaign"] = defaults.campaign
        return event

    def row_json(self, row: Sequence[Any]) -> dict[str, Any]:
        """The whole row as JSON, every column (NULLs too), for the rejects table."""
        return {name: jsonable(row[i + 1]) for i, name in enumerate(self.columns)}

    def records(
        self, numbered: Iterable[tuple[int, Sequence[Any]]]
    ) -> list[tuple[Record, Mapping[str, Any]]]:
        """(Record, event) per (row number, row)."""
        return [(Record(None, row=n), self.event(row)) for n, row in numbered]
