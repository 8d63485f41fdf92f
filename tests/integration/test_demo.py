"""`leadflow up --demo`'s content on real servers: what `prepare` seeds (twice), and the feeder
(`python -m leadflow.demo`) driving real roles — `leadflow run web|intake|allocator|staging|
scheduler` as processes — until every channel has stored leads and agents have worked some."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from allocate.roster import token_hash
from leadflow.demo import DemoSetup, prepare
from leadflow.demo.setup import HUMAN_AGENT, SOURCE_NAME
from leadflow.embedded import free_port
from leadflow.kafka import ensure_topics
from leadflow.settings import KafkaSettings, Settings, TopicSettings, load_settings
from tests.fault.roles import RoleProcess

pytestmark = pytest.mark.integration

ROLES = ("web", "intake", "allocator", "staging", "scheduler")


@pytest.fixture
def demo(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DemoSetup]:
    monkeypatch.chdir(tmp_path)  # no ./leadflow.yaml of the developer's
    monkeypatch.delenv("LEADFLOW_CONFIG", raising=False)
    setup = prepare(Settings(), db_url, tmp_path / ".leadflow")
    try:
        yield setup
    finally:
        crm = make_url(setup.crm_url).database
        assert crm is not None
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(crm))
            )


def test_prepare_seeds_the_demo_and_can_run_again(
    demo: DemoSetup, db_url: str, tmp_path: Path
) -> None:
    settings = load_settings(demo.config_path, {**os.environ, **demo.env})
    assert [s.name for s in settings.sources] == [SOURCE_NAME]
    assert settings.queues
    tokens = json.loads(Path(demo.env["LEADFLOW_DEMO_TOKENS"]).read_text())["agents"]
    assert HUMAN_AGENT not in tokens
    assert oct(Path(demo.env["LEADFLOW_DEMO_TOKENS"]).stat().st_mode & 0o777) == "0o600"
    with psycopg.connect(demo.crm_url, autocommit=True) as crm:
        (rows,) = crm.execute("SELECT count(*) FROM crm_silent_users").fetchone()  # type: ignore[misc]
    assert rows > 100

    again = prepare(Settings(), db_url, tmp_path / ".leadflow")  # a second `up --demo`
    assert again.config_path == demo.config_path
    with psycopg.connect(again.crm_url, autocommit=True) as crm:
        assert crm.execute("SELECT count(*) FROM crm_silent_users").fetchone() == (rows,)
    with psycopg.connect(db_url, autocommit=True) as conn:
        agents: dict[str, str] = dict(conn.execute("SELECT id, status FROM agents").fetchall())
        live = {
            h: (role, agent)
            for h, role, agent in conn.execute(
                "SELECT token_hash, role, agent_id FROM api_tokens WHERE revoked_at IS NULL"
            ).fetchall()
        }
    assert len(agents) == len(tokens) + 1
    assert agents[HUMAN_AGENT] == "available"
    assert sum(status == "available" for status in agents.values()) >= 20
    # The second run's tokens work, the first run's do not: nothing left that nobody holds.
    assert live[token_hash(again.ops_token)] == ("ops", None)
    assert live[token_hash(again.agent_token)] == ("agent", HUMAN_AGENT)
    assert token_hash(demo.ops_token) not in live
    assert token_hash(demo.agent_token) not in live
    assert len(live) == len(tokens) + 2


def _counts(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url, autocommit=True) as conn:

        def one(query: str) -> int:
            row = conn.execute(query).fetchone()
            assert row is not None
            return int(row[0])

        intake: dict[str, int] = dict(
            conn.execute("SELECT intake, count(*) FROM lead_events GROUP BY intake").fetchall()
        )
        return {
            "realtime": intake.get("realtime", 0),
            "stock": intake.get("stock", 0),
            "staging": intake.get("staging", 0),
            "extracts": one("SELECT count(*) FROM staging.extracts WHERE table_name LIKE 'demo%'"),
            "dispositions": one("SELECT count(*) FROM dispositions"),
            "contacted": one("SELECT count(*) FROM assignments WHERE first_contact_at IS NOT NULL"),
            "lines": one("SELECT count(DISTINCT business_line) FROM leads"),
        }


def test_the_feeder_drives_every_channel_and_the_agents(
    demo: DemoSetup, db_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    topics = TopicSettings(raw=f"demo.{run}.raw", dlq=f"demo.{run}.dlq", assigned=f"demo.{run}.out", partitions=2)  # fmt: skip
    asyncio.run(ensure_topics(KafkaSettings(bootstrap=kafka_bootstrap), topics))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")},
        **demo.env,
        "LEADFLOW_CONFIG": str(demo.config_path),
        "LEADFLOW_DATABASE_URL": db_url,
        "LEADFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "LEADFLOW_TOPICS_RAW": topics.raw,
        "LEADFLOW_TOPICS_DLQ": topics.dlq,
        "LEADFLOW_TOPICS_ASSIGNED": topics.assigned,
        "LEADFLOW_INTAKE_CONSUMER_GROUP": f"demo-{run}",
        "LEADFLOW_WEB_PORT": str(port),
        "LEADFLOW_EMBEDDED_DATA_DIR": str(tmp_path / ".leadflow"),
    }
    roles = [RoleProcess(role, env, tmp_path / f"{role}.log") for role in ROLES]
    for role in roles:
        role.start()
    feeder_log = tmp_path / "feeder.log"
    feeder: subprocess.Popen[bytes] | None = None
    try:
        _wait_for_web(port, roles[0])
        with open(feeder_log, "wb") as out:
            feeder = subprocess.Popen(
                [sys.executable, "-m", "leadflow.demo"],
                env={**env, "LEADFLOW_DEMO_WEB_URL": f"http://127.0.0.1:{port}"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 50

        def flowing(counts: dict[str, int]) -> bool:  # everything asserted below, at once
            return bool(
                counts["realtime"] and counts["stock"] and counts["extracts"]
                and counts["staging"] and counts["dispositions"] and counts["contacted"]
                and counts["lines"] >= 3
            )  # fmt: skip

        counts = _counts(db_url)
        while time.monotonic() < deadline and not flowing(counts):
            for role in roles:
                role.assert_alive()
            assert feeder.poll() is None, feeder_log.read_text()[-3000:]
            time.sleep(1)
            counts = _counts(db_url)
        assert counts["realtime"] > 0, feeder_log.read_text()[-3000:]
        assert counts["stock"] > 0  # the warehouse polled
        assert counts["extracts"] >= 1  # the data team submitted an extract ...
        assert counts["staging"] > 0  # ... and the loader loaded it
        assert counts["dispositions"] > 0  # agents worked leads through the API
        assert counts["contacted"] > 0
        assert counts["lines"] >= 3

        feeder.send_signal(signal.SIGTERM)
        assert feeder.wait(15) == 0, feeder_log.read_text()[-3000:]
        assert "demo feeder stopped" in feeder_log.read_text()
    finally:
        if feeder is not None and feeder.poll() is None:
            feeder.kill()
            feeder.wait(10)
        for role in roles:
            role.stop()


def _wait_for_web(port: int, web: RoleProcess) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        web.assert_alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the web role did not answer within 30 s")


def test_the_data_team_drops_its_loaded_tables_but_the_newest(db_url: str) -> None:
    from leadflow.demo.feeder import Endpoints, Feeder, FeederConfig
    from sync.staging import Submission, submit

    feeder = Feeder(
        Settings(), Endpoints(db_url, "127.0.0.1:9", "http://127.0.0.1:9", db_url), {},
        FeederConfig(staging_keep=1),
    )  # fmt: skip
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name in ("demo_a", "demo_b", "demo_c", "demo_orphan", "theirs"):
            conn.execute(
                sql.SQL("CREATE TABLE staging.{} (phone text)").format(sql.Identifier(name))
            )
        ids = {
            name: submit(conn, "staging", Submission(name))
            for name in ("demo_a", "demo_b", "demo_c")
        }
        conn.execute(
            "UPDATE staging.extracts SET state = 'loaded' WHERE id = ANY(%s)",
            ([ids["demo_a"], ids["demo_b"]],),
        )
        feeder._drop_loaded(conn, "staging")
        left = {
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'staging' "
                "AND tablename NOT LIKE 'extract%'"
            ).fetchall()
        }
    # The newest submitted (still pending) and the data team's other tables stay.
    assert left == {"demo_c", "theirs"}
