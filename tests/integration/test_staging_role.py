"""deploy/sql/staging_role.sql applied on the real server: what the data team's role can do —
create and fill tables in `staging`, register and follow extracts — and everything it cannot."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from leadflow.rules import RulesHolder
from leadflow.settings import load_settings
from leadflow.stack import rules_classifier, staging_loader

SCRIPT = Path(__file__).parents[2] / "deploy" / "sql" / "staging_role.sql"


@pytest.fixture
def role(db_url: str) -> Iterator[str]:
    """A uniquely named data-team role made by the script (roles are server-wide)."""
    name = f"lf_stg_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(f"SET leadflow.staging_role = '{name}'")
        admin.execute(SCRIPT.read_text())
        admin.execute(SCRIPT.read_text())  # idempotent
    try:
        yield name
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{name}"')
            admin.execute(f'DROP ROLE "{name}"')


def as_role(db_url: str, role: str) -> psycopg.Connection:
    url = make_url(db_url).set(username=role, password=None)
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


def test_the_role_can_create_fill_submit_and_follow(db_url: str, role: str) -> None:
    with as_role(db_url, role) as team:
        team.execute("CREATE TABLE staging.pending_payment (phone text, name text, amount int)")
        team.execute(
            "INSERT INTO staging.pending_payment VALUES ('13800138000', '张三', 5000), ('1', 'x', 1)"
        )
        row = team.execute(
            "INSERT INTO staging.extracts (table_name, source, event_type, priority)"
            " VALUES ('pending_payment', 'dwh', 'order_pending_payment', 90) RETURNING id"
        ).fetchone()
        assert row is not None
        extract_id = row[0]

    settings = load_settings(None, environ={}, database={"url": db_url})
    loader = staging_loader(settings, rules_classifier(RulesHolder.from_settings(settings)))
    try:
        result = loader.load_next()
    finally:
        loader.close()
    assert result is not None
    assert result.state == "loaded"

    with as_role(db_url, role) as team:
        assert team.execute(
            "SELECT submitted_by, state, rows_loaded, rows_rejected FROM staging.extracts"
            " WHERE id = %s",
            (extract_id,),
        ).fetchone() == (role, "loaded", 1, 1)
        assert team.execute(
            "SELECT row_number, code, row->>'phone' FROM staging.extract_rejects"
        ).fetchall() == [(2, "invalid_phone", "1")]
        team.execute("DROP TABLE staging.pending_payment")  # its own table, its to drop


def test_what_the_tables_it_creates_grant_to_the_loader(db_url: str, role: str) -> None:
    with as_role(db_url, role) as team:
        team.execute("CREATE TABLE staging.mine (phone text)")
    with psycopg.connect(db_url) as admin:
        owner = admin.execute(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'staging' AND tablename = 'extracts'"
        ).fetchone()
        acl = admin.execute(
            "SELECT relacl::text[] FROM pg_class WHERE oid = 'staging.mine'::regclass"
        ).fetchone()
    assert owner is not None
    assert acl is not None
    assert f"{owner[0]}=r/{role}" in acl[0]


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM leads",
        "SELECT * FROM customers",
        "SELECT * FROM lead_events",
        "SELECT * FROM api_tokens",
        "INSERT INTO leads (customer_id, business_line, segment, priority, intake,"
        " first_event_at, last_event_at) VALUES (1, 'x', 'y', 1, 'staging', now(), now())",
        "INSERT INTO dnc (phone_e164) VALUES ('+8613800138000')",
        "CREATE TABLE public.sneaky (phone text)",
        "CREATE FUNCTION public.sneaky() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "INSERT INTO staging.extracts (table_name, state) VALUES ('t', 'loaded')",
        "INSERT INTO staging.extracts (table_name, rows_loaded) VALUES ('t', 5)",
        "UPDATE staging.extracts SET state = 'pending'",
        "DELETE FROM staging.extracts",
        "DELETE FROM staging.extract_rejects",
        "INSERT INTO staging.extract_rejects (extract_id, row_number, code, detail)"
        " VALUES (1, 1, 'invalid_phone', 'x')",
        "TRUNCATE staging.extracts",
        "DROP TABLE staging.extract_rejects",
        "ALTER TABLE staging.extracts ADD COLUMN x int",
        "CREATE SCHEMA elsewhere",
        "CREATE ROLE another",
        "SET ROLE postgres",
    ],
)
def test_the_role_cannot(db_url: str, role: str, statement: str) -> None:
    with as_role(db_url, role) as team, pytest.raises(psycopg.errors.InsufficientPrivilege):
        team.execute(statement)
