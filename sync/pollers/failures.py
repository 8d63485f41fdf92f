"""What a failed run leaves behind: when to try again, and an error text safe to show. Pure.

Retries back off exponentially: the n-th failure in a row waits `initial * 2**(n-1)`, at most
`maximum`, give or take the jitter the caller draws (so replicas and sources that failed
together do not retry in step). A success resets the count.

Error texts go to `poller_state.last_error`, `poller_runs.error`, logs and `leadflow sources
list`: the exception's class and the first line of the driver's message, passwords masked, the
SQL and its parameters (which SQLAlchemy appends) and PostgreSQL's DETAIL lines (which can quote
row values) left out, shortened to `MAX_ERROR_CHARS`. Callers may pass a `redact` function for
anything else (the composition root passes its phone and e-mail masking).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import timedelta

MAX_ERROR_CHARS = 300

_URL_PASSWORD = re.compile(r"(//[^:/@\s]+):[^@/\s]*@")


def retry_delay(
    failures: int, initial: timedelta, maximum: timedelta, jitter: float = 1.0
) -> timedelta:
    """The wait before the next attempt after `failures` failed runs in a row (>= 1)."""
    if failures < 1:
        return timedelta(0)
    top = maximum.total_seconds()
    seconds = initial.total_seconds() * 2.0 ** min(failures - 1, 1023)  # floats, no overflow
    return timedelta(seconds=min(min(seconds, top) * jitter, top))


def describe_error(
    error: BaseException,
    secrets: Iterable[str] = (),
    redact: Callable[[str], str] = lambda text: text,
) -> str:
    """One line naming what went wrong, without credentials, SQL, parameters or row values."""
    cause = getattr(error, "orig", None) or error  # SQLAlchemy wraps the driver's exception
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = first.split("[SQL:")[0].strip()
    name = type(cause).__name__
    text = f"{name}: {first}" if first else name
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = redact(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
