"""`leadflow report funnel` and `leadflow bench report` as a user runs them: the real command
as a subprocess against a real PostgreSQL (`LEADFLOW_DATABASE_URL`)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from pydantic import SecretStr

from allocate.allocator import Allocator, AllocatorConfig
from ingest.chain import Accepted, ChainConfig, IntakeChain, Record
from ingest.store import LeadStore
from leadflow import reports
from leadflow.rules import RulesHolder
from leadflow.settings import DatabaseSettings, Settings
from leadflow.stack import rules_classifier
from tests.e2e.test_bench_allocate import assert_cleaned_up, bench
from tests.e2e.test_bench_intake import LEADFLOW, clean_env


def leadflow(cwd: Path, db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    env.update(LEADFLOW_DATABASE_URL=db_url, COLUMNS="250")
    return subprocess.run(
        [*LEADFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def seed(db_url: str) -> None:
    """Leads from two sources (one merge, one campaign in Chinese) through the intake chain and
    the store, then assigned by the allocator."""
    events = [
        {
            "schema_version": 1,
            "event_id": f"cli-{n}",
            "occurred_at": "2026-11-24T09:15:02+08:00",
            "source": source,
            "event_type": "signup",
            "customer": {"phone": f"1350013{phone:04d}"},
            "product": "car_loan",
            **({"campaign": "双十一"} if n == 3 else {}),
        }
        for n, (source, phone) in enumerate(
            [("loan-app", 1), ("loan-app", 1), ("ad-platform", 2), ("ad-platform", 3)]
        )
    ]
    records = [Record(json.dumps(e, ensure_ascii=False).encode()) for e in events]
    accepted = [
        o for o in IntakeChain(ChainConfig()).process(records, "http") if isinstance(o, Accepted)
    ]
    settings = Settings(database=DatabaseSettings(url=SecretStr(db_url)))
    classifier = rules_classifier(RulesHolder.from_settings(settings))()
    with psycopg.connect(db_url, autocommit=True) as conn:
        LeadStore().write(conn, accepted, classifier)
        conn.execute(
            "INSERT INTO agents (id, name, business_lines, segments, capacity, daily_cap, status)"
            " VALUES ('a-1', '王芳', '{*}', '{*}', 10, 100, 'available')"
        )
        allocator = Allocator(
            AllocatorConfig(queues=(), assigned_topic="leads.assigned", implicit_call_window=None)
        )
        allocator.sync_queues(conn)
        assert allocator.allocate(conn).assigned == 3


def period() -> tuple[str, str]:
    now = datetime.now(UTC)
    return (now - timedelta(days=1)).isoformat(), (now + timedelta(days=1)).isoformat()


def test_report_funnel_shows_the_table_and_writes_the_csv(tmp_path: Path, db_url: str) -> None:
    seed(db_url)
    start, end = period()
    out = tmp_path / "funnel.csv"
    result = leadflow(
        tmp_path, db_url, "report", "funnel", "--from", start, "--to", end, "--csv", str(out)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lead funnel by source" in result.stdout
    for text in ("ad-platform", "loan-app", "total", f"CSV written to {out}"):
        assert text in result.stdout, text

    data = out.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf")
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8").removeprefix("\ufeff"))))
    assert [row["source"] for row in rows] == ["ad-platform", "loan-app", "total"]
    assert [(row["events"], row["merged"], row["leads"], row["assigned"]) for row in rows] == [
        ("2", "0", "2", "2"),
        ("2", "1", "1", "1"),
        ("4", "1", "3", "3"),
    ]
    # The same as the report computed here, column for column.
    with psycopg.connect(db_url) as conn:
        here = reports.funnel(
            conn,
            reports.Period(datetime.fromisoformat(start), datetime.fromisoformat(end)),
            ("source",),
        )
    assert list(rows[0]) == [column.name for column in here.columns]
    assert int(rows[-1]["attempts"]) == here.total["attempts"] == 3


def test_report_by_campaign_and_by_agent(tmp_path: Path, db_url: str) -> None:
    seed(db_url)
    start, end = period()
    result = leadflow(
        tmp_path, db_url, "report", "funnel", "--from", start, "--to", end, "--by", "campaign"
    )
    assert result.returncode == 0, result.stderr
    assert "双十一" in result.stdout
    assert "(none)" in result.stdout
    result = leadflow(
        tmp_path, db_url, "report", "funnel", "--from", start, "--to", end, "--by", "agent"
    )
    assert result.returncode == 0, result.stderr
    assert "agents' work by agent" in result.stdout
    assert "a-1" in result.stdout


def test_report_funnel_explains_bad_input(tmp_path: Path, db_url: str) -> None:
    result = leadflow(tmp_path, db_url, "report", "funnel", "--by", "phone")
    assert result.returncode == 2
    assert "unknown dimension" in result.stderr
    result = leadflow(
        tmp_path, db_url, "report", "funnel", "--from", "2026-12-01", "--to", "2026-11-01"
    )
    assert result.returncode == 2
    assert "from must be before to" in result.stderr
    result = leadflow(tmp_path, "postgresql://postgres@127.0.0.1:1/none", "report", "funnel")
    assert result.returncode == 1
    assert "Cannot reach PostgreSQL" in result.stderr
    for output in (result.stdout, result.stderr):
        assert "Traceback" not in output


def test_bench_report_loads_times_verifies_and_reports(tmp_path: Path) -> None:
    report, stdout = bench(tmp_path, "report", "--events", "20000", "--days", "30")
    assert report["scenario"] == "report"
    assert (report["events"], report["days"]) == (20_000, 30)
    assert report["p50_ms"] > 0
    details: dict[str, Any] = report["details"]
    assert len(details["runs_ms"]) == 7
    assert details["verified"]["events"] == 20_000
    assert details["verified"]["sources_compared"] >= 10
    assert details["cohort"]["leads"] == details["verified"]["leads"]  # 30 days of 30
    assert details["load_seconds"] > 0
    assert details["rollup_build_seconds"] > 0
    assert details["incremental_refresh"]["open_leads_changed"] >= 0
    assert details["goals"] == {"p50_ms": 2000}
    assert set(details["other_breakdowns_ms"]) == {"agent", "source,segment"}
    assert "leadflow bench report" in stdout
    assert_cleaned_up(stdout, "report")
