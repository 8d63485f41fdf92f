"""`leadflow agents import|list|token` as a supervisor runs them, against a real database."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

LEADFLOW = [sys.executable, "-m", "leadflow.cli"]
EXAMPLE = Path(__file__).parents[2] / "deploy" / "agents.example.csv"


def leadflow(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    environ.update(env, PYTHONWARNINGS="ignore", COLUMNS="250")
    return subprocess.run(
        [*LEADFLOW, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def explained(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def example_size() -> int:
    return len(EXAMPLE.read_text(encoding="utf-8").strip().splitlines()) - 1


def test_import_the_example_twice_then_list_it(tmp_path: Path, db_url: str) -> None:
    total = example_size()
    first = leadflow("agents", "import", str(EXAMPLE), cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert first.returncode == 0, explained(first)
    assert f"imported {total} agents: {total} new, 0 updated, 0 unchanged" in first.stdout
    again = leadflow("agents", "import", str(EXAMPLE), cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert again.returncode == 0, explained(again)
    assert f"imported {total} agents: 0 new, 0 updated, {total} unchanged" in again.stdout

    table = leadflow("agents", "list", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert table.returncode == 0, explained(table)
    for expected in (
        f"agents ({total})",
        "周建国",
        "企业贷款一组",
        "enterprise_loan",
        "key_account",
        "18:00-02:00 Asia/Shanghai",
        "any time Asia/Shanghai",
        "0/4",  # open/capacity of ent-01
        "0/30",  # today/daily cap of ent-01
        "available",
    ):
        assert expected in table.stdout, expected

    listed = leadflow("agents", "list", "--json", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert listed.returncode == 0, explained(listed)
    agents = {agent["id"]: agent for agent in json.loads(listed.stdout)}
    assert len(agents) == total
    assert agents["night-01"] | {"status_changed_at": None} == {
        "id": "night-01",
        "name": "曹阳",
        "team": "夜班支援",
        "business_lines": ["*"],
        "segments": ["*"],
        "languages": ["zh"],
        "status": "offline",
        "status_changed_at": None,
        "timezone": "Asia/Shanghai",
        "shift": "21:00-06:00",
        "capacity": 8,
        "open": 0,
        "daily_cap": 100,
        "today": 0,
        "weight": 1.0,
    }


def test_a_bad_file_lists_every_error_and_imports_nothing(tmp_path: Path, db_url: str) -> None:
    roster = tmp_path / "roster.csv"
    roster.write_text(
        "\ufeffid,name,business_lines,capacity,skill\n"
        "a-01,王芳,car_loan,5,x\n"
        "a-02,,car_loan,five,y\n"
        "a-01,李雷,car loan,3,z\n",
        encoding="utf-8",
    )
    result = leadflow("agents", "import", "roster.csv", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert result.returncode == 1, explained(result)
    assert "roster.csv:1: unknown column 'skill'" in result.stderr
    assert "Traceback" not in result.stderr

    roster.write_text(roster.read_text(encoding="utf-8").replace(",skill", ",team"))
    result = leadflow("agents", "import", "roster.csv", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert result.returncode == 1, explained(result)
    for expected in (
        "roster.csv: 4 errors, nothing imported:",
        "roster.csv:3: name: required",
        "roster.csv:3: capacity: 'five' is not a whole number",
        "roster.csv:4: business_lines: 'car loan' is not a name",
        "roster.csv:4: id: 'a-01' is already on line 2",
    ):
        assert expected in result.stderr, expected
    listed = leadflow("agents", "list", "--json", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert json.loads(listed.stdout) == []

    roster.write_bytes("id,name,business_lines\na-01,王芳,*\n".encode("gbk"))
    result = leadflow("agents", "import", "roster.csv", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert result.returncode == 1
    assert "roster.csv:2: not UTF-8 text" in result.stderr

    result = leadflow("agents", "import", "missing.csv", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert result.returncode == 1
    assert "Cannot read missing.csv" in result.stderr


def test_a_token_is_printed_once_and_stored_hashed(tmp_path: Path, db_url: str) -> None:
    imported = leadflow(
        "agents", "import", str(EXAMPLE), cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url
    )
    assert imported.returncode == 0, explained(imported)
    result = leadflow(
        "agents", "token", "car-01", "--label", "desk 7", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url
    )
    assert result.returncode == 0, explained(result)
    token = result.stdout.strip()
    assert token.startswith("lf_")
    assert "\n" not in token
    assert "will not be shown again" in result.stderr
    assert token not in result.stderr
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT token_hash, role, agent_id, label FROM api_tokens").fetchall()
    assert rows == [(hashlib.sha256(token.encode()).hexdigest(), "agent", "car-01", "desk 7")]

    unknown = leadflow("agents", "token", "nobody", cwd=tmp_path, LEADFLOW_DATABASE_URL=db_url)
    assert unknown.returncode == 1
    assert "no agent with id 'nobody'" in unknown.stderr
    assert unknown.stdout == ""


def test_without_a_database_each_command_explains(tmp_path: Path) -> None:
    down = "postgresql://app:hunter2@127.0.0.1:1/leadflow"
    for args in (["import", str(EXAMPLE)], ["list"], ["token", "a-01"]):
        result = leadflow("agents", *args, cwd=tmp_path, LEADFLOW_DATABASE_URL=down)
        assert result.returncode == 1, explained(result)
        assert "Cannot reach PostgreSQL at" in result.stderr
        assert "hunter2" not in result.stderr
        assert "Traceback" not in result.stderr
    unset = leadflow("agents", "list", cwd=tmp_path)
    assert unset.returncode == 1
    assert "No database to manage agents in" in unset.stderr


def test_a_database_behind_the_schema_says_to_upgrade(tmp_path: Path, empty_db_url: str) -> None:
    result = leadflow("agents", "list", cwd=tmp_path, LEADFLOW_DATABASE_URL=empty_db_url)
    assert result.returncode == 1, explained(result)
    assert "run `leadflow db upgrade` first" in result.stderr
