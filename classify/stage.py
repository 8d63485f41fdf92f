"""The classification stage: a pure function from a batch of leads to their decisions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from classify.engine import Explanation
from classify.rules import RuleSet
from schemas.lead import NEW_CUSTOMER, Classification, CustomerContext, Lead


def classify(
    leads: Sequence[Lead],
    rules: RuleSet,
    now: datetime,
    context: Mapping[str, CustomerContext] | None = None,
) -> list[Classification]:
    """One `Classification` per lead, in order: business line, then segment, then priority.

    `context` is keyed by the lead's E.164 phone; a phone not in it is a new customer. `now`
    must be timezone-aware: it gives `age_days`, `hour_local` and `weekday_local`. The same
    leads, rules, `now` and context always give the same answer; nothing is read or written
    outside the arguments. Submission hints on a lead override the level they name, and a
    hinted priority is taken as it is (no real-time boost). Raises ValueError for a naive `now`.
    """
    return rules.plan.run(leads, now, context)


def explain(
    lead: Lead, rules: RuleSet, now: datetime, context: CustomerContext | None = None
) -> Explanation:
    """How `classify` decides `lead`: the facts the rules read, and for each level every rule
    tried until the one that matched, with the condition that failed for each of the others."""
    return rules.plan.explain(lead, context or NEW_CUSTOMER, now)
