"""The compiled plan behind `classify`: first-match decisions in a few microseconds a lead.

How it stays fast without a memo of leads:
- each rule's condition is a tree of closures compiled once (`classify.conditions`);
- facts are computed on first read, so a lead decided by two tests of `product` never pays
  for its age, local time or attribute look-ups;
- each ordered rule list is pre-filtered by the text field most of its rules pin to a value
  (`_Index`): a lead only meets the rules its value allows, in the original order;
- outcomes repeat far more than leads do, so one immutable `Classification` per outcome is
  shared (bounded by `OUTCOME_LIMIT`).

A memo of decisions keyed by a canonical form of every field the rules read (thresholds as
bucket positions, attribute text as "named by a rule or other", ...) was built and measured
on `leadflow bench classify`: building the key cost more than deciding (92k leads/s with the
memo against 248k/s without, hit ratio 53% over 200k varied leads), so it is not used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from classify.conditions import (
    FIELDS,
    All,
    Atom,
    Cond,
    Facts,
    Test,
    fields_read,
    why_not,
)
from schemas.lead import NEW_CUSTOMER, Classification, CustomerContext, Lead

if TYPE_CHECKING:
    from classify.rules import Defaults, LineRule, SegmentRule

OUTCOME_LIMIT = 100_000

_LEAD_FIELDS = frozenset(
    {
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
    }
)
_SEGMENT_FIELDS = frozenset({"business_line", "open_leads_other_lines"})

Extract = Callable[[Lead, CustomerContext, "_Env"], Any]


@functools.lru_cache(maxsize=4096)
def _zone(name: str | None) -> tzinfo:
    if not name:
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return UTC  # the contract: the lead's timezone, else UTC


class _Env:
    """What one `classify` call shares between its leads: `now`, and `now` per timezone."""

    __slots__ = ("_local", "now")

    def __init__(self, now: datetime) -> None:
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be a timezone-aware datetime")
        self.now = now
        self._local: dict[str | None, tuple[int, int]] = {}

    def local(self, timezone: str | None) -> tuple[int, int]:
        """(hour, ISO weekday) of now in `timezone`."""
        cached = self._local.get(timezone)
        if cached is None:
            here = self.now.astimezone(_zone(timezone))
            cached = self._local[timezone] = (here.hour, here.isoweekday())
        return cached


def age_days(now: datetime, occurred_at: datetime) -> float:
    return (now - occurred_at).total_seconds() / 86400.0


def _attribute(attributes: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = attributes
    for key in keys:
        if type(value) is not dict and not isinstance(value, Mapping):  # dict: skip the ABC
            return None
        value = value.get(key)
    return value


def _extractor(name: str) -> Extract:
    if name == "age_days":
        return lambda lead, ctx, env: age_days(env.now, lead.occurred_at)
    if name == "hour_local":
        return lambda lead, ctx, env: env.local(lead.timezone)[0]
    if name == "weekday_local":
        return lambda lead, ctx, env: env.local(lead.timezone)[1]
    if name == "is_returning_customer":
        return lambda lead, ctx, env: ctx.is_returning_customer
    if name == "realtime":
        return lambda lead, ctx, env: lead.realtime
    if name.startswith("attributes."):
        keys = tuple(name.split(".")[1:])
        return lambda lead, ctx, env: _attribute(lead.attributes, keys)
    assert name in _LEAD_FIELDS, name
    get = attrgetter(name)
    return lambda lead, ctx, env: get(lead)


# --- the plan -------------------------------------------------------------------------------


class _LazyFacts(dict[str, Any]):
    """Facts computed on first read: most leads are decided by a few tests of a few fields."""

    __slots__ = ("source",)
    extractors: Mapping[str, Extract] = {}
    source: tuple[Lead, CustomerContext, _Env]

    def __missing__(self, name: str) -> Any:
        value = self[name] = self.extractors[name](*self.source)
        return value


def _lazy_facts_type(extractors: Mapping[str, Extract]) -> type[_LazyFacts]:
    return type("Facts", (_LazyFacts,), {"__slots__": (), "extractors": extractors})


R = TypeVar("R", "LineRule", "SegmentRule")


class _Index(Generic[R]):
    """Ordered rules, pre-filtered by the value of one text field most of them pin down.

    A rule whose condition requires `field = v` or `field in [...]` cannot match a lead with
    another value, so each value maps to the rules that can still match it, in order; values
    no rule names map to the rules that do not constrain the field. The order is preserved,
    so the first match is the same as scanning every rule.
    """

    __slots__ = ("by_value", "field", "rest")
    field: str | None
    rest: tuple[tuple[R, Test], ...]
    by_value: dict[str, tuple[tuple[R, Test], ...]]

    def __init__(self, rules: Sequence[tuple[R, Test]]) -> None:
        pinned = [_pinned(rule.when) for rule, _ in rules]
        counts: dict[str, int] = {}
        for pins in pinned:
            for name in pins:
                counts[name] = counts.get(name, 0) + 1
        best = max(counts, key=lambda n: counts[n], default=None)
        self.field = best if best is not None and counts[best] >= 2 else None
        name = self.field or ""
        self.rest = tuple(r for r, pins in zip(rules, pinned, strict=True) if name not in pins)
        values = {v for pins in pinned if name in pins for v in pins[name]}
        self.by_value = {
            v: tuple(
                r
                for r, pins in zip(rules, pinned, strict=True)
                if name not in pins or v in pins[name]
            )
            for v in values
        }
        if self.field is None:
            self.rest = tuple(rules)

    def candidates(self, facts: Facts) -> tuple[tuple[R, Test], ...]:
        if self.field is None:
            return self.rest
        return self.by_value.get(facts[self.field], self.rest)


def _pinned(cond: Cond) -> dict[str, frozenset[str]]:
    """Text fields the condition pins to a set of values (only a top-level `and` counts)."""
    parts = cond.children if isinstance(cond, All) else (cond,)
    pins: dict[str, frozenset[str]] = {}
    for part in parts:
        if (
            isinstance(part, Atom)
            and part.op in ("eq", "in")
            and part.field in _LEAD_FIELDS
            and FIELDS[part.field].type == "text"
        ):
            values = frozenset(part.value if part.op == "in" else (part.value,))
            pins[part.field] = pins[part.field] & values if part.field in pins else values
    return pins


class Plan:
    """Rules compiled for deciding batches of leads; built once per `RuleSet`."""

    def __init__(
        self,
        line_rules: Sequence[LineRule],
        segment_rules: Sequence[SegmentRule],
        defaults: Defaults,
        version: str,
    ) -> None:
        self.defaults = defaults
        self.version = version
        self.line_tests: tuple[tuple[LineRule, Test], ...] = tuple(
            (rule, rule.when.test) for rule in line_rules
        )
        self.segment_tests: tuple[tuple[SegmentRule, Test], ...] = tuple(
            (rule, rule.when.test) for rule in segment_rules
        )
        named = {line for rule in segment_rules for line in rule.lines or ()}
        # per line, the segment rules that apply to it, in file order
        self.segments_for = {line: self._segments_of(line) for line in named}
        self.any_line_segments = self._segments_of(None)
        self.line_index = _Index(self.line_tests)
        self.segment_index = {line: _Index(rules) for line, rules in self.segments_for.items()}
        self.any_line_index = _Index(self.any_line_segments)

        conditions = [r.when for r in line_rules] + [r.when for r in segment_rules]
        read: set[str] = set()
        for when in conditions:
            read |= fields_read(when)
        self.reads = frozenset(read)
        self.extractors: tuple[tuple[str, Extract], ...] = tuple(
            (name, _extractor(name)) for name in sorted(read - _SEGMENT_FIELDS)
        )
        self.lazy_facts = _lazy_facts_type(dict(self.extractors))
        self.outcomes: dict[Hashable, Classification] = {}
        self.needs_context = bool(read & {"is_returning_customer", "open_leads_other_lines"})

    def _segments_of(self, line: str | None) -> tuple[tuple[SegmentRule, Test], ...]:
        return tuple(
            (rule, test)
            for rule, test in self.segment_tests
            if rule.lines is None or (line is not None and line in rule.lines)
        )

    # --- deciding --------------------------------------------------------------------------

    def run(
        self,
        leads: Sequence[Lead],
        now: datetime,
        context: Mapping[str, CustomerContext] | None,
    ) -> list[Classification]:
        env = _Env(now)
        decide = self.decide
        if not (context and self.needs_context):
            return [decide(lead, NEW_CUSTOMER, env) for lead in leads]
        lookup = context.get
        return [decide(lead, lookup(lead.phone, NEW_CUSTOMER), env) for lead in leads]

    def facts(self, lead: Lead, ctx: CustomerContext, env: _Env) -> dict[str, Any]:
        """Every field the rules read (eagerly: for explanations)."""
        return {name: get(lead, ctx, env) for name, get in self.extractors}

    def _segment_facts(self, facts: dict[str, Any], line: str, ctx: CustomerContext) -> None:
        facts["business_line"] = line
        open_lines = ctx.open_lead_lines
        facts["open_leads_other_lines"] = len(open_lines) - (line in open_lines)

    def decide(self, lead: Lead, ctx: CustomerContext, env: _Env) -> Classification:
        facts = self.lazy_facts()
        facts.source = (lead, ctx, env)
        hints = lead.hints
        line_rule = segment_rule = None
        if hints is not None and hints.business_line:
            line = hints.business_line
        else:
            line = self.defaults.business_line
            for rule, test in self.line_index.candidates(facts):
                if test(facts):
                    line_rule, line = rule, rule.business_line
                    break
        self._segment_facts(facts, line, ctx)
        if hints is not None and hints.segment:
            segment = hints.segment
        else:
            segment = self.defaults.segment
            for srule, test in self.segment_index.get(line, self.any_line_index).candidates(facts):
                if test(facts):
                    segment_rule, segment = srule, srule.segment
                    break
        base = segment_rule.priority if segment_rule is not None else self.defaults.priority
        priority = self._priority(lead, base)
        # Decisions repeat far more than leads do: share one immutable object per outcome.
        key = (
            line,
            segment,
            priority,
            line_rule.id if line_rule is not None else None,
            segment_rule.id if segment_rule is not None else None,
        )
        decision = self.outcomes.get(key)
        if decision is None:
            if len(self.outcomes) >= OUTCOME_LIMIT:
                self.outcomes.clear()
            decision = self.outcomes[key] = Classification(
                business_line=line,
                segment=segment,
                priority=priority,
                matched_rules=tuple(i for i in key[3:] if i is not None),
                rules_version=self.version,
                sla_class=segment_rule.sla_class if segment_rule is not None else None,
            )
        return decision

    def _priority(self, lead: Lead, priority: int) -> int:
        if lead.hints is not None and lead.hints.priority is not None:
            return max(0, min(100, lead.hints.priority))
        if lead.realtime and self.defaults.realtime_boost:
            return min(100, priority + self.defaults.realtime_boost)
        return priority

    # --- explaining ------------------------------------------------------------------------

    def explain(self, lead: Lead, ctx: CustomerContext, now: datetime) -> Explanation:
        env = _Env(now)
        facts = self.facts(lead, ctx, env)
        hints = lead.hints
        if hints is not None and hints.business_line:
            line_level = Level("business_line", hints.business_line, "hint", ())
        else:
            steps: list[Step] = []
            line = self.defaults.business_line
            for line_rule, test in self.line_tests:
                if test(facts):
                    steps.append(Step(line_rule.id, True, ()))
                    line = line_rule.business_line
                    break
                steps.append(Step(line_rule.id, False, tuple(why_not(line_rule.when, facts))))
            by_rule = bool(steps) and steps[-1].matched
            line_level = Level(
                "business_line", line, "rule" if by_rule else "default", tuple(steps)
            )
        shown = dict(facts)
        self._segment_facts(facts, line_level.value, ctx)
        if "open_leads_other_lines" in self.reads:
            shown["open_leads_other_lines"] = facts["open_leads_other_lines"]
        if hints is not None and hints.segment:
            segment_level = Level("segment", hints.segment, "hint", ())
        else:
            applicable = {
                rule.id
                for rule, _ in self.segments_for.get(line_level.value, self.any_line_segments)
            }
            steps = []
            segment = self.defaults.segment
            for rule, test in self.segment_tests:
                if rule.id not in applicable:
                    lines = ", ".join(sorted(rule.lines or ()))
                    steps.append(Step(rule.id, False, (), f"only for {lines}"))
                elif test(facts):
                    steps.append(Step(rule.id, True, ()))
                    segment = rule.segment
                    break
                else:
                    steps.append(Step(rule.id, False, tuple(why_not(rule.when, facts))))
            by_rule = bool(steps) and steps[-1].matched
            segment_level = Level(
                "segment", segment, "rule" if by_rule else "default", tuple(steps)
            )
        decision = self.run([lead], now, {lead.phone: ctx})[0]
        return Explanation(decision, shown, line_level, segment_level)


@dataclass(frozen=True, slots=True)
class Step:
    """One rule tried: matched, or the reasons it did not (or why it did not apply)."""

    rule_id: str
    matched: bool
    reasons: tuple[str, ...]
    skipped: str | None = None


@dataclass(frozen=True, slots=True)
class Level:
    """How one level was decided: by a rule, by the default, or by the submitter's hint."""

    name: Literal["business_line", "segment"]
    value: str
    decided_by: Literal["rule", "default", "hint"]
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Explanation:
    classification: Classification
    facts: Facts
    business_line: Level
    segment: Level
