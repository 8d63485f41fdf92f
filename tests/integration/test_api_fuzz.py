"""A property-based fuzz of the OpenAPI schema (schemathesis) against the real app and database:
whatever the generated request, with whatever token, the API never answers 5xx and every error
has the documented JSON shape."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr

from allocate.roster import import_agents, issue_token, parse_agents_csv
from leadflow.db import make_engine
from leadflow.kafka import ensure_topics
from leadflow.rules import RulesHolder
from leadflow.settings import DatabaseSettings, KafkaSettings, Settings, TopicSettings
from leadflow.stack import rules_classifier
from leadflow.web import WebContext, create_app

pytestmark = pytest.mark.integration

ROSTER = "id,name,business_lines,status\na-1,王芳,*,available\n"
TOKENS: dict[str, str] = {}


@pytest.fixture
def api_schema(db_url: str, kafka_bootstrap: str) -> Iterator[Any]:
    suffix = uuid.uuid4().hex[:8]
    config = Settings(
        database=DatabaseSettings(url=SecretStr(db_url)),
        kafka=KafkaSettings(bootstrap=kafka_bootstrap),
        topics=TopicSettings(
            raw=f"r.{suffix}", dlq=f"d.{suffix}", assigned=f"a.{suffix}", partitions=1
        ),
    )
    asyncio.run(ensure_topics(config.kafka, config.topics))  # so /readyz can be ready
    engine = make_engine(db_url)
    with engine.connect() as conn:
        import_agents(conn, parse_agents_csv(ROSTER, source="roster.csv"))
        TOKENS["agent"] = issue_token(conn, "a-1")
        TOKENS["ops"] = issue_token(conn, None, role="ops")
    app = create_app(
        WebContext(config, engine, rules_classifier(RulesHolder.from_settings(config)))
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.dispose()


def test_no_request_makes_the_api_fail(api_schema: Any) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def check(case: Any) -> None:
            for role in ("agent", "ops"):
                response = case.call(headers={"Authorization": f"Bearer {TOKENS[role]}"})
                where = (case.method, case.path, response.status_code, response.text[:300])
                assert response.status_code < 500, where
                if response.status_code >= 400:
                    body = response.json()
                    assert set(body) == {"error"}, where
                    assert {"code", "message"} <= set(body["error"]), where
                    assert "Traceback" not in response.text, where

        check()
