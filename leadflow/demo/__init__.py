"""`leadflow up --demo`: what the demo seeds, and the feeder process that drives its traffic.

`prepare` runs once in the supervisor, after the servers answer and the migrations are applied
and before any role starts: it writes the demo's configuration (every role of the demo loads
it), creates the demo warehouse database that the stock poller reads, imports the roster and
issues the tokens. `main` is the feeder, a process of its own (`python -m leadflow.demo`) that
the supervisor starts once the web role answers: product events on the raw topic, new rows in
the warehouse, extracts from a simulated data team, and simulated agents working their queues
through the HTTP API. Both are safe to repeat on the same data directory.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from leadflow.demo.setup import (
    CRM_TABLE,
    HUMAN_AGENT,
    OFF_SHIFT,
    TOKENS_FILE,
    ensure_crm_database,
    now_utc,
    roster,
    seed_agents,
    seed_crm,
    write_config,
    write_tokens,
)
from leadflow.settings import Settings

#: Where the feeder finds the simulated agents' tokens (default: tokens.json beside the config).
TOKENS_VARIABLE = "LEADFLOW_DEMO_TOKENS"


@dataclass(frozen=True)
class DemoSetup:
    config_path: Path  # a leadflow.yaml every child role loads (LEADFLOW_CONFIG)
    env: dict[str, str]  # extra environment for the child roles and the feeder
    ops_token: str  # an ops token for /ops#token=...
    agent_id: str  # the demo agent left for a person to play (not simulated)
    agent_token: str  # its token, for /agent#token=...
    tips: list[str]  # short lines "what to try", printed with the URLs
    tokens_path: Path  # the simulated agents' tokens (mode 0600), for the feeder
    crm_url: str  # the demo warehouse database the stock source polls


def prepare(settings: Settings, database_url: str, data_dir: Path) -> DemoSetup:
    """Seed the demo; idempotent: a second `up --demo` on the same data dir works.

    `database_url` is leadflow's PostgreSQL at the current schema; the demo warehouse is
    created beside it on the same server. Raises ConfigError if the demo's configuration does
    not validate, psycopg/SQLAlchemy errors if PostgreSQL refuses.
    """
    demo_dir = data_dir / "demo"
    now = now_utc()
    crm_url = ensure_crm_database(database_url)
    seed_crm(crm_url, now, random.Random())  # noqa: S311 - demo data, not secrets
    config_path, env = write_config(settings, demo_dir, crm_url, os.environ)
    _ensure_schema(database_url, settings.staging.schema_name)
    rows = roster(now, settings.allocation.default_timezone)
    simulated = [row.id for row in rows if row.id != HUMAN_AGENT]
    ops, human, agents = seed_agents(database_url, rows, simulated)
    tokens_path = write_tokens(demo_dir, agents)
    env[TOKENS_VARIABLE] = str(tokens_path.resolve())
    away = sum(row.status == "away" for row in rows)
    offline = sum(row.status == "offline" for row in rows)
    crm = make_url(crm_url).database
    tips = [
        f"On /agent you are agent {HUMAN_AGENT!r}: open a lead, mark first contact, record an "
        "outcome (a callback comes back at its time); leave one alone and it goes to another "
        "agent when its SLA runs out (60 s in queue pc_hot).",
        f"{len(simulated)} simulated agents work their queues through the API "
        f"({away} away for now, {offline} offline, {len(OFF_SHIFT)} off shift: "
        f"{', '.join(OFF_SHIFT)}); `leadflow agents list` shows their load.",
        "Three channels feed it: product events on the raw topic (with redeliveries, returning "
        f"customers and poison messages for the DLQ); the stock source polling table {CRM_TABLE} "
        f"of database {crm} every 20 s; and a data team's staging extract every few minutes "
        "(`leadflow staging status --watch`).",
        f"Edit the rules in {demo_dir.resolve() / 'rules.yaml'}: workers reload them within "
        "seconds (reset at the next `up --demo`).",
        f"Beside it: LEADFLOW_CONFIG={config_path.resolve()} leadflow status --watch",
    ]
    return DemoSetup(
        config_path=config_path.resolve(),
        env=env,
        ops_token=ops,
        agent_id=HUMAN_AGENT,
        agent_token=human,
        tips=tips,
        tokens_path=tokens_path.resolve(),
        crm_url=crm_url,
    )


def _ensure_schema(database_url: str, schema: str) -> None:
    """The data team's staging schema (migrations create `staging`; another name may be new)."""
    url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        found: Any = conn.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
        if found is None:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))


def main() -> None:
    """The demo feeder process: runs until SIGTERM/SIGINT, then stops within seconds, exit 0.

    Reads LEADFLOW_CONFIG (the demo's configuration), LEADFLOW_DEMO_WEB_URL (the web role),
    LEADFLOW_DEMO_TOKENS (default: tokens.json beside the configuration) and the servers as
    every role finds them (database.url and kafka.bootstrap, or a running `leadflow up`).
    """
    from leadflow.demo.feeder import main as feeder_main

    feeder_main()


__all__ = ["TOKENS_FILE", "DemoSetup", "main", "prepare"]
