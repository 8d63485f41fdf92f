"""The intake chain's fast path for already-decoded objects (`plain_event`) against pydantic,
the authority: whatever it accepts, `LeadEvent.model_validate` accepts with the same values and
`model_dump_json(exclude_none=True)` writes the same payload; and the chain's outcome for an
object is the same whichever path it takes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.chain import (
    Accepted,
    ChainConfig,
    IntakeChain,
    Record,
    Rejected,
    _rejection,
    plain_event,
)
from schemas.events import LeadEvent

# Text close to the limits and the patterns: whitespace at either end, upper case, symbols.
_CHARS = st.sampled_from([*"abz09_.-AZ ", "\t", "\n", "\u3000", "\u00a0", "张", "é", "\x1c"])
_TEXT = st.one_of(
    st.text(_CHARS, max_size=8),
    st.text(_CHARS, min_size=60, max_size=70),
    st.text(_CHARS, min_size=125, max_size=130),
    st.text(_CHARS, min_size=250, max_size=260),
)
_MAYBE = st.one_of(st.none(), _TEXT, st.integers(0, 10), st.booleans())
_ZONES = st.sampled_from([UTC, timezone(timedelta(hours=8)), None])
_TIMES = st.builds(
    lambda seconds, zone: datetime(2026, 1, 1, tzinfo=zone) + timedelta(seconds=seconds),
    st.integers(0, 10**8),
    _ZONES,
)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def objects(draw: st.DrawFn) -> dict[str, Any]:
    customer = {"phone": draw(st.one_of(_TEXT, st.sampled_from(["13800138000", " 138 0013 8000"])))}
    for name in ("external_id", "name", "email", "region", "timezone"):
        if draw(st.booleans()):
            customer[name] = draw(_MAYBE)
    obj: dict[str, Any] = {
        "schema_version": draw(st.sampled_from([1, 1, 1, 2, True, "1"])),
        "event_id": draw(st.one_of(_TEXT, st.just("staging:t:1:2:0:1"))),
        "occurred_at": draw(st.one_of(_TIMES, st.just("2026-11-23T09:15:02+08:00"))),
        "source": draw(st.one_of(_TEXT, st.just("dwh"))),
        "event_type": draw(st.one_of(_TEXT, st.just("browse"))),
        "customer": customer,
        "attributes": draw(st.dictionaries(st.text(max_size=5), _JSON, max_size=4)),
    }
    for name in ("channel", "product", "campaign"):
        if draw(st.booleans()):
            obj[name] = draw(st.one_of(_MAYBE, st.just("car_loan")))
    if draw(st.integers(0, 9)) == 0:
        obj["consent"] = {"telemarketing": True}
    if draw(st.integers(0, 9)) == 0:
        obj["unknown"] = 1
    return obj


@settings(max_examples=1500, deadline=None)
@given(objects())
def test_what_the_fast_path_accepts_pydantic_accepts_the_same(obj: dict[str, Any]) -> None:
    plain = plain_event(obj)
    if plain is None:
        return
    event = LeadEvent.model_validate(obj)  # must not raise
    assert plain.payload() == event.model_dump_json(exclude_none=True)
    for name in (
        "event_id",
        "occurred_at",
        "source",
        "event_type",
        "channel",
        "product",
        "campaign",
    ):
        assert getattr(plain, name) == getattr(event, name), name
    assert plain.attributes == event.attributes
    assert event.consent is None
    for name in ("phone", "external_id", "name", "email", "region", "timezone"):
        assert getattr(plain.customer, name) == getattr(event.customer, name), name


CHAIN = IntakeChain(ChainConfig(default_region="CN"))


@settings(max_examples=800, deadline=None)
@given(objects())
def test_the_chain_gives_the_same_outcome_on_either_path(obj: dict[str, Any]) -> None:
    (outcome,) = CHAIN.process_objects([(Record(None, row=1), obj)], "staging")
    try:
        event = LeadEvent.model_validate(obj)
    except ValidationError as exc:
        expected = _rejection(Record(None, row=1), exc, None)
        assert isinstance(outcome, Rejected)
        assert (outcome.code, outcome.detail) == (expected.code, expected.detail)
        return
    slow = CHAIN.normalise(
        Record(None, row=1), event, "staging", event.model_dump_json(exclude_none=True)
    )
    if isinstance(slow, Accepted):
        assert isinstance(outcome, Accepted)
        assert outcome.lead == slow.lead
        assert outcome.payload == slow.payload
    else:
        assert isinstance(outcome, Rejected)
        assert (outcome.code, outcome.detail) == (slow.code, slow.detail)


def test_plain_rows_take_the_fast_path() -> None:
    obj = {
        "schema_version": 1,
        "event_id": "staging:t:1:2:0:1",
        "occurred_at": datetime(2026, 11, 23, 1, 15, 2, tzinfo=UTC),
        "source": "dwh",
        "event_type": "browse",
        "customer": {"phone": "13800138000", "name": "张三"},
        "product": "car_loan",
        "attributes": {"amount": 5000, "tags": ["silent"]},
    }
    assert plain_event(obj) is not None
    assert plain_event({**obj, "source": " dwh"}) is None  # pydantic strips it: its call
    assert plain_event({**obj, "consent": {"telemarketing": False}}) is None
