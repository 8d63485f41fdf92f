"""Watermarks and keyset paging over a source query, rows with equal watermarks included. Pure.

A source query reads the rows after the watermark in watermark order, `LIMIT :limit` at a time.
Two forms are supported, and both store every row exactly once however many rows share a
watermark value and wherever a page boundary falls among them:

- **keyed** — the query also takes `:watermark_key` and compares the pair, e.g.
  `WHERE (updated_at, id) > (:watermark, :watermark_key) ORDER BY updated_at, id LIMIT :limit`.
  The watermark is the (value, key) of the last row taken; a page is taken whole. The key must
  be unique, so (value, key) orders the rows strictly.
- **plain** — the query only compares the value, `updated_at > :watermark ORDER BY updated_at
  LIMIT :limit`, as in CONTRACT.md §6. A full page may end inside a group of rows sharing the
  last value, with more of that group beyond the limit; advancing to that value would skip them.
  So a full page is taken only up to its trailing tie group, which the next read (`> ` the value
  before it) returns again, whole. (The poller reads `batch_size + 1` rows: with distinct
  values, the one row of look-ahead is the trailing group, and `batch_size` rows are taken.) A full page that is one tie group cannot be split that way:
  it is read again with twice the limit, until the group ends inside the page (so a plain query
  needs memory for its largest tie group, up to `max_rows`; beyond that the run fails and asks
  for the keyed form). A short page is the end of the rows: it is taken whole.

Both assume what keyset paging always assumes: the rows after the watermark do not change
while a run reads them, and a row written later gets a larger watermark value than any row
already read (a timestamp set on commit, or a sequence); a row that appears later with a value
at or below the watermark is not read until `leadflow sources reset` moves the watermark back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

_TYPES = ("datetime", "date", "int", "decimal", "float", "str")


class PagingError(ValueError):
    """The rows do not fit the query's contract (order, NULL watermark, tie group too big);
    retrying will not help, the query or the configuration must change."""


@dataclass(frozen=True, slots=True)
class Watermark:
    """Where the next read starts: the last row's watermark value (and key, keyed queries)."""

    value: Any
    key: Any = None


@dataclass(frozen=True, slots=True)
class Page:
    """What to do with the rows one read returned."""

    take: int  # store rows[:take]
    watermark: Watermark | None  # after storing them; None: unchanged
    done: bool  # no more rows after these
    next_limit: int  # the limit of the next read


def plain_page(values: Sequence[Any], limit: int, base_limit: int, max_rows: int) -> Page:
    """Decide a page of a plain query from its rows' watermark values, in read order; `limit`
    is the limit it was read with, `base_limit` the limit of a page that did not grow."""
    check_plain_order(values)
    n = len(values)
    if n < limit:
        return Page(n, Watermark(values[-1]) if n else None, True, base_limit)
    last = values[-1]
    group = n - 1
    while group > 0 and values[group - 1] == last:
        group -= 1
    if group == 0:  # the whole page shares one value: read it again, larger
        if limit >= max_rows:
            raise PagingError(
                f"more than {max_rows:,} rows share the watermark value {last!r}: a plain "
                "`> :watermark` query cannot page through them in bounded memory; give the "
                "source a `key` column and compare (watermark, key) > (:watermark, "
                ":watermark_key) in its query"
            )
        return Page(0, None, False, min(limit * 2, max_rows))
    return Page(group, Watermark(values[group - 1]), False, base_limit)


def keyed_page(pairs: Sequence[tuple[Any, Any]], limit: int) -> Page:
    """Decide a page of a keyed query from its rows' (watermark value, key) pairs."""
    check_keyed_order(pairs)
    n = len(pairs)
    watermark = Watermark(*pairs[-1]) if n else None
    return Page(n, watermark, n < limit, limit)


def check_plain_order(values: Sequence[Any]) -> None:
    for n, value in enumerate(values):
        if value is None:
            raise PagingError(f"row {n + 1} of a page has no watermark value (NULL)")
    for n in range(1, len(values)):
        if _comparable(values[n]) and values[n] < values[n - 1]:
            raise PagingError(
                "the rows are not in watermark order: the query must ORDER BY the watermark "
                "column (ascending)"
            )


