"""Seeding the demo: its configuration, its warehouse database, its roster and tokens.

Everything here is idempotent: agents are upserted, the warehouse table is created when absent
and topped up, the configuration is rewritten, and the demo's earlier tokens are revoked before
new ones are issued (so a second `up --demo` leaves no live token behind that nobody holds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

import psycopg
import sqlalchemy as sa
import yaml
from psycopg import sql
from sqlalchemy.engine import make_url

from allocate.model import Window
from allocate.roster import AgentRow, import_agents, issue_token, parse_agents_csv
from leadflow.db import make_engine
from leadflow.demo.traffic import CrmUser, crm_user
from leadflow.logs import get_logger
from leadflow.settings import Settings, load_settings, resolve_config_path
from schemas.tables import ApiToken

log = get_logger("leadflow.demo")

#: The demo agent left for a person to play on /agent; every other roster agent is simulated.
HUMAN_AGENT: Final = "demo"
#: Simulated agents whose shift is set to exclude the time of `prepare`: off shift, to show it.
OFF_SHIFT: Final = ("night-01", "night-02")
#: The stock source of the demo, and the table it polls.
SOURCE_NAME: Final = "crm_silent_high_value"
CRM_TABLE: Final = "crm_silent_users"
CRM_URL_VARIABLE: Final = "LEADFLOW_DEMO_CRM_URL"
WEB_URL_VARIABLE: Final = "LEADFLOW_DEMO_WEB_URL"
#: Rows the warehouse table starts with, and the share of them that are silent (polled).
CRM_INITIAL_ROWS: Final = 300
CRM_INITIAL_SILENT: Final = 0.4
TOKEN_LABEL: Final = "leadflow demo"  # noqa: S105 - a label, not a secret
TOKENS_FILE: Final = "tokens.json"
CONFIG_FILE: Final = "leadflow.yaml"
RULES_FILE: Final = "rules.yaml"

#: Queues of the demo: one or more per business line, every strategy, no call window (the demo
#: runs at any hour) and first-contact SLAs short enough to see expiries within minutes.
QUEUES: Final[list[dict[str, Any]]] = [
    {"name": "ent_key_accounts", "business_line": "enterprise_loan", "segments": ["key_account"],
     "strategy": "sticky", "fallback_strategy": "least_loaded", "sla": "2m"},
    {"name": "enterprise_loan", "business_line": "enterprise_loan", "strategy": "least_loaded",
     "sla": "3m"},
    {"name": "pc_hot", "business_line": "personal_credit_loan",
     "segments": ["pending_payment_30d", "new_signup", "ad_click"], "strategy": "weighted",
     "sla": "60s"},
    {"name": "personal_credit", "business_line": "personal_credit_loan",
     "strategy": "round_robin", "sla": "3m"},
    {"name": "car_hot", "business_line": "car_loan", "segments": ["test_drive", "pending_payment_30d"],
     "strategy": "sticky", "fallback_strategy": "weighted", "sla": "90s"},
    {"name": "car_loan", "business_line": "car_loan", "strategy": "round_robin", "sla": "3m"},
    {"name": "financial_leasing", "business_line": "financial_leasing",
     "strategy": "least_loaded", "sla": "5m"},
    {"name": "wealth_vip", "business_line": "wealth_management", "segments": ["silent_high_value"],
     "strategy": "sticky", "fallback_strategy": "least_loaded", "sla": "2m"},
    {"name": "wealth_management", "business_line": "wealth_management", "strategy": "weighted",
     "sla": "3m"},
]  # fmt: skip
for _queue in QUEUES:
    _queue.update(call_window=None, max_attempts=3)

#: The warehouse's silent users with a high-value tag, read after the watermark (keyed: the
#: feeder writes several rows in one statement, so they share an `updated_at`).
SOURCE_QUERY: Final = """\
SELECT user_id AS external_id, mobile AS phone, nick AS name, region, ltv, tags,
       silent_days, updated_at
