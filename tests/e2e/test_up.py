"""`leadflow up` supervising its roles: a role that dies comes back, `status` says so, and a
`kill -9` of leadflow itself leaves no process behind."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import psycopg

from schemas.events import LeadEvent
from tests.e2e.test_cli import LEADFLOW, clean_env, leadflow, wait_for_runtime


def valid(line: str) -> bool:
    try:
        LeadEvent.model_validate_json(line)
    except ValueError:
        return False
    return True


def children_of(cwd: Path) -> dict[str, dict[str, object]]:
    data = json.loads((cwd / ".leadflow" / "runtime.json").read_text())
    return dict(data["children"])


def test_a_killed_role_is_restarted_and_a_killed_up_leaves_nothing(tmp_path: Path) -> None:
    with subprocess.Popen(
        [*LEADFLOW, "up"],
        cwd=tmp_path,
        env=clean_env(LEADFLOW_WEB_PORT="0", LEADFLOW_SUPERVISOR_RESTART_BACKOFF_INITIAL="0.2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            runtime = wait_for_runtime(tmp_path, process)
            web = runtime["web_url"]
            killed = int(children_of(tmp_path)["intake"]["pid"])  # type: ignore[call-overload]
            psutil.Process(killed).kill()

            deadline = time.monotonic() + 60
            while True:
                intake = children_of(tmp_path)["intake"]
                if intake["pid"] not in (None, killed):
                    break
                assert time.monotonic() < deadline, f"intake was not restarted: {intake}"
                time.sleep(0.2)
            assert intake["restarts"] == 1
            assert intake["last_exit"] == "killed by SIGKILL"
            others = {n: c["restarts"] for n, c in children_of(tmp_path).items() if n != "intake"}
            assert set(others.values()) == {0}, others

            status = leadflow("status", cwd=tmp_path)
            assert status.returncode == 0, status.stdout + status.stderr
            assert "roles (leadflow up)" in status.stdout
            assert "killed by SIGKILL" in status.stdout

            # The restarted intake takes events again.
            sample = Path(__file__).parents[2] / "deploy" / "simulate" / "leads.sample.jsonl"
            events = tmp_path / "events.jsonl"
            events.write_text(
                "".join(line for line in sample.read_text().splitlines(True)[:50] if valid(line))
            )
            published = leadflow("publish", str(events), cwd=tmp_path)
            assert published.returncode == 0, published.stdout + published.stderr
            with psycopg.connect(runtime["database_url"], autocommit=True) as db:
                while not db.execute("SELECT count(*) FROM leads").fetchone()[0]:  # type: ignore[index]
                    assert time.monotonic() < deadline + 60, "the restarted intake took nothing"
                    time.sleep(0.2)

            # One scrape serves every role's metrics, the restarted intake's among them.
            metrics = httpx.get(f"{web}/metrics/", timeout=10).text
            for name in (
                "leadflow_http_requests_total",  # web
                "leadflow_intake_events_total",  # intake
                "leadflow_allocation_pass_seconds",  # allocator
                "leadflow_relay_leader 1.0",  # relay: exactly one leader
                "leadflow_analytics_up",  # analytics (1 once its group has joined)
                "leadflow_rules_info",  # the web role's rules
            ):
                assert name in metrics, name

            everything = psutil.Process(process.pid).children(recursive=True)
            assert len(everything) >= 9
            process.kill()  # no chance to stop anything: the children must go by themselves
            process.wait(10)
            _, alive = psutil.wait_procs(everything, timeout=30)
            assert alive == [], f"left behind: {alive}"
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(10)