def check_keyed_order(pairs: Sequence[tuple[Any, Any]]) -> None:
    for n, (value, key) in enumerate(pairs):
        if value is None or key is None:
            raise PagingError(f"row {n + 1} of a page has no watermark value or key (NULL)")
    for n in range(1, len(pairs)):
        if all(_comparable(v) for v in (*pairs[n], *pairs[n - 1])) and pairs[n] <= pairs[n - 1]:
            raise PagingError(
                "the rows are not in (watermark, key) order, or the key is not unique: the "
                "query must ORDER BY the watermark column, then the key column (ascending)"
            )


def _comparable(value: Any) -> bool:
    # Text is ordered by the source's collation (often case-insensitive), which Python's
    # comparison does not know: it is not checked. Numbers and times order the same everywhere.
    return not isinstance(value, str)


# --- storage as JSON (poller_state.watermark) ----------------------------------------------


def to_json(watermark: Watermark | None) -> dict[str, Any] | None:
    """{"value": ..., "type": ..., "key": ..., "key_type": ...}, readable and exact."""
    if watermark is None:
        return None
    value_type, value = encode(watermark.value)
    document: dict[str, Any] = {"value": value, "type": value_type}
    if watermark.key is not None:
        key_type, key = encode(watermark.key)
        document.update(key=key, key_type=key_type)
    return document


def from_json(document: Mapping[str, Any] | None) -> Watermark | None:
    if document is None:
        return None
    key = document.get("key")
    return Watermark(
        decode(document["type"], document["value"]),
        None if key is None else decode(document["key_type"], key),
    )


def encode(value: Any) -> tuple[str, Any]:
    """(type, JSON value) of a watermark value or key, as the source driver returned it."""
    if isinstance(value, bool):
        return "int", int(value)
    if isinstance(value, datetime):
        return "datetime", value.isoformat()
    if isinstance(value, date):
        return "date", value.isoformat()
    if isinstance(value, int):
        return "int", value
    if isinstance(value, Decimal):
        return "decimal", str(value)
    if isinstance(value, float):
        return "float", value
    if isinstance(value, str):
        return "str", value
    raise PagingError(
        f"a watermark or key of type {type(value).__name__} is not supported (use a timestamp, "
        "date, number or text column)"
    )


def decode(value_type: str, value: Any) -> Any:
    """The driver value back from `encode`: bound as the query's parameter."""
    if value_type == "datetime":
        return datetime.fromisoformat(value)
    if value_type == "date":
        return date.fromisoformat(value)
    if value_type == "int":
        return int(value)
    if value_type == "decimal":
        return Decimal(value)
    if value_type == "float":
        return float(value)
    if value_type == "str":
        return str(value)
    raise PagingError(f"unknown watermark type {value_type!r} (one of {', '.join(_TYPES)})")


def parse_as(value_type: str, text: str) -> Any:
    """A value typed by a person (`sources reset --to`), read as `value_type`; ValueError with
    a reason when it is not one."""
    text = text.strip()
    try:
        if value_type == "datetime":
            return datetime.fromisoformat(text)
        if value_type == "date":
            return date.fromisoformat(text)
        if value_type == "int":
            return int(text)
        if value_type == "decimal":
            number = Decimal(text)
            if not number.is_finite():
                raise ValueError
            return number
        if value_type == "float":
            return float(text)
    except (ValueError, ArithmeticError):
        examples = {
            "datetime": "an ISO 8601 date-time such as 2026-11-01T00:00:00 or 2026-11-01",
            "date": "an ISO 8601 date such as 2026-11-01",
            "int": "a whole number",
            "decimal": "a decimal number",
            "float": "a number",
        }
        raise ValueError(f"{text!r} is not {examples[value_type]}") from None
    if value_type == "str":
        return text
    raise ValueError(f"unknown watermark type {value_type!r}")


def display(watermark: Watermark | None) -> str:
    """The watermark as people read it: `2026-11-24T08:00:00`, `(2026-11-24T08:00:00, 42)`."""
    if watermark is None:
        return "-"
    value = _show(watermark.value)
    return value if watermark.key is None else f"({value}, {_show(watermark.key)})"


def _show(value: Any) -> str:
    return value.isoformat() if isinstance(value, date | datetime) else str(value)
