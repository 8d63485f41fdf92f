"""Pure allocation policy: what a disposition does to a lead (CONTRACT.md §8, recycling).

No I/O and no clock: `now` is an argument, so the allocator, the API and the simulator share one
decision and tests freeze time instead of sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.vocab import Disposition, LeadState

DEFAULT_RETRY_DELAY = timedelta(hours=2)


@dataclass(frozen=True)
class Recycle:
    """The lead's next state after a disposition, and when it may be offered again."""

    state: LeadState
    next_action_at: datetime | None
    add_to_dnc: bool
    reason: str


def recycle(
    disposition: Disposition,
    *,
    attempts: int,
    max_attempts: int,
    now: datetime,
    retry_delay: timedelta = DEFAULT_RETRY_DELAY,
    callback_at: datetime | None = None,
) -> Recycle:
    """Decide what follows a disposition.

    `attempts` counts the attempt just finished. `no_answer` retries after `retry_delay` until
    `max_attempts` is reached; `callback` returns at `callback_at` (required, must be aware);
    the other outcomes close the lead, `do_not_call` also putting the phone on the DNC list.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    match disposition:
        case "no_answer":
            if attempts >= max_attempts:
                return Recycle("closed", None, False, f"no answer after {attempts} attempts")
            return Recycle("queued", now + retry_delay, False, f"no answer, retry {attempts + 1}")
        case "callback":
            if callback_at is None or callback_at.tzinfo is None:
                raise ValueError("a callback needs a timezone-aware callback_at")
            return Recycle("queued", max(callback_at, now), False, "callback requested")
        case "converted":
            return Recycle("converted", None, False, "converted")
        case "not_interested" | "invalid_number":
            return Recycle("closed", None, False, disposition.replace("_", " "))
        case "do_not_call":
            return Recycle("do_not_call", None, True, "customer asked not to be called")
    raise ValueError(f"unknown disposition {disposition!r}")
