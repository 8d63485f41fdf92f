"""Masking of personal data for lists, pages and logs."""

from __future__ import annotations

import json
import logging

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from leadflow import logs
from leadflow.privacy import mask_email, mask_phone, mask_text


@pytest.mark.parametrize(
    ("phone", "masked"),
    [
        ("+8613800138000", "+86138****8000"),
        ("13800138000", "138****8000"),
        ("+14155550100", "+14155**0100"),
        (None, None),
    ],
)
def test_phones_keep_prefix_and_last_four(phone: str | None, masked: str | None) -> None:
    assert mask_phone(phone) == masked


@given(st.from_regex(r"\+861[3-9]\d{9}", fullmatch=True))
def test_no_mobile_number_survives_free_text(phone: str) -> None:
    local = phone[3:]
    spaced = f"{local[:3]} {local[3:7]} {local[7:]}"
    text = mask_text(f"customer {phone} called; again {local} and {spaced}")
    masked = f"{local[:3]}****{local[-4:]}"
    assert text == f"customer +86{masked} called; again {masked} and {masked}"


def test_emails_keep_the_first_letter_and_domain() -> None:
    assert mask_email("zhang.san@example.com") == "z***@example.com"
    assert mask_text("write to zhang.san@example.com.") == "write to z***@example.com."


def test_dates_ids_and_ports_are_left_alone() -> None:
    text = "2026-11-24 09:15:02 lead 123456789 port 8080 offset 1730000000000"
    assert mask_text(text) == text


def test_log_lines_never_carry_phones_or_emails(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "json")
    try:
        structlog.stdlib.get_logger("t").warning(
            "odd row", phone="+8613800138000", row={"mail": "li.lei@example.com"}
        )
        logging.getLogger("plain").warning("stdlib says 138 0013 8000")
    finally:
        logs.configure("INFO", "console")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["phone"] == "+86138****8000"
    assert lines[0]["row"] == {"mail": "l***@example.com"}
    assert lines[1]["event"] == "stdlib says 138****8000"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_are_logged_masked(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An exception's message and the source lines of its traceback can hold personal data (a
    unique violation's DETAIL names the key): logged, they are masked like everything else."""
    logs.configure("INFO", fmt)
    try:
        try:
            raise ValueError("Key (phone)=(+8613800138000) exists; li.lei@example.com")
        except ValueError:
            structlog.stdlib.get_logger("t").exception("insert failed")
            logging.getLogger("plain").exception("stdlib insert failed")
    finally:
        logs.configure("INFO", "console")
    err = capsys.readouterr().err
    assert "13800138000" not in err
    assert "li.lei@" not in err
    assert err.count("ValueError: Key (phone)=(+86138****8000) exists; l***@example.com") == 2
    assert err.count("Traceback (most recent call last)") == 2
    if fmt == "json":
        lines = [json.loads(line) for line in err.splitlines()]
        assert [line["event"] for line in lines] == ["insert failed", "stdlib insert failed"]
        assert all("Traceback" in line["exception"] for line in lines)
