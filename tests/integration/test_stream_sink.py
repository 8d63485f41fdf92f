"""The stream analytics' sink on a real PostgreSQL: flushes add up, old minutes are pruned."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from leadflow.analytics import WindowRow, write_rows

pytestmark = pytest.mark.integration

MINUTE = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


def test_flushes_add_counts_and_histograms(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        oldest = MINUTE - timedelta(hours=1)
        write_rows(
            conn,
            [
                WindowRow(MINUTE, "raw_channel", "app", 0, 3),
                WindowRow(MINUTE, "speed_queue", "q", 1, {"2": 1, "5": 2}),
            ],
            oldest,
        )
        write_rows(
            conn,
            [
                WindowRow(MINUTE, "raw_channel", "app", 0, 4),
                WindowRow(MINUTE, "raw_channel", "app", 1, 1),
                WindowRow(MINUTE, "speed_queue", "q", 1, {"5": 1, "9": 1}),
            ],
            oldest,
        )
        rows = conn.execute(
            "SELECT metric, key, partition, value FROM stream_minutes ORDER BY 1, 2, 3"
        ).fetchall()
        assert rows == [
            ("raw_channel", "app", 0, 7),
            ("raw_channel", "app", 1, 1),
            ("speed_queue", "q", 1, {"2": 1, "5": 3, "9": 1}),
        ]
        write_rows(conn, [], MINUTE + timedelta(minutes=1))  # past retention
        assert conn.execute("SELECT count(*) FROM stream_minutes").fetchone() == (0,)
