"""Local clock arithmetic for allocation: call windows, shifts and the day of a daily cap.

Leads are called in their own local time and agents work shifts in theirs, so every rule of
the decision is a question about wall clocks in some IANA zone at an instant `now` that the
caller passes in (never read here). The questions are answered with `zoneinfo` and are exact
across DST changes: a wall time that does not exist (spring forward) resolves to the first
instant after the gap, an ambiguous one (fall back) to its first occurrence, so a window
"opens" at the first instant its start time has been reached on the local clock.

Timezone names come from data (a lead's `timezone`, an agent's row) and may be wrong; an
unknown name never raises: the caller names a fallback zone, which must itself be valid (it
comes from validated settings, so an unknown fallback is a configuration error and raises).
Zones are cached, including the misses, so a bad name costs one lookup per process.
"""

from __future__ import annotations

import functools
import math
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from allocate.model import Window


@functools.lru_cache(maxsize=4096)
def _lookup(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory such as "America"
        return None


def zone(name: str | None, fallback: str = "UTC") -> ZoneInfo:
    """The zone called `name`, else (None, empty or unknown) `fallback`; ValueError if that is
    unknown too."""
    found = _lookup(name) if name else None
    if found is not None:
        return found
    default = _lookup(fallback)
    if default is None:
        raise ValueError(f"fallback timezone {fallback!r} is not a known IANA zone")
    return default


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now


def local_time(now: datetime, tz: str | None, fallback: str = "UTC") -> time:
    """The wall-clock time in `tz` at the instant `now`."""
    return _aware(now).astimezone(zone(tz, fallback)).time()


def in_window(window: Window, now: datetime, tz: str | None, fallback: str = "UTC") -> bool:
    """Whether the wall clock of `tz` is inside `window` at the instant `now`."""
    return window.contains(local_time(now, tz, fallback))


def next_opening(window: Window, now: datetime, tz: str | None, fallback: str = "UTC") -> datetime:
    """The first instant at or after `now` (UTC) at which `window` opens on the clock of `tz`.

    On a day whose opening time falls in a DST gap the window opens when the gap ends; a day
    on which the whole window falls in a gap has no opening and the next day's counts.
    """
    zone_ = zone(tz, fallback)
    now_utc = _aware(now).astimezone(UTC)
    day = now_utc.astimezone(zone_).date()
    while True:
        opening = _instant(day, window.start, zone_)
        if opening >= now_utc and window.contains(opening.astimezone(zone_).time()):
            return opening
        day += timedelta(days=1)


def local_day_start(now: datetime, tz: str | None, fallback: str = "UTC") -> datetime:
    """The instant (UTC) of the local midnight that began the current day in `tz` (the first
    instant of that date when midnight itself was skipped or repeated)."""
    zone_ = zone(tz, fallback)
    return _instant(_aware(now).astimezone(zone_).date(), time(0), zone_)


def _instant(day: date, wall: time, zone_: ZoneInfo) -> datetime:
    """The first instant (UTC) at which the clock of `zone_` reads `day` `wall` or later."""
    local = datetime.combine(day, wall)
    first = local.replace(tzinfo=zone_, fold=0).astimezone(UTC)
    if first.astimezone(zone_).replace(tzinfo=None) == local:
        return first  # exists; fold=0 is the earlier of two occurrences
    # In a gap, fold=0 applies the offset from before the transition and lands after it, fold=1
    # the offset from after it and lands before it; the transition (tzdata keeps whole seconds)
    # is the first instant after the gap.
    before = math.floor(local.replace(tzinfo=zone_, fold=1).timestamp())
    after = math.ceil(first.timestamp())
    offset_before = _offset(before, zone_)
    while after - before > 1:
        middle = (before + after) // 2
        if _offset(middle, zone_) == offset_before:
            before = middle
        else:
            after = middle
    return datetime.fromtimestamp(after, UTC)


def _offset(timestamp: int, zone_: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(timestamp, zone_).utcoffset()
