"""Properties of classification over generated rule sets and leads.

The compiled stage (closures, lazy facts, the per-field rule index, shared outcomes) is checked
against `reference`, a plain reading of the documented semantics over the rules' YAML data,
so the two share no code beyond the `Lead` type.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classify import Defaults, RulesError, RuleSet, classify, explain, lint, parse_rules
from schemas.lead import CustomerContext, Hints, Lead

NOW = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
LINES = ["car_loan", "wealth_management", "enterprise_loan", "personal_credit_loan"]
SEGMENTS = ["hot", "warm", "cold", "vip", "stale"]
TEXT_FIELDS: dict[str, list[str | None]] = {
    "event_type": ["browse", "signup", "order_pending_payment", "ad_click"],
    "source": ["loan-app", "car-mall", "partner-x"],
    "channel": ["app", "web", "ad", None],
    "product": ["car_loan", "fund", "cash_loan", None],
    "campaign": ["auto-expo", "auto-spring", "2026-double-11", None],
    "intake": ["realtime", "stock", "staging", "http"],
    "timezone": ["Asia/Shanghai", "America/New_York", None, "Not/A_Zone"],
}
NUMBER_FIELDS: dict[str, list[float]] = {
    "age_days": [0, 1, 3, 7.5, 10, 30],
    "hour_local": [2, 9, 10, 21],
    "weekday_local": [1, 6, 7],
}
BOOL_FIELDS = ["is_returning_customer", "realtime"]
ATTRIBUTE_FIELDS = ["attributes.tags", "attributes.amount", "attributes.flag", "attributes.p.ltv"]
SCALARS: list[Any] = ["vip", "new", "1", 1, 1.0, 0, 100, 5000.5, True, False]


# --- the reference semantics -----------------------------------------------------------------


def kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    return None


def same(value: Any, literal: Any) -> bool:
    return kind(value) is not None and kind(value) == kind(literal) and value == literal


def holds(op: str, value: Any, operand: Any) -> bool:
    if op == "exists":
        return bool((value is not None) == operand)
    if op == "eq":
        return same(value, operand)
    if op == "ne":
        return not same(value, operand)
    if op == "in":
        return any(same(value, x) for x in operand)
    if op == "not_in":
        return not any(same(value, x) for x in operand)
    if op in ("lt", "lte", "gt", "gte"):
        if kind(value) != "number":
            return False
        return bool(
            {
                "lt": value < operand,
                "lte": value <= operand,
                "gt": value > operand,
                "gte": value >= operand,
            }[op]
        )
    if op == "contains":
        if isinstance(value, list):
            return any(same(x, operand) for x in value)
        return isinstance(value, str) and isinstance(operand, str) and operand in value
    if op == "contains_any":
        return isinstance(value, list) and any(same(x, o) for x in value for o in operand)
    if op in ("starts_with", "ends_with"):
        affixes = operand if isinstance(operand, list) else [operand]
        method = str.startswith if op == "starts_with" else str.endswith
        return isinstance(value, str) and any(method(value, a) for a in affixes)
    raise AssertionError(op)


def reference_facts(lead: Lead, ctx: CustomerContext) -> dict[str, Any]:
    try:
        zone: Any = ZoneInfo(lead.timezone) if lead.timezone else UTC
    except Exception:  # the documented fallback, however the name is broken
        zone = UTC
    local = NOW.astimezone(zone)
    facts: dict[str, Any] = {
        name: getattr(lead, name)
        for name in (
            "event_type",
            "source",
            "channel",
            "product",
            "campaign",
            "region",
            "timezone",
            "country",
            "intake",
            "consent",
        )
    }
    facts.update(
        realtime=lead.intake in ("realtime", "http"),
        age_days=(NOW - lead.occurred_at).total_seconds() / 86400,
        hour_local=local.hour,
        weekday_local=local.isoweekday(),
        is_returning_customer=ctx.is_returning_customer,
    )
    return facts


def field_value(facts: dict[str, Any], lead: Lead, name: str) -> Any:
    if name.startswith("attributes."):
        value: Any = lead.attributes
        for key in name.split(".")[1:]:
            value = value.get(key) if isinstance(value, dict) else None
        return value
    return facts[name]


def evaluate(cond: Any, facts: dict[str, Any], lead: Lead) -> bool:
    if cond is None:
        return True
    results = []
    for key, value in cond.items():
        if key == "all":
            results.append(all(evaluate(c, facts, lead) for c in value))
        elif key == "any":
            results.append(any(evaluate(c, facts, lead) for c in value))
        elif key == "not":
            results.append(not evaluate(value, facts, lead))
        else:
            actual = field_value(facts, lead, key)
            if isinstance(value, dict):
                results.append(all(holds(op, actual, operand) for op, operand in value.items()))
            elif isinstance(value, list):
                results.append(holds("in", actual, value))
            elif value is None:
                results.append(actual is None)
            else:
                results.append(holds("eq", actual, value))
    return all(results)


def reference(document: dict[str, Any], lead: Lead, ctx: CustomerContext) -> tuple[Any, ...]:
    defaults = document.get("defaults", {})
    facts = reference_facts(lead, ctx)
    hints = lead.hints or Hints()
    matched = []
    line = defaults.get("business_line", "general")
    if hints.business_line:
        line = hints.business_line
    else:
        for rule in document.get("business_lines", []):
            if evaluate(rule.get("when"), facts, lead):
                line = rule["business_line"]
                matched.append(rule["id"])
                break
    facts["business_line"] = line
    facts["open_leads_other_lines"] = len(ctx.open_lead_lines - {line})
    segment = defaults.get("segment", "general")
    priority = defaults.get("priority", 50)
    sla = None
    if hints.segment:
        segment = hints.segment
    else:
        for rule in document.get("segments", []):
            if "lines" in rule and line not in rule["lines"]:
                continue
            if evaluate(rule.get("when"), facts, lead):
                segment, priority, sla = rule["segment"], rule["priority"], rule.get("sla_class")
                matched.append(rule["id"])
                break
    if hints.priority is not None:
        priority = max(0, min(100, hints.priority))
    elif lead.intake in ("realtime", "http"):
        priority = min(100, priority + defaults.get("realtime_boost", 0))
    return (line, segment, priority, tuple(matched), sla)


def decided(c: Any) -> tuple[Any, ...]:
    return (c.business_line, c.segment, c.priority, c.matched_rules, c.sla_class)


# --- generators ------------------------------------------------------------------------------


def atoms(segment_level: bool) -> st.SearchStrategy[dict[str, Any]]:
    text = st.sampled_from(sorted(TEXT_FIELDS)).flatmap(
        lambda name: st.one_of(
            st.sampled_from([v for v in TEXT_FIELDS[name] if v]).map(lambda v: {name: v}),
            st.lists(
                st.sampled_from([v for v in TEXT_FIELDS[name] if v]), min_size=1, max_size=3
            ).map(lambda vs: {name: vs}),
            st.tuples(
                st.sampled_from(["eq", "ne"]), st.sampled_from([v for v in TEXT_FIELDS[name] if v])
            ).map(lambda t: {name: {t[0]: t[1]}}),
            st.sampled_from(["auto", "a", "-", "app", "x"]).flatmap(
                lambda v: st.sampled_from(
                    [
                        {name: {"starts_with": v}},
                        {name: {"ends_with": [v, "p"]}},
                        {name: {"contains": v}},
                    ]
                )
            ),
            st.booleans().map(
                lambda b: (
                    {name: {"exists": b}} if None in TEXT_FIELDS[name] else {name: {"ne": "zzz"}}
                )
            ),
            st.just({name: None} if None in TEXT_FIELDS[name] else {name: {"not_in": ["zzz"]}}),
        )
    )
    number_fields: dict[str, list[float]] = {
        **NUMBER_FIELDS,
        **({"open_leads_other_lines": [0, 1, 2]} if segment_level else {}),
    }
    number = st.sampled_from(sorted(number_fields)).flatmap(
        lambda name: st.one_of(
            st.tuples(
                st.sampled_from(["eq", "ne", "lt", "lte", "gt", "gte"]),
                st.sampled_from(number_fields[name]),
            ).map(lambda t: {name: {t[0]: t[1]}}),
            st.lists(st.sampled_from(number_fields[name]), min_size=1, max_size=3).map(
                lambda vs: {name: {"not_in": vs}}
            ),
            st.tuples(
                st.sampled_from(number_fields[name]), st.sampled_from(number_fields[name])
            ).map(lambda t: {name: {"gte": min(t), "lte": max(t)}}),
        )
    )
    boolean = st.tuples(st.sampled_from(BOOL_FIELDS), st.booleans()).map(lambda t: {t[0]: t[1]})
    scalar = st.sampled_from(SCALARS)
    attribute = st.sampled_from(ATTRIBUTE_FIELDS).flatmap(
        lambda name: st.one_of(
            scalar.map(lambda v: {name: v}),
            st.lists(scalar, min_size=1, max_size=3).map(lambda vs: {name: vs}),
            st.tuples(st.sampled_from(["ne", "contains", "eq"]), scalar).map(
                lambda t: {name: {t[0]: t[1]}}
            ),
            st.lists(scalar, min_size=1, max_size=3).map(lambda vs: {name: {"contains_any": vs}}),
            st.tuples(st.sampled_from(["lt", "gte"]), st.sampled_from([0, 1, 100, 5000.5])).map(
                lambda t: {name: {t[0]: t[1]}}
            ),
            st.booleans().map(lambda b: {name: {"exists": b}}),
            st.sampled_from(["v", "ne", "1"]).map(lambda v: {name: {"starts_with": v}}),
        )
    )
    extra: list[st.SearchStrategy[dict[str, Any]]] = []
    if segment_level:
        extra.append(st.sampled_from(LINES).map(lambda line: {"business_line": line}))
    return st.one_of(text, number, boolean, attribute, *extra)


def conditions(segment_level: bool) -> st.SearchStrategy[Any]:
    def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in parts:
            for key, value in part.items():
                if key in merged:  # a key once per mapping: fold repeats into an `all`
                    merged.setdefault("all", []).append({key: value})
                else:
                    merged[key] = value
        return merged

    base = st.lists(atoms(segment_level), min_size=1, max_size=3).map(merge)
    tree = st.recursive(
        base,
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"any": cs}),
            st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"all": cs}),
            inner.map(lambda c: {"not": c}),
        ),
        max_leaves=6,
    )
    return st.one_of(st.none(), tree)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    line_rules = []
    for i in range(draw(st.integers(0, 6))):
        line_rules.append(
            {
                "id": f"l{i}",
                "business_line": draw(st.sampled_from(LINES)),
                "when": draw(conditions(False)),
            }
        )
    segment_rules = []
    for i in range(draw(st.integers(0, 8))):
        rule: dict[str, Any] = {
            "id": f"s{i}",
            "segment": draw(st.sampled_from(SEGMENTS)),
            "priority": draw(st.integers(0, 100)),
            "when": draw(conditions(True)),
        }
        if draw(st.booleans()):
            rule["lines"] = draw(
                st.lists(st.sampled_from(LINES), min_size=1, max_size=2, unique=True)
            )
        if draw(st.booleans()):
            rule["sla_class"] = draw(st.sampled_from(["hot", "batch"]))
        segment_rules.append(rule)
    # Narrowed copies of earlier rules: these must be reported as shadowed.
    for level, rules in (("l", line_rules), ("s", segment_rules)):
        if draw(st.booleans()) and rules:
            earlier = dict(draw(st.sampled_from(rules)))
            narrower = draw(st.sampled_from(["same", "and"]))
            if narrower == "and":
                earlier["when"] = {
                    "all": [earlier["when"] or {"realtime": True}, draw(atoms(level == "s"))]
                }
            earlier["id"] = f"{level}-copy"
            rules.append(earlier)
    document: dict[str, Any] = {"business_lines": line_rules, "segments": segment_rules}
    if draw(st.booleans()):
        document["defaults"] = {
            "business_line": draw(st.sampled_from([*LINES, "general"])),
            "segment": "general",
            "priority": draw(st.integers(0, 100)),
            "realtime_boost": draw(st.sampled_from([0, 10, 60])),
        }
    return document


attribute_values = st.one_of(
    st.none(),
    st.sampled_from(SCALARS),
    st.just(math.nan),
    st.lists(st.one_of(st.sampled_from(SCALARS), st.just({"x": 1}), st.just([1])), max_size=4),
    st.just({"ltv": 200}),
)


@st.composite
def leads(draw: st.DrawFn) -> tuple[Lead, CustomerContext]:
    fields: dict[str, Any] = {
        name: draw(st.sampled_from(values)) for name, values in TEXT_FIELDS.items()
    }
    age = draw(st.one_of(st.sampled_from([0, 1, 3, 7.5, 10, 30, -1]), st.floats(0, 45)))
    attributes = {
        key: draw(attribute_values)
        for key in draw(st.lists(st.sampled_from(["tags", "amount", "flag", "p"]), unique=True))
    }
    hints = None
    if draw(st.integers(0, 9)) == 0:
        hints = Hints(
            business_line=draw(st.sampled_from([None, "leasing"])),
            segment=draw(st.sampled_from([None, "hinted"])),
            priority=draw(st.sampled_from([None, 5, 150])),
        )
    lead = Lead(
        event_id="e",
        occurred_at=NOW - timedelta(days=age),
        phone=draw(st.sampled_from(["+8613800000001", "+8613800000002"])),
        attributes=attributes,
        hints=hints,
        **fields,
    )
    context = CustomerContext(
        is_returning_customer=draw(st.booleans()),
        open_lead_lines=frozenset(draw(st.lists(st.sampled_from(LINES), max_size=3))),
    )
    return lead, context


def compiled(document: dict[str, Any]) -> RuleSet:
    return parse_rules(yaml.safe_dump(document, sort_keys=False), source="generated")


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the properties --------------------------------------------------------------------------


@PROPERTY
@given(documents(), st.lists(leads(), min_size=1, max_size=12))
def test_the_stage_agrees_with_the_reference_semantics(
    document: dict[str, Any], batch: list[tuple[Lead, CustomerContext]]
) -> None:
    rules = compiled(document)
    for lead, ctx in batch:
        (got,) = classify([lead], rules, NOW, {lead.phone: ctx})
        assert decided(got) == reference(document, lead, ctx), (lead, ctx)


@PROPERTY
@given(documents(), st.lists(leads(), min_size=1, max_size=12))
def test_exactly_one_line_and_one_segment_per_lead_from_the_rules_defaults_or_hints(
    document: dict[str, Any], batch: list[tuple[Lead, CustomerContext]]
) -> None:
    rules = compiled(document)
    lines = rules.lines() | {"leasing"}
    segments = {r.segment for r in rules.segment_rules} | {rules.defaults.segment, "hinted"}
    decisions = classify([lead for lead, _ in batch], rules, NOW)
    assert len(decisions) == len(batch)
    for decision in decisions:
        assert decision.business_line in lines
        assert decision.segment in segments
        assert 0 <= decision.priority <= 100
        assert decision.rules_version == rules.version
        assert len(decision.matched_rules) <= 2


@PROPERTY
@given(documents(), st.lists(leads(), min_size=1, max_size=12))
def test_the_same_leads_and_rules_always_give_the_same_answer(
    document: dict[str, Any], batch: list[tuple[Lead, CustomerContext]]
) -> None:
    context = dict((lead.phone, ctx) for lead, ctx in batch)
    only = [lead for lead, _ in batch]
    rules = compiled(document)
    first = classify(only, rules, NOW, context)
    again = classify(only, compiled(document), NOW, context)  # compiled afresh
    one_by_one = [classify([lead], rules, NOW, context)[0] for lead in only]
    backwards = classify(only[::-1], rules, NOW, context)[::-1]
    assert first == again == one_by_one == backwards


@PROPERTY
@given(documents(), leads())
def test_explain_agrees_with_the_stage(
    document: dict[str, Any], subject: tuple[Lead, CustomerContext]
) -> None:
    lead, ctx = subject
    rules = compiled(document)
    explained = explain(lead, rules, NOW, ctx)
    assert explained.classification == classify([lead], rules, NOW, {lead.phone: ctx})[0]
    assert explained.business_line.value == explained.classification.business_line
    assert explained.segment.value == explained.classification.segment
    for level in (explained.business_line, explained.segment):
        if level.decided_by == "rule":
            assert level.steps[-1].matched
        assert all(not s.matched for s in level.steps[:-1])
        assert all(s.reasons or s.skipped or s.matched for s in level.steps)


@PROPERTY
@given(documents(), st.lists(leads(), min_size=1, max_size=12))
def test_a_rule_reported_as_shadowed_never_decides(
    document: dict[str, Any], batch: list[tuple[Lead, CustomerContext]]
) -> None:
    rules = compiled(document)
    shadowed = {w.rule_id for w in lint(rules) if "never matches" in w.message}
    context = {lead.phone: ctx for lead, ctx in batch}
    for decision in classify([lead for lead, _ in batch], rules, NOW, context):
        assert not shadowed & set(decision.matched_rules)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(allow_nan=True, allow_infinity=True),
            st.text(max_size=20),
            st.sampled_from(["__class__", "attributes.__dict__", "all", "any", "not", "eq", "in"]),
        ),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(
                st.one_of(
                    st.sampled_from(
                        [
                            "id",
                            "business_line",
                            "segment",
                            "priority",
                            "when",
                            "lines",
                            "channel",
                            "age_days",
                            "attributes.x",
                            "any",
                            "all",
                            "not",
                            "lt",
                            "in",
                            "exists",
                            "business_lines",
                            "segments",
                            "defaults",
                        ]
                    ),
                    st.text(max_size=8),
                ),
                inner,
                max_size=4,
            ),
        ),
        max_leaves=20,
    )
)
def test_any_data_either_loads_or_is_refused_with_rules_error(data: Any) -> None:
    for document in (data, {"business_lines": [{"id": "a", "business_line": "x", "when": data}]}):
        try:
            text = yaml.safe_dump(document)
        except yaml.YAMLError:
            continue
        refused = None
        try:
            parse_rules(text, defaults=Defaults())
        except RulesError as exc:
            refused = exc
        assert refused is None or (refused.problems and str(refused))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_either_loads_or_is_refused_with_rules_error(text: str) -> None:
    refused = None
    try:
        parse_rules(text)
    except RulesError as exc:
        refused = exc
    assert refused is None or str(refused)
