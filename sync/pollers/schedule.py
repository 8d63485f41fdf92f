"""A source's schedule: a five-field crontab expression or an interval such as "5m". Pure.

Crontab expressions mean what crontab(5) says they mean. APScheduler 3's `from_crontab` reads a
numeric day of week with Monday as 0 (crontab has Sunday as 0 and 7), so the day-of-week field
is rewritten to weekday names before APScheduler sees it: `0 2 * * 0` runs on Sundays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

_INTERVAL_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MIN_INTERVAL = timedelta(seconds=1)
_TICK = timedelta(microseconds=1)

#: crontab(5) weekday numbers: Sunday is 0 and 7.
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DAY_NUMBER = {name: n for n, name in enumerate(_CRON_DAYS)}


class ScheduleError(ValueError):
    """The schedule cannot be read; the message says what is wrong, for a person."""


@dataclass(frozen=True)
class Schedule:
    """Either `interval` or `crontab` is set."""

    text: str
    interval: timedelta | None = None
    crontab: str | None = None  # with the day of week as names (APScheduler's reading)

    def trigger(self, timezone: tzinfo) -> BaseTrigger:
        """The APScheduler trigger; interval schedules start one interval from now."""
        if self.interval is not None:
            return IntervalTrigger(seconds=self.interval.total_seconds(), timezone=timezone)
        assert self.crontab is not None
        return CronTrigger.from_crontab(self.crontab, timezone=timezone)

    def due_after(self, last_run: datetime, timezone: tzinfo) -> datetime:
        """The first tick after a run that started at `last_run`."""
        if self.interval is not None:
            return last_run + self.interval
        fire = self.trigger(timezone).get_next_fire_time(None, last_run + _TICK)
        assert fire is not None  # a valid crontab expression always fires again
        return fire  # type: ignore[no-any-return]

    def next_run(
        self,
        now: datetime,
        timezone: tzinfo,
        last_run: datetime | None,
        retry_at: datetime | None = None,
        misfire_grace: timedelta | None = None,
    ) -> datetime | None:
        """When the source should run next, from what PostgreSQL knows of it: a pending retry;
        else now if it never ran, or if the tick after its last run has passed (a tick missed
        while no scheduler led, or in a restart, runs at once — unless later than
        `misfire_grace`); else that tick. None: the schedule's own next tick."""
        if retry_at is not None:
            return max(now, retry_at)
        if last_run is None:
            return now
        due = self.due_after(last_run, timezone)
        if due > now:
            return due
        if misfire_grace is not None and now - due > misfire_grace:
            return None
        return now


def parse_schedule(text: str) -> Schedule:
    """Read "*/10 * * * *" (cron) or "5m", "90s", "1h30m" (interval, at least 1s)."""
    stripped = text.strip()
    fields = stripped.split()
    if len(fields) == 5:
        return _crontab(stripped, fields)
    if len(fields) == 1 and (interval := _interval(stripped)) is not None:
        if interval < MIN_INTERVAL:
            raise ScheduleError(f"{text!r}: an interval must be at least 1s")
        return Schedule(text=stripped, interval=interval)
    raise ScheduleError(
        f"{text!r} is neither a crontab expression of five fields (minute hour day-of-month "
        "month day-of-week, e.g. '*/10 * * * *') nor an interval such as '90s', '5m' or '1h30m'"
    )


def _interval(text: str) -> timedelta | None:
    position, seconds = 0, 0.0
    while position < len(text):
        match = _INTERVAL_PART.match(text, position)
        if match is None:
            return None
        seconds += float(match[1]) * _UNIT_SECONDS[match[2]]
        position = match.end()
    return timedelta(seconds=seconds) if text else None


def _crontab(text: str, fields: list[str]) -> Schedule:
    crontab = " ".join([*fields[:4], crontab_weekdays(fields[4])])
    try:
        CronTrigger.from_crontab(crontab)
    except ValueError as exc:
        raise ScheduleError(f"{text!r} is not a valid crontab expression: {exc}") from None
    return Schedule(text=text, crontab=crontab)


def crontab_weekdays(field: str) -> str:
    """A crontab day-of-week field (numbers 0-7 with Sunday as 0 and 7, names, ranges, lists,
    steps) as the list of weekday names it selects, which APScheduler reads the same way."""
    if field == "*":
        return field
    days: set[int] = set()
    for item in field.lower().split(","):
        part, _, step_text = item.partition("/")
        step = _number(step_text, "step") if step_text else 1
        if step < 1:
            raise ScheduleError(f"day of week {field!r}: a step must be at least 1")
        if part == "*":
            first, last = 0, 6
        elif "-" in part:
            low, _, high = part.partition("-")
            first, last = _weekday(low, field), _weekday(high, field)
            if high.strip() == "7" or (high.strip() == "sun" and first > 0):
                last = 7  # "0-7", "5-7", "fri-sun": up to the Sunday at the end of the week
        else:
            first = _weekday(part, field)
            last = 6 if step_text else first  # "1/2": from Monday on, every other day
        if first > last:
            raise ScheduleError(f"day of week {field!r}: range {part!r} runs backwards")
        days.update(day % 7 for day in range(first, last + 1, step))
    return ",".join(_CRON_DAYS[day] for day in sorted(days))


def _weekday(text: str, field: str) -> int:
    text = text.strip()
    if text in _DAY_NUMBER:
        return _DAY_NUMBER[text]
    number = _number(text, f"day of week {field!r}")
    if not 0 <= number <= 7:
        raise ScheduleError(f"day of week {field!r}: {number} is not 0-7 (0 and 7 are Sunday)")
    return number % 7


def _number(text: str, what: str) -> int:
    if not text.isdigit():
        raise ScheduleError(f"{what}: {text!r} is not a number")
    return int(text)
