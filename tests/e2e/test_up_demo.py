"""`leadflow up --demo` as a newcomer runs it: the real CLI on the embedded servers. Within a
couple of minutes leads from all three channels are stored, classified, assigned within their
SLA, visible to their agents, worked and recycled; /metrics and /ops show them; SIGTERM stops
everything and leaves nothing behind."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

from tests.e2e.test_cli import LEADFLOW, clean_env, wait_for_runtime

#: What the demo must show, each as SQL answering true once it does.
CHECKS: dict[str, str] = {
    "real-time events stored": "SELECT count(*) > 0 FROM lead_events WHERE intake = 'realtime'",
    "stock rows stored": "SELECT count(*) > 0 FROM lead_events WHERE intake = 'stock'",
    "staging rows stored": "SELECT count(*) > 0 FROM lead_events WHERE intake = 'staging'",
    "poison messages rejected to the DLQ": "SELECT count(*) > 0 FROM stream_minutes WHERE metric = 'dlq_code'",
    "leads of several lines and segments": "SELECT count(DISTINCT (business_line, segment)) >= 5 FROM leads",
    "leads assigned": "SELECT count(*) > 0 FROM assignments",
    "first contacts": "SELECT count(*) > 0 FROM assignments WHERE first_contact_at IS NOT NULL",
    "dispositions of several kinds": "SELECT count(DISTINCT outcome) >= 3 FROM dispositions",
    "converted leads": "SELECT count(*) > 0 FROM leads WHERE state = 'converted'",
    "leads recycled to the queue": "SELECT count(*) > 0 FROM lead_transitions WHERE from_state IN ('assigned', 'in_progress') AND to_state = 'queued'",
}  # fmt: skip


def wait_until(condition: Callable[[], list[str]], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    missing = condition()
    while missing:
        assert time.monotonic() < deadline, f"{what}: still missing {missing}"
        time.sleep(1)
        missing = condition()


def test_up_demo_feeds_all_three_channels_to_agents_then_stops_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "stdout.txt"
    with (
        out.open("w") as stdout,
        subprocess.Popen(
            [*LEADFLOW, "up", "--demo"],
            cwd=tmp_path,
            env=clean_env(LEADFLOW_WEB_PORT="0"),
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as process,
    ):
        try:
            runtime: dict[str, Any] = wait_for_runtime(tmp_path, process)
            web, database = runtime["web_url"], runtime["database_url"]
            demo = runtime["demo"]

            # What it printed: where to look, with a token that works.
            deadline = time.monotonic() + 30
            while "What to try" not in out.read_text():
                assert time.monotonic() < deadline, out.read_text()
                time.sleep(0.2)
            printed = out.read_text()
            ops_url = re.search(r"(http://\S+/ops#token=\S+)", printed)
            agent_url = re.search(r"(http://\S+/agent#token=\S+)", printed)
            assert ops_url
            assert ops_url[1] == demo["ops_url"]
            assert agent_url
            assert agent_url[1] == demo["agent_url"]
            ops_token = demo["ops_url"].split("#token=")[1]
            me = httpx.get(
                f"{web}/api/v1/me",
                headers={"Authorization": f"Bearer {demo['agent_url'].split('#token=')[1]}"},
                timeout=10,
            )
            assert me.status_code == 200, me.text
            assert me.json()["role"] == "agent"
            assert me.json()["agent_id"] == demo["agent_id"]
            assert httpx.get(f"{web}/ops", timeout=10).status_code == 200

            with psycopg.connect(database, autocommit=True) as db:

                def missing() -> list[str]:
                    return [
                        what
                        for what, sql in CHECKS.items()
                        if not db.execute(sql).fetchone()[0]  # type: ignore[index]
                    ]

                wait_until(missing, 180, "the demo")

                # Assigned within their SLA: the allocator takes back what is not contacted
                # in time, so no open assignment is long past its deadline.
                overdue = db.execute(
                    "SELECT count(*) FROM assignments WHERE status = 'open'"
                    " AND sla_deadline < now() - interval '30 seconds'"
                ).fetchone()
                assert overdue is not None
                assert overdue[0] == 0
                # No lead with two open assignments, no agent over capacity.
                over = db.execute(
                    "SELECT count(*) FROM (SELECT a.agent_id FROM assignments a"
                    " JOIN agents g ON g.id = a.agent_id WHERE a.status = 'open'"
                    " GROUP BY a.agent_id, g.capacity HAVING count(*) > g.capacity) x"
                ).fetchone()
                assert over is not None
                assert over[0] == 0

                # Visible to their agents: the queue the demo agent (the one left for a person,
                # so nobody works it) sees through the API is its open assignments in the
                # database, whatever the SLA sweep took back meanwhile.
                you = demo["agent_id"]
                token = demo["agent_url"].split("#token=")[1]

                def open_for_you() -> set[str]:
                    return {
                        str(r[0])
                        for r in db.execute(
                            "SELECT id FROM assignments WHERE agent_id = %s AND status = 'open'",
                            (you,),
                        )
                    }

                wait_until(lambda: [] if open_for_you() else [f"a lead for {you}"], 180, "demo")
                before = open_for_you()
                listed = httpx.get(
                    f"{web}/api/v1/me/assignments",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=10,
                )
                after = open_for_you()
                assert listed.status_code == 200, listed.text
                shown = {item["id"] for item in listed.json()}
                assert before & after <= shown <= before | after
                assert shown

            # /metrics and the ops pipeline show the flow.
            metrics = httpx.get(f"{web}/metrics/", timeout=10).text
            for needle in (
                'leadflow_intake_events_total{intake="realtime"',
                "leadflow_assignments_total{",
                "leadflow_poller_rows_total{",
                "leadflow_staging_rows_total{",
                "leadflow_http_requests_total{",
            ):
                assert needle in metrics, needle
            pipeline = httpx.get(
                f"{web}/api/v1/pipeline",
                headers={"Authorization": f"Bearer {ops_token}"},
                timeout=10,
            )
            assert pipeline.status_code == 200, pipeline.text
            events = pipeline.json()["intake"]["events_in_window"]
            assert all(events[channel] > 0 for channel in ("realtime", "stock", "staging")), events

            everything = psutil.Process(process.pid).children(recursive=True)
            process.send_signal(signal.SIGTERM)
            assert process.wait(90) == 0
            errors = process.communicate()[1]
            assert "Traceback" not in errors, errors[-3000:]
            _, alive = psutil.wait_procs(everything, timeout=30)
            assert alive == [], f"left behind: {alive}"
            assert not (tmp_path / ".leadflow" / "runtime.json").exists()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
