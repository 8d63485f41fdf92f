"""The demo's content without servers: its rules, roster and configuration, and what its
generators produce, held to the real intake chain and the demo rules."""

from __future__ import annotations

import random
import tomllib
from collections import Counter
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from classify import RuleSet
from ingest.chain import Accepted, ChainConfig, IntakeChain, Record, Rejected
from leadflow.demo.feeder import pace_for, poisson
from leadflow.demo.setup import HUMAN_AGENT, OFF_SHIFT, QUEUES, SOURCE_NAME, roster, write_config
from leadflow.demo.traffic import (
    EXPECTED_REJECT,
    EXTRACT_KINDS,
    OUTCOME_WEIGHTS,
    STAGING_COLUMNS,
    EventStream,
    MessageKind,
    crm_user,
    plan_assignment,
    staging_extract,
)
from leadflow.rules import defaults_of, load
from leadflow.settings import Settings, load_settings
from schemas.lead import CustomerContext

REPO = Path(__file__).parents[2]
NOW = datetime(2026, 11, 24, 3, 30, tzinfo=UTC)


def demo_rules() -> RuleSet:
    path = Path(str(resources.files("leadflow.demo").joinpath("rules.yaml")))
    return load(path, defaults_of(Settings()))


def test_the_packaged_rules_are_deploys_example_rules() -> None:
    """One set of demo rules: the package's copy ships in the wheel, deploy/ documents it."""
    packaged = resources.files("leadflow.demo").joinpath("rules.yaml").read_text(encoding="utf-8")
    assert packaged == (REPO / "deploy" / "rules.example.yaml").read_text(encoding="utf-8")


@given(st.datetimes(timezones=st.just(UTC)))
def test_roster_works_at_any_hour(now: datetime) -> None:
    rows = {row.id: row for row in roster(now, "Asia/Shanghai")}
    assert 28 <= len(rows) <= 32
    assert rows[HUMAN_AGENT].status == "available"
    assert rows[HUMAN_AGENT].business_lines == ("*",)
    for agent in OFF_SHIFT:  # off shift whenever the demo starts
        row = rows[agent]
        shift = row.shift
        assert shift is not None
        assert not shift.contains(now.astimezone(ZoneInfo(row.timezone)).time())
    on_shift = [r for r in rows.values() if r.shift is None and r.status == "available"]
    assert len(on_shift) >= 20


def test_every_queue_line_has_an_available_agent_and_every_line_a_queue() -> None:
    rows = roster(NOW, "Asia/Shanghai")
    lines = {"enterprise_loan", "personal_credit_loan", "car_loan", "financial_leasing", "wealth_management"}  # fmt: skip
    assert {queue["business_line"] for queue in QUEUES} == lines
    for line in lines:
        skilled = [
            r
            for r in rows
            if r.status == "available"
            and r.shift is None
            and r.id != HUMAN_AGENT
            and (line in r.business_lines or "*" in r.business_lines)
        ]
        assert len(skilled) >= 3, line


