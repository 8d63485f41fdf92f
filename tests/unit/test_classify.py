"""The classification stage by example: order, scopes, defaults, hints, boost, derived fields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from classify import Defaults, RuleSet, classify, explain, lint, load_rules, parse_rules
from schemas.lead import CustomerContext, Hints, Lead

NOW = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # 10:00 Monday in Shanghai, 21:00 Sunday in NY
DEMO = Path(__file__).parents[2] / "deploy" / "rules.example.yaml"


def lead(**fields: Any) -> Lead:
    values: dict[str, Any] = {
        "event_id": "e-1",
        "occurred_at": NOW - timedelta(hours=1),
        "source": "loan-app",
        "event_type": "browse",
        "phone": "+8613800138000",
        "intake": "realtime",
    }
    values.update(fields)
    return Lead(**values)


def rules(text: str, defaults: Defaults | None = None) -> RuleSet:
    return parse_rules(text, source="t.yaml", defaults=defaults)


ORDERED = """
defaults: {business_line: fallback_line, segment: fallback_segment, priority: 20}
business_lines:
  - {id: first, business_line: one, when: {channel: app}}
  - {id: second, business_line: two, when: {channel: [app, web]}}
segments:
  - {id: s-one-only, lines: [one], segment: for_one, priority: 70, when: {event_type: browse}}
  - {id: s-any, segment: any_line, priority: 60, sla_class: warm, when: {event_type: browse}}
"""


def test_the_first_matching_rule_wins_at_each_level() -> None:
    ruleset = rules(ORDERED)
    app, web = classify([lead(channel="app"), lead(channel="web", intake="stock")], ruleset, NOW)
    assert (app.business_line, app.segment, app.matched_rules) == (
        "one",
        "for_one",
        ("first", "s-one-only"),
    )
    assert (web.business_line, web.segment, web.priority, web.sla_class) == (
        "two",
        "any_line",
        60,
        "warm",
    )
    assert web.matched_rules == ("second", "s-any")
    assert app.rules_version == web.rules_version == ruleset.version


def test_swapping_two_rules_changes_the_answer_and_the_version() -> None:
    swapped = ORDERED.replace("first, business_line: one", "tmp").replace(
        "second, business_line: two", "first, business_line: one"
    )
    swapped = swapped.replace("tmp", "second, business_line: two")
    before, after = rules(ORDERED), rules(swapped)
    assert classify([lead(channel="app")], after, NOW)[0].business_line == "two"
    assert before.version != after.version


def test_defaults_apply_when_nothing_matches() -> None:
    (decision,) = classify(
        [lead(channel=None, event_type="signup", intake="stock")], rules(ORDERED), NOW
    )
    assert (decision.business_line, decision.segment, decision.priority) == (
        "fallback_line",
        "fallback_segment",
        20,
    )
    assert decision.matched_rules == ()
    assert decision.sla_class is None


def test_defaults_come_from_the_caller_unless_the_file_sets_them() -> None:
    text = "business_lines: []\nsegments: []\n"
    given = Defaults(business_line="general", segment="misc", priority=40, realtime_boost=5)
    (decision,) = classify([lead()], rules(text, given), NOW)
    assert (decision.business_line, decision.segment, decision.priority) == ("general", "misc", 45)
    (decision,) = classify([lead(intake="stock", event_type="signup")], rules(ORDERED, given), NOW)
    assert (decision.business_line, decision.segment, decision.priority) == (
        "fallback_line",
        "fallback_segment",
        20,
    )


def test_an_empty_file_is_valid_and_gives_the_defaults() -> None:
    (decision,) = classify([lead(intake="staging")], rules(""), NOW)
    default = Defaults()
    assert (decision.business_line, decision.segment, decision.priority) == (
        default.business_line,
        default.segment,
        default.priority,
    )


BOOST = """
defaults: {realtime_boost: 15}
segments:
  - {id: hot, segment: hot, priority: 95, when: {event_type: order_pending_payment}}
  - {id: warm, segment: warm, priority: 50, when: {event_type: browse}}
