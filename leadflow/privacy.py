"""Personal data out of sight: masked phones and e-mails for pages, API lists and logs.

`mask_phone` keeps what an agent or an operator needs to tell numbers apart (country code,
carrier prefix, last four digits); `mask_email` keeps the first character and the domain.
`mask_text` masks every phone- or e-mail-shaped run in free text; the log configuration runs
it over every log event, so a value that slips into a log line is masked there too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

# International numbers (E.164, as leadflow stores them, or written with a leading +) and
# mainland mobiles as people write them; not bare digit runs, which are ids, ports and dates.
_PHONE = re.compile(
    r"(?<![\w+])\+\d[\d \-()]{6,18}\d(?!\w)|(?<![\w+])1[3-9]\d(?:[ -]?\d{4}){2}(?!\w)"
)
_EMAIL = re.compile(r"([A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]*@([A-Za-z0-9.\-]+\.[A-Za-z]{2,})")


def mask_phone(phone: str | None) -> str | None:
    """+8613800138000 -> +86138****8000; short or odd values keep at most their last two."""
    if phone is None:
        return None
    digits = [c for c in phone if c.isdigit()]
    if len(digits) < 7:
        return "*" * max(len(phone) - 2, 0) + phone[-2:]
    plus = "+" if phone.startswith("+") else ""
    text = "".join(digits)
    head = text[:5] if plus else text[:3]
    return f"{plus}{head}{'*' * (len(text) - len(head) - 4)}{text[-4:]}"


def mask_email(email: str | None) -> str | None:
    """zhang.san@example.com -> z***@example.com"""
    if email is None:
        return None
    return _EMAIL.sub(lambda m: f"{m[1]}***@{m[2]}", email)


def mask_text(text: str) -> str:
    """Every e-mail- and phone-shaped run of `text` masked."""
    text = _EMAIL.sub(lambda m: f"{m[1]}***@{m[2]}", text)
    return _PHONE.sub(lambda m: mask_phone(m[0]) or "", text)


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, Mapping):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def mask_log_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: personal data in any field of a log event is masked."""
    for key, value in event.items():
        if key not in ("timestamp", "level", "logger"):
            event[key] = _masked(value)
    return event
