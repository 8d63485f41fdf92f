"""The reports' pure parts: periods and dimensions as users write them, speed buckets and the
percentiles read from them, the CSV."""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leadflow import reports

SHANGHAI = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 11, 24, 20, 30, tzinfo=UTC)  # 04:30 on the 25th in Shanghai


def exact(values: list[float], q: float) -> float:
    """PostgreSQL's percentile_cont."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def histogram(values: list[float]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for value in values:
        bucket = reports.speed_bucket(value)
        counts[bucket] = counts.get(bucket, 0) + 1
    return counts


# --- periods and dimensions -------------------------------------------------------------------


def test_dates_are_days_of_the_call_center() -> None:
    period = reports.parse_period("2026-11-01", "2026-12-01", SHANGHAI, NOW)
    assert period.start == datetime(2026, 11, 1, tzinfo=SHANGHAI)
    assert period.end == datetime(2026, 12, 1, tzinfo=SHANGHAI)
    assert period.start.utcoffset() == timedelta(hours=8)


def test_times_keep_their_offset() -> None:
    period = reports.parse_period(
        "2026-11-01T08:00:00+08:00", "2026-11-02T00:00:00Z", SHANGHAI, NOW
    )
    assert period.start == datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    assert period.end == datetime(2026, 11, 2, tzinfo=UTC)


def test_the_default_is_the_last_30_days_up_to_today_included() -> None:
    period = reports.parse_period(None, None, SHANGHAI, NOW)
    assert period.end == datetime(2026, 11, 26, tzinfo=SHANGHAI)  # today is the 25th there
    assert period.start == datetime(2026, 10, 27, tzinfo=SHANGHAI)
    only_to = reports.parse_period(None, "2026-11-10", SHANGHAI, NOW)
    assert only_to.start == datetime(2026, 10, 11, tzinfo=SHANGHAI)


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2026-11-02", "2026-11-01", "before"),
        ("2026-11-01", "2026-11-01", "before"),
        ("2026-11-01T00:00:00", None, "offset"),
        ("11/01/2026", None, "a date"),
        ("", "2026-02-30", "a date"),
        ("1990-01-01", "2026-01-01", "ten years"),
    ],
)
def test_bad_periods_are_refused(start: str, end: str | None, message: str) -> None:
    with pytest.raises(reports.ReportError, match=message):
        reports.parse_period(start, end, SHANGHAI, NOW)


def test_dimensions() -> None:
    assert reports.parse_by(None) == ("source",)
    assert reports.parse_by(" source , segment ") == ("source", "segment")
    assert reports.parse_by("agent,queue") == ("agent", "queue")
    for bad, message in [
        ("phone", "unknown dimension"),
        ("source,segment,queue", "at most 2"),
        ("queue,queue", "twice"),
        (" , ", "no dimension"),
    ]:
        with pytest.raises(reports.ReportError, match=message):
            reports.parse_by(bad)
    with pytest.raises(reports.ReportError) as refused:
        reports.parse_by("'; DROP TABLE leads; --")
    assert "DROP" not in str(refused.value)  # what was sent is never echoed


def test_every_dimension_maps_to_a_plain_column() -> None:
    for column in reports.DIMENSIONS.values():
        assert column.isidentifier()
        assert column.islower()


# --- speed buckets and percentiles ---------------------------------------------------------------


def test_speed_buckets() -> None:
    assert reports.speed_bucket(-3.0) == 0  # clock skew
    assert reports.speed_bucket(0.4) == 0
    assert reports.speed_bucket(59.99) == 59
    assert reports.speed_bucket(599.5) == 599
    assert reports.speed_bucket(600) == 600
    assert reports.speed_bucket(606) == 601
    assert reports.speed_bucket(86400) == 600 + math.floor(math.log(144) / math.log(1.01))


@given(st.lists(st.integers(0, 599), min_size=1, max_size=200))
def test_whole_seconds_below_ten_minutes_are_exact(values: list[int]) -> None:
    speeds = [float(v) for v in values]
    got = reports.percentiles(histogram(speeds), (0.5, 0.9))
    assert got == pytest.approx([exact(speeds, 0.5), exact(speeds, 0.9)], abs=1e-9)


@given(st.lists(st.floats(0, 599.999), min_size=1, max_size=200))
def test_below_ten_minutes_within_a_second(values: list[float]) -> None:
    for q, value in zip(
        (0.5, 0.9), reports.percentiles(histogram(values), (0.5, 0.9)), strict=True
    ):
        assert value is not None
        assert abs(value - exact(values, q)) < 1.0


@given(st.lists(st.floats(600, 30 * 86400), min_size=1, max_size=200))
def test_above_ten_minutes_within_one_percent(values: list[float]) -> None:
    for q, value in zip(
        (0.5, 0.9), reports.percentiles(histogram(values), (0.5, 0.9)), strict=True
    ):
        assert value is not None
        assert abs(value - exact(values, q)) <= 0.0101 * exact(values, q)


def test_an_empty_histogram_has_no_percentile() -> None:
    assert reports.percentiles({}, (0.5, 0.9)) == [None, None]
    assert reports.percentiles({5: 0}, (0.5,)) == [None]


# --- CSV ----------------------------------------------------------------------------------------


def test_the_csv_has_a_bom_crlf_every_column_and_a_total_row() -> None:
    columns = (
        reports.Column("campaign", "campaign", "dimension"),
        reports.Column("leads", "leads", "count"),
        reports.Column("lead_conversion_rate", "converted / leads", "rate"),
        reports.Column("contact_p50_s", "p50", "seconds"),
    )
    report = reports.Report(
        "funnel",
        reports.Period(
            datetime(2026, 11, 1, tzinfo=SHANGHAI), datetime(2026, 12, 1, tzinfo=SHANGHAI)
        ),
        ("campaign",),
        NOW,
        columns,
        [
            {
                "campaign": "双十一",
                "leads": 3,
                "lead_conversion_rate": 0.3333,
                "contact_p50_s": 95.5,
            },
            {"campaign": None, "leads": 1, "lead_conversion_rate": None, "contact_p50_s": None},
        ],
        {"leads": 4, "lead_conversion_rate": 0.25, "contact_p50_s": 100.0},
    )
    text = reports.to_csv(report)
    assert text.startswith("\ufeffcampaign,leads,lead_conversion_rate,contact_p50_s\r\n")
    rows = list(csv.reader(io.StringIO(text.removeprefix("\ufeff"))))
    assert rows[1:] == [
        ["双十一", "3", "0.3333", "95.5"],
        ["", "1", "", ""],
        ["total", "4", "0.25", "100.0"],
    ]
    assert reports.csv_filename(report) == "funnel-campaign-2026-11-01-2026-12-01.csv"
