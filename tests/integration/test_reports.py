"""Reports on a real PostgreSQL: hand-computed funnels for a scripted history, the agents'
view, the rollup kept exact by incremental refreshes, CSV round trips, authorisation.

The history goes through the real code paths: HTTP intake (`POST /api/v1/leads`), the
allocator (`Allocator.allocate` with a frozen `now`), agents' work (`allocate.work`: first
contact, dispositions, hand-back), the SLA sweep (`Allocator.expire_slas`), a staging extract
loaded by the real loader, and agents' statuses through the API. Times are the leads' creation
(T0, one intake transaction) plus whole seconds, so every speed is known.
"""

from __future__ import annotations

import csv
import io
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from pydantic import SecretStr

from allocate import work
from allocate.allocator import Allocator, AllocatorConfig
from allocate.roster import import_agents, issue_token, parse_agents_csv
from leadflow import reports
from leadflow.db import make_engine
from leadflow.rules import RulesHolder
from leadflow.settings import DatabaseSettings, KafkaSettings, Settings
from leadflow.stack import rules_classifier, staging_loader
from leadflow.web import WebContext, create_app
from sync.staging import Submission, submit

pytestmark = pytest.mark.integration

ROSTER = """\
id,name,team,business_lines,segments,capacity,shift,status
a-1,王芳,t1,*,*,10,,available
a-2,李雷,t1,*,*,10,,offline
a-3,韩梅梅,t1,*,*,10,,offline
a-4,张伟,t2,*,*,10,,offline
"""
WORK = work.WorkConfig()


