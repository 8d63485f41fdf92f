"""`leadflow bench classify`: 50 business-line and segment rules over 200k leads on one core.

The rules are modelled on the demo finance company (deploy/rules.example.yaml) and padded with
campaign rules so that 10 line rules and 40 segment rules are in play; the leads follow a
skewed, repetitive mix of event types, products, channels, campaigns, regions, ages and
attributes like real traffic, with every lead distinct (its own event id, phone and time).

Each repetition compiles the rules afresh (nothing carries over between runs) and classifies
the whole batch in one `classify` call; the median of the repetitions is reported. `rate` is
leads per wall-clock second, `rate_per_core` leads per CPU second of this single-threaded
process; `details` adds the compile time, the slowest repetition, how many distinct decisions
the leads got and the machine.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import machine, pick, write_report
from classify import RuleSet, classify, parse_rules
from schemas.lead import CustomerContext, Hints, Lead
from schemas.vocab import Intake

NOW = datetime(2026, 11, 23, 2, 30, tzinfo=UTC)  # 10:30 in Shanghai, a Monday
LINES = (
    "enterprise_loan",
    "personal_credit_loan",
    "car_loan",
    "financial_leasing",
    "wealth_management",
)


def bench_rules() -> str:
    """10 business-line rules and 40 segment rules, as a rules file."""
    lines = [
        "defaults: {business_line: personal_credit_loan, segment: general, priority: 30, realtime_boost: 10}",
        "business_lines:",
        "  - {id: bl-enterprise-product, business_line: enterprise_loan, when: {product: [enterprise_loan, sme_credit, invoice_financing]}}",
        "  - {id: bl-enterprise-company, business_line: enterprise_loan, when: {attributes.customer_type: business}}",
        "  - {id: bl-car-product, business_line: car_loan, when: {product: [car_loan, used_car_loan]}}",
        "  - {id: bl-car-campaign, business_line: car_loan, when: {campaign: {starts_with: auto-}}}",
        "  - {id: bl-leasing, business_line: financial_leasing, when: {product: [financial_leasing, equipment_leasing]}}",
        "  - {id: bl-wealth-product, business_line: wealth_management, when: {product: [wealth_management, fund, deposit_plus]}}",
        "  - {id: bl-wealth-source, business_line: wealth_management, when: {source: wealth-app}}",
        "  - {id: bl-wealth-silent, business_line: wealth_management, when: {event_type: stock_profile, attributes.ltv: {gte: 50000}}}",
        "  - {id: bl-credit-product, business_line: personal_credit_loan, when: {product: [personal_credit_loan, cash_loan, credit_card]}}",
        "  - {id: bl-credit-region, business_line: personal_credit_loan, when: {region: [CN-31, CN-44], channel: app}}",
        "segments:",
    ]
    for i in range(20):
        lines.append(
            f"  - {{id: seg-campaign-{i:02}, segment: campaign_{i:02}, priority: {55 + i}, "
            f"when: {{campaign: 2026-promo-{i:02}, event_type: [order_pending_payment, form_submit]}}}}"
        )
    lines += [
        "  - {id: seg-key-account, lines: [enterprise_loan], segment: key_account, priority: 85, sla_class: hot, when: {attributes.annual_revenue: {gte: 10000000}}}",
        "  - {id: seg-enterprise-form, lines: [enterprise_loan], segment: enterprise_form, priority: 70, when: {event_type: form_submit}}",
        "  - {id: seg-test-drive, lines: [car_loan], segment: test_drive, priority: 85, sla_class: hot, when: {attributes.form: test_drive}}",
        "  - {id: seg-car-pending, lines: [car_loan], segment: car_pending_7d, priority: 92, sla_class: hot, when: {event_type: order_pending_payment, age_days: {lte: 7}}}",
        "  - {id: seg-equipment-quote, lines: [financial_leasing], segment: equipment_quote, priority: 80, when: {attributes.amount: {gte: 200000}}}",
        "  - {id: seg-leasing-form, lines: [financial_leasing], segment: leasing_form, priority: 65, when: {event_type: form_submit}}",
        "  - {id: seg-silent-high-value, lines: [wealth_management], segment: silent_high_value, priority: 70, when: {intake: stock, attributes.tags: {contains: high_value}}}",
        "  - {id: seg-wealth-returning, lines: [wealth_management], segment: wealth_returning, priority: 60, when: {is_returning_customer: true}}",
        "  - {id: seg-card-upgrade, lines: [personal_credit_loan], segment: card_upgrade, priority: 55, when: {product: credit_card, is_returning_customer: true}}",
        "  - {id: seg-cash-evening, lines: [personal_credit_loan], segment: cash_evening, priority: 45, when: {product: cash_loan, hour_local: {gte: 20}}}",
        "  - {id: seg-pending-payment-30d, segment: pending_payment_30d, priority: 90, sla_class: hot, when: {event_type: order_pending_payment, age_days: {lte: 30}}}",
        "  - {id: seg-browsed-10d, segment: browsed_10d_no_order, priority: 60, when: {event_type: browse, age_days: {lte: 10}, attributes.ordered: {ne: true}}}",
        "  - {id: seg-new-signup, segment: new_signup, priority: 80, sla_class: hot, when: {event_type: signup, age_days: {lte: 3}}}",
        "  - {id: seg-ad-click, segment: ad_click, priority: 75, when: {any: [{event_type: ad_click}, {channel: ad}]}}",
        "  - {id: seg-partner-batch, segment: partner_batch, priority: 40, when: {channel: partner}}",
        "  - {id: seg-cross-sell, segment: cross_sell, priority: 50, when: {open_leads_other_lines: {gte: 1}}}",
        "  - {id: seg-high-amount, segment: high_amount, priority: 65, when: {attributes.amount: {gte: 100000}}}",
        "  - {id: seg-vip, segment: vip, priority: 85, when: {attributes.tags: {contains_any: [vip, platinum]}}}",
        "  - {id: seg-stale, segment: stale, priority: 10, when: {age_days: {gt: 30}}}",
        "  - {id: seg-weekend, segment: weekend, priority: 35, when: {weekday_local: {gte: 6}}}",
    ]
    return "\n".join(lines) + "\n"


_EVENTS = [
    ("browse", 35),
    ("signup", 10),
    ("order_created", 8),
    ("order_pending_payment", 12),
    ("ad_click", 15),
    ("form_submit", 8),
    ("stock_profile", 10),
    ("partner_referral", 2),
]
_PRODUCTS = [
    (None, 20),
    ("personal_credit_loan", 18),
    ("cash_loan", 10),
    ("credit_card", 8),
    ("car_loan", 10),
    ("used_car_loan", 4),
    ("enterprise_loan", 5),
    ("sme_credit", 3),
    ("financial_leasing", 4),
    ("equipment_leasing", 2),
    ("wealth_management", 8),
    ("fund", 5),
    ("deposit_plus", 3),
]
_SOURCES = [
    ("loan-app", 40),
    ("car-mall", 12),
    ("wealth-app", 10),
    ("ads-platform", 15),
    ("partner-gateway", 5),
    ("dwh-silent-users", 10),
    ("web-portal", 8),
]
_CHANNELS = [("app", 45), ("web", 25), ("ad", 15), ("partner", 5), (None, 10)]
_CAMPAIGNS = (
    [(None, 50)]
    + [(f"2026-promo-{i:02}", 1.5) for i in range(20)]
    + [
        ("auto-expo", 3),
        ("auto-spring", 2),
        ("2026-double-11", 15),
    ]
)
_REGIONS = [(None, 20)] + [(f"CN-{code}", 1 + (code % 7)) for code in range(11, 66, 2)]
_INTAKES: list[tuple[Intake, float]] = [
    ("realtime", 60),
    ("http", 5),
    ("stock", 20),
    ("staging", 15),
]
_TAGS = ("silent", "high_value", "vip", "platinum", "young", "car_owner", "homeowner", "student")


def bench_leads(count: int, seed: int = 7) -> tuple[list[Lead], dict[str, CustomerContext]]:
    """`count` distinct leads and the context of the returning customers among them."""
    rng = random.Random(seed)
    leads: list[Lead] = []
    context: dict[str, CustomerContext] = {}
    for i in range(count):
        intake: Intake = pick(rng, _INTAKES)
        event_type = "stock_profile" if intake == "stock" else pick(rng, _EVENTS)
        if intake in ("realtime", "http"):
            age = timedelta(seconds=rng.uniform(0.1, 900))
        else:
            age = timedelta(days=rng.uniform(0, 60))
        attributes: dict[str, Any] = {
            "amount": rng.choice((0, 1000, 5000)) + rng.randrange(200_000)
        }
        if rng.random() < 0.6:
            attributes["tags"] = rng.sample(_TAGS, rng.randrange(0, 4))
        if event_type == "stock_profile":
            attributes["ltv"] = round(rng.lognormvariate(10, 1.2), 2)
        if rng.random() < 0.05:
            attributes["customer_type"] = "business"
            attributes["annual_revenue"] = rng.randrange(100_000, 50_000_000)
        if event_type == "form_submit":
            attributes["form"] = rng.choice(("test_drive", "callback", "quote"))
        if event_type == "browse":
            attributes["ordered"] = rng.random() < 0.2
        phone = f"+86138{i:08d}"
        hints = None
        if intake == "staging" and rng.random() < 0.1:
            hints = Hints(business_line=rng.choice(LINES), priority=rng.randrange(40, 90))
        leads.append(
            Lead(
                event_id=f"bench-{i}",
                occurred_at=NOW - age,
                source=pick(rng, _SOURCES),
                event_type=event_type,
                phone=phone,
                intake=intake,
                channel=pick(rng, _CHANNELS),
                product=pick(rng, _PRODUCTS),
                campaign=pick(rng, _CAMPAIGNS),
                region=pick(rng, _REGIONS),
                timezone=rng.choice(("Asia/Shanghai",) * 9 + ("Asia/Hong_Kong",)),
                country="CN",
                attributes=attributes,
                hints=hints,
            )
        )
        if rng.random() < 0.15:
            context[phone] = CustomerContext(
                is_returning_customer=True,
                open_lead_lines=frozenset(rng.sample(LINES, rng.randrange(0, 3))),
            )
    return leads, context


def _timed(
    rules_text: str, leads: Sequence[Lead], context: dict[str, CustomerContext]
) -> tuple[float, float, RuleSet]:
    rules = parse_rules(rules_text, source="bench")
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    classify(leads, rules, NOW, context)
    return time.perf_counter() - wall, time.process_time() - cpu, rules


def run(leads: int = 200_000, repeats: int = 5, json_path: Path | None = None) -> dict[str, Any]:
    """Measure, write the JSON report to `json_path` (if given) and return it."""
    text = bench_rules()
    started = time.perf_counter()
    rules = parse_rules(text, source="bench")
    compile_ms = (time.perf_counter() - started) * 1000
    batch, context = bench_leads(leads)
    runs = [_timed(text, batch, context) for _ in range(max(1, repeats))]
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    report: dict[str, Any] = {
        "scenario": "classify",
        "leads": leads,
        "rules": len(rules.line_rules) + len(rules.segment_rules),
        "rate": round(leads / wall),
        "rate_per_core": round(leads / cpu) if cpu > 0 else None,
        "details": {
            "line_rules": len(rules.line_rules),
            "segment_rules": len(rules.segment_rules),
            "repeats": len(runs),
            "seconds_median": round(wall, 4),
            "rate_slowest": round(leads / max(r[0] for r in runs)),
            "distinct_decisions": len(runs[-1][2].plan.outcomes),
            "compile_ms": round(compile_ms, 2),
            "machine": machine(),
        },
    }
    write_report(json_path, report)
    return report


def show(console: Console, report: dict[str, Any]) -> None:
    """The report as a table, for people."""
    details = report["details"]
    table = Table(title="leadflow bench classify", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        "rules",
        f"{report['rules']} ({details['line_rules']} line, {details['segment_rules']} segment)",
    )
    table.add_row("leads", f"{report['leads']:,}")
    table.add_row("leads/s (median of runs)", f"[bold]{report['rate']:,}[/]")
    table.add_row("leads/s per core (CPU time)", f"{report['rate_per_core']:,}")
    table.add_row("leads/s (slowest run)", f"{details['rate_slowest']:,}")
    table.add_row("distinct decisions", f"{details['distinct_decisions']:,}")
    table.add_row("compile rules", f"{details['compile_ms']} ms")
    machine = details["machine"]
    table.add_row(
        "machine", f"{machine['cpu']}, {machine['cores']} cores, Python {machine['python']}"
    )
    console.print(table)
