"""The database schema: migrations round-trip, agree with the models, and enforce the invariants."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, insert, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from schemas import migrate
from schemas.tables import (
    Agent,
    ApiToken,
    Assignment,
    Base,
    Customer,
    Disposition,
    Extract,
    ExtractReject,
    Lead,
    LeadEvent,
)

pytestmark = pytest.mark.integration

# Fixtures from tests/conftest.py: `empty_db_url` (a fresh empty database) and `engine` (on a
# fresh database already migrated to head, cloned from a template).


@pytest.fixture
def empty_engine(empty_db_url: str) -> Iterator[Engine]:
    engine = create_engine(empty_db_url, poolclass=NullPool)
    yield engine
    engine.dispose()


LEADFLOW_TABLES = {
    "public.customers",
    "public.customer_identities",
    "public.leads",
    "public.lead_events",
    "public.lead_transitions",
    "public.queues",
    "public.agents",
    "public.agent_status_log",
    "public.queue_agent_state",
    "public.assignments",
    "public.dispositions",
    "public.dnc",
    "public.poller_state",
    "public.poller_runs",
    "public.poller_rejects",
    "public.consumer_offsets",
    "public.stream_minutes",
    "public.report_values",
    "public.report_leads",
    "public.report_open_leads",
    "public.report_assignments",
    "public.report_refresh",
    "public.outbox",
    "public.api_tokens",
    "staging.extracts",
    "staging.extract_rejects",
}


def _tables(connection: Connection) -> set[str]:
    rows = connection.execute(
        text(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables"
            " WHERE table_schema IN ('public', 'staging') AND table_name <> 'alembic_version'"
        )
    )
    return set(rows.scalars())


def _schema_exists(connection: Connection, name: str) -> bool:
    query = text("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = :name)")
    return bool(connection.execute(query, {"name": name}).scalar_one())


# --- migrations ---------------------------------------------------------------------------


def test_upgrade_creates_every_table(empty_db_url: str, empty_engine: Engine) -> None:
    assert migrate.current(empty_db_url) is None

    migrate.upgrade(empty_db_url)

    with empty_engine.connect() as connection:
        assert _tables(connection) == LEADFLOW_TABLES
    assert {f"{t.schema or 'public'}.{t.name}" for t in Base.metadata.sorted_tables} == (
        LEADFLOW_TABLES
    )
    assert migrate.current(empty_db_url) == migrate.head() == "0007"


def test_upgrade_again_is_a_no_op(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)
    migrate.upgrade(empty_db_url)

    assert migrate.current(empty_db_url) == migrate.head()


def test_concurrent_upgrades_migrate_once(empty_db_url: str) -> None:
    # Processes, not threads: Alembic keeps its migration context in module globals.
    script = "import sys; from schemas import migrate; migrate.upgrade(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", script, empty_db_url], stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr.decode()
    assert migrate.current(empty_db_url) == migrate.head()


def test_downgrade_and_upgrade_round_trip_sparing_the_data_teams_tables(
    empty_db_url: str, empty_engine: Engine
) -> None:
    # The data team may well have created the staging schema before leadflow was installed.
    with empty_engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA staging"))
        connection.execute(text("CREATE TABLE staging.crm_export (phone text, name text)"))
        connection.execute(text("INSERT INTO staging.crm_export VALUES ('+8613800138000', 'Z')"))
    migrate.upgrade(empty_db_url)

    migrate.downgrade(empty_db_url, "base")

    assert migrate.current(empty_db_url) is None
    with empty_engine.connect() as connection:
        assert _tables(connection) == {"staging.crm_export"}
        rows = connection.execute(text("SELECT phone, name FROM staging.crm_export")).all()
        assert [tuple(row) for row in rows] == [("+8613800138000", "Z")]

    migrate.upgrade(empty_db_url)

    assert migrate.current(empty_db_url) == migrate.head()
    with empty_engine.connect() as connection:
        assert _tables(connection) == LEADFLOW_TABLES | {"staging.crm_export"}


def test_downgrade_drops_the_staging_schema_when_only_leadflow_used_it(
    empty_db_url: str, empty_engine: Engine
) -> None:
    migrate.upgrade(empty_db_url)

    migrate.downgrade(empty_db_url, "base")

    with empty_engine.connect() as connection:
        assert _tables(connection) == set()
        assert not _schema_exists(connection, "staging")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p%40ss@db:5432/leadflow",
        "postgres://u:p%40ss@db:5432/leadflow",
        "postgresql+psycopg://u:p%40ss@db:5432/leadflow",
        "postgresql+psycopg2://u:p%40ss@db:5432/leadflow",
    ],
)
def test_urls_are_driven_through_psycopg3(url: str) -> None:
    normalised = migrate.normalise_url(url)

    assert normalised.drivername == "postgresql+psycopg"
    assert normalised.password == "p@ss"
    assert normalised.database == "leadflow"


def test_non_postgresql_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        migrate.normalise_url("mysql+pymysql://root@127.0.0.1/test")


# --- the models and the migration agree ----------------------------------------------------


def test_autogenerate_finds_no_difference_between_models_and_migration(
    engine: Engine,
) -> None:
    with engine.begin() as connection:
        # The data team's tables must not show up as "tables leadflow should drop".
        connection.execute(text("CREATE TABLE staging.crm_export (phone text)"))
        context = MigrationContext.configure(connection, opts=dict(migrate.AUTOGENERATE_OPTS))

        assert compare_metadata(context, Base.metadata) == []


_CATALOG_QUERIES = {
    # Autogenerate ignores CHECK constraints and compares partial indexes loosely; PostgreSQL's
    # own rendering of both databases' catalogs does not.
    "columns": """
        SELECT table_schema, table_name, column_name, data_type, udt_name, is_nullable,
               column_default, is_identity, identity_generation
        FROM information_schema.columns
        WHERE table_schema IN ('public', 'staging') AND table_name <> 'alembic_version'
    """,
    "constraints": """
        SELECT n.nspname, t.relname, c.conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c
        JOIN pg_class t ON t.oid = c.conrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname IN ('public', 'staging') AND t.relname <> 'alembic_version'
    """,
    "indexes": """
        SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname IN ('public', 'staging') AND tablename <> 'alembic_version'
    """,
}


def _catalog(engine: Engine) -> dict[str, set[tuple[Any, ...]]]:
    with engine.connect() as connection:
        return {
            kind: {tuple(row) for row in connection.execute(text(query))}
            for kind, query in _CATALOG_QUERIES.items()
        }


def test_migration_builds_exactly_the_schema_the_models_describe(
    engine: Engine, empty_engine: Engine
) -> None:
    with empty_engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA staging"))
        Base.metadata.create_all(connection)

    migrated, modelled = _catalog(engine), _catalog(empty_engine)

    for kind in _CATALOG_QUERIES:
        assert sorted(migrated[kind] - modelled[kind]) == [], f"{kind} only in the migration"
        assert sorted(modelled[kind] - migrated[kind]) == [], f"{kind} only in the models"


def test_hot_path_indexes_exist(engine: Engine) -> None:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
        )
        indexes = {name: definition for name, definition in rows}

    queued = indexes["ix_leads_queued"]
    assert "(queue, priority DESC, realtime DESC, queued_at, id)" in queued
    assert "WHERE (state = 'queued'::text)" in queued

    one_open = indexes["uq_assignments_one_open_per_lead"]
    assert one_open.startswith("CREATE UNIQUE INDEX")
    assert "(lead_id) WHERE (status = 'open'::text)" in one_open

    assert "(agent_id) WHERE (status = 'open'::text)" in indexes["ix_assignments_open_per_agent"]
    assert "(agent_id, assigned_at)" in indexes["ix_assignments_agent_id_assigned_at"]
    assert "WHERE (published_at IS NULL)" in indexes["ix_outbox_unpublished"]


# --- constraints ------------------------------------------------------------------------------

NOW = datetime(2026, 11, 23, 9, 15, tzinfo=UTC)


@dataclass(frozen=True)
class Seed:
    customer_id: int
    lead_id: int
    agent_id: str
    assignment_id: uuid.UUID
    extract_id: int


def _customer(connection: Connection, phone: str = "+8613800138000") -> int:
    return connection.execute(
        insert(Customer).values(phone_e164=phone).returning(Customer.id)
    ).scalar_one()


def _lead(connection: Connection, customer_id: int, **values: Any) -> int:
    row = {
        "customer_id": customer_id,
        "business_line": "loans",
        "segment": "hot",
        "priority": 50,
        "intake": "realtime",
        "first_event_at": NOW,
        "last_event_at": NOW,
    }
    return connection.execute(
        insert(Lead).values({**row, **values}).returning(Lead.id)
    ).scalar_one()


def _agent(connection: Connection, agent_id: str = "a-1", **values: Any) -> str:
    row = {"id": agent_id, "name": "Agent One", "capacity": 5, "daily_cap": 40}
    connection.execute(insert(Agent).values({**row, **values}))
    return agent_id


def _assignment(connection: Connection, lead_id: int, agent_id: str, **values: Any) -> uuid.UUID:
    row = {
        "lead_id": lead_id,
        "agent_id": agent_id,
        "queue": "loans-hot",
        "strategy": "round_robin",
        "reason": "test",
        "attempt": 1,
        "assigned_at": NOW,
    }
    return connection.execute(
        insert(Assignment).values({**row, **values}).returning(Assignment.id)
    ).scalar_one()


def _event(connection: Connection, customer_id: int, event_id: str) -> None:
    connection.execute(
        insert(LeadEvent).values(
            event_id=event_id,
            customer_id=customer_id,
            intake="realtime",
            source="loan-app",
            event_type="signup",
            occurred_at=NOW,
            payload={"event_id": event_id},
        )
    )


def _extract(connection: Connection, **values: Any) -> int:
    return connection.execute(
        insert(Extract)
        .values({"table_name": "crm_export", "submitted_by": "data-team", **values})
        .returning(Extract.id)
    ).scalar_one()


def _reject(connection: Connection, extract_id: int, row_number: int) -> None:
    connection.execute(
        insert(ExtractReject).values(
            extract_id=extract_id, row_number=row_number, code="invalid_phone", detail="12345"
        )
    )


@pytest.fixture
def seed(engine: Engine) -> Seed:
    with engine.begin() as connection:
        customer_id = _customer(connection)
        lead_id = _lead(connection, customer_id)
        agent_id = _agent(connection)
        assignment_id = _assignment(connection, lead_id, agent_id)
        extract_id = _extract(connection)
        _event(connection, customer_id, "evt-1")
        _reject(connection, extract_id, 7)
    return Seed(customer_id, lead_id, agent_id, assignment_id, extract_id)


Violation = Callable[[Connection, Seed], object]

VIOLATIONS: dict[str, tuple[Violation, str]] = {
    "duplicate event_id": (
        lambda c, s: _event(c, s.customer_id, "evt-1"),
        "uq_lead_events_event_id",
    ),
    "empty event_id": (
        lambda c, s: _event(c, s.customer_id, ""),
        "ck_lead_events_event_id_length",
    ),
    "priority 101": (
        lambda c, s: _lead(c, s.customer_id, priority=101),
        "ck_leads_priority_range",
    ),
    "priority -1": (
        lambda c, s: _lead(c, s.customer_id, priority=-1),
        "ck_leads_priority_range",
    ),
    "unknown lead state": (
        lambda c, s: _lead(c, s.customer_id, state="lost"),
        "ck_leads_state",
    ),
    "second open assignment for a lead": (
        lambda c, s: _assignment(c, s.lead_id, _agent(c, "a-2")),
        "uq_assignments_one_open_per_lead",
    ),
    "closed assignment without closed_at": (
        lambda c, s: _assignment(c, s.lead_id, s.agent_id, status="completed"),
        "ck_assignments_closed_at",
    ),
    "capacity -1": (
        lambda c, s: _agent(c, "a-2", capacity=-1),
        "ck_agents_capacity_min",
    ),
    "bad agent status": (
        lambda c, s: _agent(c, "a-2", status="busy"),
        "ck_agents_status",
    ),
    "phone not E.164": (
        lambda c, s: _customer(c, "12345"),
        "ck_customers_phone_e164",
    ),
    "lead for a missing customer": (
        lambda c, s: _lead(c, s.customer_id + 1000),
        "fk_leads_customer_id_customers",
    ),
    "callback without callback_at": (
        lambda c, s: c.execute(
            insert(Disposition).values(
                assignment_id=s.assignment_id,
                lead_id=s.lead_id,
                agent_id=s.agent_id,
                outcome="callback",
            )
        ),
        "ck_dispositions_callback_needs_time",
    ),
    "agent token without an agent": (
        lambda c, s: c.execute(insert(ApiToken).values(token_hash="ab" * 32, role="agent")),
        "ck_api_tokens_agent_role_needs_agent",
    ),
    "plain token instead of a hash": (
        lambda c, s: c.execute(
            insert(ApiToken).values(token_hash="secret", role="ops", agent_id=None)
        ),
        "ck_api_tokens_token_hash_sha256",
    ),
    "duplicate reject row": (
        lambda c, s: _reject(c, s.extract_id, 7),
        "uq_extract_rejects_extract_id_row_number",
    ),
    "extract priority 200": (
        lambda c, s: _extract(c, priority=200),
        "ck_extracts_priority_range",
    ),
}


@pytest.mark.parametrize("case", list(VIOLATIONS), ids=list(VIOLATIONS))
def test_constraints_bite(case: str, engine: Engine, seed: Seed) -> None:
    violate, constraint = VIOLATIONS[case]

    with pytest.raises(IntegrityError) as raised, engine.begin() as connection:
        violate(connection, seed)

    assert isinstance(raised.value.orig, psycopg.IntegrityError)
    assert raised.value.orig.diag.constraint_name == constraint


def test_valid_rows_pass_the_constraints(engine: Engine, seed: Seed) -> None:
    with engine.begin() as connection:
        # A lead may have any number of closed assignments beside its one open assignment.
        _assignment(connection, seed.lead_id, seed.agent_id, status="completed", closed_at=NOW)
        _assignment(connection, seed.lead_id, seed.agent_id, status="expired", closed_at=NOW)
        connection.execute(
            insert(Disposition).values(
                assignment_id=seed.assignment_id,
                lead_id=seed.lead_id,
                agent_id=seed.agent_id,
                outcome="callback",
                callback_at=NOW,
            )
        )
        connection.execute(
            insert(ApiToken).values(token_hash="cd" * 32, role="supervisor", agent_id=None)
        )
        connection.execute(
            insert(ApiToken).values(token_hash="ef" * 32, role="agent", agent_id=seed.agent_id)
        )
        _extract(connection, priority=None)

        open_assignments = connection.execute(
            text("SELECT count(*) FROM assignments WHERE lead_id = :id AND status = 'open'"),
            {"id": seed.lead_id},
        ).scalar_one()
        assert open_assignments == 1


def test_the_data_team_can_register_an_extract_with_plain_sql(engine: Engine) -> None:
    with engine.begin() as connection:
        row = connection.execute(
            text(
                "INSERT INTO staging.extracts (table_name) VALUES ('crm_export')"
                " RETURNING state, submitted_by, rows_total, rows_rejected"
            )
        ).one()

    assert tuple(row) == ("pending", "postgres", 0, 0)


def test_every_agent_status_change_is_logged(engine: Engine) -> None:
    with engine.begin() as connection:
        _agent(connection, "a-log", status="offline")
        for status in ("available", "available", "away", "available"):
            connection.execute(
                text("UPDATE agents SET status = :s WHERE id = 'a-log'"), {"s": status}
            )
        connection.execute(text("UPDATE agents SET capacity = 7 WHERE id = 'a-log'"))
        logged = connection.execute(
            text("SELECT status FROM agent_status_log WHERE agent_id = 'a-log' ORDER BY id")
        ).scalars()

        # Insert, then changes only: neither the repeated status nor the capacity edit count.
        assert list(logged) == ["offline", "available", "away", "available"]
