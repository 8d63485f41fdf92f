"""`leadflow sources list|run|reset` as a subprocess, against a MariaDB source and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from sync.pollers import lock_source
from tests.e2e.test_cli import LEADFLOW, clean_env, leadflow
from tests.sources import MariaDB, mariadb_server

BASE = datetime(2026, 11, 1, 8, 0)  # noqa: DTZ001 - MySQL DATETIME


@pytest.fixture
def mariadb() -> Iterator[MariaDB]:
    yield from mariadb_server()


@pytest.fixture
def project(tmp_path: Path, mariadb: MariaDB, db_url: str) -> tuple[Path, str]:
    """A directory with a leadflow.yaml: a MariaDB source of 30 profiles (one invalid) and one
    whose server is down; returns it and the table."""
    table = mariadb.table(
        "user_id INT PRIMARY KEY, mobile VARCHAR(32), nick VARCHAR(64), updated_at DATETIME(6)"
    )
    rows = [(n, f"1380013{n:04d}", f"n{n}", BASE + timedelta(seconds=n // 4)) for n in range(1, 30)]
    rows.append((30, "12345", "bad", BASE + timedelta(seconds=7)))
    mariadb.insert(table, ("user_id", "mobile", "nick", "updated_at"), rows)
    (tmp_path / "leadflow.yaml").write_text(
        f"""
database:
  url: {db_url}
log:
  level: WARNING
sources:
  - name: profiles
    url: ${{DWH_URL}}
    query: >-
      SELECT user_id AS external_id, mobile AS phone, nick AS name, updated_at FROM {table}
      WHERE updated_at > :watermark ORDER BY updated_at LIMIT :limit
    watermark: updated_at
    schedule: "*/10 * * * *"
    event_type: stock_profile
    batch_size: 7
  - name: down
    url: mysql://reader:pa55w0rd@127.0.0.1:1/test
    query: SELECT * FROM t WHERE w > :watermark ORDER BY w LIMIT :limit
    watermark: w
    schedule: 5m
    event_type: stock_profile
""",
        encoding="utf-8",
    )
    return tmp_path, table


def run(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if stdin is None:
        return leadflow(*args, cwd=cwd, DWH_URL="mysql://root@127.0.0.1:3306/test")
    return subprocess.run(
        [*LEADFLOW, *args],
        cwd=cwd,
        env=clean_env(DWH_URL="mysql://root@127.0.0.1:3306/test"),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def watermark(db_url: str, source: str) -> object:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT watermark FROM poller_state WHERE source = %s", (source,)
        ).fetchone()
    return None if row is None else row[0]


def test_list_run_list_reset_run(project: tuple[Path, str], db_url: str) -> None:
    cwd, _ = project
    listed = run(cwd, "sources", "list")
    assert listed.returncode == 0, listed.stderr
    assert "profiles" in listed.stdout
    assert "never run" in listed.stdout
    assert "*/10 * * * *" in listed.stdout

    ran = run(cwd, "sources", "run", "profiles")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "source profiles: succeeded" in ran.stdout
    assert "rows read" in ran.stdout
    assert "30" in ran.stdout
    assert "invalid_phone 1" in ran.stdout
    assert "- → 2026-11-01T08:00:07" in ran.stdout
    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT count(*) FROM lead_events WHERE source = 'profiles'")
        assert stored.fetchone() == (29,)

    listed = run(cwd, "sources", "list")
    assert "2026-11-01T08:00:07" in listed.stdout
    assert "(succeeded)" in listed.stdout
    assert "30 / 30" in listed.stdout
    assert " ok " in listed.stdout
    entries = {e["name"]: e for e in json.loads(run(cwd, "sources", "list", "--json").stdout)}
    assert entries["profiles"]["state"] == "ok"
    assert entries["profiles"]["watermark_json"] == {
        "type": "datetime",
        "value": "2026-11-01T08:00:07",
    }
    assert entries["down"]["state"] == "never run"

    refused = run(cwd, "sources", "reset", "profiles", "--to", "2026-11-01T08:00:03", stdin="n\n")
    assert refused.returncode == 1
    assert "Move the watermark of profiles from 2026-11-01T08:00:07 to" in refused.stdout
    assert watermark(db_url, "profiles") == {"type": "datetime", "value": "2026-11-01T08:00:07"}

    moved = run(cwd, "sources", "reset", "profiles", "--to", "2026-11-01T08:00:03", stdin="y\n")
    assert moved.returncode == 0, moved.stderr
    assert watermark(db_url, "profiles") == {"type": "datetime", "value": "2026-11-01T08:00:03"}

    again = run(cwd, "sources", "run", "profiles")
    assert again.returncode == 0
    assert "already stored" in again.stdout
    with psycopg.connect(db_url) as conn:  # read again: no-ops
        stored = conn.execute("SELECT count(*) FROM lead_events WHERE source = 'profiles'")
        assert stored.fetchone() == (29,)

    scripted = run(cwd, "sources", "reset", "profiles", "--to", "start", "--yes")
    assert scripted.returncode == 0
    assert watermark(db_url, "profiles") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sources", "run", "nope"], "no source named 'nope' in the configuration; configured: profiles, down"),
        (["sources", "reset", "nope", "--to", "1", "--yes"], "no source named 'nope'"),
        (["sources", "reset", "profiles", "--to", "yesterday", "--yes"], "is not an ISO 8601 date-time"),
        (["sources", "reset", "profiles", "--to", "2026-11-01", "--key", "3", "--yes"], "not a keyed source"),
    ],
)  # fmt: skip
def test_unknown_names_and_bad_values_are_explained(
    project: tuple[Path, str], args: list[str], message: str
) -> None:
    cwd, _ = project
    result = run(cwd, *args)
    assert result.returncode == 2
    assert message in " ".join(result.stderr.replace("│", " ").split())
    assert "Traceback" not in result.stderr


def test_a_failing_source_exits_1_with_the_error_and_no_password(
    project: tuple[Path, str], db_url: str
) -> None:
    cwd, _ = project
    result = run(cwd, "sources", "run", "down")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "source down: failed" in result.stdout
    assert "Can't connect to MySQL server" in output
    assert "pa55w0rd" not in output
    listed = run(cwd, "sources", "list")
    assert "failing ×1" in listed.stdout
    assert "pa55w0rd" not in listed.stdout + listed.stderr


def test_run_waits_for_a_run_elsewhere_and_reset_refuses_during_one(
    project: tuple[Path, str], db_url: str
) -> None:
    cwd, _ = project
    with psycopg.connect(db_url, autocommit=True) as holder:
        assert lock_source(holder, "profiles", wait=False)  # the scheduler's run, say
        reset = run(cwd, "sources", "reset", "profiles", "--to", "2026-11-01", "--yes")
        assert reset.returncode == 1
        assert "A run of profiles is in progress" in reset.stderr
        with subprocess.Popen(
            [*LEADFLOW, "sources", "run", "profiles"],
            cwd=cwd,
            env=clean_env(DWH_URL="mysql://root@127.0.0.1:3306/test"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as waiting:
            time.sleep(3)
            assert waiting.poll() is None  # waiting for the other run
            holder.execute("SELECT pg_advisory_unlock_all()")
            out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, out + err
    assert "source profiles: succeeded" in out
