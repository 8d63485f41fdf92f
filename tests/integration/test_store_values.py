"""LeadStore writes every value as given, whatever its characters: the rule ids of a new lead
(written as array literals in the COPY) and the customer values sent as binary arrays."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

import psycopg
import pytest

from ingest.chain import Accepted, ChainConfig, IntakeChain, Record
from ingest.store import LeadStore
from schemas.lead import Classification, CustomerContext, Lead

AWKWARD_RULES = [
    (),
    ("r1",),
    ("bl-car", "seg-pending-payment-30d"),
    ('we"ird', "back\\slash", "NULL", "a,b", "{x}", " spaced ", "", "张三"),
]


def accepted(phone: str, name: str | None, email: str | None) -> Accepted:
    event = {
        "schema_version": 1,
        "event_id": f"ev-{phone}",
        "occurred_at": "2026-11-23T09:15:02+08:00",
        "source": "loan-app",
        "event_type": "browse",
        "customer": {"phone": phone, "name": name, "email": email, "region": "CN-31"},
    }
    (outcome,) = IntakeChain(ChainConfig()).process(
        [Record(json.dumps(event, ensure_ascii=False).encode())], "realtime"
    )
    assert isinstance(outcome, Accepted)
    return outcome


@pytest.mark.parametrize("rules", AWKWARD_RULES)
def test_rule_ids_and_customer_values_round_trip(db_url: str, rules: tuple[str, ...]) -> None:
    def classify(
        leads: Sequence[Lead], now: datetime, context: Mapping[str, CustomerContext]
    ) -> list[Classification]:
        return [Classification("car_loan", "s", 50, rules, 'v"1\\') for _ in leads]

    batch = [
        accepted("138 0013 8000", 'O"Brien \\ {张三}, NULL', "a@example.com"),
        accepted("139 1234 5678", None, None),
    ]
    with psycopg.connect(db_url) as conn:
        LeadStore().write(conn, batch, classify)
        leads = conn.execute(
            "SELECT matched_rules, rules_version FROM leads ORDER BY id"
        ).fetchall()
        customers = conn.execute(
            "SELECT phone_e164, name, email, region FROM customers ORDER BY phone_e164"
        ).fetchall()
    assert leads == [(list(rules), 'v"1\\')] * 2
    assert customers == [
        ("+8613800138000", 'O"Brien \\ {张三}, NULL', "a@example.com", "CN-31"),
        ("+8613912345678", None, None, "CN-31"),
    ]
