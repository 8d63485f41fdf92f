"""The composition root's database helpers on a real server."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from leadflow.db import check_database, lead_counts, make_engine, schema_version, upgrade
from leadflow.errors import ServiceUnavailable
from schemas import migrate
from schemas.vocab import LEAD_STATES


def test_fresh_database_is_at_head_with_no_leads(engine: Engine) -> None:
    assert schema_version(engine) == (migrate.head(), migrate.head())
    assert lead_counts(engine) == dict.fromkeys(LEAD_STATES, 0)


def test_upgrade_is_idempotent(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        assert schema_version(engine)[0] is None
        upgrade(engine)
        upgrade(engine)
        assert schema_version(engine)[0] == migrate.head()
    finally:
        engine.dispose()


def test_a_missing_database_is_one_clear_paragraph() -> None:
    engine = make_engine("postgresql://app:hunter2@127.0.0.1:1/leadflow", connect_timeout=2)
    with pytest.raises(ServiceUnavailable) as raised:
        check_database(engine)
    message = str(raised.value)
    assert message.startswith(
        "Cannot reach PostgreSQL at postgresql+psycopg://app:***@127.0.0.1:1/leadflow"
    )
    assert "hunter2" not in message
    assert "LEADFLOW_DATABASE_URL" in message