"""


@pytest.mark.parametrize(
    ("intake", "event_type", "priority"),
    [
        ("realtime", "browse", 65),
        ("http", "browse", 65),
        ("stock", "browse", 50),
        ("staging", "browse", 50),
        ("realtime", "order_pending_payment", 100),  # capped
    ],
)
def test_real_time_leads_get_the_boost_capped_at_100(
    intake: str, event_type: str, priority: int
) -> None:
    (decision,) = classify([lead(intake=intake, event_type=event_type)], rules(BOOST), NOW)
    assert decision.priority == priority


def test_hints_override_the_levels_they_name() -> None:
    ruleset = rules(ORDERED)
    hinted = [
        lead(channel="app", hints=Hints(business_line="car_loan")),
        lead(channel="app", hints=Hints(segment="vip")),
        lead(channel="app", hints=Hints(priority=7)),
        lead(channel="app", hints=Hints(priority=250)),
        lead(channel="app", hints=Hints()),
    ]
    line, segment, priority, clamped, empty = classify(hinted, ruleset, NOW)
    # the hinted line is not scoped to s-one-only, so the any-line rule applies
    assert (line.business_line, line.segment, line.matched_rules) == (
        "car_loan",
        "any_line",
        ("s-any",),
    )
    assert (segment.business_line, segment.segment, segment.matched_rules) == (
        "one",
        "vip",
        ("first",),
    )
    assert segment.priority == 20  # the default priority (this file has no real-time boost)
    assert (priority.segment, priority.priority) == ("for_one", 7)  # a hinted priority: no boost
    assert clamped.priority == 100
    assert empty.matched_rules == ("first", "s-one-only")


CONTEXT = """
segments:
  - {id: cross, segment: cross_sell, priority: 40, when: {open_leads_other_lines: {gte: 1}}}
  - {id: back, segment: returning, priority: 30, when: {is_returning_customer: true}}
business_lines:
  - {id: car, business_line: car_loan, when: {product: car_loan}}
"""


def test_customer_context_counts_open_leads_of_other_lines_only() -> None:
    ruleset = rules(CONTEXT)
    car = lead(product="car_loan", phone="+8613800000001")
    other = lead(product="car_loan", phone="+8613800000002")
    new = lead(product="car_loan", phone="+8613800000003")
    context = {
        car.phone: CustomerContext(True, frozenset({"car_loan"})),
        other.phone: CustomerContext(True, frozenset({"car_loan", "wealth_management"})),
    }
    decisions = classify([car, other, new], ruleset, NOW, context)
    assert [d.segment for d in decisions] == ["returning", "cross_sell", "general"]


def test_age_days_is_now_minus_occurred_at() -> None:
    ruleset = rules("segments:\n  - {id: recent, segment: recent, when: {age_days: {lte: 30}}}\n")
    exactly = lead(occurred_at=NOW - timedelta(days=30))
    just_over = lead(occurred_at=NOW - timedelta(days=30, seconds=1))
    future = lead(occurred_at=NOW + timedelta(days=1))
    assert [d.segment for d in classify([exactly, just_over, future], ruleset, NOW)] == [
        "recent",
        "general",
        "recent",
    ]


def test_local_hour_and_weekday_follow_the_leads_timezone_with_utc_as_fallback() -> None:
    ruleset = rules(
        """
segments:
  - {id: morning, segment: morning_monday, when: {hour_local: 10, weekday_local: 1}}
  - {id: evening, segment: evening_sunday, when: {hour_local: {gte: 20}, weekday_local: 7}}
  - {id: utc, segment: utc_two, when: {hour_local: 2}}
"""
    )
    shanghai = lead(timezone="Asia/Shanghai")
    new_york = lead(timezone="America/New_York")
    unknown = lead(timezone=None)
    broken = lead(timezone="Not/A_Zone")
    hostile = lead(timezone="../../etc/passwd")
    decisions = classify([shanghai, new_york, unknown, broken, hostile], ruleset, NOW)
    assert [d.segment for d in decisions] == [
        "morning_monday",
        "evening_sunday",
        "utc_two",
        "utc_two",
        "utc_two",
    ]


def test_attribute_values_compare_by_json_type() -> None:
    ruleset = rules(
        """
