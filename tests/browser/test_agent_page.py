"""The agent workbench in a real browser: log in, see a lead arrive, work it, see it leave."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import expect

from allocate.allocator import Allocator, AllocatorConfig
from tests.browser.conftest import ARTIFACTS, Site

WAIT_MS = 15_000  # a behaviour bound, generous for a loaded machine, not a speed figure


def lead(site: Site, n: int, name: str = "张三") -> None:
    body = {
        "schema_version": 1,
        "event_id": f"page-{n}",
        "occurred_at": "2026-11-24T09:15:02+08:00",
        "source": "loan-app",
        "event_type": "order_pending_payment",
        "customer": {"phone": f"1380013{n:04d}", "name": name},
        "product": "personal_credit_loan",
    }
    response = httpx.post(
        f"{site.url}/api/v1/leads",
        json=body,
        headers={"Authorization": f"Bearer {site.tokens['ops']}"},
    )
    assert response.status_code == 200, response.text


def allocate(site: Site) -> int:
    allocator = Allocator(
        AllocatorConfig(queues=(), assigned_topic="leads.assigned", implicit_call_window=None)
    )
    with psycopg.connect(site.db_url, autocommit=True) as conn:
        allocator.sync_queues(conn)
        return allocator.allocate(conn).assigned


def login(page: Any, site: Site, who: str) -> None:
    page.goto(f"{site.url}/agent")
    page.get_by_label("token").fill(site.tokens[who])
    page.get_by_role("button", name="log in").click()
    expect(page.locator("#who")).to_be_visible(timeout=WAIT_MS)


def test_an_agent_sees_a_lead_arrive_and_works_it_without_reloading(page: Any, site: Site) -> None:
    with psycopg.connect(site.db_url, autocommit=True) as conn:
        conn.execute("UPDATE agents SET status = 'offline' WHERE id = 'a-2'")
    login(page, site, "a-1")
    expect(page.locator("#who")).to_contain_text("王芳")
    expect(page.locator("#empty")).to_be_visible()
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))

    lead(site, 1, name="<b>张三</b>")
    assert allocate(site) == 1
    row = page.locator("#leads tr")
    expect(row).to_have_count(1, timeout=WAIT_MS)
    expect(row).to_contain_text("<b>张三</b>")  # shown as text, not markup
    expect(row).to_contain_text("+86138****0001")
    expect(row).to_contain_text("left")  # the SLA countdown

    row.get_by_role("button", name="open").click()
    expect(page.locator("#d-phone")).to_have_text("+8613800130001", timeout=WAIT_MS)
    expect(page.locator("#d-events")).to_contain_text("order_pending_payment")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "agent-workbench.png"), full_page=True)
    page.get_by_role("button", name="first contact").click()
    expect(page.locator("#leads tr")).to_contain_text("contacted", timeout=WAIT_MS)
    page.get_by_role("button", name="not interested").click()
    expect(page.locator("#leads tr")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#empty")).to_be_visible()
    assert navigations == []  # no reload, no navigation

    with psycopg.connect(site.db_url) as conn:
        outcome = conn.execute("SELECT outcome, agent_id FROM dispositions").fetchall()
        state = conn.execute("SELECT state FROM leads").fetchall()
    assert outcome == [("not_interested", "a-1")]
    assert state == [("closed",)]


def test_a_callback_and_a_status_change_from_the_page(page: Any, site: Site) -> None:
    login(page, site, "a-2")
    lead(site, 2)
    with psycopg.connect(site.db_url, autocommit=True) as conn:
        conn.execute("UPDATE agents SET status = 'offline' WHERE id = 'a-1'")
    assert allocate(site) == 1
    expect(page.locator("#leads tr")).to_have_count(1, timeout=WAIT_MS)
    page.locator("#leads tr").get_by_role("button", name="open").click()
    page.locator("#callback-at").fill("2030-01-02T18:30")
    page.get_by_role("button", name="callback", exact=True).click()
    expect(page.locator("#leads tr")).to_have_count(0, timeout=WAIT_MS)
    page.get_by_label("my status").select_option("away")
    with psycopg.connect(site.db_url) as conn:
        for _ in range(100):
            status = conn.execute("SELECT status FROM agents WHERE id = 'a-2'").fetchone()
            if status == ("away",):
                break
            page.wait_for_timeout(100)
        callback = conn.execute("SELECT outcome, callback_at FROM dispositions").fetchone()
    assert status == ("away",)
    assert callback is not None
    assert callback[0] == "callback"
    assert callback[1].year == 2030


@pytest.mark.parametrize("who", ["ops", "nobody"])
def test_only_agents_tokens_log_in(page: Any, site: Site, page_errors: list[str], who: str) -> None:
    page.goto(f"{site.url}/agent")
    page.get_by_label("token").fill(site.tokens.get(who, "lf_not_a_token"))
    page.get_by_role("button", name="log in").click()
    expect(page.locator("#login-error")).not_to_be_empty(timeout=WAIT_MS)
    expect(page.locator("#work")).to_be_hidden()
    if who == "nobody":  # the browser reports the refused request itself
        assert page_errors == [
            "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
        ]
        page_errors.clear()
