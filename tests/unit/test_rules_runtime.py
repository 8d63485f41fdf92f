"""The rules of a running process: the configured file, atomic reloads, the watcher (file
changes and SIGHUP), events and case files for `leadflow rules`."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from classify import Defaults
from leadflow.rules import (
    DEMO_RULES,
    RulesHolder,
    RulesInvalid,
    defaults_of,
    lead_from_event,
    load_cases,
    rules_path,
    run_cases,
    watch_rules,
)
from leadflow.settings import Settings, load_settings
from schemas.events import LEAD_EVENT_EXAMPLE, LeadEvent

CAR = "business_lines:\n  - {id: car, business_line: car_loan, when: {product: car_loan}}\n"
WEALTH = (
    "business_lines:\n  - {id: fund, business_line: wealth_management, when: {product: fund}}\n"
)
BROKEN = "business_lines:\n  - {id: car, business_line: car_loan, when: {prodcut: car_loan}}\n"


def reloads(outcome: str) -> float:
    return REGISTRY.get_sample_value("leadflow_rules_reloads_total", {"outcome": outcome}) or 0.0


def settings_for(path: Path, tmp_path: Path, **environ: str) -> Settings:
    env = {"LEADFLOW_CLASSIFICATION_RULES_FILE": str(path), **environ}
    return load_settings(environ=env)


def write(path: Path, text: str) -> None:
    # a new inode each time, as editors and `kubectl` config maps do
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


async def eventually(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


# --- settings --------------------------------------------------------------------------------


def test_without_a_rules_file_the_demo_rules_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings.classification.rules_file is None
    assert rules_path(settings) == DEMO_RULES
    assert DEMO_RULES.is_file()
    holder = RulesHolder.from_settings(settings)
    assert len(holder.rules.line_rules) >= 5


def test_a_relative_rules_file_is_read_beside_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "leadflow.yaml"
    config.parent.mkdir()
    config.write_text(
        "classification:\n  rules_file: rules/mine.yaml\n  default_segment: misc\n"
        "  realtime_boost: 0\n  reload_interval: 500ms\n"
    )
    settings = load_settings(config, environ={})
    assert rules_path(settings) == tmp_path / "conf" / "rules" / "mine.yaml"
    assert settings.classification.reload_interval == timedelta(milliseconds=500)
    assert defaults_of(settings) == Defaults("general", "misc", 50, 0)
    absolute = load_settings(
        config, environ={"LEADFLOW_CLASSIFICATION_RULES_FILE": str(tmp_path / "x.yaml")}
    )
    assert rules_path(absolute) == tmp_path / "x.yaml"


# --- the holder ------------------------------------------------------------------------------


def test_a_broken_file_at_start_stops_with_the_file_position_and_rule(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(BROKEN)
    with pytest.raises(RulesInvalid) as caught:
        RulesHolder(path, Defaults())
    message = str(caught.value)
    assert f"{path}:2:" in message
    assert "(rule car)" in message
    assert "unknown field 'prodcut'" in message


def test_missing_demo_rules_say_which_setting_to_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import leadflow.rules

    monkeypatch.setattr(leadflow.rules, "DEMO_RULES", tmp_path / "gone.yaml")
    with pytest.raises(RulesInvalid, match="LEADFLOW_CLASSIFICATION_RULES_FILE"):
        RulesHolder.from_settings(load_settings(environ={}))


def test_reload_applies_valid_changes_refuses_broken_ones_and_counts_both(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(CAR)
    holder = RulesHolder(path, Defaults())
    first = holder.rules
    assert not holder.changed_on_disk()

    before = {outcome: reloads(outcome) for outcome in ("applied", "unchanged", "refused")}
    assert holder.reload("test") == "unchanged"
    path.write_text("# a comment changes nothing\n" + CAR)
    assert holder.changed_on_disk()
    assert holder.reload("test") == "unchanged"
    assert holder.rules is first

    write(path, BROKEN)
    assert holder.reload("test") == "refused"
    assert holder.rules is first  # the old rules keep running

    write(path, WEALTH)
    assert holder.reload("test") == "applied"
    assert holder.rules.version != first.version
    assert holder.rules.line_rules[0].business_line == "wealth_management"
    assert (
        REGISTRY.get_sample_value(
            "leadflow_rules_info", {"version": holder.rules.version, "file": str(path)}
        )
        == 1
    )
    after = {outcome: reloads(outcome) for outcome in ("applied", "unchanged", "refused")}
    assert {k: after[k] - before[k] for k in after} == {"applied": 1, "unchanged": 2, "refused": 1}


# --- the watcher -----------------------------------------------------------------------------


async def test_the_watcher_picks_up_a_changed_file_and_survives_a_broken_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(CAR)
    settings = settings_for(path, tmp_path, LEADFLOW_CLASSIFICATION_RELOAD_INTERVAL="20ms")
    holder = RulesHolder.from_settings(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(watch_rules(holder, settings, None, stop))
    try:
        refused = reloads("refused")
        write(path, BROKEN)
        await eventually(lambda: reloads("refused") > refused)
        assert holder.rules.line_rules[0].id == "car"
        write(path, WEALTH)
        await eventually(lambda: holder.rules.line_rules[0].id == "fund")
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


async def test_sighup_reloads_when_polling_is_off(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(CAR)
    settings = settings_for(path, tmp_path, LEADFLOW_CLASSIFICATION_RELOAD_INTERVAL="0s")
    holder = RulesHolder.from_settings(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(watch_rules(holder, settings, None, stop))
    try:
        await asyncio.sleep(0.05)  # the handler is installed once the task runs
        write(path, WEALTH)
        await asyncio.sleep(0.1)
        assert holder.rules.line_rules[0].id == "car"  # not polling
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: holder.rules.line_rules[0].id == "fund")
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)
    # the handler went with the watcher
    assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


async def test_the_watcher_stops_promptly(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(CAR)
    settings = settings_for(path, tmp_path, LEADFLOW_CLASSIFICATION_RELOAD_INTERVAL="1h")
    stop = asyncio.Event()
    task = asyncio.create_task(
        watch_rules(RulesHolder.from_settings(settings), settings, None, stop)
    )
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 1)


# --- events and cases ------------------------------------------------------------------------


def test_a_lead_from_an_event_keeps_what_rules_read() -> None:
    event = LeadEvent.model_validate(LEAD_EVENT_EXAMPLE)
    lead = lead_from_event(event, "stock")
    assert (lead.event_type, lead.source, lead.channel, lead.product) == (
        "order_pending_payment",
        "loan-app",
        "app",
        "personal_credit_loan",
    )
    assert (lead.region, lead.timezone, lead.consent, lead.intake) == (
        "CN-31",
        "Asia/Shanghai",
        True,
        "stock",
    )
    assert lead.attributes == {"amount": 5000, "tags": ["silent", "high_value"]}
    assert lead.occurred_at == event.occurred_at


def cases_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cases.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_cases_fill_in_the_event_and_report_differences(tmp_path: Path) -> None:
    holder_path = tmp_path / "rules.yaml"
    holder_path.write_text(
        CAR + "segments:\n  - {id: new, segment: fresh, priority: 70, when: {age_days: {lte: 1}}}\n"
    )
    rules = RulesHolder(holder_path, Defaults()).rules
    path = cases_file(
        tmp_path,
        """
