"""`leadflow rules check|explain|test|reload` and `leadflow bench classify` as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from leadflow.rules import LISTENER_NAME, RELOAD_CHANNEL, RulesHolder, libpq_url, watch_rules
from leadflow.settings import load_settings

LEADFLOW = [sys.executable, "-m", "leadflow.cli"]
DEPLOY = Path(__file__).parents[2] / "deploy"
DEMO_RULES = DEPLOY / "rules.example.yaml"
DEMO_CASES = DEPLOY / "rules.cases.yaml"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    env.update(extra, PYTHONWARNINGS="ignore", COLUMNS="200")
    return env


def leadflow(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LEADFLOW, *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
        timeout=180, check=False,
    )  # fmt: skip


def explained(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


CAR = """
business_lines:
  - {id: car, business_line: car_loan, when: {product: car_loan}}
  - {id: car-app, business_line: car_loan, when: {product: car_loan, channel: app}}
segments:
  - {id: hot, segment: hot, priority: 90, when: {event_type: order_pending_payment}}
"""


def test_check_lists_the_demo_rules_by_default(tmp_path: Path) -> None:
    result = leadflow("rules", "check", cwd=tmp_path)
    assert result.returncode == 0, explained(result)
    for expected in (
        "bl-enterprise-product",
        "seg-pending-payment-30d",
        "silent_high_value",
        "valid: 7 business-line and 10 segment rules, 0 warnings.",
    ):
        assert expected in result.stdout


def test_check_reports_every_mistake_with_its_position_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        "business_lines:\n"
        "  - id: car\n"
        "    business_line: car_loan\n"
        "    when: {prodcut: car_loan, age_days: {lte: thirty}}\n"
    )
    result = leadflow("rules", "check", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 1, explained(result)
    assert "rules.yaml has 2 problems" in result.stderr
    assert (
        "rules.yaml:4:12: business_lines[0].when.prodcut (rule car): unknown field 'prodcut'"
        in result.stderr
    )
    assert (
        "rules.yaml:4:47: business_lines[0].when.age_days.lte (rule car): age_days lte expects a number"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_check_warns_about_shadowed_rules_and_strict_fails_on_them(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(CAR)
    result = leadflow("rules", "check", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, explained(result)
    assert (
        "warning: rule car-app: never matches: rule car comes first with a broader condition"
        in result.stdout
    )
    strict = leadflow("rules", "check", "rules.yaml", "--strict", cwd=tmp_path)
    assert strict.returncode == 1


def test_check_of_a_missing_file_explains(tmp_path: Path) -> None:
    result = leadflow("rules", "check", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "nope.yaml: cannot read it" in result.stderr
    assert "Traceback" not in result.stderr


def test_explain_shows_each_level_and_why_earlier_rules_failed(tmp_path: Path) -> None:
    event = {
        "schema_version": 1,
        "event_id": "e-1",
        "occurred_at": "2026-11-20T09:15:02+08:00",
        "source": "loan-app",
        "event_type": "browse",
        "channel": "app",
        "customer": {"phone": "138 0013 8000", "timezone": "Asia/Shanghai"},
        "product": "cash_loan",
        "attributes": {"ordered": True},
    }
    (tmp_path / "event.json").write_text(json.dumps(event))
    result = leadflow(
        "rules", "explain", "--event", "event.json", "--rules", str(DEMO_RULES),
        "--now", "2026-11-23T10:00:00+08:00", "--returning", "--open-line", "car_loan",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, explained(result)
    out = result.stdout
    assert "business line: personal_credit_loan (by rule)" in out
    assert "product in [car_loan, used_car_loan], but product is cash_loan" in out
    assert "seg-browsed-10d-no-order" in out
    assert "not attributes.ordered = true, but attributes.ordered = true holds" in out
    assert "segment: cross_sell (by rule)" in out
    assert "seg-enterprise-key-account │ not applicable │ only for enterprise_loan" in out
    assert "decision: line personal_credit_loan, segment cross_sell, priority 55" in out


def test_explain_refuses_an_event_that_is_not_a_lead_event(tmp_path: Path) -> None:
    (tmp_path / "event.json").write_text('{"schema_version": 1, "event_id": "x"}')
    result = leadflow("rules", "explain", "--event", "event.json", cwd=tmp_path)
    assert result.returncode == 1
    assert "event.json: not a valid LeadEvent v1: occurred_at: Field required" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_demo_cases_pass(tmp_path: Path) -> None:
    result = leadflow("rules", "test", str(DEMO_RULES), "--cases", str(DEMO_CASES), cwd=tmp_path)
    assert result.returncode == 0, explained(result)
    assert "16 passed, 0 failed." in result.stdout


def test_a_failing_case_shows_a_difference_table_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(CAR)
    (tmp_path / "cases.yaml").write_text(
        "cases:\n"
        "  - name: car pending payment\n"
        "    event: {event_type: order_pending_payment, product: car_loan}\n"
        "    intake: stock\n"
        "    expect: {business_line: car_loan, segment: hot, priority: 90}\n"
        "  - name: wrong on purpose\n"
        "    event: {event_type: browse, product: car_loan}\n"
        "    expect: {segment: hot, matched_rules: [car, hot]}\n"
    )
    result = leadflow("rules", "test", "rules.yaml", "--cases", "cases.yaml", cwd=tmp_path)
    assert result.returncode == 1, explained(result)
    assert "1 passed, 1 failed." in result.stdout
    assert "differences" in result.stdout
    rows = [line.split("│") for line in result.stdout.splitlines() if "wrong on purpose" in line]
    cells = [[cell.strip() for cell in row if cell.strip()] for row in rows]
    assert ["wrong on purpose", "segment", "hot", "general"] in cells
    assert ["wrong on purpose", "matched_rules", "['car', 'hot']", "['car']"] in cells


def test_bench_classify_writes_its_report(tmp_path: Path) -> None:
    result = leadflow(
        "bench", "classify", "--leads", "20000", "--json", "out/report.json", cwd=tmp_path
    )
    assert result.returncode == 0, explained(result)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["scenario"] == "classify"
    assert (report["leads"], report["rules"]) == (20000, 50)
    assert report["rate"] > 0
    assert report["rate_per_core"] > 0
    assert "leads/s" in result.stdout


# --- reload through PostgreSQL ----------------------------------------------------------------


def test_reload_without_a_database_says_what_to_do(tmp_path: Path) -> None:
    result = leadflow("rules", "reload", cwd=tmp_path)
    assert result.returncode == 1
    assert "No workers to reach" in result.stderr


def test_reload_notifies_the_listening_workers(tmp_path: Path, empty_db_url: str) -> None:
    with psycopg.connect(
        libpq_url(empty_db_url), autocommit=True, application_name=LISTENER_NAME
    ) as listener:
        listener.execute(f"LISTEN {RELOAD_CHANNEL}")
        result = leadflow("rules", "reload", cwd=tmp_path, LEADFLOW_DATABASE_URL=empty_db_url)
        assert result.returncode == 0, explained(result)
        assert "to 1 listening worker." in result.stdout
        notices = list(listener.notifies(timeout=5, stop_after=1))
    assert len(notices) == 1
    assert notices[0].payload.startswith("version ")


def test_reload_of_a_broken_file_sends_nothing(tmp_path: Path, empty_db_url: str) -> None:
    (tmp_path / "rules.yaml").write_text("business_lines: [{id: a}]\n")
    with psycopg.connect(libpq_url(empty_db_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {RELOAD_CHANNEL}")
        result = leadflow(
            "rules", "reload", cwd=tmp_path, LEADFLOW_DATABASE_URL=empty_db_url,
            LEADFLOW_CLASSIFICATION_RULES_FILE="rules.yaml",
        )  # fmt: skip
        assert result.returncode == 1
        assert "business_line is required" in result.stderr
        assert list(listener.notifies(timeout=1, stop_after=1)) == []


async def test_a_running_worker_swaps_its_rules_on_leadflow_rules_reload(
    tmp_path: Path, empty_db_url: str
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("business_lines:\n  - {id: one, business_line: car_loan}\n")
    environ = {
        "LEADFLOW_CLASSIFICATION_RULES_FILE": str(path),
        "LEADFLOW_CLASSIFICATION_RELOAD_INTERVAL": "0s",  # only the NOTIFY can reload
    }
    settings = load_settings(environ=environ)
    holder = RulesHolder.from_settings(settings)
    stop = asyncio.Event()
    worker = asyncio.create_task(watch_rules(holder, settings, empty_db_url, stop))
    try:
        for _ in range(100):  # until the listener is connected
            done = await asyncio.create_subprocess_exec(
                *LEADFLOW, "rules", "reload", cwd=tmp_path,
                env=clean_env(LEADFLOW_DATABASE_URL=empty_db_url, **environ),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await done.communicate()
            if b"to 1 listening worker" in out:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the worker never listened")
        before = holder.rules
        path.write_text("business_lines:\n  - {id: two, business_line: wealth_management}\n")
        done = await asyncio.create_subprocess_exec(
            *LEADFLOW, "rules", "reload", cwd=tmp_path,
            env=clean_env(LEADFLOW_DATABASE_URL=empty_db_url, **environ),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert await done.wait() == 0
        for _ in range(100):
            if holder.rules is not before:
                break
            await asyncio.sleep(0.05)
        assert holder.rules.line_rules[0].id == "two"
    finally:
        stop.set()
        await asyncio.wait_for(worker, 5)


@pytest.mark.parametrize("command", ["check", "test", "reload"])
def test_rules_commands_have_help(tmp_path: Path, command: str) -> None:
    result = leadflow("rules", command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "Usage" in result.stdout
