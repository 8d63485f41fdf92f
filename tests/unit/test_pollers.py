"""The pollers' pure parts: schedules, paging with ties, row mapping, backoff, error texts."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.pollers.failures import describe_error, retry_delay
from sync.pollers.rows import RowMapper, RowSpec, check_target, event_id
from sync.pollers.schedule import ScheduleError, crontab_weekdays, parse_schedule
from sync.pollers.watermark import (
    PagingError,
    Watermark,
    display,
    from_json,
    keyed_page,
    parse_as,
    plain_page,
    to_json,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")

# --- schedules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1), ("90s", 90), ("5m", 300), ("2h", 7200), ("1h30m", 5400), ("1d", 86400)],
)
def test_intervals(text: str, seconds: int) -> None:
    schedule = parse_schedule(text)
    assert schedule.interval == timedelta(seconds=seconds)
    assert schedule.crontab is None


@pytest.mark.parametrize(
    ("field", "names"),
    [
        ("*", "*"),
        ("0", "sun"),
        ("7", "sun"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("0-7", "sun,mon,tue,wed,thu,fri,sat"),
        ("5-7", "sun,fri,sat"),
        ("fri-sun", "sun,fri,sat"),
        ("*/2", "sun,tue,thu,sat"),
        ("1,3,5", "mon,wed,fri"),
        ("mon-fri/2", "mon,wed,fri"),
        ("0-2", "sun,mon,tue"),
    ],
)
def test_crontab_weekdays_mean_what_crontab_means(field: str, names: str) -> None:
    assert crontab_weekdays(field) == names


def test_a_sunday_crontab_fires_on_sunday_not_monday() -> None:
    # APScheduler 3 alone reads day-of-week 0 as Monday.
    trigger = parse_schedule("0 2 * * 0").trigger(UTC)
    fire = trigger.get_next_fire_time(None, datetime(2026, 11, 24, tzinfo=UTC))  # a Tuesday
    assert fire == datetime(2026, 11, 29, 2, 0, tzinfo=UTC)
    assert fire.strftime("%A") == "Sunday"


def test_the_tick_after_a_run_in_the_schedule_timezone() -> None:
    every_ten = parse_schedule("*/10 * * * *")
    run = datetime(2026, 11, 24, 12, 3, tzinfo=UTC)
    assert every_ten.due_after(run, SHANGHAI) == datetime(2026, 11, 24, 12, 10, tzinfo=UTC)
    at_two = parse_schedule("0 2 * * *")  # 02:00 in Shanghai is 18:00 UTC
    assert at_two.due_after(run, SHANGHAI) == datetime(2026, 11, 24, 18, 0, tzinfo=UTC)
    on_the_tick = datetime(2026, 11, 24, 18, 0, tzinfo=UTC)  # a run that started on its tick
    assert at_two.due_after(on_the_tick, SHANGHAI) == datetime(2026, 11, 25, 18, 0, tzinfo=UTC)
    assert parse_schedule("5m").due_after(run, SHANGHAI) == run + timedelta(minutes=5)


NOW_UTC = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("schedule", "last_run", "retry_at", "grace", "expected"),
    [
        # never ran: at once
        ("1h", None, None, None, NOW_UTC),
        # the tick after the last run is ahead: then
        ("1h", NOW_UTC - timedelta(minutes=20), None, None, NOW_UTC + timedelta(minutes=40)),
        ("0 2 * * *", NOW_UTC - timedelta(hours=1), None, None, datetime(2026, 11, 24, 18, tzinfo=UTC)),
        # a tick was missed (no leader at 02:00, a restart): at once
        ("0 2 * * *", NOW_UTC - timedelta(days=1), None, None, NOW_UTC),
        ("1h", NOW_UTC - timedelta(hours=3), None, None, NOW_UTC),
        # ... unless later than the misfire grace: the schedule's own next tick
        ("1h", NOW_UTC - timedelta(hours=3), None, timedelta(minutes=30), None),
        # a pending retry wins, also when it has passed
        ("1h", NOW_UTC - timedelta(minutes=1), NOW_UTC + timedelta(seconds=40), None, NOW_UTC + timedelta(seconds=40)),
        ("1h", NOW_UTC - timedelta(minutes=1), NOW_UTC - timedelta(seconds=5), None, NOW_UTC),
    ],
)  # fmt: skip
def test_when_a_new_leader_runs_a_source_first(
    schedule: str,
    last_run: datetime | None,
    retry_at: datetime | None,
    grace: timedelta | None,
    expected: datetime | None,
) -> None:
    parsed = parse_schedule(schedule)
    assert parsed.next_run(NOW_UTC, SHANGHAI, last_run, retry_at, grace) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0.5s", "at least 1s"),
        ("* * *", "neither a crontab expression"),
        ("5x", "neither a crontab expression"),
        ("61 * * * *", "not a valid crontab expression"),
        ("0 0 * * 8", "8 is not 0-7"),
        ("0 0 * * 5-2", "runs backwards"),
        ("", "neither"),
    ],
)
def test_bad_schedules_say_why(text: str, reason: str) -> None:
    with pytest.raises(ScheduleError, match=reason):
        parse_schedule(text)


# --- paging -----------------------------------------------------------------------------------


def test_a_short_page_is_taken_whole_and_ends_the_run() -> None:
    page = plain_page([1, 2, 2], limit=5, base_limit=5, max_rows=100)
    assert (page.take, page.watermark, page.done) == (3, Watermark(2), True)
    empty = plain_page([], 5, 5, 100)
    assert (empty.take, empty.watermark, empty.done) == (0, None, True)


def test_a_full_page_leaves_its_trailing_tie_group_for_the_next_read() -> None:
    page = plain_page([1, 2, 3, 3, 3], 5, 5, 100)
    assert (page.take, page.watermark, page.done, page.next_limit) == (2, Watermark(2), False, 5)


def test_a_full_page_of_one_tie_group_is_read_again_larger() -> None:
    page = plain_page([7] * 5, 5, 5, 100)
    assert (page.take, page.watermark, page.done, page.next_limit) == (0, None, False, 10)
    assert plain_page([7] * 80, 80, 5, 100).next_limit == 100  # capped
    with pytest.raises(PagingError, match="more than 100 rows share"):
        plain_page([7] * 100, 100, 5, 100)


def test_keyed_pages_are_taken_whole() -> None:
    page = keyed_page([(1, 1), (1, 2), (1, 3)], 3)
    assert (page.take, page.watermark, page.done) == (3, Watermark(1, 3), False)
    assert keyed_page([(1, 4)], 3).done


@pytest.mark.parametrize(
    ("values", "reason"),
    [([1, 3, 2], "not in watermark order"), ([1, None], "no watermark value")],
)
def test_plain_pages_out_of_order_are_refused(values: list[Any], reason: str) -> None:
    with pytest.raises(PagingError, match=reason):
        plain_page(values, 10, 10, 100)


def test_keyed_pages_out_of_order_or_with_a_repeated_key_are_refused() -> None:
    with pytest.raises(PagingError, match="not unique"):
        keyed_page([(1, 2), (1, 2)], 10)
    with pytest.raises(PagingError, match="not in"):
        keyed_page([(2, 1), (1, 2)], 10)


def test_text_is_not_order_checked_the_source_collation_decides() -> None:
    assert plain_page(["b", "A"], 10, 10, 100).take == 2


Row = tuple[int, int]  # (watermark value, unique key)


def _plain_source(rows: Sequence[Row], rng: random.Random) -> Callable[[Any, int], list[Row]]:
    """`value > :watermark ORDER BY value LIMIT :limit`, rows of one value in any order (as a
    database may return them, differently each time)."""

    def query(watermark: Any, limit: int) -> list[Row]:
        after = [row for row in rows if watermark is None or row[0] > watermark]
        rng.shuffle(after)
        return sorted(after, key=lambda row: row[0])[:limit]

    return query


def _read_plain(rows: Sequence[Row], batch_size: int, seed: int) -> list[Row]:
    query = _plain_source(rows, random.Random(seed))
    taken: list[Row] = []
    watermark: Watermark | None = None
    limit = batch_size
    for _ in range(10_000):
        page_rows = query(None if watermark is None else watermark.value, limit)
        page = plain_page([row[0] for row in page_rows], limit, batch_size, 10_000)
        taken.extend(page_rows[: page.take])
        watermark = page.watermark or watermark
        limit = page.next_limit
        if page.done:
            return taken
    raise AssertionError("paging did not end")


def _read_keyed(rows: Sequence[Row], batch_size: int) -> list[Row]:
    taken: list[Row] = []
    watermark: Watermark | None = None
    while True:
        after = sorted(
            row
            for row in rows
            if watermark is None
            or (watermark.key is None and row[0] > watermark.value)
            or (watermark.key is not None and row > (watermark.value, watermark.key))
        )[:batch_size]
        page = keyed_page(after, batch_size)
        taken.extend(after[: page.take])
        watermark = page.watermark or watermark
        if page.done:
            return taken


_ROWS = st.lists(st.integers(0, 6), max_size=60).map(
    lambda values: [(value, key) for key, value in enumerate(values)]
)


@settings(max_examples=300, deadline=None)
@given(rows=_ROWS, batch_size=st.integers(1, 9), seed=st.integers(0, 1000))
def test_plain_paging_reads_every_row_exactly_once_whatever_the_ties(
    rows: list[Row], batch_size: int, seed: int
) -> None:
    taken = _read_plain(rows, batch_size, seed)
    assert sorted(taken) == sorted(rows)  # none lost, none twice


@settings(max_examples=300, deadline=None)
@given(rows=_ROWS, batch_size=st.integers(1, 9))
def test_keyed_paging_reads_every_row_exactly_once_whatever_the_ties(
    rows: list[Row], batch_size: int
) -> None:
    assert _read_keyed(rows, batch_size) == sorted(rows)


def test_naive_paging_would_lose_rows_at_a_tie_boundary() -> None:
    """The reason for the above: advancing to the last row's value loses the rest of its group."""
    rows = [(1, 0), (2, 1), (2, 2), (2, 3)]
    first = sorted(rows)[:2]  # LIMIT 2 ends inside the group of 2s
    naive_next = [row for row in rows if row[0] > first[-1][0]]
    assert len(first) + len(naive_next) < len(rows)
    assert sorted(_read_plain(rows, 2, 0)) == rows