def test_config_validates_keeps_the_users_settings_and_brings_the_demos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text(
        "web: {port: 9123}\nlog: {level: debug}\n"
        "queues: [{name: mine, business_line: general}]\n"
        "classification: {rules_file: elsewhere.yaml, realtime_boost: 5}\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    environ = {"LEADFLOW_CONFIG": str(user)}
    crm = "postgresql://postgres@127.0.0.1:5999/leadflow_demo_crm"
    path, env = write_config(Settings(), tmp_path / "demo", crm, environ)
    assert path.stat().st_mode & 0o077 == 0
    settings = load_settings(path, {**environ, **env})
    assert settings.web.port == 9123
    assert settings.log.level == "DEBUG"
    assert settings.classification.realtime_boost == 5
    assert settings.classification.rules_file == (tmp_path / "demo" / "rules.yaml").resolve()
    assert [q.name for q in settings.queues] == [q["name"] for q in QUEUES]
    assert all(q.call_window is None for q in settings.queues)
    assert min(q.sla for q in settings.queues) <= timedelta(minutes=2)
    (source,) = settings.sources
    assert source.name == SOURCE_NAME
    assert source.url.get_secret_value().endswith("/leadflow_demo_crm")
    # Without the variable too (e.g. `leadflow status` beside the demo): no password, so the
    # URL is in the file as the default.
    assert load_settings(path, {}).sources[0].url == source.url
    # Written again: the same result (the demo restarts on the same data directory).
    again, _ = write_config(Settings(), tmp_path / "demo", crm, environ)
    assert again.read_text(encoding="utf-8") == path.read_text(encoding="utf-8")


def test_a_password_stays_out_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    crm = "postgresql://leadflow:s3cret@db:5432/leadflow_demo_crm"
    path, env = write_config(Settings(), tmp_path / "demo", crm, {})
    assert "s3cret" not in path.read_text(encoding="utf-8")
    assert (
        load_settings(path, env)
        .sources[0]
        .url.get_secret_value()
        .endswith("@db:5432/leadflow_demo_crm")
    )


def run_stream(count: int, seed: int = 7) -> list[tuple[MessageKind, Accepted | Rejected]]:
    stream = EventStream(random.Random(seed))
    chain = IntakeChain(ChainConfig())
    out: list[tuple[MessageKind, Accepted | Rejected]] = []
    for n in range(count):
        message = stream.next(NOW + timedelta(seconds=n))
        (outcome,) = chain.process([Record(message.value, message.key)], "realtime")
        out.append((message.kind, outcome))
    return out


def test_events_are_accepted_or_rejected_as_intended() -> None:
    results = run_stream(6000)
    kinds = Counter(kind for kind, _ in results)
    assert set(kinds) == set(EXPECTED_REJECT), "every kind of message occurs"
    for kind, outcome in results:
        expected = EXPECTED_REJECT[kind]
        if expected is None:
            assert isinstance(outcome, Accepted), (kind, outcome)
        else:
            assert isinstance(outcome, Rejected), kind
            assert outcome.code == expected, (kind, outcome.detail)
    poison = sum(
        kinds[k] for k in ("not_json", "bad_utf8", "missing_customer", "naive_time", "schema_v2")
    )
    assert 0.003 < poison / len(results) < 0.03
    assert kinds["new"] > len(results) / 2


def test_redeliveries_repeat_an_event_and_returning_customers_repeat_a_phone() -> None:
    results = run_stream(3000)
    seen_ids: set[str] = set()
    seen_phones: set[str] = set()
    for kind, outcome in results:
        if not isinstance(outcome, Accepted):
            continue
        lead = outcome.lead
        if kind == "redelivery":
            assert lead.event_id in seen_ids
        elif kind in ("returning", "cross_sell"):
            assert lead.event_id not in seen_ids
            assert lead.phone in seen_phones
        seen_ids.add(lead.event_id)
        seen_phones.add(lead.phone)


def test_the_stream_exercises_every_business_line_and_the_real_time_segments() -> None:
    rules = demo_rules()
    open_lines: dict[str, set[str]] = {}
    mix: Counter[tuple[str, str]] = Counter()
    for n, (kind, outcome) in enumerate(run_stream(4000)):
        if not isinstance(outcome, Accepted) or kind == "redelivery":
            continue
        lead = outcome.lead
        lines = open_lines.setdefault(lead.phone, set())
        context = {lead.phone: CustomerContext(bool(lines), frozenset(lines))}
        (decision,) = rules.plan.run([lead], NOW + timedelta(seconds=n), context)
        lines.add(decision.business_line)
        mix[decision.business_line, decision.segment] += 1
    lines = {line for line, _ in mix}
    segments = {segment for _, segment in mix}
    assert lines == {"enterprise_loan", "personal_credit_loan", "car_loan", "financial_leasing", "wealth_management"}  # fmt: skip
    assert {
        "key_account", "pending_payment_30d", "test_drive", "new_signup", "ad_click",
        "browsed_10d_no_order", "cross_sell", "partner_batch", "general",
    } <= segments  # fmt: skip
    # Personal credit is the largest line, as in the seed's finance company.
    by_line: Counter[str] = Counter()
    for (line, _), n in mix.items():
        by_line[line] += n
    assert by_line.most_common(1)[0][0] == "personal_credit_loan"


def test_warehouse_users_are_silent_high_value_and_some_are_bad() -> None:
    rng = random.Random(3)
    users = [crm_user(rng, f"crm-{n}") for n in range(500)]
    assert len({u.user_id for u in users}) == 500
    assert all({"high_value", "vip"} & set(u.tags) for u in users)
    assert any(u.ltv >= 50_000 for u in users)
    assert any(u.ltv < 50_000 for u in users)
    assert 0 < sum(not u.mobile.isdigit() or len(u.mobile) != 11 for u in users) < 30


@pytest.mark.parametrize("kind", EXTRACT_KINDS)
def test_staging_extracts_have_the_staging_columns_and_a_little_dirt(kind: str) -> None:
    extract = staging_extract(random.Random(5), NOW, kind, 400)
    assert len(extract.rows) == 400
    assert all(len(row) == len(STAGING_COLUMNS) for row in extract.rows)
    assert 63 >= len(extract.table_name(NOW)) > 0
    names = [column for column, _ in STAGING_COLUMNS]
    phones = [row[names.index("phone")] for row in extract.rows]
    assert 0 < sum(p is None for p in phones) < 20
    stale = [
        row for row in extract.rows if NOW - row[names.index("occurred_at")] > timedelta(days=30)
    ]
    assert 0 < len(stale) < 40


def test_agents_mostly_work_their_leads() -> None:
    rng = random.Random(11)
    plans = [plan_assignment(rng) for _ in range(3000)]
    actions = Counter(plan.action for plan in plans)
    assert actions["work"] > 0.85 * len(plans)
    assert actions["ignore"] > 0
    assert actions["reject"] > 0
    outcomes = Counter(plan.outcome for plan in plans if plan.action == "work")
    assert set(outcomes) == set(OUTCOME_WEIGHTS)
    for plan in plans:
        if plan.outcome == "callback":
            assert plan.callback_in is not None
            assert timedelta(minutes=1) <= plan.callback_in <= timedelta(minutes=3)
        if plan.outcome in ("no_answer", "invalid_number"):
            assert not plan.contact  # nobody answered: no first contact, the disposition counts
        if plan.action == "reject":
            assert plan.note


@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_pace_falls_with_the_backlog_and_stays_in_bounds(a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert 0.1 <= pace_for(high, 150, 600) <= pace_for(low, 150, 600) <= 1.0
    assert pace_for(low, 150, 600) == 1.0 or low > 150


def test_poisson_counts_have_their_mean() -> None:
    rng = random.Random(1)
    samples = [poisson(rng, 0.3) for _ in range(20_000)]
    assert 0.27 < sum(samples) / len(samples) < 0.33
    assert poisson(rng, 0) == 0


def test_the_packaged_roster_and_rules_are_package_data() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    data = project["tool"]["setuptools"]["package-data"]["leadflow"]
    assert "demo/*.yaml" in data
    assert "demo/*.csv" in data
