"""Rules files: every mistake reported with file, line, column and rule id; hostile input refused
or bounded, and never run as Python."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from classify import RuleProblem, RulesError, classify, lint, load_rules, parse_rules
from schemas.lead import Lead

NOW = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


def problems(text: str) -> list[RuleProblem]:
    with pytest.raises(RulesError) as caught:
        parse_rules(text, source="r.yaml")
    assert caught.value.problems
    return list(caught.value.problems)


def one_problem(text: str) -> RuleProblem:
    (problem,) = problems(text)
    return problem


def line_rule(when: str, rule_id: str = "r1") -> str:
    return f"business_lines:\n  - id: {rule_id}\n    business_line: car_loan\n    when: {when}\n"


def test_an_unknown_field_is_named_with_position_rule_and_a_suggestion() -> None:
    problem = one_problem(line_rule("{prodcut: car_loan}"))
    assert (problem.line, problem.column, problem.rule_id) == (4, 12, "r1")
    assert problem.where == "business_lines[0].when.prodcut"
    assert "unknown field 'prodcut' (did you mean product?)" in problem.message
    assert str(problem).startswith("r.yaml:4:12: business_lines[0].when.prodcut (rule r1): ")


def test_type_errors_point_at_the_value() -> None:
    problem = one_problem(line_rule("{age_days: {lte: thirty}}"))
    assert (problem.line, problem.column) == (4, 28)
    assert problem.message == "age_days lte expects a number, not text 'thirty'"


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("{channel: {lt: 3}}", "channel is text; its operators are"),
        ("{channel: {regex: x}}", "unknown operator 'regex'"),
        ("{channel: {eq: 5}}", "expects text, not the number 5 (quote it to make it text)"),
        ("{channel: {eq: no}}", "expects text, not false (quote it to make it text)"),
        ("{hour_local: {in: []}}", "in takes a non-empty list"),
        ("{is_returning_customer: {eq: 1}}", "expects true/false"),
        ("{age_days: {exists: true}}", "always has a value"),
        ("{age_days: null}", "always has a value"),
        ("{consent: {exists: maybe}}", "exists takes true or false"),
        ("{attributes.tags: {contains: [a, b]}}", "expects text or a number or true/false"),
        ("{product: {starts_with: []}}", "starts_with takes a non-empty list"),
        ("{business_line: car_loan}", "known only in segment rules"),
        ("{open_leads_other_lines: {gt: 0}}", "known only in segment rules"),
        ("{any: []}", "'any' takes a non-empty list of conditions"),
        ("{all: {channel: app}}", "'all' takes a non-empty list of conditions"),
        ("{not: [channel]}", "a condition is a mapping"),
        ("{channel: {}}", "give at least one operator"),
        ("[channel, app]", "a condition is a mapping"),
        ("{attributes.: 1}", "attribute key '': use 1 to 64 letters"),
        ("{attributes.a.b.c.d.e: 1}", "an attribute path has 1 to 4 keys"),
        ("{attributes.a b: 1}", "use 1 to 64 letters, digits"),
    ],
)
def test_condition_mistakes(when: str, message: str) -> None:
    assert message in one_problem(line_rule(when)).message


def test_every_problem_is_reported_at_once() -> None:
    text = """
version: 2
colour: blue
defaults: {priority: 101, segment: General}
business_lines:
  - id: a
    business_line: car_loan
    when: {channel: app}
  - id: a
    business_line: car_loan
  - business_line: car_loan
  - id: b
segments:
  - id: s
    segment: x
    priority: high
    lines: [Car]
    sla_class: 3
    colour: red
