"""Fault test of the staging loader (DESIGN.md, "Reliability"): two real `leadflow run staging`
processes share an extract by lanes and are killed with SIGKILL mid-load — one, the other, then
both — and restarted each time; the final state — extract counters, rejects, customers, leads,
events, audit trail — is identical to an uninterrupted load of the same table into another
database by one loader with one lane."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench import staging_data
from leadflow.rules import RulesHolder
from leadflow.settings import load_settings
from leadflow.stack import rules_classifier, staging_loader
from sync.staging import Submission, submit
from tests.conftest import _create_database, _drop_database, _with_database
from tests.fault.roles import RoleProcess

pytestmark = pytest.mark.fault

ROWS = 30_000
CHUNK_ROWS = 1_000
AT = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


@pytest.fixture
def reference_db_url(pg_admin_url: str, template_database: str) -> Iterator[str]:
    name = f"lf_t_{uuid.uuid4().hex[:12]}"
    _create_database(pg_admin_url, name, template=template_database)
    try:
        yield _with_database(pg_admin_url, name)
    finally:
        _drop_database(pg_admin_url, name)


def prepare(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        staging_data.create(conn, ROWS, now=AT)
        extract_id = submit(conn, "staging", Submission(staging_data.TABLE, source="dwh"))
        # The same submission time in both databases: it is the occurred_at of rows without one.
        conn.execute("UPDATE staging.extracts SET submitted_at = %s", (AT,))
    return extract_id


def progress(url: str, extract_id: int) -> tuple[str, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT state, rows_loaded + rows_merged + rows_rejected FROM staging.extracts"
            " WHERE id = %s",
            (extract_id,),
        ).fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


def snapshot(url: str) -> dict[str, Any]:
    """Everything a load leaves, with the database's own ids and clock times taken out: events
    by their row's place in the table, leads by their customer, line and first event."""
    with psycopg.connect(url) as conn:

        def rows(query: str) -> list[tuple[Any, ...]]:
            return sorted(conn.execute(query).fetchall(), key=repr)

        return {
            "extract": rows(
                "SELECT state, rows_total, rows_loaded, rows_merged, rows_rejected, error,"
                " checkpoint - 'relid' - 'filenode' - 'lanes' FROM staging.extracts"
            ),
            "rejects": rows("SELECT row_number, code, detail, row FROM staging.extract_rejects"),
            "customers": rows("SELECT phone_e164, name, email, region, timezone FROM customers"),
            "identities": rows(
                "SELECT i.source, i.external_id, c.phone_e164 FROM customer_identities i"
                " JOIN customers c ON c.id = i.customer_id"
            ),
            "leads": rows(
                "SELECT c.phone_e164, l.business_line, l.segment, l.priority, l.state, l.intake,"
                " l.source, l.event_type, l.product, l.campaign, l.matched_rules, l.event_count,"
                " l.first_event_at, l.last_event_at, l.attributes,"
                " (SELECT min(split_part(e.event_id, ':', 5) || ':' || split_part(e.event_id, ':', 6))"
                "  FROM lead_events e WHERE e.lead_id = l.id)"
                " FROM leads l JOIN customers c ON c.id = l.customer_id"
            ),
            "events": rows(
                "SELECT split_part(e.event_id, ':', 5) || ':' || split_part(e.event_id, ':', 6),"
                " e.intake, e.source, e.event_type, e.occurred_at, e.payload - 'event_id',"
                " c.phone_e164, l.business_line"
                " FROM lead_events e JOIN customers c ON c.id = e.customer_id"
                " JOIN leads l ON l.id = e.lead_id"
            ),
            "transitions": rows(
                "SELECT c.phone_e164, l.business_line, t.from_state, t.to_state, t.actor, t.reason"
                " FROM lead_transitions t JOIN leads l ON l.id = t.lead_id"
                " JOIN customers c ON c.id = l.customer_id"
            ),
        }


def extract_blocks(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT (checkpoint->>'blocks')::int FROM staging.extracts").fetchone()
    assert row is not None
    return int(row[0])


def role_env(db_url: str, bootstrap: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    env.update(
        LEADFLOW_DATABASE_URL=db_url,
        LEADFLOW_KAFKA_BOOTSTRAP=bootstrap,
        LEADFLOW_TOPICS_RAW=f"fault.raw.{suffix}",
        LEADFLOW_TOPICS_DLQ=f"fault.dlq.{suffix}",
        LEADFLOW_TOPICS_ASSIGNED=f"fault.assigned.{suffix}",
        LEADFLOW_STAGING_CHUNK_ROWS=str(CHUNK_ROWS),
        LEADFLOW_STAGING_LANES="2",  # the reference load has one lane: lanes change nothing
        LEADFLOW_STAGING_POLL_INTERVAL="0.5s",
        LEADFLOW_LOG_LEVEL="WARNING",
        PYTHONWARNINGS="ignore",
    )
    return env


def test_kill_9_mid_load_and_restart_ends_as_an_uninterrupted_load(
    db_url: str, reference_db_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    extract_id = prepare(db_url)
    assert prepare(reference_db_url) == extract_id

    settings = load_settings(
        None, environ={}, database={"url": reference_db_url}, staging={"chunk_rows": CHUNK_ROWS}
    )
    reference = staging_loader(settings, rules_classifier(RulesHolder.from_settings(settings)))
    try:
        result = reference.load_next()
    finally:
        reference.close()
    assert result is not None
    assert result.state == "loaded"

    env = role_env(db_url, kafka_bootstrap)
    roles = [RoleProcess("staging", env, tmp_path / f"staging-{n}.log") for n in (1, 2)]
    for role in roles:
        role.start()
    # Kill -9 the first loader, then the second, then both, each time restarting the killed.
    for kill, (share, victims) in enumerate(
        ((0.15, roles[:1]), (0.45, roles[1:]), (0.75, roles)), 1
    ):
        deadline = time.monotonic() + 120
        while progress(db_url, extract_id)[1] < share * ROWS:
            for role in roles:
                role.assert_alive()
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        for role in victims:
            role.kill()
        state, done = progress(db_url, extract_id)
        assert state == "loading", f"finished before kill {kill} ({done:,} rows)"
        for role in victims:
            role.start()
    deadline = time.monotonic() + 180
    while progress(db_url, extract_id)[0] != "loaded":
        for role in roles:
            role.assert_alive()
        assert time.monotonic() < deadline, "the load did not finish"
        time.sleep(0.1)
    for role in roles:
        assert role.stop() == 0

    interrupted, uninterrupted = snapshot(db_url), snapshot(reference_db_url)
    for part in uninterrupted:
        assert interrupted[part] == uninterrupted[part], part
    with psycopg.connect(db_url) as conn:
        lanes = conn.execute("SELECT checkpoint->'lanes' FROM staging.extracts").fetchone()
    assert lanes is not None
    assert lanes[0] == [{"next_block": extract_blocks(db_url), "next_row": ROWS + 1}] * 2
    (extract,) = interrupted["extract"]
    assert extract[1] == ROWS == extract[2] + extract[3] + extract[4]
    assert len(interrupted["events"]) == extract[2] + extract[3]
    assert len(interrupted["rejects"]) == extract[4] > 0
