"""Business-line and customer-segment classification: pure, batch-oriented, no I/O.

    rules = load_rules("rules.yaml", defaults=Defaults(business_line="general"))
    decisions = classify(leads, rules, now, context)   # one Classification per lead

Rules are data checked and compiled once at load (`classify.conditions` has the language,
`classify.rules` the file format); `lint` finds rules that can never match; `explain` says why
a lead got its decision.
"""

from classify.engine import Explanation, Level, Step
from classify.lint import RuleWarning, lint
from classify.rules import (
    Defaults,
    LineRule,
    RuleProblem,
    RulesError,
    RuleSet,
    SegmentRule,
    load_rules,
    parse_rules,
)
from classify.stage import classify, explain

__all__ = [
    "Defaults",
    "Explanation",
    "Level",
    "LineRule",
    "RuleProblem",
    "RuleSet",
    "RuleWarning",
    "RulesError",
    "SegmentRule",
    "Step",
    "classify",
    "explain",
    "lint",
    "load_rules",
    "parse_rules",
]