"""
    found = {(p.where, p.message.split(";")[0].split(",")[0]) for p in problems(text)}
    wheres = {where for where, _ in found}
    assert wheres == {
        "version",
        "colour",
        "defaults.priority",
        "defaults.segment",
        "business_lines[1].id",
        "business_lines[2].id",
        "business_lines[3].business_line",
        "segments[0].priority",
        "segments[0].lines[0]",
        "segments[0].sla_class",
        "segments[0].colour",
    }
    text_of_error = str(RulesError("r.yaml", problems(text)))
    assert text_of_error.startswith("r.yaml has 11 problems: ")


def test_yaml_that_does_not_parse_says_where() -> None:
    problem = one_problem("business_lines:\n  - id: a\n   bad indent: [\n")
    assert problem.line is not None
    assert problem.message.startswith("not valid YAML")


def test_duplicate_keys_are_refused_not_silently_overwritten() -> None:
    problem = one_problem(line_rule("{channel: app, channel: web}"))
    assert problem.message == "duplicate key 'channel'"


def test_a_yes_that_yaml_reads_as_true_gets_a_hint() -> None:
    problem = one_problem("business_lines:\n  - {id: yes, business_line: car_loan}\n")
    assert "quote it" in problem.message


def test_load_rules_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RulesError, match=r"nope\.yaml: cannot read it"):
        load_rules(missing)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RulesError, match="not UTF-8"):
        load_rules(binary)
    big = tmp_path / "big.yaml"
    big.write_text("#" * (1024 * 1024 + 1))
    with pytest.raises(RulesError, match="larger than 1024 KiB"):
        load_rules(big)


# --- hostile input ---------------------------------------------------------------------------


@contextmanager
def no_python_execution() -> Iterator[None]:
    """Fail if anything calls eval, exec or compile inside the block."""
    calls: list[str] = []
    saved = {name: getattr(builtins, name) for name in ("eval", "exec", "compile")}

    def forbidden(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called")

        return call

    for name in saved:
        setattr(builtins, name, forbidden(name))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(builtins, name, original)
    assert calls == []


PYTHONISH = [
    "__import__('os').system('touch /tmp/leadflow-pwned')",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: 1",
    "{{7*7}}",
    "${jndi:ldap://x}",
    "exec('1')",
]


@pytest.mark.parametrize("text", PYTHONISH)
def test_a_condition_written_as_code_is_refused(text: str) -> None:
    with no_python_execution():
        problem = one_problem(line_rule(repr(text)))
    assert "a condition is a mapping" in problem.message


@pytest.mark.parametrize("text", PYTHONISH)
def test_code_as_a_value_is_only_ever_compared_as_text(text: str) -> None:
    with no_python_execution():
        rules = parse_rules(
            "segments:\n"
            f"  - {{id: s, segment: matched, when: {{campaign: {text!r}, attributes.note: {{starts_with: {text!r}}}}}}}\n"
        )
    same = Lead(
        event_id="e",
        occurred_at=NOW,
        source="s",
        event_type="browse",
        phone="+8613800138000",
        intake="realtime",
        campaign=text,
        attributes={"note": text + " and more"},
    )
    other = Lead(
        event_id="f",
        occurred_at=NOW,
        source="s",
        event_type="browse",
        phone="+8613800138000",
        intake="realtime",
        campaign="x",
    )
    with no_python_execution():
        decisions = classify([same, other], rules, NOW)
    assert [d.segment for d in decisions] == ["matched", "general"]
    assert not Path("/tmp/leadflow-pwned").exists()


@pytest.mark.parametrize(
    "field",
    [
        "__class__",
        "__import__",
        "attributes.__class__",
        "attributes.__dict__",
        "attributes.x.__globals__",
        "event_type.__class__",
        "lead.__init__",
    ],
)
def test_dunder_and_dotted_names_are_refused(field: str) -> None:
    with no_python_execution():
        problem = one_problem(line_rule(f"{{{field}: x}}"))
    assert "unknown field" in problem.message or "'__' are not allowed" in problem.message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1e999", "expects a number"),  # YAML 1.1 reads this as text: there is no arithmetic
        ("1.0e+999", "finite"),  # infinity
        (".nan", "finite"),
        ("10 ** 1000000", "expects a number"),
        ("9" * 5000, "cannot read"),  # beyond Python's integer-parsing limit: refused, not parsed
        ("1000000000001", "within"),
        ("-1.5e+13", "within"),
    ],
)
def test_huge_and_odd_numbers_are_refused(value: str, message: str) -> None:
    with no_python_execution():
        problem = one_problem(line_rule(f"{{age_days: {{lt: {value}}}}}"))
    assert message in problem.message


def test_very_long_text_is_refused() -> None:
    assert "longer than 256" in one_problem(line_rule(f"{{campaign: {'x' * 257}}}")).message
    assert parse_rules(line_rule(f"{{campaign: {'x' * 256}}}"))


def test_very_long_lists_are_refused() -> None:
    values = ", ".join(str(i) for i in range(1001))
    assert "at most 1000 values" in one_problem(line_rule(f"{{hour_local: [{values}]}}")).message


def test_deep_condition_nesting_is_refused() -> None:
    deep = "{not: " * 11 + "{channel: app}" + "}" * 11
    assert "nest at most 10 levels" in one_problem(line_rule(deep)).message
    fine = "{not: " * 10 + "{channel: app}" + "}" * 10
    assert parse_rules(line_rule(fine))


def test_deep_yaml_nesting_is_refused_before_it_is_built() -> None:
    # a recursive YAML composer would blow the stack on this; the event stream stops it first
    deep = "[" * 100_000 + "]" * 100_000
    assert "nested more than 40 levels" in one_problem(f"business_lines: {deep}\n").message


def test_too_many_tests_in_one_rule_are_refused() -> None:
    many = "{any: [" + ", ".join(f"{{hour_local: {i % 24}}}" for i in range(600)) + "]}"
    assert "at most 500 tests" in one_problem(line_rule(many)).message


def test_an_alias_bomb_is_bounded() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        previous = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([previous] * 10)}]")
    lines.append("business_lines: *a8")
    assert "more than 200000 values" in one_problem("\n".join(lines) + "\n").message


@pytest.mark.parametrize(
    "text",
    [
        "business_lines: !!python/object/apply:os.system ['true']\n",
        "business_lines: [!!python/name:builtins.eval x]\n",
        "segments: !!set {a, b}\n",
        "business_lines:\n  - {id: a, business_line: car_loan, when: {channel: !!binary aGk=}}\n",
    ],
)
def test_yaml_tags_are_refused(text: str) -> None:
    with no_python_execution():
        problem = one_problem(text)
    assert "is not allowed in rules" in problem.message


def test_the_whole_pipeline_never_executes_python() -> None:
    demo = Path(__file__).parents[2] / "deploy" / "rules.example.yaml"
    lead = Lead(
        event_id="e",
        occurred_at=NOW - timedelta(days=2),
        source="loan-app",
        event_type="order_pending_payment",
        phone="+8613800138000",
        intake="realtime",
        timezone="Asia/Shanghai",
        attributes={"tags": ["vip"]},
    )
    with no_python_execution():
        rules = load_rules(demo)
        lint(rules)
        decision = classify([lead], rules, NOW)[0]
    assert decision.segment == "pending_payment_30d"
