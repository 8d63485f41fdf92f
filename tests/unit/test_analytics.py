"""The pure parts of the stream analytics: keys, buckets, percentiles, the flush deltas."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from leadflow.analytics import (
    SPEED_BUCKETS,
    Deltas,
    assignment_keys,
    merge_histograms,
    minute_of,
    percentile,
    raw_keys,
    speed_bucket,
    table_key,
)


def test_raw_events_are_keyed_by_channel_and_source_whatever_they_hold() -> None:
    assert raw_keys(b'{"channel": "app", "source": "loan-app"}') == ("app", "loan-app")
    assert raw_keys(b'{"source": "ads"}') == ("-", "ads")
    assert raw_keys(b'{"channel": 7, "source": ""}') == ("-", "-")
    assert raw_keys(b"{not json") == ("undecodable", "undecodable")
    assert raw_keys(b"\xff\xfe") == ("undecodable", "undecodable")
    assert raw_keys(b"[1, 2]") == ("undecodable", "undecodable")


def test_speed_to_lead_counts_first_attempts_only() -> None:
    event = {
        "queue": "q",
        "business_line": "car_loan",
        "segment": "s",
        "attempt": 1,
        "assigned_at": "2026-11-24T10:00:05+08:00",
        "lead_queued_at": "2026-11-24T02:00:00+00:00",
    }
    assert assignment_keys(json.dumps(event).encode()) == ("car_loan/s", "q", 5.0)
    later = {**event, "attempt": 2}
    assert assignment_keys(json.dumps(later).encode())[2] is None
    old = {k: v for k, v in event.items() if k != "lead_queued_at"}
    assert assignment_keys(json.dumps(old).encode())[2] is None


@given(st.floats(min_value=-10, max_value=10**6, allow_nan=False))
def test_a_speed_falls_in_the_first_bucket_whose_bound_holds_it(seconds: float) -> None:
    bucket = speed_bucket(seconds)
    assert max(seconds, 0) <= SPEED_BUCKETS[bucket]
    assert bucket == 0 or SPEED_BUCKETS[bucket - 1] < seconds


def test_percentiles_from_histograms() -> None:
    assert percentile({}, 0.5) is None
    histogram = {str(speed_bucket(0.3)): 50, str(speed_bucket(4)): 40, str(speed_bucket(200)): 10}
    assert percentile(histogram, 0.5) == 0.5
    assert percentile(histogram, 0.9) == 5
    assert percentile(histogram, 0.99) == 300
    open_ended = {str(len(SPEED_BUCKETS) - 1): 3}
    assert percentile(open_ended, 0.5) == SPEED_BUCKETS[-2]
    assert math.isfinite(percentile(open_ended, 1.0) or 0)


def test_histograms_merge_by_bucket() -> None:
    assert merge_histograms([{"1": 2}, {"1": 3, "4": 1}, {}]) == {"1": 5, "4": 1}


def test_deltas_are_taken_once_and_put_back_after_a_failed_flush() -> None:
    deltas = Deltas()
    at = datetime(2026, 11, 24, 2, 0, 30, tzinfo=UTC).timestamp()
    deltas.add("raw_channel", at, "app", 0)
    deltas.add("raw_channel", at + 10, "app", 0)
    deltas.add("raw_channel", at + 40, "app", 0)  # the next minute
    deltas.observe("speed_queue", at, "q", 1, "3")
    rows = deltas.take()
    assert deltas.take() == []
    counted = {(r.minute.minute, r.metric, r.key, r.partition): r.value for r in rows}
    assert counted == {
        (0, "raw_channel", "app", 0): 2,
        (1, "raw_channel", "app", 0): 1,
        (0, "speed_queue", "q", 1): {"3": 1},
    }
    deltas.put_back(rows)
    deltas.add("raw_channel", at, "app", 0)
    again = {(r.minute.minute, r.metric, r.key): r.value for r in deltas.take()}
    assert again[(0, "raw_channel", "app")] == 3
    assert again[(0, "speed_queue", "q")] == {"3": 1}


def test_keys_carry_their_partition_and_minutes_are_tumbling_windows() -> None:
    assert table_key(3, "app") == "3|app"
    assert minute_of(125.5) == 120
    assert minute_of(120) == 120