# --- watermarks as JSON and as typed by people -------------------------------------------------


@pytest.mark.parametrize(
    "watermark",
    [
        Watermark(datetime(2026, 11, 24, 8, 0, 1, 500)),  # noqa: DTZ001 - MySQL DATETIME
        Watermark(datetime(2026, 11, 24, 8, 0, tzinfo=SHANGHAI), 42),
        Watermark(date(2026, 11, 24), "u-42"),
        Watermark(12345678901234),
        Watermark(Decimal("10.50")),
        Watermark(1.5),
        Watermark("2026-11-24#7"),
    ],
)
def test_watermarks_round_trip_through_json_with_their_types(watermark: Watermark) -> None:
    back = from_json(to_json(watermark))
    assert back == watermark
    assert back is not None
    assert type(back.value) is type(watermark.value)


def test_no_watermark_is_stored_as_null() -> None:
    assert to_json(None) is None
    assert from_json(None) is None
    assert display(None) == "-"
    assert display(Watermark(datetime(2026, 1, 2, 3, 4), 7)) == "(2026-01-02T03:04:00, 7)"  # noqa: DTZ001


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [
        ("datetime", "2026-11-01T08:00:00", datetime(2026, 11, 1, 8)),  # noqa: DTZ001
        ("datetime", "2026-11-01 08:00", datetime(2026, 11, 1, 8)),  # noqa: DTZ001
        ("datetime", "2026-11-01", datetime(2026, 11, 1)),  # noqa: DTZ001
        ("date", "2026-11-01", date(2026, 11, 1)),
        ("int", " 42 ", 42),
        ("decimal", "10.5", Decimal("10.5")),
        ("str", "abc", "abc"),
    ],
)
def test_values_typed_by_people_are_read_as_the_watermark_type(
    kind: str, text: str, value: Any
) -> None:
    assert parse_as(kind, text) == value


