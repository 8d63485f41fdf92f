"""Fault tests of the stock-data pollers (DESIGN.md, "Reliability"), with real processes:

- two `leadflow run scheduler` processes while rows keep arriving in MariaDB: one runs every
  source's job, one run per source at a time, about one per tick; SIGKILL of the leader and the
  standby takes over; every row stored exactly once;
- `leadflow sources run` killed with SIGKILL mid-way, and stopped with SIGTERM mid-way: what
  it committed is consistent with its watermark, and the next run goes on with no duplicates
  and no gaps.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fault.roles import RoleProcess
from tests.sources import MariaDB, mariadb_server

pytestmark = pytest.mark.fault

LEADFLOW = [sys.executable, "-m", "leadflow.cli"]
BASE = datetime(2026, 11, 1, 8, 0)  # noqa: DTZ001 - MySQL DATETIME


@pytest.fixture
def mariadb() -> Iterator[MariaDB]:
    yield from mariadb_server()


def config(tmp_path: Path, sources: str, **scheduler: str) -> Path:
    path = tmp_path / "leadflow.yaml"
    knobs = "".join(f"  {key}: {value}\n" for key, value in scheduler.items())
    head = f"scheduler:\n{knobs}" if knobs else ""
    path.write_text(f"{head}sources:\n{sources}", encoding="utf-8")
    return path


def env(db_url: str, kafka_bootstrap: str, path: Path) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    environ.update(
        LEADFLOW_CONFIG=str(path),
        LEADFLOW_DATABASE_URL=db_url,
        LEADFLOW_KAFKA_BOOTSTRAP=kafka_bootstrap,
        LEADFLOW_TOPICS_RAW=f"fault.raw.{suffix}",
        LEADFLOW_TOPICS_DLQ=f"fault.dlq.{suffix}",
        LEADFLOW_TOPICS_ASSIGNED=f"fault.assigned.{suffix}",
        LEADFLOW_TOPICS_PARTITIONS="1",
        LEADFLOW_LOG_LEVEL="INFO",
        PYTHONWARNINGS="ignore",
    )
    return environ


def rows_of(conn: psycopg.Connection, query: str, *args: Any) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in conn.execute(query, args).fetchall()]


def stored(conn: psycopg.Connection, source: str) -> list[str]:
    return [
        row[0]
        for row in conn.execute(
            "SELECT payload->'customer'->>'external_id' FROM lead_events WHERE source = %s",
            (source,),
        )
    ]


class Writer:
    """Rows arriving in a MariaDB table, one commit each, stamped with the server's NOW(6) (a
    row written later gets a later watermark value, as the watermark's contract asks)."""

    def __init__(self, mariadb: MariaDB, table: str) -> None:
        self.conn = MariaDB(mariadb.url)
        self.table = table
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.errors: list[BaseException] = []

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(30)
        self.conn.conn.close()
        assert not self.errors, self.errors
        return self.count

    def _write(self) -> None:
        try:
            while not self.stop.is_set():
                for _ in range(3):
                    self.count += 1
                    n = self.count
                    self.conn.execute(
                        f"INSERT INTO {self.table} (id, mobile, updated_at) VALUES (%s, %s, NOW(6))",
                        (n, f"139{n:08d}"),
                    )
                time.sleep(0.05)
        except BaseException as exc:  # reported by finish()
            self.errors.append(exc)


