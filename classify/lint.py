"""Warnings about rules that can never match, where that can be decided.

A rule never matches when every lead it would match is taken by an earlier rule of the same
level that applies at least as widely. Deciding that in general is as hard as the conditions
are rich, so `implies` is sound but incomplete: it proves the common cases (identical
conditions, a subset of the same tests, a value list inside a broader one, a tighter number
range, an all/any/not built from those) and says nothing when unsure. A warning is therefore
always real; a missing one proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from classify.conditions import All, AnyOf, Atom, Cond, Not, type_tag
from classify.rules import RuleSet, SegmentRule


@dataclass(frozen=True, slots=True)
class RuleWarning:
    rule_id: str
    message: str

    def __str__(self) -> str:
        return f"rule {self.rule_id}: {self.message}"


def lint(rules: RuleSet) -> list[RuleWarning]:
    """Rules shadowed by an earlier rule, and segment rules for lines no rule gives."""
    warnings: list[RuleWarning] = []
    for j, later in enumerate(rules.line_rules):
        for earlier in rules.line_rules[:j]:
            if implies(later.when, earlier.when):
                warnings.append(
                    RuleWarning(later.id, _shadowed(earlier.id, later.when, earlier.when))
                )
                break
    for j, seg in enumerate(rules.segment_rules):
        for earlier_seg in rules.segment_rules[:j]:
            if _covers(earlier_seg, seg) and implies(seg.when, earlier_seg.when):
                warnings.append(
                    RuleWarning(seg.id, _shadowed(earlier_seg.id, seg.when, earlier_seg.when))
                )
                break
    given = rules.lines()
    for seg in rules.segment_rules:
        if seg.lines is not None and not seg.lines & given:
            lines = ", ".join(sorted(seg.lines))
            warnings.append(
                RuleWarning(
                    seg.id,
                    f"no business-line rule gives {lines} and it is not the default line, so "
                    "this rule applies only to leads whose submission hints name that line",
                )
            )
    return warnings


def _shadowed(earlier: str, later: Cond, broader: Cond) -> str:
    how = "the same condition" if later.data() == broader.data() else "a broader condition"
    return f"never matches: rule {earlier} comes first with {how}"


def _covers(earlier: SegmentRule, later: SegmentRule) -> bool:
    """The earlier rule applies to every line the later one does."""
    if earlier.lines is None:
        return True
    return later.lines is not None and later.lines <= earlier.lines


def implies(a: Cond, b: Cond) -> bool:
    """True only when every lead satisfying `a` surely satisfies `b`."""
    if isinstance(b, All):
        return all(implies(a, c) for c in b.children)  # no children: b always holds
    if isinstance(a, AnyOf):
        return all(implies(c, b) for c in a.children)
    if isinstance(a, All) and any(implies(c, b) for c in a.children):
        return True
    if isinstance(b, AnyOf) and any(implies(a, c) for c in b.children):
        return True
    if isinstance(a, Not) and isinstance(b, Not):
        return implies(b.child, a.child)
    if isinstance(a, Atom) and isinstance(b, Atom):
        return _atom_implies(a, b)
    return False


_NEGATIVE = ("ne", "not_in")
_BOUNDS = ("lt", "lte", "gt", "gte")


def _atom_implies(a: Atom, b: Atom) -> bool:
    if a.field != b.field:
        return False
    if a.op == b.op and _same(a.value, b.value):
        return True
    if b.op == "exists":
        present = a.op not in _NEGATIVE and not (a.op == "exists" and a.value is False)
        return present if b.value else a.op == "exists" and a.value is False
    if a.op in ("eq", "in"):
        # a pins the value to a few candidates: b must hold for each of them
        values = a.value if a.op == "in" else (a.value,)
        return all(b.test({b.field: v}) for v in values)
    if a.op in _BOUNDS and b.op in _BOUNDS:
        return _bound_implies(a.op, float(a.value), b.op, float(b.value))
    if a.op == "not_in" and b.op in _NEGATIVE:
        excluded = {type_tag(v) for v in a.value}
        wanted = b.value if b.op == "not_in" else (b.value,)
        return all(type_tag(v) in excluded for v in wanted)
    if a.op == b.op and a.op in ("starts_with", "ends_with"):
        method = str.startswith if a.op == "starts_with" else str.endswith
        return all(any(method(p, q) for q in b.value) for p in a.value)
    return False


def _bound_implies(a_op: str, s: float, b_op: str, t: float) -> bool:
    if b_op in ("lt", "lte") and a_op in ("lt", "lte"):
        strict_needed = b_op == "lt" and a_op == "lte"
        return s < t if strict_needed else s <= t
    if b_op in ("gt", "gte") and a_op in ("gt", "gte"):
        strict_needed = b_op == "gt" and a_op == "gte"
        return s > t if strict_needed else s >= t
    return False


def _same(x: object, y: object) -> bool:
    if isinstance(x, tuple) and isinstance(y, tuple):
        return {type_tag(v) for v in x} == {type_tag(v) for v in y}
    return type_tag(x) == type_tag(y)
