"""Stock-data pollers on real servers: MariaDB and PostgreSQL sources, ties at page boundaries,
rejects, a source down and back, stopping between pages, one run per source at a time, resets,
and the scheduler role's leader election, backoff and catch-up."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg import sql

from leadflow.rules import RulesHolder
from leadflow.settings import Settings, load_settings
from leadflow.stack import rules_classifier, scheduler_service, source_pollers
from sync.pollers import (
    LOCK_CLASS,
    Poller,
    RunResult,
    SchedulerService,
    Watermark,
    load_watermark,
    lock_source,
    reset_watermark,
)
from tests.sources import MariaDB, TcpProxy, mariadb_server

pytestmark = pytest.mark.integration

BASE = datetime(2026, 11, 1, 8, 0)  # noqa: DTZ001 - MySQL DATETIME is naive

_OPEN: list[Poller] = []


def settings_for(db_url: str, sources: list[dict[str, Any]], **scheduler: Any) -> Settings:
    return load_settings(
        None, environ={}, database={"url": db_url}, sources=sources, scheduler=scheduler
    )


def pollers(db_url: str, *sources: dict[str, Any], **scheduler: Any) -> list[Poller]:
    settings = settings_for(db_url, list(sources), **scheduler)
    made = source_pollers(settings, rules_classifier(RulesHolder.from_settings(settings)))
    _OPEN.extend(made)
    return made


@pytest.fixture(autouse=True)
def _dispose_pollers() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().dispose()


@pytest.fixture
def mariadb() -> Iterator[MariaDB]:
    yield from mariadb_server()


@pytest.fixture
def pg(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


def name() -> str:
    return f"src-{uuid.uuid4().hex[:8]}"


def phone(n: int) -> str:
    return f"1380013{n:04d}"


def one(conn: psycopg.Connection, query: str, *args: Any) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


def state(conn: psycopg.Connection, source: str) -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM poller_state WHERE source = %s", (source,))
    names = [d.name for d in cur.description or ()]
    row = cur.fetchone()
    assert row is not None, f"no poller_state for {source}"
    return dict(zip(names, row, strict=True))


def runs(conn: psycopg.Connection, source: str) -> list[dict[str, Any]]:
    cur = conn.execute("SELECT * FROM poller_runs WHERE source = %s ORDER BY id", (source,))
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def stored_external_ids(conn: psycopg.Connection, source: str) -> list[str]:
    """The external id of every stored event of the source (one per event, repeats kept)."""
    return [
        row[0]
        for row in conn.execute(
            "SELECT payload->'customer'->>'external_id' FROM lead_events WHERE source = %s",
            (source,),
        )
    ]


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


# --- a MariaDB source, the contract's plain query ----------------------------------------------

PROFILE = (
    "user_id INT PRIMARY KEY, mobile VARCHAR(32), nick VARCHAR(64), updated_at DATETIME(6),"
    " ltv DECIMAL(12,2), silent TINYINT, tags JSON"
)


def contract_source(table: str, source: str, more: str = "", **extra: Any) -> dict[str, Any]:
    """CONTRACT.md §6's example, on a MariaDB table (and `more` columns)."""
    return {
        "name": source,
        "url": "mysql://root@127.0.0.1:3306/test",
        "query": f"""
            SELECT user_id AS external_id, mobile AS phone, nick AS name, updated_at, ltv, tags
            {more} FROM {table} WHERE silent = 1 AND updated_at > :watermark
            ORDER BY updated_at LIMIT :limit
        """,
        "watermark": "updated_at",
        "schedule": "*/10 * * * *",
        "event_type": "stock_profile",
        **extra,
    }


def tie_groups(sizes: list[int], start: int = 1) -> list[tuple[Any, ...]]:
    """Rows of the profile table: groups of rows sharing an updated_at, ids shuffled."""
    rows = []
    n = start
    for group, size in enumerate(sizes):
        for _ in range(size):
            rows.append(
                (
                    n,
                    phone(n),
                    f"nick{n}",
                    BASE + timedelta(minutes=group),
                    n * 10.5,
                    1,
                    '["silent"]',
                )
            )
            n += 1
    random.Random(7).shuffle(rows)
    return rows


