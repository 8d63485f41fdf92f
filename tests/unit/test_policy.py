"""The disposition -> lead outcome rule (CONTRACT.md §8, recycling)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from allocate.policy import recycle
from schemas.vocab import DISPOSITIONS

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def test_no_answer_retries_after_the_delay_until_max_attempts() -> None:
    first = recycle(
        "no_answer", attempts=1, max_attempts=3, now=NOW, retry_delay=timedelta(minutes=30)
    )
    assert (first.state, first.next_action_at) == ("queued", NOW + timedelta(minutes=30))
    last = recycle("no_answer", attempts=3, max_attempts=3, now=NOW)
    assert (last.state, last.next_action_at) == ("closed", None)


def test_callback_returns_at_the_requested_time_never_in_the_past() -> None:
    later = NOW + timedelta(days=1)
    assert (
        recycle("callback", attempts=1, max_attempts=3, now=NOW, callback_at=later).next_action_at
        == later
    )
    past = NOW - timedelta(hours=1)
    assert (
        recycle("callback", attempts=1, max_attempts=3, now=NOW, callback_at=past).next_action_at
        == NOW
    )
    with pytest.raises(ValueError, match="callback_at"):
        recycle("callback", attempts=1, max_attempts=3, now=NOW)


@pytest.mark.parametrize(
    ("disposition", "state", "dnc"),
    [
        ("converted", "converted", False),
        ("not_interested", "closed", False),
        ("invalid_number", "closed", False),
        ("do_not_call", "do_not_call", True),
    ],
)
def test_final_outcomes_close_the_lead(disposition: str, state: str, dnc: bool) -> None:
    outcome = recycle(disposition, attempts=1, max_attempts=3, now=NOW)  # type: ignore[arg-type]
    assert (outcome.state, outcome.add_to_dnc, outcome.next_action_at) == (state, dnc, None)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        recycle("converted", attempts=1, max_attempts=1, now=datetime(2026, 1, 1))  # noqa: DTZ001


@given(
    disposition=st.sampled_from(DISPOSITIONS),
    attempts=st.integers(min_value=1, max_value=20),
    max_attempts=st.integers(min_value=1, max_value=20),
    delay=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=7)),
)
def test_only_recycled_leads_come_back_and_never_before_now(
    disposition: str, attempts: int, max_attempts: int, delay: timedelta
) -> None:
    outcome = recycle(
        disposition,  # type: ignore[arg-type]
        attempts=attempts,
        max_attempts=max_attempts,
        now=NOW,
        retry_delay=delay,
        callback_at=NOW + delay,
    )
    if outcome.state == "queued":
        assert outcome.next_action_at is not None
        assert outcome.next_action_at >= NOW
        assert disposition in ("no_answer", "callback")
        if disposition == "no_answer":
            assert attempts < max_attempts
    else:
        assert outcome.next_action_at is None
    assert outcome.add_to_dnc == (disposition == "do_not_call")
