"""Local clock arithmetic for call windows, shifts and daily caps, on frozen instants."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time

import pytest

from allocate.clock import in_window, local_day_start, local_time, next_opening, zone
from allocate.model import Window

DAY = Window(time(9), time(21))
NIGHT = Window(time(22), time(6))


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "tz", "local"),
    [
        (utc(2026, 11, 24, 1, 30), "Asia/Shanghai", time(9, 30)),
        (utc(2026, 6, 15, 12, 0), "America/New_York", time(8, 0)),  # EDT
        (utc(2026, 12, 15, 12, 0), "America/New_York", time(7, 0)),  # EST
        (utc(2026, 1, 10, 8, 30), "Europe/London", time(8, 30)),  # GMT
        (utc(2026, 7, 10, 8, 30), "Europe/London", time(9, 30)),  # BST
    ],
)
def test_local_time(now: datetime, tz: str, local: time) -> None:
    assert local_time(now, tz) == local


def test_in_window_follows_the_local_clock() -> None:
    assert in_window(DAY, utc(2026, 11, 24, 1, 0), "Asia/Shanghai")  # 09:00, start included
    assert not in_window(DAY, utc(2026, 11, 24, 13, 0), "Asia/Shanghai")  # 21:00, end excluded
    assert in_window(DAY, utc(2026, 7, 10, 8, 30), "Europe/London")  # 09:30 BST
    assert not in_window(DAY, utc(2026, 1, 10, 8, 30), "Europe/London")  # 08:30 GMT


def test_windows_wrapping_midnight() -> None:
    assert in_window(NIGHT, utc(2026, 11, 24, 15, 0), "Asia/Shanghai")  # 23:00
    assert in_window(NIGHT, utc(2026, 11, 24, 21, 0), "Asia/Shanghai")  # 05:00
    assert not in_window(NIGHT, utc(2026, 11, 24, 2, 0), "Asia/Shanghai")  # 10:00
    # 10:00 local: tonight at 22:00; 23:00 local (open now): the opening after, tomorrow night
    assert next_opening(NIGHT, utc(2026, 11, 24, 2, 0), "Asia/Shanghai") == utc(2026, 11, 24, 14)
    assert next_opening(NIGHT, utc(2026, 11, 24, 15, 0), "Asia/Shanghai") == utc(2026, 11, 25, 14)


def test_next_opening_on_ordinary_days() -> None:
    # 21:30 in Shanghai: tomorrow 09:00 local
    assert next_opening(DAY, utc(2026, 11, 24, 13, 30), "Asia/Shanghai") == utc(2026, 11, 25, 1)
    # 08:00 EDT: 09:00 EDT the same day
    assert next_opening(DAY, utc(2026, 6, 15, 12, 0), "America/New_York") == utc(2026, 6, 15, 13)
    # 07:00 GMT and 07:00 BST
    assert next_opening(DAY, utc(2026, 1, 10, 7, 0), "Europe/London") == utc(2026, 1, 10, 9)
    assert next_opening(DAY, utc(2026, 7, 10, 6, 0), "Europe/London") == utc(2026, 7, 10, 8)
    # exactly at the opening: now
    assert next_opening(DAY, utc(2026, 11, 24, 1, 0), "Asia/Shanghai") == utc(2026, 11, 24, 1)


def test_next_opening_inside_the_spring_forward_gap() -> None:
    """2026-03-08 in New York: 02:00 EST (07:00 UTC) becomes 03:00 EDT; 02:00-03:00 never is."""
    midnight = utc(2026, 3, 8, 5, 0)
    # the window opens when the gap ends, 03:00 EDT, not at 02:30 read with either offset
    assert next_opening(Window(time(2, 30), time(10)), midnight, "America/New_York") == utc(
        2026, 3, 8, 7, 0
    )
    # a window wholly inside the gap does not open that day: the next day's 02:15 EDT
    assert next_opening(Window(time(2, 15), time(2, 45)), midnight, "America/New_York") == utc(
        2026, 3, 9, 6, 15
    )
    # an opening after the change uses the new offset
    assert next_opening(DAY, midnight, "America/New_York") == utc(2026, 3, 8, 13, 0)


def test_next_opening_inside_the_fall_back_overlap() -> None:
    """2026-11-01 in New York: 02:00 EDT (06:00 UTC) becomes 01:00 EST; 01:00-02:00 is twice."""
    window = Window(time(1, 30), time(10))
    # the first 01:30 (EDT) counts
    assert next_opening(window, utc(2026, 11, 1, 4, 0), "America/New_York") == utc(
        2026, 11, 1, 5, 30
    )
    # once that has passed, the next opening is tomorrow's (EST)
    assert next_opening(window, utc(2026, 11, 1, 5, 45), "America/New_York") == utc(
        2026, 11, 2, 6, 30
    )
    assert next_opening(DAY, utc(2026, 11, 1, 4, 0), "America/New_York") == utc(2026, 11, 1, 14)


@pytest.mark.parametrize(
    ("now", "tz", "start"),
    [
        (utc(2026, 11, 24, 1, 30), "Asia/Shanghai", utc(2026, 11, 23, 16)),
        (utc(2026, 11, 23, 15, 59), "Asia/Shanghai", utc(2026, 11, 22, 16)),
        # spring forward: the day began at midnight EST and is 23 hours long
        (utc(2026, 3, 8, 12), "America/New_York", utc(2026, 3, 8, 5)),
        (utc(2026, 3, 9, 12), "America/New_York", utc(2026, 3, 9, 4)),
        # fall back: began at midnight EDT and is 25 hours long
        (utc(2026, 11, 1, 12), "America/New_York", utc(2026, 11, 1, 4)),
        (utc(2026, 11, 2, 4, 59), "America/New_York", utc(2026, 11, 1, 4)),
        (utc(2026, 11, 2, 5, 0), "America/New_York", utc(2026, 11, 2, 5)),
        (utc(2026, 3, 29, 12), "Europe/London", utc(2026, 3, 29, 0)),
        # Santiago springs forward at midnight: the day begins at 01:00 -03
        (utc(2026, 9, 6, 12), "America/Santiago", utc(2026, 9, 6, 4)),
    ],
)
def test_local_day_start(now: datetime, tz: str, start: datetime) -> None:
    assert local_day_start(now, tz) == start
    assert local_day_start(now, tz).tzinfo is UTC


def test_unknown_timezones_fall_back() -> None:
    now = utc(2026, 11, 24, 1, 30)
    assert local_time(now, "Not/A_Zone", "Asia/Shanghai") == time(9, 30)
    assert local_time(now, None, "Asia/Shanghai") == time(9, 30)
    assert local_time(now, "America", "Asia/Shanghai") == time(9, 30)  # a directory of zones
    assert local_time(now, "../../etc/passwd") == time(1, 30)  # UTC by default
    assert zone("Not/A_Zone", "Europe/London").key == "Europe/London"
    with pytest.raises(ValueError, match="fallback timezone"):
        zone("Not/A_Zone", "Also/Not_A_Zone")


@pytest.mark.parametrize(
    "call",
    [
        lambda now: local_time(now, "UTC"),
        lambda now: in_window(DAY, now, "UTC"),
        lambda now: next_opening(DAY, now, "UTC"),
        lambda now: local_day_start(now, "UTC"),
    ],
)
def test_naive_now_is_refused(call: Callable[[datetime], object]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        call(datetime(2026, 1, 1))  # noqa: DTZ001