now: "2026-11-23T10:00:00+08:00"
cases:
  - name: right
    event: {event_type: browse, product: car_loan}
    intake: stock
    expect: {business_line: car_loan, segment: fresh, priority: 70, matched_rules: [car, new]}
  - name: wrong
    event: {event_type: browse}
    age_days: 3
    customer: {returning: true, open_lines: [car_loan]}
    expect: {business_line: car_loan, segment: general}
""",
    )
    cases = load_cases(path)
    assert cases[0].now == datetime(2026, 11, 23, 2, tzinfo=UTC)
    assert cases[1].lead.occurred_at == cases[1].now - timedelta(days=3)
    assert cases[1].context.open_lead_lines == {"car_loan"}
    right, wrong = run_cases(rules, cases)
    assert right.passed
    assert not wrong.passed
    assert wrong.differences == [("business_line", "car_loan", "general")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cases: 3\n", "expected a mapping with a list of `cases`"),
        ("now: yesterday\ncases: []\n", "is not an ISO 8601 time"),
        ("now: '2026-01-01T00:00:00'\ncases: []\n", "needs a UTC offset"),
        ("cases:\n  - {name: a, expect: {segment: x}}\n", "cases[0] (a): `event` is required"),
        (
            "cases:\n  - {name: a, event: {event_type: 'Not A Slug'}, expect: {segment: x}}\n",
            "not a valid LeadEvent: event_type",
        ),
        (
            "cases:\n  - {name: a, event: {event_type: x}, expect: {colour: x}}\n",
            "expect is a mapping",
        ),
        (
            "cases:\n  - {name: a, event: {event_type: x}, expect: {segment: x}, typo: 1}\n",
            "unknown keys ['typo']",
        ),
        (
            "cases:\n  - {event: {event_type: x}, intake: kafka, expect: {segment: x}}\n",
            "intake is one of",
        ),
        ("cases: [\n", "not valid YAML"),
    ],
)
def test_bad_case_files_name_the_case_and_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(RulesInvalid) as caught:
        load_cases(cases_file(tmp_path, text))
    assert message in str(caught.value)
    assert str(tmp_path / "cases.yaml") in str(caught.value)