FROM crm_silent_users
WHERE silent AND (updated_at, user_id) > (:watermark, :watermark_key)
ORDER BY updated_at, user_id LIMIT :limit
"""

_CRM_DDL: Final = """
CREATE TABLE IF NOT EXISTS crm_silent_users (
    user_id     text PRIMARY KEY,
    mobile      text,
    nick        text,
    region      text,
    ltv         numeric(14, 2) NOT NULL,
    tags        text[] NOT NULL DEFAULT '{}',
    silent      boolean NOT NULL DEFAULT true,
    silent_days integer,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS crm_silent_users_updated ON crm_silent_users (updated_at, user_id);
"""
CRM_INSERT: Final = """
INSERT INTO crm_silent_users
    (user_id, mobile, nick, region, ltv, tags, silent_days, silent, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (user_id) DO NOTHING
"""


def crm_database_url(database_url: str) -> str:
    """The demo warehouse: a database beside leadflow's on the same server."""
    url = make_url(database_url)
    name = f"{url.database or 'leadflow'}_demo_crm"[:63]
    return url.set(database=name).render_as_string(hide_password=False)


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def ensure_crm_database(database_url: str) -> str:
    """Create the warehouse database when absent; its URL."""
    crm_url = crm_database_url(database_url)
    name = make_url(crm_url).database
    assert name is not None
    with psycopg.connect(_libpq(database_url), autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another was quicker
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return crm_url


def crm_rows(users: list[CrmUser], now: datetime) -> list[tuple[Any, ...]]:
    """Parameters of CRM_INSERT: the users, updated `now`."""
    return [
        (u.user_id, u.mobile, u.nick, u.region, u.ltv, list(u.tags), u.silent_days, u.silent, now)
        for u in users
    ]


def insert_crm_users(conn: psycopg.Connection[Any], users: list[CrmUser], now: datetime) -> None:
    """Users with a high-value tag, updated `now` (one statement)."""
    conn.cursor().executemany(CRM_INSERT, crm_rows(users, now))


def seed_crm(crm_url: str, now: datetime, rng: random.Random) -> int:
    """Create the warehouse table, with a few hundred rows of the last weeks when empty; how
    many rows it has."""
    with psycopg.connect(_libpq(crm_url), autocommit=True, connect_timeout=10) as conn:
        conn.execute(_CRM_DDL)
        row = conn.execute("SELECT count(*) FROM crm_silent_users").fetchone()
        count = int(row[0]) if row else 0
        if count == 0:
            with conn.transaction():
                for n in range(CRM_INITIAL_ROWS):
                    when = now - timedelta(days=rng.uniform(1, 28))
                    user = crm_user(rng, f"crm-{n + 1:07d}", silent=CRM_INITIAL_SILENT)
                    insert_crm_users(conn, [user], when)
            count = CRM_INITIAL_ROWS
    return count


def roster(now: datetime, default_timezone: str) -> list[AgentRow]:
    """The demo roster: the packaged CSV, with the off-shift agents' shift set to start three
    hours after `now` in their timezone, so that they are off shift whenever the demo starts."""
    text = resources.files("leadflow.demo").joinpath("agents.csv").read_text(encoding="utf-8")
    rows = parse_agents_csv(
        text, source="leadflow/demo/agents.csv", default_timezone=default_timezone
    )
    out = []
    for row in rows:
        if row.id in OFF_SHIFT:
            local = now.astimezone(ZoneInfo(row.timezone))
            start = (local + timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
            end = start + timedelta(hours=9)
            row = dataclasses.replace(row, shift=Window(start.time(), end.time()))
        out.append(row)
    return out


def demo_config(
    user: Mapping[str, Any], *, rules_file: Path, crm_url: str, crm_url_in_file: bool
) -> dict[str, Any]:
    """The user's configuration (as written, `${VAR}` kept) with the demo's rules, queues,
    source and pace. Queues and sources are the demo's alone: the demo is self-contained."""
    config = {key: value for key, value in user.items() if key not in ("queues", "sources")}

    def section(name: str) -> dict[str, Any]:
        value = config.get(name)
        config[name] = dict(value) if isinstance(value, Mapping) else {}
        return config[name]  # type: ignore[no-any-return]

    section("classification")["rules_file"] = str(rules_file)
    allocation = section("allocation")
    # Recycling within minutes, so a no-answer comes back while you watch.
    allocation["no_answer_delays"] = ["1m", "2m", "5m"]
    allocation["sweep_interval"] = "1s"
    allocation["implicit_queues"] = True
    section("scheduler").setdefault("retry_backoff_max", "30s")
    section("staging").setdefault("poll_interval", "2s")
    url = f"${{{CRM_URL_VARIABLE}:-{crm_url}}}" if crm_url_in_file else f"${{{CRM_URL_VARIABLE}}}"
    config["queues"] = [dict(queue) for queue in QUEUES]
    config["sources"] = [
        {
            "name": SOURCE_NAME,
            "url": url,
            "query": SOURCE_QUERY,
            "watermark": "updated_at",
            "key": "external_id",
            "schedule": "20s",
            "event_type": "stock_profile",
            "batch_size": 500,
        }
    ]
    return config


def _user_config(settings_path: Path | None) -> dict[str, Any]:
    if settings_path is None or not settings_path.is_file():
        return {}
    data = yaml.safe_load(settings_path.read_text(encoding="utf-8"))
    return dict(data) if isinstance(data, dict) else {}


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold URLs and tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(0o600)


_HEADER = """\
# Written by `leadflow up --demo` at every start (edits are lost): the configuration of your
# leadflow.yaml, if any, with the demo's rules, queues, stock source and recycling delays.
"""


def write_config(
    settings: Settings, demo_dir: Path, crm_url: str, environ: Mapping[str, str]
) -> tuple[Path, dict[str, str]]:
    """The demo's leadflow.yaml and rules file in `demo_dir`; the file and the environment it
    needs. Raises ConfigError when the result does not validate."""
    del settings  # the user's file is read as written, so that ${VAR} stays a reference
    rules = demo_dir / RULES_FILE
    rules.parent.mkdir(parents=True, exist_ok=True)
    packaged = resources.files("leadflow.demo").joinpath(RULES_FILE).read_text(encoding="utf-8")
    rules.write_text(packaged, encoding="utf-8")
    user = _user_config(resolve_config_path(None, environ))
    has_password = make_url(crm_url).password is not None
    config = demo_config(
        user, rules_file=rules.resolve(), crm_url=crm_url, crm_url_in_file=not has_password
    )
    path = demo_dir / CONFIG_FILE
    _write_private(
        path, _HEADER + yaml.safe_dump(config, allow_unicode=True, sort_keys=False, width=100)
    )
    env = {CRM_URL_VARIABLE: crm_url}
    load_settings(path, {**environ, **env})  # fails here, not in every role
    return path, env


def seed_agents(
    database_url: str, rows: list[AgentRow], simulated: list[str]
) -> tuple[str, str, dict[str, str]]:
    """Upsert the roster and issue fresh tokens (the demo's earlier ones revoked): the ops
    token, the human agent's, and each simulated agent's."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            summary = import_agents(conn, rows)
            with conn.begin():  # tokens of an earlier demo: nobody holds them any more
                tokens = cast(sa.Table, ApiToken.__table__)
                conn.execute(
                    sa.update(tokens)
                    .where(tokens.c.label == TOKEN_LABEL, tokens.c.revoked_at.is_(None))
                    .values(revoked_at=sa.func.now())
                )
            ops = issue_token(conn, None, role="ops", label=TOKEN_LABEL)
            human = issue_token(conn, HUMAN_AGENT, label=TOKEN_LABEL)
            agents = {agent: issue_token(conn, agent, label=TOKEN_LABEL) for agent in simulated}
    finally:
        engine.dispose()
    log.info(
        "demo roster imported",
        agents=summary.total,
        new=summary.inserted,
        updated=summary.updated,
        simulated=len(simulated),
    )
    return ops, human, agents


def write_tokens(demo_dir: Path, tokens: Mapping[str, str]) -> Path:
    path = demo_dir / TOKENS_FILE
    _write_private(path, json.dumps({"agents": dict(tokens)}, indent=2) + "\n")
    return path


def read_tokens(path: Path) -> dict[str, str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in data["agents"].items()}


def now_utc() -> datetime:
    return datetime.now(UTC)
