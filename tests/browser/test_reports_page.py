"""The reports page in a real browser: the numbers the API gives, a funnel chart, the CSV."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import expect

from tests.browser.conftest import ARTIFACTS, Site
from tests.browser.test_agent_page import WAIT_MS, allocate


def event(n: int, source: str, phone: int, **extra: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": f"reports-page-{n}",
        "occurred_at": "2026-11-24T09:15:02+08:00",
        "source": source,
        "event_type": "order_pending_payment",
        "customer": {"phone": f"1360013{phone:04d}", "name": "王五"},
        "product": "personal_credit_loan",
        **extra,
    }


def call(site: Site, method: str, path: str, who: str, **kwargs: Any) -> httpx.Response:
    response = httpx.request(
        method,
        f"{site.url}{path}",
        headers={"Authorization": f"Bearer {site.tokens[who]}"},
        timeout=30,
        **kwargs,
    )
    assert response.status_code == 200, response.text
    return response


def history(site: Site) -> None:
    """Three sources, a merge, a campaign with a Chinese name; assigned, one converted."""
    call(
        site,
        "POST",
        "/api/v1/leads",
        "ops",
        json=[
            event(1, "loan-app", 1),
            event(2, "loan-app", 1),  # merged
            event(3, "loan-app", 2, campaign="双十一"),
            event(4, "ad-platform", 3, campaign="双十一"),
            event(5, "ad-platform", 4),
            event(6, "partner", 5, consent={"telemarketing": False}),
        ],
    )
    assert allocate(site) == 4
    agent, assignment = next(
        (who, item)
        for who in ("a-1", "a-2")
        for item in call(site, "GET", "/api/v1/me/assignments", who).json()
    )
    call(site, "POST", f"/api/v1/assignments/{assignment['id']}/contact", agent)
    call(
        site,
        "POST",
        f"/api/v1/assignments/{assignment['id']}/disposition",
        agent,
        json={"outcome": "converted"},
    )


def login(page: Any, site: Site, who: str) -> None:
    page.goto(f"{site.url}/ops/reports")
    page.get_by_label("token").fill(site.tokens[who])
    page.get_by_role("button", name="log in").click()


def table(page: Any) -> tuple[list[dict[str, str]], dict[str, str]]:
    """The report table as the page shows it: data-value of each cell (the dimension's text)."""
    data = page.evaluate(
        """() => {
        const read = (tr) => Object.fromEntries([...tr.cells].map((td) =>
            [td.dataset.column, td.dataset.value ?? td.textContent]));
        return {
            rows: [...document.querySelectorAll("#report-body tr")].map(read),
            total: read(document.querySelector("#report-total")),
        };
    }"""
    )
    return data["rows"], data["total"]


def shown(value: Any) -> str:
    return "(none)" if value is None else str(value)


def test_the_page_shows_the_numbers_the_api_gives(page: Any, site: Site) -> None:
    history(site)
    login(page, site, "supervisor")
    expect(page.locator("#board")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#report-body tr")).to_have_count(3, timeout=WAIT_MS)

    period = {"from": page.locator("#from").input_value(), "to": page.locator("#to").input_value()}
    assert period["from"] < period["to"]
    report = call(site, "GET", "/api/v1/reports/funnel", "ops", params={**period, "by": "source"})
    body = report.json()
    assert body["total"]["leads"] == 5
    assert body["total"]["converted"] == 1
    rows, total = table(page)
    counts = [c["name"] for c in body["columns"] if c["kind"] not in ("dimension",)]
    assert [row["source"] for row in rows] == [shown(r["source"]) for r in body["rows"]]
    for row, expected in zip(rows, body["rows"], strict=True):
        for name in counts:
            if expected[name] is not None:
                assert float(row[name]) == expected[name], (row["source"], name)
    for name in counts:
        if body["total"][name] is not None:
            assert float(total[name]) == body["total"][name], name
    assert total["source"] == "total"
    assert page.locator("#report-body tr").first.locator("td").first.inner_text() == "ad-platform"

    # The funnel chart draws the total's steps.
    chart = page.locator("#c-funnel")
    assert json.loads(chart.get_attribute("data-labels")) == [
        "events", "leads", "queued", "assigned", "contacted", "converted",
    ]  # fmt: skip
    assert json.loads(chart.get_attribute("data-values")) == [
        body["total"][k]
        for k in ("events", "leads", "queued", "assigned", "contacted", "converted")
    ]

    # Another dimension: the campaign, its Chinese name as text.
    page.get_by_label("by", exact=True).select_option("campaign")
    page.get_by_role("button", name="show").click()
    expect(page.locator("#report-body tr")).to_have_count(2, timeout=WAIT_MS)
    expect(page.locator("#report-body")).to_contain_text("双十一")
    by_campaign = call(
        site, "GET", "/api/v1/reports/funnel", "ops", params={**period, "by": "campaign"}
    ).json()
    rows, _ = table(page)
    assert [row["campaign"] for row in rows] == ["双十一", "(none)"]
    assert [int(row["leads"]) for row in rows] == [r["leads"] for r in by_campaign["rows"]]

    # The CSV of what is shown: every column, a BOM, the same rows.
    with page.expect_download() as info:
        page.get_by_role("button", name="download CSV").click()
    download = info.value
    assert download.suggested_filename.startswith("funnel-campaign-")
    data = Path(download.path()).read_bytes()
    assert data.startswith(b"\xef\xbb\xbf")
    parsed = list(csv.DictReader(io.StringIO(data.decode("utf-8").removeprefix("\ufeff"))))
    assert [row["campaign"] for row in parsed] == ["双十一", "", "total"]
    assert [int(row["leads"]) for row in parsed] == [
        *(r["leads"] for r in by_campaign["rows"]),
        by_campaign["total"]["leads"],
    ]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "reports-page.png"), full_page=True)


def test_agents_by_agent_and_source(page: Any, site: Site) -> None:
    history(site)
    login(page, site, "ops")
    expect(page.locator("#report-body tr")).to_have_count(3, timeout=WAIT_MS)
    page.get_by_label("by", exact=True).select_option("agent")
    page.get_by_label("then by").select_option("source")
    page.get_by_role("button", name="show").click()
    expect(page.locator("#table-title")).to_have_text(
        "Agents' work by agent and source", timeout=WAIT_MS
    )
    period = {"from": page.locator("#from").input_value(), "to": page.locator("#to").input_value()}
    body = call(
        site, "GET", "/api/v1/reports/funnel", "ops", params={**period, "by": "agent,source"}
    ).json()
    rows, total = table(page)
    assert [(row["agent"], row["source"]) for row in rows] == [
        (r["agent"], r["source"]) for r in body["rows"]
    ]
    assert [int(row["assignments"]) for row in rows] == [r["assignments"] for r in body["rows"]]
    assert int(total["assignments"]) == body["total"]["assignments"] == 4


def test_an_agent_token_is_refused(page: Any, site: Site, page_errors: list[str]) -> None:
    login(page, site, "a-1")
    expect(page.locator("#login-error")).to_contain_text("this route is for", timeout=WAIT_MS)
    expect(page.locator("#board")).to_be_hidden()
    page_errors[:] = [e for e in page_errors if "403" not in e]  # the refused request
