"""Staging-table loaders (CONTRACT.md §5) on a real PostgreSQL: the manifest, the mapping,
rejects, counts, resubmission, resuming, hostile names, dropped tables, two loaders at once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg import sql

from leadflow.rules import RulesHolder
from leadflow.settings import Settings, load_settings
from leadflow.stack import rules_classifier, staging_loader
from sync.staging import StagingLoader, Submission, TableRefused, submit
from sync.staging.manifest import SUBMITTED_CHANNEL

HOSTILE = 'x"; drop table leads; --'


def settings_for(db_url: str, **staging: Any) -> Settings:
    intake = staging.pop("intake", {})
    return load_settings(None, environ={}, database={"url": db_url}, staging=staging, intake=intake)


_OPEN: list[StagingLoader] = []


def make_loader(db_url: str, **staging: Any) -> StagingLoader:
    settings = settings_for(db_url, **staging)
    loader = staging_loader(settings, rules_classifier(RulesHolder.from_settings(settings)))
    _OPEN.append(loader)
    return loader


@pytest.fixture(autouse=True)
def _close_loaders() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


def create_table(
    conn: psycopg.Connection, name: str, columns: str, rows: list[tuple[Any, ...]]
) -> None:
    conn.execute(
        sql.SQL("CREATE TABLE {} ({})").format(sql.Identifier("staging", name), sql.SQL(columns))
    )
    if rows:
        with conn.cursor().copy(
            sql.SQL("COPY {} FROM STDIN").format(sql.Identifier("staging", name))
        ) as copy:
            for row in rows:
                copy.write_row(row)


def extract(conn: psycopg.Connection, extract_id: int) -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM staging.extracts WHERE id = %s", (extract_id,))
    names = [d.name for d in cur.description or ()]
    row = cur.fetchone()
    assert row is not None
    return dict(zip(names, row, strict=True))


def one(conn: psycopg.Connection, query: str, *args: Any) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


def load_all(loader: StagingLoader) -> list[Any]:
    results = []
    while (result := loader.load_next()) is not None:
        results.append(result)
    return results


PEOPLE = "phone text, name text, email text, external_id text, product text, event_type text, occurred_at timestamptz, region text, campaign text"


def test_columns_map_to_the_event_and_the_rest_to_typed_attributes(
    conn: psycopg.Connection, db_url: str
) -> None:
    create_table(
        conn,
        "silent_users",
        PEOPLE + ", amount numeric, visits int, score double precision, vip boolean,"
        " last_seen timestamp, signed_up date, tags text[], profile jsonb, note text",
        [
            (
                "138 0013 8000",
                " 张  三 ",
                "z@example.com",
                "u-1",
                "car_loan",
                "browse",
                datetime(2026, 11, 20, 1, 2, 3, tzinfo=UTC),
                "CN-31",
                "c-11",
                Decimal("5000"),
                7,
                0.5,
                True,
                datetime(2026, 11, 19, 8, 0),  # noqa: DTZ001
                datetime(2026, 1, 2).date(),  # noqa: DTZ001
                ["silent", "high_value"],
                json.dumps({"level": 3}),
                None,
            ),
            (
                "13912345678",
                None,
                "not-an-email",
                None,
                None,
                None,
                None,
                None,
                None,
                Decimal("12.5"),
                None,
                None,
                False,
                None,
                None,
                None,
                None,
                "hello",
            ),
        ],
    )
    extract_id = submit(
        conn,
        "staging",
        Submission("silent_users", source="dwh", business_line="car_loan", priority=77),
    )
    results = load_all(make_loader(db_url))
    assert [(r.extract_id, r.state) for r in results] == [(extract_id, "loaded")]

    done = extract(conn, extract_id)
    assert (done["state"], done["rows_total"], done["rows_loaded"], done["rows_merged"]) == (
        "loaded", 2, 2, 0,
    )  # fmt: skip
    assert done["rows_rejected"] == 0
    assert done["error"] is None
    assert done["started_at"] <= done["finished_at"]

    events = conn.execute(
        "SELECT e.event_id, e.intake, e.source, e.event_type, e.occurred_at, e.payload,"
        " l.business_line, l.priority, l.attributes, c.phone_e164, c.name, c.email"
        " FROM lead_events e JOIN leads l ON l.id = e.lead_id JOIN customers c ON c.id = e.customer_id"
        " ORDER BY e.event_id"
    ).fetchall()
    assert len(events) == 2
    first, second = events
    relid = one(conn, "SELECT 'staging.silent_users'::regclass::oid")
    assert first[0].startswith(f"staging:silent_users:{relid}:")
    assert first[0].endswith(":0:1")
    assert second[0].endswith(":0:2")
    assert first[1:5] == (
        "staging", "dwh", "browse", datetime(2026, 11, 20, 1, 2, 3, tzinfo=UTC),
    )  # fmt: skip
    # The hints win over the rules; the rows' own values fill the event.
    assert (first[6], first[7]) == ("car_loan", 77)
    assert (first[9], first[10], first[11]) == ("+8613800138000", "张 三", "z@example.com")
    assert first[8] == {
        "amount": 5000,
        "visits": 7,
        "score": 0.5,
        "vip": True,
        "last_seen": "2026-11-19T08:00:00",
        "signed_up": "2026-01-02",
        "tags": ["silent", "high_value"],
        "profile": {"level": 3},
    }
    assert first[5]["customer"]["external_id"] == "u-1"
    assert first[5]["product"] == "car_loan"
    assert first[5]["campaign"] == "c-11"
    # Defaults: the event type of the loader, the submission time; a bad e-mail is dropped.
    assert second[3] == "staging_extract"
    assert second[4] == done["submitted_at"]
    assert (second[9], second[10], second[11]) == ("+8613912345678", None, None)
    assert second[8] == {"amount": 12.5, "vip": False, "note": "hello"}


def test_every_reject_code_lands_with_its_row_and_counts_add_up(
    conn: psycopg.Connection, db_url: str
) -> None:
    rows = [
        ("13800138000", "甲", None, None, None, None, None, None, None),  # 1 new
        ("12345", "乙", None, None, None, None, None, None, None),  # 2 invalid_phone
        ("+86 138 0013 8000", None, None, None, None, None, None, None, None),  # 3 merged
        (None, "丙", None, None, None, None, None, None, None),  # 4 no phone
        ("13900000001", "x" * 300, None, None, None, None, None, None, None),  # 5 long name
        ("13900000002", None, None, None, None, "Order Created", None, None, None),  # 6 bad slug
        ("13900000003", None, None, None, None, None, None, None, None),  # 7 new
    ]
    create_table(conn, "mixed", PEOPLE, rows)
    extract_id = submit(conn, "staging", Submission("mixed"))
    load_all(make_loader(db_url, chunk_rows=100))

    done = extract(conn, extract_id)
    assert (done["rows_total"], done["rows_loaded"], done["rows_merged"], done["rows_rejected"]) == (
        7, 2, 1, 4,
    )  # fmt: skip
    assert done["rows_loaded"] + done["rows_merged"] + done["rows_rejected"] == done["rows_total"]
    rejects = conn.execute(
        "SELECT row_number, code, detail, row FROM staging.extract_rejects"
        " WHERE extract_id = %s ORDER BY row_number",
        (extract_id,),
    ).fetchall()
    assert [(r[0], r[1]) for r in rejects] == [
        (2, "invalid_phone"),
        (4, "schema_violation"),
        (5, "schema_violation"),
        (6, "schema_violation"),
    ]
    assert "customer.phone" in rejects[1][2]
    assert "customer.name" in rejects[2][2]
    assert "event_type" in rejects[3][2]
    # The row as it was, every column, so the data team can find and fix it.
    assert rejects[0][3]["phone"] == "12345"
    assert rejects[0][3]["name"] == "乙"
    assert rejects[1][3] == dict.fromkeys(
        ("phone", "name", "email", "external_id", "product", "event_type", "occurred_at", "region", "campaign")
    ) | {"name": "丙"}  # fmt: skip
    assert one(conn, "SELECT count(*) FROM lead_events") == 3
    assert one(conn, "SELECT count(*) FROM leads") == 2

    # consent_missing: the one code left that a table row can give, when consent is required
    # (staging tables have no consent column).
    create_table(conn, "no_consent", PEOPLE, [rows[0]])
    consent_id = submit(conn, "staging", Submission("no_consent"))
    load_all(make_loader(db_url, intake={"require_consent": True}))
    assert conn.execute(
        "SELECT row_number, code FROM staging.extract_rejects WHERE extract_id = %s",
        (consent_id,),
    ).fetchall() == [(1, "consent_missing")]
    assert extract(conn, consent_id)["rows_rejected"] == 1


def test_a_table_submitted_again_loads_nothing_twice(conn: psycopg.Connection, db_url: str) -> None:
    rows = [
        (f"1390000{n:04d}", f"n{n}", None, None, None, None, None, None, None) for n in range(50)
    ]
    rows.append(("bad", None, None, None, None, None, None, None, None))
    create_table(conn, "again", PEOPLE, rows)
    loader = make_loader(db_url, chunk_rows=100)
    first = submit(conn, "staging", Submission("again"))
    load_all(loader)
    second = submit(conn, "staging", Submission("again"))
    load_all(loader)

    a, b = extract(conn, first), extract(conn, second)
    assert (a["rows_loaded"], a["rows_merged"], a["rows_rejected"]) == (50, 0, 1)
    # Nothing new the second time: every valid row was stored already (merged, as duplicates).
    assert (b["state"], b["rows_loaded"], b["rows_merged"], b["rows_rejected"]) == (
        "loaded", 0, 50, 1,
    )  # fmt: skip
    assert b["checkpoint"]["duplicates"] == 50
    assert one(conn, "SELECT count(*) FROM lead_events") == 50
    assert one(conn, "SELECT count(*) FROM leads") == 50
    assert one(conn, "SELECT sum(event_count) FROM leads") == 50

    # The same name with new content (TRUNCATE and refill) is a new extract: it loads.
    conn.execute("TRUNCATE staging.again")
    create_rows = [
        (f"1380000{n:04d}", None, None, None, None, None, None, None, None) for n in range(5)
    ]
    with conn.cursor().copy("COPY staging.again FROM STDIN") as copy:
        for row in create_rows:
            copy.write_row(row)
    third = submit(conn, "staging", Submission("again"))
    load_all(loader)
    assert extract(conn, third)["rows_loaded"] == 5


def test_a_stopped_load_resumes_where_it_stopped_with_no_duplicates(
    conn: psycopg.Connection, db_url: str
) -> None:
    rows = [
        (f"1370000{n:04d}", None, None, None, None, None, None, None, None) for n in range(3000)
    ]
    rows += [
        (f"1370000{n:04d}", "again", None, None, None, None, None, None, None)
        for n in range(0, 3000, 10)
    ]
    rows += [("nope", None, None, None, None, None, None, None, None)] * 30
    create_table(conn, "big", PEOPLE, rows)
    extract_id = submit(conn, "staging", Submission("big"))

    chunks = 0

    def after_two_chunks() -> bool:
        nonlocal chunks
        chunks += 1
        return chunks >= 2

    first = make_loader(db_url, chunk_rows=500, lanes=2).load_next(after_two_chunks)
    assert first is not None
    assert first.state == "loading"
    assert first.chunks == 2
    paused = extract(conn, extract_id)
    assert paused["state"] == "loading"
    lanes, blocks = paused["checkpoint"]["lanes"], paused["checkpoint"]["blocks"]
    assert len(lanes) == 2
    assert 0 < lanes[0]["next_block"] < blocks  # the lane it claimed
    assert lanes[1] == {"next_block": 0, "next_row": 1}
    assert 0 < paused["rows_loaded"] + paused["rows_merged"] + paused["rows_rejected"] < len(rows)

    # Another loader takes it over (the first one's lock went with its session's claim); the
    # extract keeps its chunks and lanes whatever that loader's settings.
    rest = load_all(make_loader(db_url, chunk_rows=700, lanes=3))
    assert [r.state for r in rest] == ["loading", "loaded"]  # lane 1 of 2 resumed, then lane 2
    done = extract(conn, extract_id)
    assert (done["rows_loaded"], done["rows_merged"], done["rows_rejected"]) == (3000, 300, 30)
    assert one(conn, "SELECT count(*) FROM lead_events") == 3300
    assert one(conn, "SELECT count(DISTINCT row_number) FROM staging.extract_rejects") == 30


def test_hostile_and_chinese_identifiers_are_only_ever_quoted(
    conn: psycopg.Connection, db_url: str
) -> None:
    for table in (HOSTILE, "沉默用户_近10天"):
        conn.execute(
            sql.SQL("CREATE TABLE {} (phone text, {} text, {} int)").format(
                sql.Identifier("staging", table),
                sql.Identifier('a"); drop table customers; --'),
                sql.Identifier("浏览次数"),
            )
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} VALUES ('13800138000', 'x', 3), ('13800138001', NULL, 4)"
            ).format(sql.Identifier("staging", table))
        )
        submit(conn, "staging", Submission(table))
    results = load_all(make_loader(db_url))
    assert [r.state for r in results] == ["loaded", "loaded"]
    assert one(conn, "SELECT count(*) FROM lead_events") == 4
    attributes = conn.execute("SELECT attributes FROM leads ORDER BY id").fetchall()
    assert attributes[0][0] == {'a"); drop table customers; --': "x", "浏览次数": 3}
    for table in ("leads", "customers"):
        assert one(conn, "SELECT to_regclass(%s)::text", table) == table
    # Nothing of the data team's was touched.
    assert one(conn, "SELECT count(*) FROM staging.沉默用户_近10天") == 2


def test_submit_refuses_tables_it_could_not_load(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE staging.no_phone (mobile text)")
    conn.execute("CREATE VIEW staging.a_view AS SELECT '13800138000'::text AS phone")
    conn.execute("CREATE TABLE public.elsewhere (phone text)")
    cases = {
        "no_phone": "has no column named phone (its columns: mobile)",
        "a_view": "is a view; only ordinary tables are loaded",
        "elsewhere": "does not exist",
        "extracts": "leadflow's own manifest",
    }
    for table, message in cases.items():
        with pytest.raises(TableRefused, match=message.replace("(", r"\(").replace(")", r"\)")):
            submit(conn, "staging", Submission(table))
    with pytest.raises(TableRefused, match="source 'Loan App' must be a slug"):
        submit(conn, "staging", Submission("no_phone", source="Loan App"))
    assert one(conn, "SELECT count(*) FROM staging.extracts") == 0


def test_a_table_dropped_while_pending_fails_that_extract_only(
    conn: psycopg.Connection, db_url: str
) -> None:
    create_table(conn, "gone", PEOPLE, [("13800138000",) + (None,) * 8])
    create_table(conn, "kept", PEOPLE, [("13800138001",) + (None,) * 8])
    gone = submit(conn, "staging", Submission("gone"))
    kept = submit(conn, "staging", Submission("kept"))
    conn.execute("DROP TABLE staging.gone")
    # A manifest row inserted in plain SQL, with a value no row could carry.
    conn.execute(
        "INSERT INTO staging.extracts (table_name, event_type) VALUES ('kept', 'Bad Type')"
    )
    bad = one(conn, "SELECT max(id) FROM staging.extracts")

    results = load_all(make_loader(db_url))
    assert [(r.extract_id, r.state) for r in results] == [
        (gone, "failed"), (kept, "loaded"), (bad, "failed"),
    ]  # fmt: skip
    failed = extract(conn, gone)
    assert failed["state"] == "failed"
    assert "table staging.gone does not exist" in failed["error"]
    assert failed["finished_at"] is not None
    assert "event type 'Bad Type' must be a slug" in extract(conn, bad)["error"]
    assert extract(conn, kept)["rows_loaded"] == 1


def test_two_loaders_load_two_extracts_at_once(conn: psycopg.Connection, db_url: str) -> None:
    for name, prefix in (("one", "1370"), ("two", "1380")):
        rows = [(f"{prefix}000{n:04d}",) + (None,) * 8 for n in range(2000)]
        create_table(conn, name, PEOPLE, rows)
        submit(conn, "staging", Submission(name))
    loaders = [make_loader(db_url, chunk_rows=200) for _ in range(2)]
    barrier = threading.Barrier(2)
    claimed: list[Any] = []

    def work(loader: StagingLoader) -> None:
        barrier.wait()
        claimed.append(loader.load_next())

    threads = [threading.Thread(target=work, args=(loader,)) for loader in loaders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted((r.extract_id, r.state) for r in claimed) == [(1, "loaded"), (2, "loaded")]
    assert conn.execute(
        "SELECT rows_loaded, worker IS NOT NULL FROM staging.extracts ORDER BY id"
    ).fetchall() == [(2000, True), (2000, True)]
    assert one(conn, "SELECT count(*) FROM leads") == 4000


def test_two_loaders_share_one_extract_by_lanes(conn: psycopg.Connection, db_url: str) -> None:
    rows = [(f"1370000{n:04d}",) + (None,) * 8 for n in range(3000)]
    rows += [(f"+86 137 0000 {n:04d}", "again") + (None,) * 7 for n in range(0, 3000, 3)]
    rows += [("bad",) + (None,) * 8] * 20
    create_table(conn, "shared", PEOPLE, rows)
    extract_id = submit(conn, "staging", Submission("shared"))
    loaders = [make_loader(db_url, chunk_rows=300, lanes=2) for _ in range(2)]
    barrier = threading.Barrier(2)
    results: list[Any] = []

    def work(loader: StagingLoader) -> None:
        barrier.wait()
        results.extend(load_all(loader))

    threads = [threading.Thread(target=work, args=(loader,)) for loader in loaders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(r.state for r in results) == ["loaded", "loading"]  # the last lane finishes
    done = extract(conn, extract_id)
    assert done["state"] == "loaded"
    assert (done["rows_loaded"], done["rows_merged"], done["rows_rejected"]) == (3000, 1000, 20)
    # Each customer's rows went to one lane: one lead each, its two events merged in order.
    assert one(conn, "SELECT count(*) FROM leads") == 3000
    assert one(conn, "SELECT count(*) FROM leads WHERE event_count = 2") == 1000


def test_a_loading_extract_held_by_a_live_loader_is_left_alone(
    conn: psycopg.Connection, db_url: str
) -> None:
    create_table(conn, "held", PEOPLE, [("13800138000",) + (None,) * 8])
    extract_id = submit(conn, "staging", Submission("held"))
    with psycopg.connect(db_url, autocommit=True) as other:
        other.execute(
            "SELECT pg_advisory_lock(%s, %s)", (int.from_bytes(b"lfst", "big"), extract_id)
        )
        conn.execute("UPDATE staging.extracts SET state = 'loading' WHERE id = %s", (extract_id,))
        assert make_loader(db_url).load_next() is None
    # Its loader's session ended: the extract is taken over.
    result = make_loader(db_url).load_next()
    assert result is not None
    assert result.state == "loaded"


def test_an_insert_in_sql_notifies_the_loaders(conn: psycopg.Connection, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {SUBMITTED_CHANNEL}")
        conn.execute("INSERT INTO staging.extracts (table_name) VALUES ('whatever')")
        notices = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in notices] == [SUBMITTED_CHANNEL]


def test_metrics_count_rows_by_outcome(conn: psycopg.Connection, db_url: str) -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        o: sample("leadflow_staging_rows_total", outcome=o)
        for o in ("loaded", "merged", "rejected")
    }
    intake_before = sample("leadflow_intake_rejects_total", intake="staging", code="invalid_phone")
    create_table(
        conn,
        "metered",
        PEOPLE,
        [("13800138000",) + (None,) * 8, ("13800138000",) + (None,) * 8, ("1",) + (None,) * 8],
    )
    submit(conn, "staging", Submission("metered"))
    load_all(make_loader(db_url))
    assert {
        o: sample("leadflow_staging_rows_total", outcome=o) - before[o]
        for o in ("loaded", "merged", "rejected")
    } == {"loaded": 1, "merged": 1, "rejected": 1}
    assert (
        sample("leadflow_intake_rejects_total", intake="staging", code="invalid_phone")
        == intake_before + 1
    )
    assert sample("leadflow_staging_extracts", state="loaded") >= 1


def test_a_lane_stops_when_another_lanes_loader_failed_the_extract(
    conn: psycopg.Connection, db_url: str
) -> None:
    rows = [(f"1370000{n:04d}",) + (None,) * 8 for n in range(3000)]
    create_table(conn, "failing", PEOPLE, rows)
    extract_id = submit(conn, "staging", Submission("failing"))
    counts: list[int] = []

    def fail_elsewhere() -> bool:  # called after each stored chunk
        if not counts:
            counts.append(extract(conn, extract_id)["rows_loaded"])
            conn.execute(
                "UPDATE staging.extracts SET state = 'failed', error = 'lane 2: table dropped'"
                " WHERE id = %s",
                (extract_id,),
            )
        return False

    result = make_loader(db_url, chunk_rows=500, lanes=2).load_next(fail_elsewhere)
    assert result is not None
    assert result.state == "failed"
    ended = extract(conn, extract_id)
    # The chunk in hand was undone; the other loader's error stands.
    assert (ended["state"], ended["error"]) == ("failed", "lane 2: table dropped")
    assert ended["rows_loaded"] == counts[0]
    assert one(conn, "SELECT count(*) FROM lead_events") == counts[0]
    # A failed extract is nobody's to resume.
    assert make_loader(db_url, lanes=2).load_next() is None


def test_a_table_changed_while_loading_fails_instead_of_loading_short(
    conn: psycopg.Connection, db_url: str
) -> None:
    rows = [(f"1370000{n:04d}",) + (None,) * 8 for n in range(3000)]
    create_table(conn, "shrinking", PEOPLE, rows)
    extract_id = submit(conn, "staging", Submission("shrinking"))

    def delete_ahead() -> bool:  # after the first chunk, rows not yet read disappear
        conn.execute("DELETE FROM staging.shrinking WHERE phone > '137000029'")
        return False

    result = make_loader(db_url, chunk_rows=500).load_next(delete_ahead)
    assert result is not None
    assert result.state == "failed"
    ended = extract(conn, extract_id)
    assert ended["state"] == "failed"
    assert "rows read but 3,000 counted at the start" in ended["error"]
    assert "staging.shrinking changed while loading" in ended["error"]
