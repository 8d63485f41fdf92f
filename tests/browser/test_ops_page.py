"""The ops dashboard in a real browser: charts drawn, live numbers equal to the database."""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg
from playwright.sync_api import expect

from tests.browser.conftest import ARTIFACTS, Site
from tests.browser.test_agent_page import WAIT_MS, allocate


def post(site: Site, events: list[dict[str, Any]]) -> None:
    response = httpx.post(
        f"{site.url}/api/v1/leads",
        json=events,
        headers={"Authorization": f"Bearer {site.tokens['ops']}"},
    )
    assert response.status_code == 200, response.text


def event(n: int, event_type: str, product: str) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": f"ops-{n}",
        "occurred_at": "2026-11-24T09:15:02+08:00",
        "source": "loan-app",
        "event_type": event_type,
        "customer": {"phone": f"1370013{n:04d}", "name": "李四"},
        "product": product,
    }


def figure(page: Any, element: str) -> str:
    return str(page.locator(f"#{element}").inner_text())


def test_the_dashboard_shows_live_figures_that_match_the_database(page: Any, site: Site) -> None:
    post(site, [event(n, "order_pending_payment", "personal_credit_loan") for n in range(5)])
    post(site, [event(n, "signup", "car_loan") for n in range(5, 8)])
    assert allocate(site) == 8  # two agents with room for ten each

    page.goto(f"{site.url}/ops")
    page.get_by_label("token").fill(site.tokens["supervisor"])
    page.get_by_role("button", name="log in").click()
    expect(page.locator("#board")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#f-events")).to_have_text("8", timeout=WAIT_MS)

    with psycopg.connect(site.db_url) as conn:
        open_now = conn.execute("SELECT count(*) FROM assignments WHERE status = 'open'").fetchone()
        mix = conn.execute(
            "SELECT business_line || ' · ' || segment, count(*) FROM leads GROUP BY 1"
        ).fetchall()
    assert figure(page, "f-open") == str(open_now[0] if open_now else None)
    assert figure(page, "f-agents") == "2"

    intake = json.loads(page.locator("#c-intake").get_attribute("data-values"))
    assert sum(sum(series) for series in intake) == 8
    mix_values = json.loads(page.locator("#c-mix").get_attribute("data-values"))[0]
    assert sorted(mix_values) == sorted(n for _, n in mix)
    for label, _ in mix:
        assert label  # every line and segment drawn from the database
    expect(page.locator("#queues tr")).to_have_count(len(_queues(site)))

    # Live: a new event shows without a reload.
    post(site, [event(99, "signup", "car_loan")])
    expect(page.locator("#f-events")).to_have_text("9", timeout=WAIT_MS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ops-dashboard.png"), full_page=True)


def _queues(site: Site) -> list[str]:
    with psycopg.connect(site.db_url) as conn:
        return [
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT coalesce(queue, '-') FROM leads WHERE state = 'queued'"
                " UNION SELECT DISTINCT queue FROM assignments WHERE status = 'open'"
            )
        ]


def test_agents_tokens_do_not_open_the_dashboard(
    page: Any, site: Site, page_errors: list[str]
) -> None:
    page.goto(f"{site.url}/ops")
    page.get_by_label("token").fill(site.tokens["a-1"])
    page.get_by_role("button", name="log in").click()
    expect(page.locator("#login-error")).to_contain_text("supervisor", timeout=WAIT_MS)
    expect(page.locator("#board")).to_be_hidden()
    assert page_errors == [
        "Failed to load resource: the server responded with a status of 403 (Forbidden)"
    ]
    page_errors.clear()
