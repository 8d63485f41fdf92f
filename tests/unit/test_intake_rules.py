"""The intake's classifier follows rule reloads between batches, never within one."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from leadflow.rules import RulesHolder, defaults_of
from leadflow.settings import load_settings
from leadflow.stack import rules_classifier
from schemas.lead import NEW_CUSTOMER, Lead

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
LEAD = Lead("e1", NOW, "loan-app", "browse", "+8613800138000", "realtime", product="car_loan")


def rules(line: str) -> str:
    return (
        f"business_lines:\n  - {{id: only, business_line: {line}, when: {{product: car_loan}}}}\n"
    )


def test_a_reload_applies_to_the_next_batch_not_the_one_in_hand(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules("car_loan"))
    holder = RulesHolder(path, defaults_of(load_settings(environ={})))
    current = rules_classifier(holder)

    in_hand = current()  # a batch starts
    path.write_text(rules("wealth_management"))
    holder.reload("test")
    context = {LEAD.phone: NEW_CUSTOMER}

    assert in_hand([LEAD], NOW, context)[0].business_line == "car_loan"
    [decision] = current()([LEAD], NOW, context)  # the next batch
    assert decision.business_line == "wealth_management"
    assert decision.matched_rules[0] == "only"