segments:
  - {id: one, segment: number_one, when: {attributes.level: 1}}
  - {id: flag, segment: true_flag, when: {attributes.level: true}}
  - {id: text, segment: text_one, when: {attributes.level: "1"}}
  - {id: tag, segment: tagged, when: {attributes.tags: {contains: 1}}}
  - {id: deep, segment: deep, when: {attributes.profile.ltv: {gt: 100}}}
"""
    )
    cases = [
        ({"level": 1}, "number_one"),
        ({"level": 1.0}, "number_one"),
        ({"level": True}, "true_flag"),
        ({"level": "1"}, "text_one"),
        ({"tags": [True]}, "general"),
        ({"tags": ["1", 1]}, "tagged"),
        ({"profile": {"ltv": 101}}, "deep"),
        ({"profile": "not an object"}, "general"),
        ({"level": [1]}, "general"),
        ({}, "general"),
    ]
    decisions = classify([lead(attributes=a) for a, _ in cases], ruleset, NOW)
    assert [d.segment for d in decisions] == [expected for _, expected in cases]


def test_missing_values_fail_every_test_but_ne_not_in_and_exists_false() -> None:
    ruleset = rules(
        """
business_lines:
  - {id: eq, business_line: eq, when: {channel: app}}
  - {id: lt, business_line: lt, when: {attributes.amount: {lt: 5}}}
  - {id: starts, business_line: starts, when: {campaign: {starts_with: x}}}
  - {id: ne, business_line: ne, when: {channel: {ne: app}, campaign: {not_in: [a]}, region: null}}
"""
    )
    (decision,) = classify([lead()], ruleset, NOW)
    assert decision.business_line == "ne"


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        classify([lead()], rules(ORDERED), datetime(2026, 1, 1))  # noqa: DTZ001 - the point


def test_the_version_ignores_comments_and_layout() -> None:
    spaced = "# comment\n" + ORDERED.replace("{channel: app}", "{ channel:   app }")
    assert rules(ORDERED).version == rules(spaced).version


def test_the_demo_rules_load_and_have_no_warnings() -> None:
    demo = load_rules(DEMO)
    assert {r.business_line for r in demo.line_rules} == {
        "enterprise_loan",
        "personal_credit_loan",
        "car_loan",
        "financial_leasing",
        "wealth_management",
    }
    assert {"pending_payment_30d", "browsed_10d_no_order", "silent_high_value"} <= {
        r.segment for r in demo.segment_rules
    }
    assert lint(demo) == []


def test_explain_names_the_failing_condition_of_each_earlier_rule() -> None:
    ruleset = rules(
        """
business_lines:
  - {id: car, business_line: car_loan, when: {product: car_loan}}
  - {id: recent-app, business_line: app_line, when: {channel: app, age_days: {lte: 1}}}
segments:
  - {id: car-only, lines: [car_loan], segment: car_seg, when: {event_type: browse}}
  - {id: either, segment: either, when: {any: [{event_type: signup}, {attributes.tags: {contains: vip}}]}}
  - {id: browse, segment: browsing, when: {event_type: browse}}
"""
    )
    subject = lead(channel="app", product="cash_loan", attributes={"tags": ["new"]})
    explained = explain(subject, ruleset, NOW)
    line = explained.business_line
    assert (line.value, line.decided_by) == ("app_line", "rule")
    assert [(s.rule_id, s.matched) for s in line.steps] == [("car", False), ("recent-app", True)]
    assert line.steps[0].reasons == ("product = car_loan, but product is cash_loan",)
    segment = explained.segment
    assert [(s.rule_id, s.matched, s.skipped) for s in segment.steps] == [
        ("car-only", False, "only for car_loan"),
        ("either", False, None),
        ("browse", True, None),
    ]
    assert (
        segment.steps[1]
        .reasons[0]
        .startswith("none of: event_type = signup, but event_type is browse")
    )
    assert explained.classification == classify([subject], ruleset, NOW)[0]
    assert explained.facts["channel"] == "app"


def test_explain_says_when_a_default_or_a_hint_decided() -> None:
    ruleset = rules(ORDERED)
    explained = explain(lead(channel=None, hints=Hints(segment="vip")), ruleset, NOW)
    assert (explained.business_line.decided_by, explained.segment.decided_by) == ("default", "hint")
    assert explained.segment.steps == ()