@dataclass
class World:
    client: httpx.AsyncClient
    db_url: str
    tokens: dict[str, str]
    #: phone -> lead id, and the creation time of the first intake batch.
    leads: dict[str, int] = field(default_factory=dict)
    t0: datetime = datetime(2000, 1, 1, tzinfo=UTC)

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def at(self, seconds: float) -> datetime:
        return self.t0 + timedelta(seconds=seconds)

    async def report(self, by: str, **params: str) -> dict[str, Any]:
        response = await self.client.get(
            "/api/v1/reports/funnel",
            params={"from": self.period[0], "to": self.period[1], "by": by, **params},
            headers=self.auth("supervisor"),
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    @property
    def period(self) -> tuple[str, str]:
        return (
            (self.t0 - timedelta(days=1)).isoformat(),
            (self.t0 + timedelta(days=1)).isoformat(),
        )


def event(n: int, phone: str, source: str, **extra: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": f"report-{n}",
        "occurred_at": "2026-11-24T09:15:02+08:00",
        "source": source,
        "event_type": "order_pending_payment",
        "customer": {"phone": phone, "name": "张三"},
        "product": "personal_credit_loan",
        **extra,
    }


P = {n: f"1390000{n:04d}" for n in range(1, 8)}


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:
    settings = Settings(
        database=DatabaseSettings(url=SecretStr(db_url)),
        kafka=KafkaSettings(bootstrap="127.0.0.1:9"),
    )
    engine = make_engine(db_url)
    tokens: dict[str, str] = {}
    with engine.connect() as conn:
        import_agents(conn, parse_agents_csv(ROSTER, source="roster.csv"))
        tokens["a-1"] = issue_token(conn, "a-1")
        for role in ("supervisor", "ops"):
            tokens[role] = issue_token(conn, None, role=role)
    app = create_app(
        WebContext(settings, engine, rules_classifier(RulesHolder.from_settings(settings)))
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://t",
        ) as client:
            yield World(client, db_url, tokens)
    finally:
        engine.dispose()


# --- the scripted history ---------------------------------------------------------------------


async def intake(world: World, events: list[dict[str, Any]]) -> list[int | None]:
    response = await world.client.post("/api/v1/leads", json=events, headers=world.auth("ops"))
    assert response.status_code == 200, response.text
    return [result["lead_id"] for result in response.json()["results"]]


async def status(world: World, agent: str, value: str) -> None:
    response = await world.client.post(
        f"/api/v1/agents/{agent}/status", json={"status": value}, headers=world.auth("supervisor")
    )
    assert response.status_code == 200, response.text


def allocate(conn: psycopg.Connection, now: datetime) -> int:
    allocator = Allocator(
        AllocatorConfig(queues=(), assigned_topic="leads.assigned", implicit_call_window=None)
    )
    allocator.sync_queues(conn)
    return allocator.allocate(conn, now).assigned


def open_assignment(conn: psycopg.Connection, lead_id: int) -> tuple[uuid.UUID, str]:
    row = conn.execute(
        "SELECT id, agent_id FROM assignments WHERE lead_id = %s AND status = 'open'", (lead_id,)
    ).fetchone()
    assert row is not None, f"lead {lead_id} has no open assignment"
    return row[0], row[1]


def contact(world: World, conn: psycopg.Connection, phone: int, seconds: float) -> None:
    assignment, agent = open_assignment(conn, world.leads[P[phone]])
    work.first_contact(conn, assignment, agent, world.at(seconds))


def dispose(
    world: World, conn: psycopg.Connection, phone: int, outcome: Any, seconds: float, **kw: Any
) -> None:
    assignment, agent = open_assignment(conn, world.leads[P[phone]])
    work.dispose(conn, assignment, agent, outcome, world.at(seconds), WORK, **kw)


async def play(world: World, *, checkpoints: list[dict[str, Any]] | None = None) -> None:
    """The history (see the module docstring); `checkpoints` gets a report after each phase,
    so the rollup is refreshed incrementally along the way."""

    async def checkpoint() -> None:
        if checkpoints is not None:
            checkpoints.append(await world.report("source"))

    ids = await intake(
        world,
        [
            event(1, P[1], "app-a"),
            event(2, P[1], "app-a"),  # merged into lead 1
            event(3, P[2], "app-a"),
            event(4, P[3], "app-b"),
            event(5, P[4], "app-b", consent={"telemarketing": False}),  # blocked at intake
            event(6, P[5], "app-b"),
            event(7, P[6], "app-a"),
            event(8, P[7], "app-b"),
        ],
    )
    phones = [P[1], P[1], P[2], P[3], P[4], P[5], P[6], P[7]]
    world.leads = {phone: lead for phone, lead in zip(phones, ids, strict=True) if lead}
    with psycopg.connect(world.db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT min(created_at), max(created_at) FROM leads WHERE id = ANY(%s)",
            (list(world.leads.values()),),
        ).fetchone()
        assert row is not None
        assert row[0] == row[1]  # one intake transaction
        world.t0 = row[0]
    await checkpoint()

    with psycopg.connect(world.db_url, autocommit=True) as conn:
        assert allocate(conn, world.at(60)) == 6  # all to a-1, the only one available
        contact(world, conn, 7, 70)
        contact(world, conn, 1, 90)
        dispose(world, conn, 1, "converted", 120)
        dispose(world, conn, 2, "no_answer", 100)  # retry in 30 minutes
        dispose(world, conn, 5, "no_answer", 150)
    # The customer of lead 6 withdraws consent: merged, the lead closed, its assignment revoked.
    await intake(world, [event(9, P[6], "app-a", consent={"telemarketing": False})])
    await checkpoint()

    with psycopg.connect(world.db_url, autocommit=True) as conn:
        allocator = Allocator(
            AllocatorConfig(queues=(), assigned_topic="leads.assigned", implicit_call_window=None)
        )
        assert allocator.expire_slas(conn, world.at(400)) == 1  # lead 3, never contacted
    await status(world, "a-2", "available")
    with psycopg.connect(world.db_url, autocommit=True) as conn:
        assert allocate(conn, world.at(400)) == 1  # lead 3 to a-2 (a-1 let it expire)
        assignment, agent = open_assignment(conn, world.leads[P[3]])
        assert agent == "a-2"
        work.reject(conn, assignment, agent, "speaks Cantonese only", world.at(420), WORK)
    await status(world, "a-2", "away")
    await status(world, "a-3", "available")
    with psycopg.connect(world.db_url, autocommit=True) as conn:
        assert allocate(conn, world.at(430)) == 1  # lead 3 to a-3
        contact(world, conn, 3, 500)
        dispose(world, conn, 3, "do_not_call", 600)
    await status(world, "a-3", "away")
    await checkpoint()

    with psycopg.connect(world.db_url, autocommit=True) as conn:
        assert allocate(conn, world.at(2000)) == 2  # leads 2 and 5 again, to a-1
        dispose(world, conn, 2, "callback", 2100, callback_at=world.at(5000))
        dispose(world, conn, 5, "no_answer", 2050)  # retry in 2 hours
        assert allocate(conn, world.at(5000)) == 1  # lead 2, called back
        dispose(world, conn, 2, "not_interested", 5100)
        assert allocate(conn, world.at(9300)) == 1  # lead 5, third attempt
        dispose(world, conn, 5, "no_answer", 9400)  # no attempts left: closed

    # A staging extract: two rows become leads (never assigned), two are rejected.
    with psycopg.connect(world.db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE staging.campaign_list (phone text, name text)")
        conn.execute(
            "INSERT INTO staging.campaign_list VALUES"
            " ('13700000001', '甲'), ('12345', '乙'), ('13700000002', NULL), ('13700000003', %s)",
            ("名" * 300,),
        )
        submit(conn, "staging", Submission("campaign_list", source="crm-export", campaign="双十一"))
    settings = Settings(
        database=DatabaseSettings(url=SecretStr(world.db_url)),
        kafka=KafkaSettings(bootstrap="127.0.0.1:9"),
    )
    loader = staging_loader(settings, rules_classifier(RulesHolder.from_settings(settings)))
    try:
        while loader.load_next() is not None:
            pass
    finally:
        loader.close()
    await status(world, "a-1", "offline")  # the end of the shift: available hours stop here


# --- what the history must give -----------------------------------------------------------------

# By hand (see play): leads 1..7 over app-a (1, 2, 6) and app-b (3, 4, 5, 7), two staging ones.
# Speed to first contact: 1: 90 s, 2: 100, 3: 500, 5: 150, 7: 70; first assignment: 60 s each.
APP_A = {
    "events": 5, "merged": 2, "rejected": 0, "leads": 3, "queued": 3, "assigned": 3,
    "contacted": 2, "converted": 1, "closed": 3, "open": 0, "recycled": 1, "recycles": 2,
    "expired": 0, "expiries": 0, "attempts": 4, "closed_converted": 1,
    "closed_not_interested": 1, "closed_blocked_dnc": 1, "contact_p50_s": 95.0,
    "contact_p90_s": 99.0, "assign_p50_s": 60.0, "assign_p90_s": 60.0,
    "queued_rate": 1.0, "assigned_rate": 1.0, "contact_rate": 0.6667, "conversion_rate": 0.5,
    "lead_conversion_rate": 0.3333, "attempts_per_lead": 1.3333, "merge_rate": 0.4,
}  # fmt: skip
APP_B = {
    "events": 4, "merged": 0, "rejected": 0, "leads": 4, "queued": 3, "assigned": 3,
    "contacted": 3, "converted": 0, "closed": 3, "open": 1, "recycled": 1, "recycles": 2,
    "expired": 1, "expiries": 1, "attempts": 6, "closed_do_not_call": 1,
    "closed_blocked_dnc": 1, "closed_no_answer": 1, "closed_converted": 0,
    "contact_p50_s": 150.0, "contact_p90_s": 430.0, "assign_p50_s": 60.0,
    "assign_p90_s": 60.0, "queued_rate": 0.75, "expiry_rate": 0.3333, "recycle_rate": 0.3333,
}  # fmt: skip
CRM_EXPORT = {
    "events": 2, "merged": 0, "rejected": 2, "rejected_invalid_phone": 1,
    "rejected_schema_violation": 1, "leads": 2, "queued": 2, "assigned": 0, "contacted": 0,
    "open": 2, "closed": 0, "contact_p50_s": None, "assign_p50_s": None, "assigned_rate": 0.0,
    "contact_rate": None, "reject_rate": 0.5,
}  # fmt: skip
TOTAL = {
    "events": 11, "merged": 2, "rejected": 2, "leads": 9, "queued": 8, "assigned": 6,
    "contacted": 5, "converted": 1, "closed": 6, "open": 3, "recycled": 2, "recycles": 4,
    "expired": 1, "expiries": 1, "attempts": 10, "closed_converted": 1,
    "closed_not_interested": 1, "closed_invalid_number": 0, "closed_do_not_call": 1,
    "closed_no_answer": 1, "closed_sla_expired": 0, "closed_blocked_dnc": 2,
    "closed_max_attempts": 0, "contact_p50_s": 100.0, "contact_p90_s": 360.0,
    "assign_p50_s": 60.0, "assign_p90_s": 60.0, "attempts_per_lead": 1.6667,
}  # fmt: skip


def subset(row: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in expected}


async def test_a_scripted_history_gives_the_hand_computed_funnel(world: World) -> None:
    checkpoints: list[dict[str, Any]] = []
    await play(world, checkpoints=checkpoints)
    # Along the way, refreshed incrementally: the first report saw the leads just queued.
    first = checkpoints[0]["total"]
    assert subset(first, {"leads": 7, "events": 8, "queued": 6, "assigned": 0, "open": 6}) == {
        "leads": 7, "events": 8, "queued": 6, "assigned": 0, "open": 6,
    }  # fmt: skip
    assert checkpoints[1]["total"]["converted"] == 1
    assert checkpoints[1]["total"]["closed_blocked_dnc"] == 2  # lead 4 at intake, lead 6 now

    report = await world.report("source")
    assert report["report"] == "funnel"
    assert report["by"] == ["source"]
    rows = {row["source"]: row for row in report["rows"]}
    assert list(rows) == ["app-a", "app-b", "crm-export"]
    assert subset(rows["app-a"], APP_A) == APP_A
    assert subset(rows["app-b"], APP_B) == APP_B
    assert subset(rows["crm-export"], CRM_EXPORT) == CRM_EXPORT
    assert subset(report["total"], TOTAL) == TOTAL
    names = [column["name"] for column in report["columns"]]
    assert names[0] == "source"
    assert set(names[1:]) == set(report["total"])

    by_channel = await world.report("channel")
    channels = {row["channel"]: row for row in by_channel["rows"]}
    assert list(channels) == ["http", "staging"]
    assert channels["http"]["leads"] == 7
    assert channels["staging"]["leads"] == 2
    assert channels["staging"]["rejected"] == 2

    by_campaign = await world.report("campaign")
    campaigns = {row["campaign"]: row for row in by_campaign["rows"]}
    assert list(campaigns) == ["双十一", None]
    assert campaigns["双十一"]["leads"] == 2
    assert campaigns["双十一"]["rejected"] == 2
    assert campaigns[None]["leads"] == 7

    # Two dimensions: the app-b leads by segment sum to the app-b row.
    pairs = await world.report("source,business_line")
    app_b = [row for row in pairs["rows"] if row["source"] == "app-b"]
    assert sum(row["leads"] for row in app_b) == 4
    assert sum(row["attempts"] for row in app_b) == 6

    # Incremental refreshes along the way leave what a rebuild from scratch gives.
    with psycopg.connect(world.db_url, autocommit=True) as conn:
        conn.execute("TRUNCATE report_refresh")
    rebuilt = await world.report("source")
    assert rebuilt["rows"] == report["rows"]
    assert rebuilt["total"] == report["total"]


async def test_the_agents_view_of_the_same_history(world: World) -> None:
    await play(world)
    report = await world.report("agent")
    assert report["report"] == "agents"
    rows = {row["agent"]: row for row in report["rows"]}
    assert list(rows) == ["a-1", "a-2", "a-3"]
    # a-1: leads 1, 2 (three times), 3, 5 (three times), 6 (revoked by intake), 7 (open).
    # Assignment to contact: 1: 30 s; 2: 40, 100, 100; 5: 90, 50, 100; 7: 10.
    assert subset(
        rows["a-1"],
        {
            "assignments": 10, "attempts": 9, "contacted": 8, "converted": 1, "open": 1,
            "ended_no_answer": 4, "ended_callback": 1, "ended_not_interested": 1,
            "ended_sla_expired": 1, "ended_revoked": 1, "ended_converted": 1,
            "contact_p50_s": 70.0, "contact_p90_s": 100.0, "conversion_rate": 0.125,
        },
    ) == {
        "assignments": 10, "attempts": 9, "contacted": 8, "converted": 1, "open": 1,
        "ended_no_answer": 4, "ended_callback": 1, "ended_not_interested": 1,
        "ended_sla_expired": 1, "ended_revoked": 1, "ended_converted": 1,
        "contact_p50_s": 70.0, "contact_p90_s": 100.0, "conversion_rate": 0.125,
    }  # fmt: skip
    assert subset(rows["a-2"], {"assignments": 1, "attempts": 0, "ended_handed_back": 1}) == {
        "assignments": 1, "attempts": 0, "ended_handed_back": 1,
    }  # fmt: skip
    assert subset(
        rows["a-3"], {"assignments": 1, "attempts": 1, "contacted": 1, "ended_do_not_call": 1}
    ) == {"assignments": 1, "attempts": 1, "contacted": 1, "ended_do_not_call": 1}
    assert rows["a-3"]["contact_p50_s"] == 70.0
    assert report["total"]["assignments"] == 12
    assert report["total"]["converted"] == 1

    by_agent_source = await world.report("agent,source")
    a1 = {row["source"]: row for row in by_agent_source["rows"] if row["agent"] == "a-1"}
    assert {source: row["assignments"] for source, row in a1.items()} == {"app-a": 5, "app-b": 5}


async def test_available_hours_and_conversions_per_hour(world: World) -> None:
    await play(world)
    start = world.t0 - timedelta(days=1)
    # a-1's log before the period says available; we add an away hour inside the period.
    with psycopg.connect(world.db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM agent_status_log")
        conn.execute(
            "INSERT INTO agent_status_log (agent_id, status, at) VALUES"
            " ('a-1', 'available', %(before)s), ('a-1', 'away', %(away)s),"
            " ('a-1', 'available', %(back)s), ('a-1', 'offline', %(off)s),"
            " ('a-2', 'available', %(away)s), ('a-2', 'offline', %(back)s),"
            " ('a-4', 'available', %(back)s), ('a-4', 'offline', %(off)s)",
            {
                "before": start - timedelta(hours=5),
                "away": start + timedelta(hours=2),
                "back": start + timedelta(hours=3),
                "off": start + timedelta(hours=6),
            },
        )
    report = await world.report("agent")
    rows = {row["agent"]: row for row in report["rows"]}
    # a-1: available from the start of the period for 2 hours, then 3 more: 5 hours.
    assert rows["a-1"]["available_hours"] == 5.0
    assert rows["a-1"]["conversions_per_hour"] == 0.2
    assert rows["a-2"]["available_hours"] == 1.0
    assert rows["a-2"]["conversions_per_hour"] == 0.0
    assert rows["a-3"]["available_hours"] == 0.0
    assert rows["a-3"]["conversions_per_hour"] is None
    # Available for three hours and given nothing: still a row.
    assert subset(rows["a-4"], {"assignments": 0, "available_hours": 3.0}) == {
        "assignments": 0,
        "available_hours": 3.0,
    }
    assert rows["a-4"]["conversions_per_hour"] == 0.0
    assert report["total"]["available_hours"] == 9.0


async def test_a_period_without_the_leads_reports_nothing_of_them(world: World) -> None:
    await play(world)
    before = world.t0 - timedelta(hours=1)
    response = await world.client.get(
        "/api/v1/reports/funnel",
        params={"from": (before - timedelta(days=1)).isoformat(), "to": before.isoformat()},
        headers=world.auth("ops"),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rows"] == []
    assert body["total"]["leads"] == 0
    assert body["total"]["contact_p50_s"] is None


async def test_poller_rejects_are_counted_by_source_and_nowhere_else(world: World) -> None:
    await play(world)
    with psycopg.connect(world.db_url, autocommit=True) as conn:
        # What a poller run records: its rejects by code (the count is complete).
        conn.execute(
            "INSERT INTO poller_runs (source, trigger, outcome, started_at, finished_at, rejects)"
            " VALUES ('dwh-silent', 'schedule', 'succeeded', %s, %s, %s::jsonb)",
            (world.at(0), world.at(5), '{"invalid_phone": 3, "too_large": 1}'),
        )
    by_source = await world.report("source")
    rows = {row["source"]: row for row in by_source["rows"]}
    assert subset(
        rows["dwh-silent"],
        {"rejected": 4, "rejected_invalid_phone": 3, "rejected_too_large": 1, "leads": 0},
    ) == {"rejected": 4, "rejected_invalid_phone": 3, "rejected_too_large": 1, "leads": 0}
    assert by_source["total"]["rejected"] == 6
    by_segment = await world.report("segment")
    unknown = [row for row in by_segment["rows"] if row["segment"] is None]
    assert len(unknown) == 1
    assert unknown[0]["rejected"] == 6
    assert unknown[0]["leads"] == 0


# --- CSV ----------------------------------------------------------------------------------------


def parse_csv(data: bytes) -> list[dict[str, str]]:
    assert data.startswith(b"\xef\xbb\xbf")  # the BOM Excel needs to read UTF-8
    text = data.decode("utf-8")
    assert "\r\n" in text
    return list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"))))


def as_csv_value(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


@pytest.mark.parametrize("by", ["source", "campaign", "agent", "source,segment"])
async def test_the_csv_is_the_json_report_row_for_row(world: World, by: str) -> None:
    await play(world)
    report = await world.report(by)
    response = await world.client.get(
        "/api/v1/reports/funnel",
        params={"from": world.period[0], "to": world.period[1], "by": by, "format": "csv"},
        headers=world.auth("supervisor"),
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="')
    assert disposition.endswith('.csv"')
    assert disposition.isascii()
    rows = parse_csv(response.content)
    names = [column["name"] for column in report["columns"]]
    assert list(rows[0]) == names
    assert len(rows) == len(report["rows"]) + 1
    for parsed, row in zip(rows, report["rows"], strict=False):
        assert parsed == {name: as_csv_value(row[name]) for name in names}
    total = rows[-1]
    dims = by.split(",")
    assert total[dims[0]] == "total"
    assert total == {
        name: "total"
        if name == dims[0]
        else ""
        if name in dims
        else as_csv_value(report["total"][name])
        for name in names
    }
    if by == "campaign":
        assert "双十一" in response.content.decode("utf-8")


async def test_csv_by_the_accept_header(world: World) -> None:
    await play(world)
    response = await world.client.get(
        "/api/v1/reports/funnel",
        params={"from": world.period[0], "to": world.period[1]},
        headers={**world.auth("ops"), "Accept": "text/csv"},
    )
    assert response.status_code == 200, response.text
    rows = parse_csv(response.content)
    assert [row["source"] for row in rows] == ["app-a", "app-b", "crm-export", "total"]
    # format=json wins over the header.
    response = await world.client.get(
        "/api/v1/reports/funnel",
        params={"from": world.period[0], "to": world.period[1], "format": "json"},
        headers={**world.auth("ops"), "Accept": "text/csv"},
    )
    assert response.headers["content-type"] == "application/json"


# --- authorisation and validation -------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert "Traceback" not in response.text
    return str(body["error"]["message"])


async def test_agents_are_refused_and_watchers_allowed(world: World) -> None:
    path = "/api/v1/reports/funnel"
    assert_error(await world.client.get(path, headers=world.auth("a-1")), 403, "forbidden")
    assert_error(await world.client.get(path), 401, "unauthorized")
    for who in ("supervisor", "ops"):
        response = await world.client.get(path, headers=world.auth(who))
        assert response.status_code == 200, response.text
        body = response.json()
        # Without a period: the last 30 days up to today included (Asia/Shanghai by default).
        start = datetime.fromisoformat(body["from"])
        end = datetime.fromisoformat(body["to"])
        assert end - start == timedelta(days=30)
        local = end.astimezone(ZoneInfo("Asia/Shanghai"))
        assert (local.hour, local.minute) == (0, 0)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"by": "phone"}, "unknown dimension"),
        ({"by": "source;DROP TABLE leads"}, "unknown dimension"),
        ({"by": "source,segment,queue"}, "at most 2"),
        ({"by": "source,source"}, "named twice"),
        ({"by": ","}, "no dimension"),
        ({"from": "2026-11-02", "to": "2026-11-01"}, "before"),
        ({"from": "2026-11-01", "to": "2026-11-01"}, "before"),
        ({"from": "yesterday"}, "a date"),
        ({"from": "2026-11-01T08:00:00"}, "offset"),
        ({"from": "2026-13-01"}, "a date"),
        ({"from": "1900-01-01", "to": "2026-01-01"}, "ten years"),
    ],
)
async def test_a_bad_dimension_or_period_is_a_422(
    world: World, params: dict[str, str], fragment: str
) -> None:
    response = await world.client.get(
        "/api/v1/reports/funnel", params=params, headers=world.auth("supervisor")
    )
    message = assert_error(response, 422, "invalid_request")
    assert fragment in message
    assert "DROP" not in message


async def test_a_bad_format_is_a_422(world: World) -> None:
    response = await world.client.get(
        "/api/v1/reports/funnel", params={"format": "xlsx"}, headers=world.auth("ops")
    )
    assert_error(response, 422, "invalid_request")


async def test_the_route_is_documented(world: World) -> None:
    schema = (await world.client.get("/openapi.json")).json()
    operation = schema["paths"]["/api/v1/reports/funnel"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"from", "to", "by", "format"}
    assert "text/csv" in operation["responses"]["200"]["content"]


# --- the rollup on its own ----------------------------------------------------------------------


def test_a_connection_in_a_transaction_is_refused(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(ValueError, match="not in a transaction"):
            reports.refresh(conn)


def test_a_second_refresh_finds_nothing_new(db_url: str) -> None:
    with psycopg.connect(db_url) as first, psycopg.connect(db_url) as second:
        built = reports.refresh(first)
        assert built.full
        again = reports.refresh(second)
        assert not again.full
        assert again.leads == 0
        assert again.as_of >= built.as_of


async def test_a_refresh_that_waited_for_another_sees_what_happened_meanwhile(
    world: World,
) -> None:
    await intake(world, [event(1, P[1], "app-a")])
    with psycopg.connect(world.db_url) as conn:
        reports.refresh(conn)
    holder = psycopg.connect(world.db_url)
    try:
        holder.execute("LOCK TABLE report_refresh IN SHARE ROW EXCLUSIVE MODE")  # a refresh
        results: list[reports.Refresh] = []
        waiting = threading.Thread(target=_refresh_into, args=(world.db_url, results))
        waiting.start()
        waiting.join(1)
        assert waiting.is_alive()  # waits for the lock
        await intake(world, [event(2, P[2], "app-b")])  # committed while it waits
        holder.commit()
        waiting.join(30)
        assert not waiting.is_alive()
    finally:
        holder.close()
    assert results[0].leads >= 1
    # The lead that came while it waited is in the rollup: its snapshot followed the lock.
    with psycopg.connect(world.db_url) as conn:
        row = conn.execute("SELECT count(*) FROM report_leads").fetchone()
    assert row == (2,)


def _refresh_into(db_url: str, results: list[reports.Refresh]) -> None:
    with psycopg.connect(db_url) as conn:
        results.append(reports.refresh(conn))


def test_the_database_buckets_speeds_as_the_code_reads_them(db_url: str) -> None:
    values = [-5.0, 0.0, 0.5, 59.9, 599.999, 600.0, 605.9, 606.0, 3600.0, 3 * 86400.0, 1e12]
    query = f"SELECT {reports._bucket_sql('x')} FROM unnest(%s::float8[]) WITH ORDINALITY AS v(x, n) ORDER BY n"
    with psycopg.connect(db_url) as conn:
        got = [row[0] for row in conn.execute(query, (values,))]
    assert got == [reports.speed_bucket(v) for v in values]
