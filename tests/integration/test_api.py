"""The HTTP API over a real PostgreSQL: tokens and roles, agents' work, HTTP intake, errors.

Leads enter through `POST /api/v1/leads` and are assigned by the real allocator; nothing is
inserted behind the API's back except the roster and tokens (the CLI's job).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import SecretStr

from allocate.allocator import Allocator, AllocatorConfig
from allocate.roster import import_agents, issue_token, parse_agents_csv
from leadflow.db import make_engine
from leadflow.rules import RulesHolder
from leadflow.settings import DatabaseSettings, KafkaSettings, Settings
from leadflow.stack import rules_classifier
from leadflow.web import WebContext, create_app

pytestmark = pytest.mark.integration

ROSTER = """\
id,name,team,business_lines,segments,capacity,shift,status
a-1,王芳,t1,*,*,10,,available
a-2,李雷,t1,*,*,10,,offline
"""
HOSTILE = [
    "'; DROP TABLE leads; --",
    '<script>alert("x")</script>',
    "${jndi:ldap://x}",
    "{{7*7}}",
    "\u202eevil",
    "名字' OR 1=1 --",
]


@dataclass
class Api:
    client: httpx.AsyncClient
    db_url: str
    tokens: dict[str, str]  # who -> token: a-1, a-2, supervisor, ops, product

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    async def post_leads(self, body: Any, who: str = "ops") -> httpx.Response:
        return await self.client.post("/api/v1/leads", json=body, headers=self.auth(who))

    def allocate(self) -> int:
        """One pass of the real allocator; implicit per-line queues, open all day."""
        allocator = Allocator(
            AllocatorConfig(queues=(), assigned_topic="leads.assigned", implicit_call_window=None)
        )
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            allocator.sync_queues(conn)
            return allocator.allocate(conn).assigned


def event(n: int | str, phone: str = "13800138000", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema_version": 1,
        "event_id": f"api-{n}",
        "occurred_at": "2026-11-24T09:15:02+08:00",
        "source": "loan-app",
        "event_type": "order_pending_payment",
        "customer": {"phone": phone, "name": "张三"},
        "product": "personal_credit_loan",
    }
    body.update(extra)
    return body


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    settings = Settings(
        database=DatabaseSettings(url=SecretStr(db_url)),
        kafka=KafkaSettings(bootstrap="127.0.0.1:9"),
    )
    engine = make_engine(db_url)
    tokens: dict[str, str] = {}
    with engine.connect() as conn:
        import_agents(conn, parse_agents_csv(ROSTER, source="roster.csv"))
        for agent in ("a-1", "a-2"):
            tokens[agent] = issue_token(conn, agent)
        for role in ("supervisor", "ops", "product"):
            tokens[role] = issue_token(conn, None, role=role, label=f"test {role}")  # type: ignore[arg-type]
    classifier = rules_classifier(RulesHolder.from_settings(settings))
    app = create_app(WebContext(settings, engine, classifier))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://t",
        ) as client:
            yield Api(client, db_url, tokens)
    finally:
        engine.dispose()


async def assigned_to_a1(api: Api, count: int = 1) -> list[dict[str, Any]]:
    body = [event(f"assign-{n}", phone=f"1390000{n:04d}") for n in range(count)]
    response = await api.post_leads(body)
    assert response.status_code == 200, response.text
    assert api.allocate() == count
    mine = await api.client.get("/api/v1/me/assignments", headers=api.auth("a-1"))
    assert mine.status_code == 200, mine.text
    items: list[dict[str, Any]] = mine.json()
    assert len(items) == count
    return items


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert "Traceback" not in response.text
    return dict(body["error"])


# --- authentication and the role matrix ------------------------------------------------------

#: An assignment that does not exist; fixed, so the tests' ids are the same in every process.
UNKNOWN = "0b9e8f3c-5d2a-4e71-8c46-1f7a9d3b2e50"

ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/api/v1/me", None),
    ("GET", "/api/v1/me/assignments", None),
    ("POST", "/api/v1/me/status", {"status": "away"}),
    ("GET", f"/api/v1/assignments/{UNKNOWN}", None),
    ("POST", f"/api/v1/assignments/{UNKNOWN}/contact", None),
    ("POST", f"/api/v1/assignments/{UNKNOWN}/disposition", {"outcome": "no_answer"}),
    ("POST", f"/api/v1/assignments/{UNKNOWN}/reject", {"reason": "busy"}),
    ("GET", "/api/v1/queues", None),
    ("GET", "/api/v1/pipeline", None),
    ("GET", "/api/v1/reports/funnel", None),
    ("POST", "/api/v1/agents/a-2/status", {"status": "available"}),
    ("POST", "/api/v1/leads", [event("matrix")]),
]
ALLOWED = {
    "/api/v1/me": {"a-1", "supervisor", "ops", "product"},
    "/api/v1/me/assignments": {"a-1"},
    "/api/v1/me/status": {"a-1"},
    "/assignments/": {"a-1"},
    "/api/v1/queues": {"supervisor", "ops"},
    "/api/v1/pipeline": {"supervisor", "ops"},
    "/api/v1/reports/funnel": {"supervisor", "ops"},
    "/api/v1/agents/": {"supervisor", "ops"},
    "/api/v1/leads": {"ops", "product"},
}


def allowed(path: str) -> set[str]:
    for prefix, roles in ALLOWED.items():
        if path == prefix or (prefix.endswith("/") and prefix in path):
            return roles
    raise AssertionError(path)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_refuses_a_missing_or_unknown_token(
    api: Api, method: str, path: str, body: Any
) -> None:
    for headers in ({}, {"Authorization": "Bearer lf_nope"}, {"Authorization": "Basic eDp5"}):
        response = await api.client.request(method, path, json=body, headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_the_role_matrix(api: Api, method: str, path: str, body: Any) -> None:
    for who in ("a-1", "supervisor", "ops", "product"):
        response = await api.client.request(method, path, json=body, headers=api.auth(who))
        if who in allowed(path):
            # Allowed: whatever the route answers, it is not an authorisation error.
            assert response.status_code not in (401, 403), (who, response.text)
        else:
            assert_error(response, 403, "forbidden")


async def test_a_revoked_token_is_refused(api: Api) -> None:
    assert (await api.client.get("/api/v1/me", headers=api.auth("a-2"))).status_code == 200
    with psycopg.connect(api.db_url, autocommit=True) as conn:
        conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE agent_id = 'a-2'")
    assert_error(await api.client.get("/api/v1/me", headers=api.auth("a-2")), 401, "unauthorized")


async def test_requests_are_counted_by_route_template(api: Api) -> None:
    await api.client.get(f"/api/v1/assignments/{uuid.uuid4()}", headers=api.auth("a-1"))
    metrics = (await api.client.get("/metrics/")).text
    assert (
        'leadflow_http_requests_total{method="GET",route="/api/v1/assignments/{assignment_id}",'
        'status="404"}' in metrics
    )


async def test_using_a_token_stamps_it(api: Api) -> None:
    await api.client.get("/api/v1/me", headers=api.auth("a-1"))
    with psycopg.connect(api.db_url) as conn:
        used = conn.execute("SELECT last_used_at FROM api_tokens WHERE agent_id = 'a-1'").fetchone()
    assert used is not None
    assert used[0] is not None


# --- agents' work ----------------------------------------------------------------------------


async def test_an_agent_sees_opens_and_works_an_assignment(api: Api) -> None:
    [item] = await assigned_to_a1(api)
    assert item["phone_masked"] == "+86139****0000"
    assert "phone" not in item
    assert item["customer_name"] == "张三"
    assert item["reason"]

    opened = await api.client.get(f"/api/v1/assignments/{item['id']}", headers=api.auth("a-1"))
    assert opened.status_code == 200, opened.text
    detail = opened.json()
    assert detail["phone"] == "+8613900000000"
    assert [e["event_id"] for e in detail["events"]] == ["api-assign-0"]
    assert [h["to_state"] for h in detail["history"]] == ["queued", "assigned"]

    contact = await api.client.post(
        f"/api/v1/assignments/{item['id']}/contact", headers=api.auth("a-1")
    )
    assert contact.status_code == 200, contact.text
    assert contact.json()["lead_state"] == "in_progress"

    callback_at = (datetime.now(UTC) + timedelta(hours=3)).isoformat()
    done = await api.client.post(
        f"/api/v1/assignments/{item['id']}/disposition",
        json={"outcome": "callback", "note": "after 6pm", "callback_at": callback_at},
        headers=api.auth("a-1"),
    )
    assert done.status_code == 200, done.text
    assert done.json()["lead_state"] == "queued"
    assert datetime.fromisoformat(done.json()["next_action_at"]) == datetime.fromisoformat(
        callback_at
    )
    mine = await api.client.get("/api/v1/me/assignments", headers=api.auth("a-1"))
    assert mine.json() == []

    again = await api.client.post(
        f"/api/v1/assignments/{item['id']}/disposition",
        json={"outcome": "converted"},
        headers=api.auth("a-1"),
    )
    assert_error(again, 409, "assignment_closed")
    gone = await api.client.get(f"/api/v1/assignments/{item['id']}", headers=api.auth("a-1"))
    assert_error(gone, 404, "not_found")


async def test_another_agents_assignment_is_not_found_not_forbidden(api: Api) -> None:
    [item] = await assigned_to_a1(api)
    for method, path, body in [
        ("GET", f"/api/v1/assignments/{item['id']}", None),
        ("POST", f"/api/v1/assignments/{item['id']}/contact", None),
        ("POST", f"/api/v1/assignments/{item['id']}/disposition", {"outcome": "no_answer"}),
        ("POST", f"/api/v1/assignments/{item['id']}/reject", {"reason": "not mine"}),
    ]:
        theirs = await api.client.request(method, path, json=body, headers=api.auth("a-2"))
        nobodys = await api.client.request(
            method, path.replace(item["id"], str(uuid.uuid4())), json=body, headers=api.auth("a-2")
        )
        assert_error(theirs, 404, "not_found")
        assert theirs.json() == nobodys.json()  # nothing tells the two apart
    still = await api.client.get("/api/v1/me/assignments", headers=api.auth("a-1"))
    assert [i["id"] for i in still.json()] == [item["id"]]


async def test_a_reject_hands_the_lead_back(api: Api) -> None:
    [item] = await assigned_to_a1(api)
    response = await api.client.post(
        f"/api/v1/assignments/{item['id']}/reject",
        json={"reason": "speaks only Cantonese"},
        headers=api.auth("a-1"),
    )
    assert response.status_code == 200, response.text
    assert response.json()["lead_state"] == "queued"
    assert "speaks only Cantonese" in response.json()["reason"]


async def test_status_changes(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/me/status", json={"status": "away"}, headers=api.auth("a-1")
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "away"
    by_supervisor = await api.client.post(
        "/api/v1/agents/a-2/status", json={"status": "available"}, headers=api.auth("supervisor")
    )
    assert by_supervisor.json() == {"agent_id": "a-2", "status": "available", "changed": True}
    unknown = await api.client.post(
        "/api/v1/agents/nobody/status", json={"status": "away"}, headers=api.auth("ops")
    )
    assert_error(unknown, 404, "not_found")
    bad = await api.client.post(
        "/api/v1/me/status", json={"status": "asleep"}, headers=api.auth("a-1")
    )
    error = assert_error(bad, 422, "invalid_request")
    assert error["problems"][0]["loc"] == ["body", "status"]
    assert "asleep" not in bad.text  # the submitted value is not echoed


async def test_queues_show_depth_and_available_agents(api: Api) -> None:
    await api.post_leads([event(n, phone=f"1370000{n:04d}") for n in range(3)])
    api.allocate()
    response = await api.client.get("/api/v1/queues", headers=api.auth("supervisor"))
    assert response.status_code == 200, response.text
    [row] = response.json()
    assert row["open"] == 3
    assert row["agents_available"] == 1


async def test_the_pipeline_agrees_with_what_happened(api: Api) -> None:
    await api.post_leads([event(n, phone=f"1350000{n:04d}") for n in range(4)])
    await api.post_leads([event(1, phone="13500000001")])  # a redelivery stores nothing
    assert api.allocate() == 4
    response = await api.client.get("/api/v1/pipeline", headers=api.auth("ops"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["intake"]["events_in_window"]["http"] == 4
    assert sum(body["intake"]["events_per_minute"]["http"]) == 4
    assert body["leads_by_state"]["assigned"] == 4
    assert sum(row["leads"] for row in body["classification"]) == 4
    assert body["agents"]["available"] == {"agents": 1, "capacity": 10, "open": 4}
    assert body["speed_to_lead"]["first_assignments"] == 4
    assert body["speed_to_lead"]["assign_p50_seconds"] >= 0
    assert body["sla"] == {"open_breached": 0, "expired_in_window": 0}
    assert body["pollers"] == []
    assert body["extracts"] == []
    with psycopg.connect(api.db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO poller_state (source, consecutive_failures, last_error, last_run_at)"
            " VALUES ('dwh', 2, 'connection refused', now())"
        )
    body = (await api.client.get("/api/v1/pipeline", headers=api.auth("supervisor"))).json()
    [poller] = body["pollers"]
    assert (poller["name"], poller["state"], poller["configured"]) == ("dwh", "failing", False)
    assert poller["last_error"] == "connection refused"
    lag = body["intake"]["consumer_lag"]  # this app's broker address answers nothing
    assert lag["total"] is None
    assert "Cannot reach the Kafka broker" in lag["error"]


# --- malformed requests ----------------------------------------------------------------------


async def test_malformed_bodies_are_422_without_echo(api: Api) -> None:
    [item] = await assigned_to_a1(api)
    path = f"/api/v1/assignments/{item['id']}/disposition"
    secret = "13912345678"
    cases: list[dict[str, Any]] = [
        {"outcome": "maybe", "note": secret},
        {"outcome": "callback", "note": secret},  # no time
        {"outcome": "callback", "callback_at": "2026-11-24T18:00:00"},  # no offset
        {"outcome": "no_answer", "extra": secret},
        {"outcome": "no_answer", "note": "x" * 2001},
    ]
    for body in cases:
        response = await api.client.post(path, json=body, headers=api.auth("a-1"))
        assert_error(response, 422, "invalid_request")
        assert secret not in response.text
    not_json = await api.client.post(
        path,
        content=b"{not json",
        headers={**api.auth("a-1"), "content-type": "application/json"},
    )
    assert_error(not_json, 422, "invalid_request")
    bad_id = await api.client.post(
        "/api/v1/assignments/not-a-uuid/contact", headers=api.auth("a-1")
    )
    assert_error(bad_id, 404, "not_found")


# --- HTTP intake -----------------------------------------------------------------------------


async def test_one_event_is_stored_and_its_redelivery_is_a_no_op(api: Api) -> None:
    first = await api.post_leads(event(1), who="product")
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["accepted"], body["merged"], body["duplicate"], body["rejected"]) == (1, 0, 0, 0)
    assert body["results"][0]["status"] == "accepted"
    again = await api.post_leads(event(1), who="product")
    assert again.json()["results"][0]["status"] == "duplicate"
    assert again.json()["results"][0]["lead_id"] is None or isinstance(
        again.json()["results"][0]["lead_id"], int
    )
    later = await api.post_leads(event(2), who="product")  # same customer, same line
    assert later.json()["results"][0]["status"] == "merged"
    assert later.json()["results"][0]["lead_id"] == body["results"][0]["lead_id"]
    with psycopg.connect(api.db_url) as conn:
        assert conn.execute("SELECT intake, event_count FROM leads").fetchall() == [("http", 2)]


async def test_a_rejected_single_event_answers_422_with_its_code(api: Api) -> None:
    response = await api.post_leads(event(1, phone="12345"))
    assert_error(response, 422, "invalid_phone")
    wrong = await api.post_leads({**event(2), "schema_version": 9})
    assert_error(wrong, 422, "unsupported_schema_version")
    missing = await api.post_leads({"event_id": "x"})
    assert_error(missing, 422, "schema_violation")


def created_by_http() -> float:
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == "leadflow_leads_created_total" and sample.labels["intake"] == "http"
    )


async def test_a_batch_answers_per_event_and_stores_the_valid_ones(api: Api) -> None:
    before = created_by_http()
    batch = [
        event(1, phone="13800000001"),
        event(2, phone="call-me-maybe"),
        {"nonsense": True},
        event(1, phone="13800000001"),  # the same event twice in one request
        event(3, phone="13800000003", campaign="双十一"),
    ]
    response = await api.post_leads(batch)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["status"] for r in body["results"]] == [
        "accepted",
        "rejected",
        "rejected",
        "duplicate",
        "accepted",
    ]
    assert [r["code"] for r in body["results"]] == [
        None,
        "invalid_phone",
        "schema_violation",
        None,
        None,
    ]
    assert [r["index"] for r in body["results"]] == [0, 1, 2, 3, 4]
    assert (body["accepted"], body["rejected"], body["duplicate"]) == (2, 2, 1)
    assert "call-me-maybe" not in response.text  # details name problems, not the data
    with psycopg.connect(api.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM leads").fetchone() == (2,)
    assert created_by_http() - before == 2  # counted by line and segment once stored


async def test_oversized_and_malformed_intake_requests(api: Api) -> None:
    too_many = await api.post_leads([event(n) for n in range(1001)])
    assert_error(too_many, 413, "too_large")
    empty = await api.post_leads([])
    assert_error(empty, 422, "invalid_request")
    scalar = await api.post_leads(42)
    assert_error(scalar, 422, "invalid_request")
    garbage = await api.client.post(
        "/api/v1/leads",
        content=b"\xff\xfe not json",
        headers={**api.auth("ops"), "content-type": "application/json"},
    )
    assert_error(garbage, 422, "invalid_json")
    huge = await api.client.post(
        "/api/v1/leads",
        content=b"[" + b" " * (64 * 1024 * 1000 + 10) + b"]",
        headers={**api.auth("ops"), "content-type": "application/json"},
    )
    assert_error(huge, 413, "too_large")


async def test_injection_strings_are_stored_and_shown_inertly(api: Api) -> None:
    batch = [
        event(
            f"inj-{n}",
            phone=f"1360000{n:04d}",
            source="loan-app",
            campaign=text,
            customer={"phone": f"1360000{n:04d}", "name": text, "external_id": text},
            attributes={"note": text, text: 1},
        )
        for n, text in enumerate(HOSTILE)
    ]
    response = await api.post_leads(batch)
    assert response.status_code == 200, response.text
    assert [r["status"] for r in response.json()["results"]] == ["accepted"] * len(HOSTILE)
    assert api.allocate() == len(HOSTILE)
    mine = await api.client.get("/api/v1/me/assignments", headers=api.auth("a-1"))
    names = {item["customer_name"] for item in mine.json()}
    campaigns = {item["campaign"] for item in mine.json()}
    assert names == set(HOSTILE)
    assert campaigns == set(HOSTILE)
    with psycopg.connect(api.db_url) as conn:  # the tables are all still there
        assert conn.execute("SELECT count(*) FROM leads").fetchone() == (len(HOSTILE),)


async def test_hostile_path_and_header_values(api: Api) -> None:
    for value in HOSTILE:
        response = await api.client.get(f"/api/v1/assignments/{value}", headers=api.auth("a-1"))
        assert response.status_code == 404, response.text
        assert "Traceback" not in response.text
    weird = await api.client.get(
        "/api/v1/me", headers={"Authorization": "Bearer " + "'; DROP TABLE api_tokens; --"}
    )
    assert_error(weird, 401, "unauthorized")
    assert (await api.client.get("/api/v1/me", headers=api.auth("ops"))).status_code == 200


# --- the schema ------------------------------------------------------------------------------


async def test_openapi_documents_the_routes_and_security(api: Api) -> None:
    schema = (await api.client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in (
        "/api/v1/me/assignments",
        "/api/v1/me/status",
        "/api/v1/assignments/{assignment_id}/disposition",
        "/api/v1/leads",
        "/api/v1/queues",
    ):
        assert path in paths
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    leads = paths["/api/v1/leads"]["post"]
    assert "examples" in leads["requestBody"]["content"]["application/json"]
    assert "LeadEventIn" in schema["components"]["schemas"]
    json.dumps(schema)  # serialisable as a whole


async def test_the_database_going_away_is_a_503_not_a_trace(db_url: str) -> None:
    settings = Settings(
        database=DatabaseSettings(url=SecretStr(db_url)),
        kafka=KafkaSettings(bootstrap="127.0.0.1:9"),
    )
    engine = make_engine("postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout=1)
    app = create_app(WebContext(settings, engine, None))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t"
    ) as client:
        response = await client.get("/api/v1/me", headers={"Authorization": "Bearer lf_x"})
    assert_error(response, 503, "unavailable")
    engine.dispose()
