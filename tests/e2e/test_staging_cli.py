"""The real `leadflow staging submit|status` and `leadflow run staging` as subprocesses."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg

from tests.e2e.test_cli import clean_env, leadflow


def test_submit_refuses_what_it_could_not_load_and_says_why(tmp_path: Path, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE staging.no_phone (mobile text, name text)")
    refused = leadflow("staging", "submit", "no_phone", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert refused.returncode == 1
    assert "has no column named phone (its columns: mobile, name)" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = leadflow("staging", "submit", "nowhere", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert missing.returncode == 1
    assert "table staging.nowhere does not exist" in missing.stderr
    bad = leadflow(
        "staging", "submit", "no_phone", "--priority", "101", cwd=tmp_path,
        LEADFLOW_DATABASE_URL=db_url,
    )  # fmt: skip
    assert bad.returncode == 2  # a usage error, from the option's range
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM staging.extracts").fetchone() == (0,)


def test_submit_then_the_loader_role_loads_it_and_status_shows_it(
    tmp_path: Path, db_url: str, kafka_bootstrap: str
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE staging.浏览未下单 (phone text, name text, visits int)")
        conn.execute(
            "INSERT INTO staging.浏览未下单 SELECT '1380013' || lpad(n::text, 4, '0'), '张三', n"
            " FROM generate_series(1, 500) n"
        )
        conn.execute("INSERT INTO staging.浏览未下单 VALUES ('12345', '坏', 0)")
    env = {"LEADFLOW_DATABASE_URL": db_url, "LEADFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap}
    log = tmp_path / "staging.log"
    with open(log, "wb") as out:
        role = subprocess.Popen(
            [sys.executable, "-m", "leadflow.cli", "run", "staging"],
            cwd=tmp_path,
            env=clean_env(**env, LEADFLOW_STAGING_POLL_INTERVAL="60s"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        submitted = leadflow(
            "staging", "submit", "浏览未下单", "--source", "dwh", "--business-line", "car_loan",
            "--priority", "80", cwd=tmp_path, **env,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        assert "extract 1: staging.浏览未下单 submitted" in submitted.stdout
        # Woken by the manifest's NOTIFY, not its 60 s poll.
        deadline = time.monotonic() + 60
        state = None
        while time.monotonic() < deadline:
            with psycopg.connect(db_url) as conn:
                state = conn.execute("SELECT state FROM staging.extracts WHERE id = 1").fetchone()
            if state == ("loaded",):
                break
            assert role.poll() is None, log.read_text()
            time.sleep(0.2)
        assert state == ("loaded",), log.read_text()[-3000:]

        status = leadflow("staging", "status", cwd=tmp_path, **env)
        assert status.returncode == 0, status.stderr
        for expected in ("浏览未下单", "loaded", "501/501", "500", "1"):
            assert expected in status.stdout, status.stdout
        with psycopg.connect(db_url) as conn:
            assert conn.execute(
                "SELECT business_line, priority, count(*) FROM leads GROUP BY 1, 2"
            ).fetchall() == [("car_loan", 80, 500)]
    finally:
        role.terminate()
        assert role.wait(60) == 0, log.read_text()[-3000:]


def test_status_without_a_database_explains(tmp_path: Path) -> None:
    result = leadflow("staging", "status", cwd=tmp_path)
    assert result.returncode == 1
    assert "No database with a staging manifest" in result.stderr