def test_two_schedulers_run_each_source_once_per_tick_and_the_standby_takes_over_a_killed_leader(
    mariadb: MariaDB, db_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    plain = mariadb.table("id INT PRIMARY KEY, mobile VARCHAR(32), updated_at DATETIME(6)")
    keyed = mariadb.table("id INT PRIMARY KEY, mobile VARCHAR(32), updated_at DATETIME(6)")
    sources = f"""
  - name: plain
    url: mysql://root@127.0.0.1:3306/test
    query: SELECT id AS external_id, mobile AS phone, updated_at FROM {plain}
           WHERE updated_at > :watermark ORDER BY updated_at LIMIT :limit
    watermark: updated_at
    schedule: 1s
    event_type: stock_profile
    batch_size: 20
  - name: keyed
    url: mysql://root@127.0.0.1:3306/test
    query: SELECT id, mobile AS phone, updated_at FROM {keyed}
           WHERE (updated_at, id) > (:watermark, :watermark_key)
           ORDER BY updated_at, id LIMIT :limit
    watermark: updated_at
    key: id
    columns: {{id: external_id}}
    schedule: 1s
    event_type: stock_profile
    batch_size: 20
"""
    environ = env(db_url, kafka_bootstrap, config(tmp_path, sources, lock_interval="0.2s"))
    first = RoleProcess("scheduler", environ, tmp_path / "first.log")
    second = RoleProcess("scheduler", environ, tmp_path / "second.log")
    writers = [Writer(mariadb, plain), Writer(mariadb, keyed)]
    conn = psycopg.connect(db_url, autocommit=True)
    try:
        first.start()
        assert first.process is not None
        first_worker = f"{os.uname().nodename}:{first.process.pid}"
        deadline = time.monotonic() + 60
        while not rows_of(conn, "SELECT 1 FROM poller_runs WHERE worker = %s", first_worker):
            first.assert_alive()
            assert time.monotonic() < deadline, f"no run; see {first.log}"
            time.sleep(0.1)
        second.start()
        assert second.process is not None
        second_worker = f"{os.uname().nodename}:{second.process.pid}"
        for writer in writers:
            writer.start()
        watched_from = datetime.now().astimezone()
        time.sleep(6)
        first.assert_alive()
        second.assert_alive()
        watched_to = datetime.now().astimezone()

        # One leader: every run in the window is the first process's, no two runs of a source
        # overlap, and there is about one per tick (1s), never one per tick per process.
        for source in ("plain", "keyed"):
            window = rows_of(
                conn,
                "SELECT worker, started_at, finished_at FROM poller_runs"
                " WHERE source = %s AND started_at >= %s AND finished_at <= %s ORDER BY started_at",
                source,
                watched_from,
                watched_to,
            )
            assert {worker for worker, *_ in window} == {first_worker}, window
            for (_, _, finished), (_, started, _) in itertools.pairwise(window):
                assert started >= finished, f"{source}: two runs overlapped"
            seconds = (watched_to - watched_from).total_seconds()
            assert 3 <= len(window) <= seconds + 2, (source, len(window), seconds)

        first.kill()  # SIGKILL, maybe in the middle of a run
        deadline = time.monotonic() + 30
        while not rows_of(
            conn,
            "SELECT 1 FROM poller_runs WHERE worker = %s AND outcome = 'succeeded'",
            second_worker,
        ):
            second.assert_alive()
            assert time.monotonic() < deadline, f"the standby did not take over; see {second.log}"
            time.sleep(0.1)
        time.sleep(3)
        written = [writer.finish() for writer in writers]
        deadline = time.monotonic() + 60
        while [len(stored(conn, s)) for s in ("plain", "keyed")] != written:
            second.assert_alive()
            assert time.monotonic() < deadline, (
                f"not caught up: {[len(stored(conn, s)) for s in ('plain', 'keyed')]} of "
                f"{written}; see {second.log}"
            )
            time.sleep(0.2)
    finally:
        for writer in writers:
            writer.stop.set()
        stopped = second.stop()
        if first.process is not None and first.process.poll() is None:
            first.stop()
        if sys.exc_info()[0] is not None:
            conn.close()
    assert stopped == 0  # SIGTERM: runs end after their page, a clean exit
    for source, count in zip(("plain", "keyed"), written, strict=True):
        ids = stored(conn, source)
        assert sorted(ids, key=int) == [str(n) for n in range(1, count + 1)], source  # once each
    workers = {w for (w,) in rows_of(conn, "SELECT DISTINCT worker FROM poller_runs")}
    assert workers == {first_worker, second_worker}
    outcomes = {o for (o,) in rows_of(conn, "SELECT DISTINCT outcome FROM poller_runs")}
    conn.close()
    assert outcomes <= {"succeeded", "stopped", "interrupted"}, outcomes


BIG_ROWS = 30_000


def big_source(mariadb: MariaDB, tmp_path: Path) -> Path:
    """30,000 profiles in groups of 7 sharing an updated_at, read 300 at a time."""
    table = mariadb.table("id INT PRIMARY KEY, mobile VARCHAR(32), updated_at DATETIME(6)")
    rows = [(n, f"139{n:08d}", BASE + timedelta(seconds=n // 7)) for n in range(1, BIG_ROWS + 1)]
    for start in range(0, len(rows), 5000):
        mariadb.insert(table, ("id", "mobile", "updated_at"), rows[start : start + 5000])
    return config(
        tmp_path,
        f"""
  - name: big
    url: mysql://root@127.0.0.1:3306/test
    query: SELECT id AS external_id, mobile AS phone, updated_at FROM {table}
           WHERE updated_at > :watermark ORDER BY updated_at LIMIT :limit
    watermark: updated_at
    schedule: 1h
    event_type: stock_profile
    batch_size: 300
""",
    )


def consistent(conn: psycopg.Connection) -> tuple[int, int]:
    """(rows stored, rows_total): what the committed pages stored is exactly the rows up to the
    watermark — 7 per second of updated_at, the last group whole."""
    (row,) = rows_of(conn, "SELECT watermark, rows_total FROM poller_state WHERE source = 'big'")
    watermark, total = row
    ids = sorted(int(i) for i in stored(conn, "big"))
    assert len(ids) == len(set(ids)) == total, "stored rows and the run's count disagree"
    last = datetime.fromisoformat(watermark["value"])
    through = int((last - BASE).total_seconds()) * 7 + 6  # ids up to the end of that group
    assert ids == list(range(1, min(through, BIG_ROWS) + 1)), "a gap or rows past the watermark"
    return len(ids), total


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_run_killed_or_stopped_mid_way_resumes_with_no_duplicates_and_no_gaps(
    mariadb: MariaDB, db_url: str, kafka_bootstrap: str, tmp_path: Path, how: signal.Signals
) -> None:
    environ = env(db_url, kafka_bootstrap, big_source(mariadb, tmp_path))
    with psycopg.connect(db_url, autocommit=True) as conn:
        _kill_and_resume(conn, environ, how)


def _kill_and_resume(
    conn: psycopg.Connection, environ: dict[str, str], how: signal.Signals
) -> None:
    with subprocess.Popen(
        [*LEADFLOW, "sources", "run", "big"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        deadline = time.monotonic() + 60
        while True:
            found = rows_of(conn, "SELECT rows_total FROM poller_state WHERE source = 'big'")
            if found and found[0][0] >= 2000:
                break
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        process.send_signal(how)
        output, _ = process.communicate(timeout=60)
    done, _ = consistent(conn)
    assert 0 < done < BIG_ROWS, "the run was not interrupted mid-way"
    if how == signal.SIGTERM:
        assert process.returncode == 1
        assert "source big: stopped" in output
        assert "what it stored is kept" in output
        (outcome,) = rows_of(conn, "SELECT outcome FROM poller_runs")
        assert outcome == ("stopped",)
    else:
        assert process.returncode == -signal.SIGKILL
        (outcome,) = rows_of(conn, "SELECT outcome FROM poller_runs")
        assert outcome == ("running",)  # as the killed process left it

    rest = subprocess.run(
        [*LEADFLOW, "sources", "run", "big"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert consistent(conn) == (BIG_ROWS, BIG_ROWS)
    outcomes = [o for (o,) in rows_of(conn, "SELECT outcome FROM poller_runs ORDER BY id")]
    expected = "stopped" if how == signal.SIGTERM else "interrupted"
    assert outcomes == [expected, "succeeded"]
