"""The real `leadflow` command as a subprocess: up, status, db upgrade, errors, help."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

LEADFLOW = [sys.executable, "-m", "leadflow.cli"]
CONTRACT_COMMANDS = [
    "up", "run", "db", "publish", "staging", "sources", "rules", "agents", "status",
    "simulate", "report", "bench",
]  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    env.update(extra, PYTHONWARNINGS="ignore", COLUMNS="200")
    return env


def leadflow(
    *args: str, cwd: Path, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LEADFLOW, *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip


def wait_for_runtime(
    cwd: Path, process: subprocess.Popen[str], timeout: float = 90
) -> dict[str, str]:
    path = cwd / ".leadflow" / "runtime.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"leadflow up exited early:\n{process.communicate()[1]}")
        if path.exists():
            try:
                return dict(json.loads(path.read_text()))
            except ValueError:
                pass
        time.sleep(0.2)
    raise AssertionError("leadflow up did not come up")


@pytest.fixture
def running_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], Path]]:
    with subprocess.Popen(
        [*LEADFLOW, "up"],
        cwd=tmp_path,
        env=clean_env(LEADFLOW_WEB_PORT="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as in a terminal
    ) as process:
        try:
            yield process, wait_for_runtime(tmp_path, process), tmp_path
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, "ctrl-c"])
def test_up_is_ready_then_stops_cleanly_leaving_nothing_behind(
    running_up: tuple[subprocess.Popen[str], dict[str, str], Path], stop: signal.Signals | str
) -> None:
    process, runtime, cwd = running_up
    ready = httpx.get(f"{runtime['web_url']}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"

    status = leadflow("status", cwd=cwd)
    assert status.returncode == 0, status.stdout + status.stderr
    for expected in ("PostgreSQL", "up (18", "leads.raw", "leads.dlq", "leads.assigned", "queued"):
        assert expected in status.stdout

    children = psutil.Process(process.pid).children(recursive=True)
    roles = {name: spec["pid"] for name, spec in runtime["children"].items()}  # type: ignore[attr-defined]
    assert set(roles) == {
        "web",
        "intake",
        "allocator",
        "relay",
        "staging",
        "scheduler",
        "analytics",
    }
    assert set(roles.values()) <= {child.pid for child in children}  # each role its own process
    assert len(children) >= 9  # and postgres (with its workers) and the broker
    if stop == "ctrl-c":  # a terminal signals the whole foreground process group
        os.killpg(process.pid, signal.SIGINT)
    else:
        assert isinstance(stop, signal.Signals)
        process.send_signal(stop)
    assert process.wait(60) == 0
    errors = process.communicate()[1]
    # The roles drained before the servers stopped: no role met a server going away.
    assert "shutting down" not in errors
    assert "Connection at" not in errors
    _, gone_alive = psutil.wait_procs(children, timeout=15)
    assert gone_alive == [], f"left behind: {gone_alive}"
    assert not (cwd / ".leadflow" / "runtime.json").exists()


def test_up_with_a_bad_config_explains_and_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "leadflow.yaml").write_text("kafka:\n  bootstrap: nope\nweb:\n  prot: 1\n")
    result = leadflow("up", cwd=tmp_path)
    assert result.returncode == 1
    assert "leadflow.yaml" in result.stderr
    assert "kafka.bootstrap" in result.stderr
    assert "web.prot: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".leadflow").exists()


def test_up_with_a_missing_database_explains(tmp_path: Path) -> None:
    result = leadflow(
        "up", cwd=tmp_path, LEADFLOW_DATABASE_URL="postgresql://app:pw@127.0.0.1:1/leadflow"
    )
    assert result.returncode == 1
    assert "Cannot reach PostgreSQL at" in result.stderr
    assert ":pw@" not in result.stderr
    assert "Traceback" not in result.stderr


def test_up_with_an_unreachable_broker_explains(tmp_path: Path, empty_db_url: str) -> None:
    result = leadflow(
        "up",
        cwd=tmp_path,
        LEADFLOW_DATABASE_URL=empty_db_url,
        LEADFLOW_KAFKA_BOOTSTRAP="127.0.0.1:1",
    )
    assert result.returncode == 1
    assert "Cannot reach the Kafka broker at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_on_a_database_not_yet_migrated_explains(
    tmp_path: Path, empty_db_url: str, kafka_bootstrap: str
) -> None:
    result = leadflow(
        "run", "allocator", cwd=tmp_path,
        LEADFLOW_DATABASE_URL=empty_db_url, LEADFLOW_KAFKA_BOOTSTRAP=kafka_bootstrap,
    )  # fmt: skip
    assert result.returncode == 1
    assert "is at schema revision none (leadflow never migrated it)" in result.stderr
    assert "Run `leadflow db upgrade` first" in result.stderr
    assert "Traceback" not in result.stderr
    assert "allocator started" not in result.stderr


def test_a_role_that_fails_exits_1_with_its_traceback_logged_once(
    tmp_path: Path, db_url: str, kafka_bootstrap: str
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:  # at head, but not as the code knows it
        conn.execute("DROP TABLE leads CASCADE")
    result = leadflow(
        "run", "allocator", cwd=tmp_path,
        LEADFLOW_DATABASE_URL=db_url, LEADFLOW_KAFKA_BOOTSTRAP=kafka_bootstrap,
    )  # fmt: skip
    assert result.returncode == 1
    errors = result.stderr
    assert "role failed; stopping" in errors
    assert "role traceback" in errors
    # Logged (where personal data is masked), not printed again by the interpreter.
    assert errors.count("Traceback (most recent call last)") == 1
    last = errors.strip().splitlines()[-1]
    assert last.startswith("error: the allocator role failed: UndefinedTable"), last


def test_db_upgrade_then_status_against_configured_servers(
    tmp_path: Path, empty_db_url: str, kafka_bootstrap: str
) -> None:
    upgraded = leadflow("db", "upgrade", cwd=tmp_path, LEADFLOW_DATABASE_URL=empty_db_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "schema revision" in upgraded.stdout
    with psycopg.connect(empty_db_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (id, phone_e164) VALUES (1, '+8613800138000')")
        conn.execute(
            "INSERT INTO leads (customer_id, business_line, segment, priority, state, intake,"
            " first_event_at, last_event_at, queued_at)"
            " VALUES (1, 'car_loan', 'new', 50, 'queued', 'realtime', now(), now(), now())"
        )
        conn.execute(
            "INSERT INTO agents (id, name, capacity, daily_cap, status)"
            " VALUES ('a1', 'A', 5, 50, 'available')"
        )
    status = leadflow(
        "status", cwd=tmp_path, LEADFLOW_DATABASE_URL=empty_db_url, LEADFLOW_KAFKA_BOOTSTRAP=kafka_bootstrap,
        LEADFLOW_TOPICS_RAW="status.only.raw",
    )  # fmt: skip
    assert status.returncode == 1  # topics were never created here: not healthy, and it says so
    assert "current" in status.stdout
    assert "missing" in status.stdout
    assert "queues" in status.stdout  # one lead waiting, not yet routed: queue "-"
    assert "1 available" in status.stdout
    for headline in ("intake, last 30 min", "leads by state", "SLA:", "speed to lead"):
        assert headline in status.stdout

    # --watch redraws until Ctrl-C, then ends cleanly.
    env = clean_env(LEADFLOW_DATABASE_URL=empty_db_url, LEADFLOW_KAFKA_BOOTSTRAP=kafka_bootstrap)
    watching = subprocess.Popen(
        [*LEADFLOW, "status", "--watch"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(6)
    watching.send_signal(signal.SIGINT)
    out, errors = watching.communicate(timeout=30)
    assert watching.returncode == 0, errors
    assert "1 available" in out
    assert "Traceback" not in errors


def test_status_with_nothing_running_says_what_to_do(tmp_path: Path) -> None:
    result = leadflow("status", cwd=tmp_path)
    assert result.returncode == 1
    assert "no `leadflow up`" in result.stderr


def test_help_lists_every_contract_command(tmp_path: Path) -> None:
    result = leadflow("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in CONTRACT_COMMANDS:
        assert f" {command} " in result.stdout, command


def test_up_on_a_taken_web_port_explains_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = leadflow("up", cwd=tmp_path, LEADFLOW_WEB_PORT=port)
    assert result.returncode == 1
    assert f"Cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "LEADFLOW_WEB_PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".leadflow" / "postgres").exists()


def test_publish_without_a_broker_explains(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text("{}\n")
    result = leadflow("publish", "events.jsonl", cwd=tmp_path)
    assert result.returncode == 1
    assert "No Kafka broker to publish to" in result.stderr