@pytest.mark.parametrize(
    ("kind", "text", "reason"),
    [
        ("datetime", "yesterday", "ISO 8601 date-time"),
        ("int", "4.5", "whole number"),
        ("decimal", "NaN", "decimal number"),
        ("date", "2026-13-01", "ISO 8601 date"),
    ],
)
def test_bad_values_typed_by_people_say_what_was_expected(
    kind: str, text: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_as(kind, text)


# --- rows -------------------------------------------------------------------------------------

SPEC = RowSpec(
    source="silent_high_value",
    event_type="stock_profile",
    watermark="updated_at",
    timezone=SHANGHAI,
)
COLUMNS = ["external_id", "phone", "name", "updated_at", "ltv", "tags", "vip", "note", "visits"]
ROW = (
    42,
    13800138000,
    "张三",
    datetime(2026, 11, 24, 8, 0),  # noqa: DTZ001 - a MySQL DATETIME
    Decimal("5000.50"),
    ["silent", "high_value"],
    True,
    None,
    Decimal("7"),
)
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def test_a_row_becomes_a_lead_event_with_the_rest_in_typed_attributes() -> None:
    event = RowMapper(SPEC, COLUMNS).event(ROW, NOW)
    assert event["source"] == "silent_high_value"
    assert event["event_type"] == "stock_profile"
    assert event["customer"] == {"external_id": "42", "phone": "13800138000", "name": "张三"}
    assert event["occurred_at"] == datetime(2026, 11, 24, 8, 0, tzinfo=SHANGHAI)
    assert event["attributes"] == {
        "updated_at": "2026-11-24T08:00:00",
        "ltv": 5000.5,
        "tags": ["silent", "high_value"],
        "vip": True,
        "visits": 7,
    }  # NULL columns are left out
    assert event["schema_version"] == 1


def test_a_mapping_renames_drops_and_fills_fields() -> None:
    spec = RowSpec(
        source="s",
        event_type="stock_profile",
        watermark="updated_at",
        columns={
            "mobile": "phone",
            "ltv": "attributes.lifetime_value",
            "note": None,
            "opt": "consent",
        },
    )
    columns = ["mobile", "updated_at", "ltv", "note", "opt", "event_type", "product"]
    row = (" 138 0013 8000 ", datetime(2026, 1, 1, tzinfo=UTC), 3, "x", 0, "signup", "car_loan")
    event = RowMapper(spec, columns).event(row, NOW)
    assert event["customer"] == {"phone": " 138 0013 8000 "}
    assert event["attributes"] == {"updated_at": "2026-01-01T00:00:00+00:00", "lifetime_value": 3}
    assert event["consent"] == {"telemarketing": 0}
    assert event["event_type"] == "signup"  # the row's own event type wins
    assert event["product"] == "car_loan"
    assert event["occurred_at"] == datetime(2026, 1, 1, tzinfo=UTC)


def test_a_row_without_a_time_happened_now() -> None:
    spec = RowSpec(source="s", event_type="t", watermark="seq")
    event = RowMapper(spec, ["seq", "phone"]).event((5, "13800138000"), NOW)
    assert event["occurred_at"] == NOW


def test_event_ids_are_the_row_and_its_watermark() -> None:
    mapper = RowMapper(SPEC, COLUMNS)
    first = mapper.event(ROW, NOW)["event_id"]
    assert first == mapper.event(ROW, NOW)["event_id"]  # read again: the same event
    updated = (*ROW[:3], datetime(2026, 11, 25, 9, 0), *ROW[4:])  # noqa: DTZ001
    assert mapper.event(updated, NOW)["event_id"] != first  # updated: a new event
    assert first.startswith("silent_high_value:")
    assert len(first) <= 128
    other = RowMapper(SPEC, COLUMNS).event((43, *ROW[1:]), NOW)["event_id"]
    assert other != first
    # Without a key or an external id, a row is identified by its content.
    bare = RowMapper(RowSpec(source="s", event_type="t", watermark="w"), ["w", "phone"])
    assert bare.identity((1, "a")) != bare.identity((1, "b"))
    assert event_id("a", "b:c", "d") != event_id("a", "b", "c:d")


def test_a_key_column_identifies_rows() -> None:
    spec = RowSpec(source="s", event_type="t", watermark="w", key="id")
    mapper = RowMapper(spec, ["id", "w", "external_id"])
    assert mapper.identity((7, 1, "u-1")) == "7"
    assert mapper.key_of((7, 1, "u-1")) == 7


def test_a_result_without_the_watermark_or_key_column_is_refused() -> None:
    with pytest.raises(PagingError, match=r"no column 'updated_at'.*watermark"):
        RowMapper(SPEC, ["phone"])
    spec = RowSpec(source="s", event_type="t", watermark="w", key="id")
    with pytest.raises(PagingError, match=r"no column 'id'.*key"):
        RowMapper(spec, ["w", "phone"])


@pytest.mark.parametrize("target", ["phone", "attributes.x", None, "consent"])
def test_mapping_targets(target: str | None) -> None:
    check_target(target)


@pytest.mark.parametrize("target", ["phones", "attributes.", "customer.phone"])
def test_bad_mapping_targets_are_refused(target: str) -> None:
    with pytest.raises(ValueError, match="not a LeadEvent field"):
        check_target(target)


# --- backoff and error texts -------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    initial, cap = timedelta(seconds=5), timedelta(minutes=5)
    delays = [retry_delay(n, initial, cap).total_seconds() for n in range(1, 10)]
    assert delays == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert retry_delay(0, initial, cap) == timedelta(0)
    assert retry_delay(10**6, initial, cap) == cap


@given(
    failures=st.integers(1, 5000),
    jitter=st.floats(0.8, 1.2),
    initial=st.integers(1, 600),
    cap=st.integers(1, 86400),
)
def test_backoff_never_exceeds_the_cap_and_never_shrinks(
    failures: int, jitter: float, initial: int, cap: int
) -> None:
    first, top = timedelta(seconds=initial), timedelta(seconds=cap)
    delay = retry_delay(failures, first, top, jitter)
    assert timedelta(0) < delay <= top
    assert retry_delay(failures + 1, first, top) >= retry_delay(failures, first, top)


class _DriverError(Exception):
    pass


class _Wrapped(Exception):
    def __init__(self, orig: BaseException) -> None:
        super().__init__(f"({type(orig).__name__}) {orig}\n[SQL: SELECT ...]\n[parameters: ...]")
        self.orig = orig


def test_error_texts_carry_no_credentials_sql_or_row_values() -> None:
    error = _Wrapped(
        _DriverError(
            "connection to mysql://reader:s3cret@dwh:3306/x failed for s3cret\n"
            "DETAIL: Key (phone)=(+8613800138000) already exists"
        )
    )
    text = describe_error(error, ["s3cret"], lambda t: t.replace("dwh", "<host>"))
    assert text == "_DriverError: connection to mysql://reader:***@<host>:3306/x failed for ***"
    assert "SELECT" not in text
    assert "8613800138000" not in text
    assert len(describe_error(RuntimeError("x" * 1000))) == 300
