"""A real web server on loopback and Debian's chromium driven by Playwright (no browser download).

Without /usr/bin/chromium the browser tests are skipped, except in CI (`CI=true`), where
.ci/run installs it and a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydantic import SecretStr

from allocate.roster import import_agents, issue_token, parse_agents_csv
from leadflow.db import make_engine
from leadflow.rules import RulesHolder
from leadflow.settings import DatabaseSettings, KafkaSettings, Settings
from leadflow.stack import rules_classifier
from leadflow.web import WebContext, create_app

CHROMIUM = os.environ.get("LEADFLOW_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LEADFLOW_TEST_ARTIFACTS", "test-artifacts"))
ROSTER = """\
id,name,team,business_lines,segments,capacity,shift,status
a-1,王芳,t1,*,*,10,,available
a-2,李雷,t1,*,*,10,,available
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/browser" in str(item.path):
            item.add_marker(pytest.mark.browser)


@dataclass
class Site:
    url: str
    db_url: str
    tokens: dict[str, str]


@pytest.fixture
def site(db_url: str) -> Iterator[Site]:
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
        for role in ("supervisor", "ops"):
            tokens[role] = issue_token(conn, None, role=role)  # type: ignore[arg-type]
    app = create_app(
        WebContext(settings, engine, rules_classifier(RulesHolder.from_settings(settings)))
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the web server did not start"
        time.sleep(0.05)
    try:
        yield Site(f"http://127.0.0.1:{port}", db_url, tokens)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        engine.dispose()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Playwright's sync API runs an event loop on this thread while it is open; per test, so no
    asyncio test that runs after the browser tests finds a loop already running."""
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"no chromium at {CHROMIUM}; .ci/run installs Debian's chromium")
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page_errors() -> list[str]:
    """Script errors and failed requests of the page; a test removes those it expects."""
    return []


@pytest.fixture
def page(
    browser: Any, site: Site, page_errors: list[str], request: pytest.FixtureRequest
) -> Iterator[Any]:
    """A fresh browser tab; it closes before the site stops, so polling never sees it gone."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors = page_errors
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert errors == [], errors
