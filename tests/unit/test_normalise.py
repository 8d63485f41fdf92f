"""Normalisation: phones (fast path vs phonenumbers), e-mails (fast path vs email_validator),
names, and the rejection codes of the chain."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest.chain import (
    Accepted,
    ChainConfig,
    IntakeChain,
    Record,
    Rejected,
    clean_email,
    clean_name,
    slow_clean_email,
)
from ingest.phones import InvalidPhone, PhoneNormaliser, slow_e164
from schemas.events import LEAD_EVENT_EXAMPLE

CN = PhoneNormaliser("CN")
SEPARATORS = st.sampled_from(["", " ", "-", "  ", "."])


@st.composite
def chinese_numbers(draw: st.DrawFn) -> str:
    """Mobiles and landlines in the shapes people type them, valid or not."""
    kind = draw(st.sampled_from(["mobile", "landline", "random"]))
    if kind == "mobile":
        digits = (
            "1"
            + draw(st.text("3456789", min_size=1, max_size=1))
            + draw(st.text("0123456789", min_size=9, max_size=9))
        )
    elif kind == "landline":
        digits = draw(st.sampled_from(["10", "21", "755", "571", "20"])) + draw(
            st.text("0123456789", min_size=7, max_size=8)
        )
    else:
        digits = draw(st.text("0123456789", min_size=1, max_size=16))
    sep = draw(SEPARATORS)
    chunks = [digits[i : i + 4] for i in range(0, len(digits), 4)]
    body = sep.join(chunks)
    prefix = draw(st.sampled_from(["", "+86", "+86 ", "0086", "0086 ", "86", "0", "(+86) "]))
    if kind == "landline" and prefix == "":
        prefix = "0"
    return prefix + body


@settings(max_examples=2000)
@given(chinese_numbers())
@example("138 0013 8000")
@example("+86 138-0013-8000")
@example("008613800138000")
def test_the_fast_path_agrees_with_phonenumbers_wherever_it_answers(text: str) -> None:
    fast = CN.fast(text)
    if fast is not None:
        assert fast == slow_e164(text, "CN")


@settings(max_examples=500)
@given(chinese_numbers() | st.text(max_size=30))
def test_normalise_equals_phonenumbers(text: str) -> None:
    reference = slow_e164(text, "CN")
    try:
        phone = CN.normalise(text)
    except InvalidPhone:
        assert reference is None
    else:
        assert phone.e164 == reference


@pytest.mark.parametrize(
    ("region", "text", "e164", "timezone"),
    [
        ("CN", "138 0013 8000", "+8613800138000", "Asia/Shanghai"),
        ("CN", "+86 (138) 0013-8000", "+8613800138000", "Asia/Shanghai"),
        ("CN", "010-6552 9988", "+861065529988", "Asia/Shanghai"),
        ("CN", "+1 650 253 0000", "+16502530000", "America/Los_Angeles"),
        ("US", "(650) 253-0000", "+16502530000", "America/Los_Angeles"),
        ("GB", "+44 20 7946 0958", "+442079460958", "Europe/London"),
    ],
)
def test_normalised_shapes(region: str, text: str, e164: str, timezone: str) -> None:
    phone = PhoneNormaliser(region).normalise(text)
    assert (phone.e164, phone.timezone) == (e164, timezone)


@pytest.mark.parametrize("text", ["12345", "abc", "", "+86 000 0000 0000", "1380013800000000"])
def test_undialable_numbers_are_refused(text: str) -> None:
    with pytest.raises(InvalidPhone):
        CN.normalise(text)


LOCAL = st.from_regex(r"[A-Za-z0-9._%+\-!#]{1,20}", fullmatch=True)
DOMAIN = st.from_regex(r"([a-z0-9\-]{1,12}\.){1,3}[a-zA-Z]{1,6}", fullmatch=True) | st.sampled_from(
    ["qq.com", "163.com", "localhost", "x.test", "EXAMPLE.COM", "例子.广告", "a.invalid"]
)


@settings(max_examples=1000)
@given(st.builds(lambda local, domain: f"{local}@{domain}", LOCAL, DOMAIN) | st.text(max_size=40))
def test_email_fast_path_agrees_with_email_validator(address: str) -> None:
    assert clean_email(address) == slow_clean_email(address)


def test_names_are_trimmed_and_blank_is_none() -> None:
    assert clean_name("  张   三 ") == "张 三"
    assert clean_name("   ") is None
    assert clean_name(None) is None


def encoded(**change: Any) -> Record:
    return Record(json.dumps({**LEAD_EVENT_EXAMPLE, **change}, ensure_ascii=False).encode())


@pytest.mark.parametrize(
    ("record", "code"),
    [
        (Record(b"{nope"), "invalid_json"),
        (Record(b"\xff\xfe{}"), "invalid_utf8"),
        (Record(None), "invalid_json"),
        (Record(b"[1, 2]"), "schema_violation"),
        (encoded(occurred_at="2026-11-23T09:15:02"), "schema_violation"),
        (encoded(schema_version=2), "unsupported_schema_version"),
        (encoded(schema_version="1"), "schema_violation"),
        (encoded(customer={"phone": "12345"}), "invalid_phone"),
        (Record(b" " * (64 * 1024 + 1)), "too_large"),
        (encoded(attributes={"blob": "x" * 20_000}), "schema_violation"),
        (encoded(consent=None), "consent_missing"),
    ],
)
def test_every_rejection_has_its_code(record: Record, code: str) -> None:
    [outcome] = IntakeChain(ChainConfig(require_consent=True)).process([record], "realtime")
    assert isinstance(outcome, Rejected)
    assert outcome.code == code
    assert outcome.detail
    assert "138" not in outcome.detail  # no personal data in details


def test_a_valid_event_is_normalised() -> None:
    [outcome] = IntakeChain(ChainConfig()).process(
        [encoded(customer={"phone": "138 0013 8000", "email": "Bad@", "name": " 李四 "})],
        "realtime",
    )
    assert isinstance(outcome, Accepted)
    lead = outcome.lead
    assert (lead.phone, lead.timezone, lead.email, lead.name, lead.country) == (
        "+8613800138000",
        "Asia/Shanghai",
        None,
        "李四",
        "CN",
    )
    assert lead.realtime
    assert json.loads(outcome.payload)["event_id"] == LEAD_EVENT_EXAMPLE["event_id"]