COLUMNS = ("user_id", "mobile", "nick", "updated_at", "ltv", "silent", "tags")


def test_the_contract_query_on_mariadb_stores_every_row_once_with_ties_at_page_boundaries(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    # Batches of 7: groups end before, at and after page boundaries, and two are larger than a
    # page (the page grows to read them whole).
    sizes = [1, 7, 7, 3, 12, 20, 2, 6, 1, 8]
    mariadb.insert(table, COLUMNS, tie_groups(sizes))
    mariadb.insert(table, COLUMNS, [(999, phone(999), "x", BASE, 1, 0, "[]")])  # not silent
    source = name()
    (poller,) = pollers(db_url, contract_source(table, source, batch_size=7))

    result = poller.run(trigger="cli")

    total = sum(sizes)
    assert result.outcome == "succeeded", result.error
    assert (result.rows, result.new, result.rejected) == (total, total, 0)
    stored = stored_external_ids(pg, source)
    assert sorted(stored, key=int) == [str(n) for n in range(1, total + 1)]  # none lost, none twice
    last = BASE + timedelta(minutes=len(sizes) - 1)
    assert load_watermark(pg, source) == Watermark(last)
    row = state(pg, source)
    assert (row["rows_total"], row["last_outcome"], row["consecutive_failures"]) == (
        total,
        "succeeded",
        0,
    )
    assert row["last_success_at"] is not None
    (run,) = runs(pg, source)
    assert (run["outcome"], run["trigger"], run["rows_read"], run["rows_new"]) == (
        "succeeded",
        "cli",
        total,
        total,
    )
    assert run["watermark_from"] is None
    assert run["watermark_to"] == {"type": "datetime", "value": last.isoformat()}

    again = poller.run(trigger="cli")  # nothing new: reads nothing
    assert (again.outcome, again.rows, again.pages) == ("succeeded", 0, 0)

    # Three profiles change: new events that merge into the customers' open leads.
    later = last + timedelta(hours=1)
    mariadb.execute(
        f"UPDATE {table} SET updated_at = %s, ltv = 77777 WHERE user_id IN (2, 9, 30)", (later,)
    )
    updated = poller.run(trigger="cli")
    assert (updated.rows, updated.merged, updated.new) == (3, 3, 0)
    assert one(pg, "SELECT count(*) FROM leads") == total
    merged = pg.execute(
        "SELECT l.event_count, l.attributes->>'ltv' FROM leads l JOIN customers c"
        " ON c.id = l.customer_id WHERE c.phone_e164 = %s",
        ("+86" + phone(9),),
    ).fetchone()
    assert merged == (2, "77777")
    assert load_watermark(pg, source) == Watermark(later)


def test_rows_arrive_as_lead_events_with_typed_attributes(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    table = mariadb.table(PROFILE + ", score DOUBLE, visits BIGINT, note TEXT")
    mariadb.insert(
        table,
        (*COLUMNS, "score", "visits", "note"),
        [(1, "+86 138 0013 8000", "张三", BASE, 5000.5, 1, '{"a": [1, 2]}', 0.25, 12, None)],
    )
    source = name()
    (poller,) = pollers(db_url, contract_source(table, source, ", score, visits, note"))
    assert poller.run().outcome == "succeeded"
    payload = one(pg, "SELECT payload FROM lead_events WHERE source = %s", source)
    assert payload["customer"] == {"external_id": "1", "phone": "+86 138 0013 8000", "name": "张三"}
    assert payload["event_type"] == "stock_profile"
    assert payload["occurred_at"] == "2026-11-01T08:00:00+08:00"  # naive: scheduler timezone
    # MySQL JSON arrives as text; numbers stay numbers, NULLs are left out.
    assert payload["attributes"] == {
        "updated_at": "2026-11-01T08:00:00",
        "ltv": 5000.5,
        "tags": '{"a": [1, 2]}',
        "score": 0.25,
        "visits": 12,
    }
    intake = one(pg, "SELECT intake FROM leads")
    assert intake == "stock"


# --- a PostgreSQL source, a keyed query ---------------------------------------------------------


def test_a_keyed_query_on_postgresql_stores_every_row_once_and_keeps_json_types(
    pg: psycopg.Connection, db_url: str
) -> None:
    table = f"src_{uuid.uuid4().hex[:8]}"
    pg.execute(
        sql.SQL(
            "CREATE TABLE {} (id bigint PRIMARY KEY, mobile text, updated_at timestamptz,"
            " profile jsonb, vip boolean, score numeric)"
        ).format(sql.Identifier(table))
    )
    at = datetime(2026, 11, 1, tzinfo=UTC)
    rows = [
        (
            n,
            phone(n),
            at + timedelta(seconds=n % 5),
            f'{{"level": {n}, "tags": ["a"]}}',
            n % 2 == 0,
            n / 4,
        )
        for n in range(1, 51)
    ]
    with pg.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(table))) as copy:
        for row in rows:
            copy.write_row(row)
    source = name()
    (poller,) = pollers(
        db_url,
        {
            "name": source,
            "url": db_url,  # postgresql:// reads as postgresql+psycopg://
            "query": f"""
                SELECT id, mobile, updated_at, profile, vip, score FROM {table}
                WHERE (updated_at, id) > (:watermark, :watermark_key)
                ORDER BY updated_at, id LIMIT :limit
            """,
            "watermark": "updated_at",
            "key": "id",
            "columns": {"mobile": "phone", "id": "external_id"},
            "schedule": "1m",
            "event_type": "partner_batch",
            "batch_size": 4,
        },
    )
    result = poller.run()
    assert result.outcome == "succeeded", result.error
    assert result.rows == 50
    assert sorted(stored_external_ids(pg, source), key=int) == [str(n) for n in range(1, 51)]
    last = max(rows, key=lambda r: (r[2], r[0]))
    assert load_watermark(pg, source) == Watermark(last[2], last[0])
    payload = one(
        pg,
        "SELECT payload FROM lead_events WHERE source = %s"
        " AND payload->'customer'->>'external_id' = '8'",
        source,
    )
    assert payload["attributes"] == {
        "updated_at": (at + timedelta(seconds=3)).isoformat(),
        "profile": {"level": 8, "tags": ["a"]},
        "vip": True,
        "score": 2,
    }
    assert poller.run().rows == 0

    # A row inserted later with the watermark value already reached, but a higher key, is read.
    pg.execute(
        sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, '{{}}', false, 1)").format(
            sql.Identifier(table)
        ),
        (51, phone(51), last[2]),
    )
    assert poller.run().rows == 1


# --- rejects ------------------------------------------------------------------------------------


def test_invalid_rows_are_rejected_with_codes_counted_kept_and_never_read_again(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    table = mariadb.table(PROFILE + ", blob_text MEDIUMTEXT")
    good: list[tuple[Any, ...]] = [(n, phone(n), "ok", BASE, 1, 1, "[]", None) for n in range(1, 4)]
    bad: list[tuple[Any, ...]] = [
        (10, "12345", "short", BASE, 1, 1, "[]", None),
        (11, "not a phone 13999", "words", BASE, 1, 1, "[]", None),
        (12, None, "no phone", BASE, 1, 1, "[]", None),
        (13, phone(13), "huge", BASE, 1, 1, "[]", "x" * 20_000),
    ]
    mariadb.insert(table, (*COLUMNS, "blob_text"), good + bad)
    source = name()
    (poller,) = pollers(db_url, contract_source(table, source, ", blob_text"))

    result = poller.run()

    assert result.outcome == "succeeded"
    assert (result.rows, result.new, result.rejected) == (7, 3, 4)
    assert dict(result.rejects) == {"invalid_phone": 2, "schema_violation": 2}
    (run,) = runs(pg, source)
    assert run["rows_rejected"] == 4
    assert run["rejects"] == {"invalid_phone": 2, "schema_violation": 2}
    rejects = pg.execute(
        "SELECT row_key, code, detail, watermark FROM poller_rejects WHERE run_id = %s"
        " ORDER BY row_key",
        (run["id"],),
    ).fetchall()
    assert [(r[0], r[1]) for r in rejects] == [
        ("10", "invalid_phone"),
        ("11", "invalid_phone"),
        ("12", "schema_violation"),
        ("13", "schema_violation"),
    ]
    details = " ".join(r[2] for r in rejects)
    assert "customer.phone" in details
    assert "attributes: larger than 16 KiB" in details
    assert "12345" not in details
    assert "13999" not in details  # details name fields, never their values
    assert rejects[0][3] == {"type": "datetime", "value": BASE.isoformat()}
    assert sample("leadflow_poller_rejects_total", source=source, code="invalid_phone") == 2
    assert poller.run().rows == 0  # rejected rows are behind the watermark: never retried


# --- failures -----------------------------------------------------------------------------------


def test_a_source_that_is_down_fails_visibly_backs_off_and_catches_up_when_back(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    mariadb.insert(table, COLUMNS, tie_groups([3, 4]))
    proxy = TcpProxy(mariadb.host, mariadb.port)  # closed: the source is down
    source = name()
    spec = contract_source(table, source, batch_size=2)
    spec["url"] = mariadb.url_via("127.0.0.1", proxy.port)
    (poller,) = pollers(db_url, spec, retry_backoff_initial="1s", retry_backoff_max="3s")

    first = poller.run()
    assert first.outcome == "failed"
    assert first.error is not None
    assert "OperationalError" in first.error
    assert "Can't connect" in first.error
    row = state(pg, source)
    assert row["watermark"] is None  # unchanged
    assert row["consecutive_failures"] == 1
    assert row["last_error"] == first.error
    assert row["last_outcome"] == "failed"
    assert row["last_success_at"] is None
    assert row["retry_at"] is not None
    assert row["retry_at"] - row["last_run_at"] <= timedelta(seconds=1.2 + 0.5)
    assert sample("leadflow_poller_consecutive_failures", source=source) == 1
    assert sample("leadflow_poller_runs_total", source=source, outcome="failed") == 1

    second = poller.run()
    assert (second.outcome, second.consecutive_failures, second.trigger) == ("failed", 2, "retry")
    assert second.retry_at is not None
    assert first.retry_at is not None
    assert state(pg, source)["consecutive_failures"] == 2
    assert [r["outcome"] for r in runs(pg, source)] == ["failed", "failed"]
    assert sample("leadflow_poller_consecutive_failures", source=source) == 2

    proxy.open()  # the source is back
    try:
        back = poller.run()
    finally:
        proxy.close()
    assert back.outcome == "succeeded", back.error
    assert back.trigger == "retry"
    assert back.rows == 7
    assert sorted(stored_external_ids(pg, source), key=int) == [str(n) for n in range(1, 8)]
    row = state(pg, source)
    assert (row["consecutive_failures"], row["last_error"], row["retry_at"]) == (0, None, None)
    assert row["last_success_at"] is not None
    assert sample("leadflow_poller_consecutive_failures", source=source) == 0
    assert sample("leadflow_poller_last_success_timestamp_seconds", source=source) > 0


def test_errors_never_show_the_password(pg: psycopg.Connection, db_url: str) -> None:
    source = name()
    (poller,) = pollers(
        db_url,
        {
            "name": source,
            "url": "mysql://reader:pa55w0rd-secret@127.0.0.1:1/dwh",
            "query": "SELECT * FROM t WHERE w > :watermark ORDER BY w LIMIT :limit",
            "watermark": "w",
            "schedule": "1m",
            "event_type": "stock",
        },
    )
    result = poller.run()
    assert result.outcome == "failed"
    assert result.error is not None
    assert "pa55w0rd" not in result.error
    assert "pa55w0rd" not in (state(pg, source)["last_error"] or "")
    assert poller.spec.masked_url == "mysql+pymysql://reader:***@127.0.0.1:1/dwh"


def test_a_query_that_does_not_order_by_the_watermark_fails_and_says_so(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    mariadb.insert(table, COLUMNS, tie_groups([1, 1, 1, 1]))
    source = name()
    spec = contract_source(table, source)
    spec["query"] = spec["query"].replace("ORDER BY updated_at", "ORDER BY updated_at DESC")
    (poller,) = pollers(db_url, spec)
    result = poller.run()
    assert result.outcome == "failed"
    assert result.error is not None
    assert "ORDER BY the watermark column" in result.error
    assert load_watermark(pg, source) is None


def test_a_page_whose_watermark_moved_meanwhile_is_not_stored(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    mariadb.insert(table, COLUMNS, tie_groups([1] * 6))
    source = name()
    (poller,) = pollers(db_url, contract_source(table, source, batch_size=2))
    moved = Watermark(BASE + timedelta(minutes=4))

    def move(result: RunResult) -> None:
        if result.pages == 1:  # a person moves the watermark by hand, bypassing the lock
            with psycopg.connect(db_url, autocommit=True) as other:
                reset_watermark(other, source, moved)

    result = poller.run(progress=move)
    assert result.outcome == "failed"
    assert result.error is not None
    assert "WatermarkMoved" in result.error
    assert result.rows == 2  # the first page only
    assert load_watermark(pg, source) == moved
    assert len(stored_external_ids(pg, source)) == 2


# --- stopping, one run at a time, resets ---------------------------------------------------------


def test_a_run_stopped_between_pages_keeps_its_pages_and_the_next_run_resumes(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    mariadb.insert(table, COLUMNS, tie_groups([1] * 23))
    source = name()
    (poller,) = pollers(db_url, contract_source(table, source, batch_size=5))
    stop = threading.Event()

    def stop_after_two_pages(result: RunResult) -> None:
        if result.pages == 2:
            stop.set()

    stopped = poller.run(stop, progress=stop_after_two_pages)
    assert (stopped.outcome, stopped.pages, stopped.rows) == ("stopped", 2, 10)
    assert load_watermark(pg, source) == Watermark(BASE + timedelta(minutes=9))
    assert runs(pg, source)[0]["outcome"] == "stopped"
    assert state(pg, source)["last_outcome"] == "stopped"

    rest = poller.run()
    assert (rest.outcome, rest.rows) == ("succeeded", 13)
    assert sorted(stored_external_ids(pg, source), key=int) == [str(n) for n in range(1, 24)]


def test_one_run_per_source_at_a_time(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    mariadb.insert(table, COLUMNS, tie_groups([2]))
    source = name()
    (poller,) = pollers(db_url, contract_source(table, source))
    with psycopg.connect(db_url, autocommit=True) as holder:
        assert lock_source(holder, source, wait=False)  # another process runs the source
        busy = poller.run()
        assert busy.outcome == "busy"
        assert busy.run_id is None
        assert sample("leadflow_poller_runs_total", source=source, outcome="busy") == 1

        waited: list[RunResult] = []
        waiter = threading.Thread(target=lambda: waited.append(poller.run(wait=True)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # waits for the other run
    waiter.join(30)
    assert waited[0].outcome == "succeeded"
    assert waited[0].rows == 2
    held = one(
        pg,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s",
        LOCK_CLASS,
    )
    assert held == 0  # released with the run's connection


def test_a_run_whose_process_died_is_marked_interrupted_by_the_next(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    source = name()
    (poller,) = pollers(db_url, contract_source(table, source))
    pg.execute(
        "INSERT INTO poller_runs (source, trigger, worker) VALUES (%s, 'schedule', 'gone:1')",
        (source,),
    )
    assert poller.run().outcome == "succeeded"
    assert [r["outcome"] for r in runs(pg, source)] == ["interrupted", "succeeded"]


def test_a_reset_reads_again_and_rows_already_stored_are_no_ops(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    mariadb.insert(table, COLUMNS, tie_groups([2, 3, 4]))
    source = name()
    (poller,) = pollers(db_url, contract_source(table, source, batch_size=3))
    assert poller.run().rows == 9
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert lock_source(conn, source, wait=False)
        reset_watermark(conn, source, Watermark(BASE))  # after the first group
    again = poller.run()
    assert (again.rows, again.duplicate, again.new) == (7, 7, 0)
    assert len(stored_external_ids(pg, source)) == 9


# --- the scheduler role --------------------------------------------------------------------------


def services(
    db_url: str, count: int, *sources: dict[str, Any], **scheduler: Any
) -> list[SchedulerService]:
    settings = settings_for(
        db_url, list(sources), lock_interval="0.2s", stop_timeout="10s", **scheduler
    )
    classifier = rules_classifier(RulesHolder.from_settings(settings))
    return [scheduler_service(settings, classifier) for _ in range(count)]


async def until(condition: Any, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.1)


async def test_two_schedulers_one_runs_the_jobs_and_the_other_takes_over(
    mariadb: MariaDB, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    source = name()
    first, second = services(db_url, 2, contract_source(table, source, schedule="1s"))
    stops = [asyncio.Event(), asyncio.Event()]
    tasks = [
        asyncio.create_task(s.run(stop)) for s, stop in zip((first, second), stops, strict=True)
    ]
    try:
        await until(lambda: first.leader or second.leader, what="a leader")
        leader, standby = (first, second) if first.leader else (second, first)
        lead_stop = stops[0] if leader is first else stops[1]
        await until(lambda: leader.runs >= 3, what="runs")
        assert standby.runs == 0
        assert not standby.leader
        assert sample("leadflow_poller_scheduler_leader") == 1

        mariadb.insert(table, COLUMNS, tie_groups([2]))
        lead_stop.set()  # the leader stops; the standby takes over
        await until(lambda: standby.leader, what="the takeover")
        await until(lambda: standby.runs >= 2, what="runs after the takeover")
        with psycopg.connect(db_url) as conn:
            await until(lambda: len(stored_external_ids(conn, source)) == 2, what="the rows")
            outcomes = {r["outcome"] for r in runs(conn, source)}
        # (a run the stopping leader had started ends "stopped" after its page in hand)
        assert outcomes <= {"succeeded", "running", "stopped"}
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*tasks)


async def test_a_leader_that_loses_its_lock_connection_stops_and_a_standby_takes_over(
    mariadb: MariaDB, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    first, second = services(db_url, 2, contract_source(table, name(), schedule="1s"))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in (first, second)]
    try:
        await until(lambda: first.leader or second.leader, what="a leader")
        leader, standby = (first, second) if first.leader else (second, first)
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                " AND objsubid = 1 AND (classid::bigint << 32 | objid::bigint) = %s",
                (int.from_bytes(b"lfpoller", "big"),),
            )
        await until(lambda: standby.leader, what="the standby to lead")
        await until(lambda: not leader.leader, what="the old leader to stop")
        runs_before = leader.runs
        await asyncio.sleep(1.5)
        assert leader.runs == runs_before  # it stands by now: no job runs there
        assert not (first.leader and second.leader)
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_scheduled_runs_of_a_failing_source_back_off_then_catch_up(
    mariadb: MariaDB, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    mariadb.insert(table, COLUMNS, tie_groups([3, 3]))
    proxy = TcpProxy(mariadb.host, mariadb.port)
    source = name()
    spec = contract_source(table, source, schedule="1s", batch_size=2)
    spec["url"] = mariadb.url_via("127.0.0.1", proxy.port)
    (service,) = services(db_url, 1, spec, retry_backoff_initial="1s", retry_backoff_max="2s")
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    conn = psycopg.connect(db_url, autocommit=True)
    try:
        await until(
            lambda: (state_or_none(conn, source) or {}).get("consecutive_failures", 0) >= 3,
            what="three failures",
        )
        history = runs(conn, source)
        failed = [r for r in history if r["outcome"] == "failed"]
        assert len(failed) >= 3
        assert load_watermark(conn, source) is None  # unchanged
        # Backoff: each retry starts no earlier than the previous failure said (1s, then 2s
        # with jitter), not at every 1s tick.
        for before, after in itertools.pairwise(failed):
            gap = after["started_at"] - before["finished_at"]
            assert gap >= timedelta(seconds=0.75), gap
        later = failed[2]["started_at"] - failed[1]["finished_at"]
        assert later >= timedelta(seconds=1.5), later
        assert sample("leadflow_poller_consecutive_failures", source=source) >= 3

        proxy.open()
        await until(lambda: len(stored_external_ids(conn, source)) == 6, what="the catch-up")
        await until(
            lambda: state(conn, source)["consecutive_failures"] == 0, what="the failures reset"
        )
        assert sample("leadflow_poller_consecutive_failures", source=source) == 0
        assert sorted(stored_external_ids(conn, source), key=int) == [str(n) for n in range(1, 7)]
    finally:
        stop.set()
        await task
        proxy.close()
        conn.close()


def state_or_none(conn: psycopg.Connection, source: str) -> dict[str, Any] | None:
    try:
        return state(conn, source)
    except AssertionError:
        return None


# --- the per-source view for `sources list` and the ops surfaces ---------------------------------


def test_pipeline_sources_shows_each_sources_state(
    mariadb: MariaDB, pg: psycopg.Connection, db_url: str
) -> None:
    from leadflow.db import make_engine, pipeline_sources

    table = mariadb.table(PROFILE)
    mariadb.insert(table, COLUMNS, tie_groups([2]))
    ok, running, never, failing = (name() for _ in range(4))
    down = contract_source(table, failing)
    down["url"] = "mysql://reader:pa55w0rd@127.0.0.1:1/test"
    specs = [
        contract_source(table, ok),
        contract_source(table, running, schedule="90s"),
        contract_source(table, never),
        down,
    ]
    made = pollers(db_url, *specs)
    assert made[0].run().outcome == "succeeded"
    assert made[3].run().outcome == "failed"
    pg.execute("INSERT INTO poller_state (source) VALUES ('retired')")  # no longer configured
    settings = settings_for(db_url, specs)
    engine = make_engine(db_url)
    now = datetime.now(UTC)
    try:
        with psycopg.connect(db_url, autocommit=True) as holder:
            assert lock_source(holder, running, wait=False)  # a run in progress
            pg.execute(
                "INSERT INTO poller_state (source, last_run_at) VALUES (%s, now())", (running,)
            )
            view = {s["name"]: s for s in pipeline_sources(engine, settings.source_specs(), now)}
    finally:
        engine.dispose()
    assert [s for s in view] == [ok, running, never, failing, "retired"]
    assert view[ok]["state"] == "ok"
    assert view[ok]["watermark"] == (BASE + timedelta(minutes=0)).isoformat()
    assert (view[ok]["last_rows"], view[ok]["rows_total"]) == (2, 2)
    assert view[ok]["next_run"] > now  # the next */10 minute
    assert view[running]["state"] == "running"
    assert view[running]["next_run"] >= now
    assert view[never]["state"] == "never run"
    assert view[failing]["state"] == "failing"
    assert view[failing]["consecutive_failures"] == 1
    assert "Can't connect" in view[failing]["last_error"]
    assert view[failing]["next_run"] == view[failing]["retry_at"]
    assert view[failing]["url"] == "mysql+pymysql://reader:***@127.0.0.1:1/test"
    assert view["retired"]["configured"] is False
    assert view["retired"]["schedule"] is None


async def test_a_new_leader_runs_overdue_sources_at_once_and_others_at_their_tick(
    mariadb: MariaDB, db_url: str
) -> None:
    table = mariadb.table(PROFILE)
    mariadb.insert(table, COLUMNS, tie_groups([2]))
    overdue, recent = name(), name()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(  # both hourly; one last ran two hours ago (a missed tick), one 10 min ago
            "INSERT INTO poller_state (source, last_run_at) VALUES"
            " (%s, now() - interval '2 hours'), (%s, now() - interval '10 minutes')",
            (overdue, recent),
        )
    (service,) = services(
        db_url,
        1,
        contract_source(table, overdue, schedule="1h"),
        contract_source(table, recent, schedule="1h"),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        with psycopg.connect(db_url) as conn:
            await until(
                lambda: len(stored_external_ids(conn, overdue)) == 2, what="the overdue run"
            )
            await asyncio.sleep(1)
            assert runs(conn, recent) == []  # its tick is 50 minutes away
            assert service.runs == 1
    finally:
        stop.set()
        await task
