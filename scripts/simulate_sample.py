"""Write deploy/simulate/leads.sample.jsonl: one working day of LeadEvents for `leadflow simulate`.

    .venv/bin/python scripts/simulate_sample.py [--seed 2026] [--out FILE]

The day is Tuesday 2026-11-24 in Shanghai. Arrivals follow a call center's day: a trickle from
07:00, a morning peak around 10:00, a lunch dip, an afternoon peak and an evening tail to 23:00,
so the queues' 09:00-21:00 call window and agents' shifts both matter. The mix follows the demo
rules (deploy/rules.example.yaml): personal credit (pending payments, sign-ups, ad clicks,
browsing, partner batches) is the largest line, then car loans (test drives at the car mall),
wealth management, enterprise loans and financial leasing. Customers have Chinese names and
mainland mobile numbers written the ways people write them, a few are in Hong Kong, Singapore
or New York; some come back during the day (their events merge), a few events are redelivered,
a few withdraw consent, about 2% are invalid (bad phone, missing fields, a time without
offset, broken JSON, schema version 2), and a handful belong to the evening before (outside a
simulation of the 24th). The same seed writes the same file, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

SHANGHAI = ZoneInfo("Asia/Shanghai")
DAY = datetime(2026, 11, 24, tzinfo=SHANGHAI)
OUT = Path(__file__).resolve().parents[1] / "deploy" / "simulate" / "leads.sample.jsonl"
CUSTOMERS = 2700
#: Relative arrivals per local hour, 07:00 to 22:00.
HOURLY = {7: 2, 8: 5, 9: 9, 10: 11, 11: 9, 12: 5, 13: 6, 14: 9, 15: 10, 16: 9, 17: 7, 18: 5,
          19: 5, 20: 5, 21: 3, 22: 2}  # fmt: skip

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华建国志强文辉玉兰红梅海燕晓东子轩雨涵欣怡浩然梓萱宇轩思远佳怡嘉欣俊杰雪婷鹏飞晨阳"
REGIONS = ["CN-31", "CN-11", "CN-44", "CN-32", "CN-33", "CN-51", "CN-42", "CN-37", "CN-50"]
MOBILE_PREFIXES = ["134", "135", "136", "137", "138", "139", "150", "151", "152", "157", "158",
                   "159", "182", "183", "187", "188", "130", "131", "132", "155", "156", "185",
                   "186", "133", "153", "180", "181", "189", "177", "199"]  # fmt: skip


def _name(rng: random.Random) -> str:
    given = "".join(rng.choice(GIVEN) for _ in range(rng.choice((1, 2, 2))))
    return rng.choice(SURNAMES) + given


def _phone(rng: random.Random) -> tuple[str, str | None]:
    """A phone as a person writes it, and the customer's timezone when not mainland China."""
    roll = rng.random()
    if roll < 0.01:
        return (
            f"+852 {rng.choice('569')}{rng.randrange(1000, 9999)} {rng.randrange(1000, 9999)}",
            "Asia/Hong_Kong",
        )
    if roll < 0.015:
        return (
            f"+65 {rng.choice('89')}{rng.randrange(100, 999)} {rng.randrange(1000, 9999)}",
            "Asia/Singapore",
        )
    if roll < 0.02:
        return f"+1 (646) {rng.randrange(200, 999)}-{rng.randrange(1000, 9999)}", "America/New_York"
    digits = rng.choice(MOBILE_PREFIXES) + f"{rng.randrange(10**8):08d}"
    style = rng.random()
    if style < 0.5:
        return digits, None
    if style < 0.75:
        return f"{digits[:3]} {digits[3:7]} {digits[7:]}", None
    if style < 0.9:
        return f"+86 {digits[:3]}-{digits[3:7]}-{digits[7:]}", None
    return f"+86{digits}", None


def _interest(rng: random.Random) -> dict[str, Any]:
    """What a customer came for: source, product, event type, channel, campaign, attributes."""
    line = rng.choices(
        ["personal_credit", "car", "wealth", "enterprise", "leasing", "partner", "browse"],
        weights=[38, 16, 12, 7, 4, 8, 15],
    )[0]
    if line == "personal_credit":
        product = rng.choices(["personal_credit_loan", "cash_loan", "credit_card"], [5, 3, 2])[0]
        event_type = rng.choices(
            ["order_pending_payment", "signup", "ad_click", "order_created", "browse"],
            [30, 25, 20, 10, 15],
        )[0]
        channel = "ad" if event_type == "ad_click" else rng.choice(["app", "app", "web"])
        return {
            "source": "loan-app" if channel == "app" else "web",
            "product": product,
            "event_type": event_type,
            "channel": channel,
            "campaign": rng.choice([None, None, "2026-double-11", "winter-cash"]),
            "attributes": {"amount": rng.choice([3000, 5000, 10000, 20000, 50000])},
        }
    if line == "car":
        test_drive = rng.random() < 0.45
        return {
            "source": "car-mall",
            "product": rng.choice(["car_loan", "used_car_loan"]),
            "event_type": "form_submit"
            if test_drive
            else rng.choice(["signup", "ad_click", "order_pending_payment"]),
            "channel": rng.choice(["web", "app"]),
            "campaign": rng.choice([None, "auto-winter-2026", "auto-nev"]),
            "attributes": {"form": "test_drive"}
            if test_drive
            else {"model": rng.choice(["sedan", "suv", "ev"])},
        }
    if line == "wealth":
        return {
            "source": "wealth-app",
            "product": rng.choice(["wealth_management", "fund", "deposit_plus"]),
            "event_type": rng.choice(["signup", "order_pending_payment", "browse", "ad_click"]),
            "channel": "app",
            "campaign": None,
            "attributes": {"assets": rng.choice([50000, 200000, 1000000])},
        }
    if line == "enterprise":
        return {
            "source": "web",
            "product": rng.choice(["enterprise_loan", "sme_credit", "invoice_financing"]),
            "event_type": rng.choice(["form_submit", "signup", "order_created"]),
            "channel": "web",
            "campaign": None,
            "attributes": {
                "customer_type": "business",
                "annual_revenue": rng.choice([2_000_000, 8_000_000, 30_000_000, 120_000_000]),
            },
        }
    if line == "leasing":
        return {
            "source": "web",
            "product": rng.choice(["financial_leasing", "equipment_leasing"]),
            "event_type": rng.choice(["form_submit", "signup"]),
            "channel": "web",
            "campaign": None,
            "attributes": {"equipment": rng.choice(["truck", "excavator", "medical"])},
        }
    if line == "partner":
        return {
            "source": rng.choice(["partner-ctrip", "partner-meituan", "partner-unionpay"]),
            "product": rng.choice(["personal_credit_loan", "credit_card", None]),
            "event_type": "signup",
            "channel": "partner",
            "campaign": "partner-q4",
            "attributes": {},
        }
    return {
        "source": "web",
        "product": None,
        "event_type": "browse",
        "channel": "web",
        "campaign": None,
        "attributes": {"pages": rng.randrange(1, 12)},
    }


def _arrival(rng: random.Random) -> datetime:
    hour = rng.choices(list(HOURLY), weights=list(HOURLY.values()))[0]
    return DAY + timedelta(hours=hour, seconds=rng.randrange(3600))


def _event(
    rng: random.Random, customer: dict[str, Any], at: datetime, interest: dict[str, Any]
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": f"{rng.getrandbits(64):016x}",
        "occurred_at": at.isoformat(timespec="seconds"),
        "source": interest["source"],
        "event_type": interest["event_type"],
        "channel": interest["channel"],
        "customer": {k: v for k, v in customer.items() if v is not None},
    }
    for key in ("product", "campaign"):
        if interest[key] is not None:
            event[key] = interest[key]
    if rng.random() < 0.5:  # half of the producers say it; 1% of those withdraw it
        event["consent"] = {"telemarketing": rng.random() >= 0.02}
    if interest["attributes"]:
        event["attributes"] = interest["attributes"]
    return event


def _invalid(rng: random.Random, event: dict[str, Any]) -> str:
    """The event spoiled the ways producers spoil them."""
    kind = rng.choices(
        ["phone", "missing", "naive_time", "json", "version", "slug"], [35, 15, 15, 15, 10, 10]
    )[0]
    event = json.loads(json.dumps(event))
    if kind == "phone":
        event["customer"]["phone"] = rng.choice(
            ["12345", "138001", "000-0000", "0086 1", "call me"]
        )
    elif kind == "missing":
        del event["customer"]
    elif kind == "naive_time":
        event["occurred_at"] = event["occurred_at"][:19]
    elif kind == "version":
        event["schema_version"] = 2
    elif kind == "slug":
        event["source"] = "Loan App"
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return text[: len(text) // 2] if kind == "json" else text


def generate(seed: int) -> list[str]:
    rng = random.Random(seed)  # noqa: S311 (reproducible sample data, not secrets)
    customers = []
    for n in range(CUSTOMERS):
        phone, timezone = _phone(rng)
        customers.append(
            {
                "phone": phone,
                "external_id": f"u{n:05d}",
                "name": _name(rng),
                "region": None if timezone else rng.choice(REGIONS),
                "timezone": timezone,
            }
        )
    rows: list[tuple[datetime, str]] = []
    for customer in customers:
        interest = _interest(rng)
        at = _arrival(rng)
        event = _event(rng, customer, at, interest)
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        if rng.random() < 0.02:
            text = _invalid(rng, event)
        rows.append((at, text))
        if rng.random() < 0.005:  # redelivered by the producer
            rows.append((at + timedelta(seconds=rng.randrange(1, 30)), text))
        if rng.random() < 0.08:  # comes back later the same day: the event merges
            later = at + timedelta(minutes=rng.randrange(5, 240))
            if later < DAY + timedelta(days=1):
                again = dict(interest, event_type="order_pending_payment")
                rows.append(
                    (
                        later,
                        json.dumps(
                            _event(rng, customer, later, again),
                            ensure_ascii=False,
                            separators=(",", ":"),
                        ),
                    )
                )
        if rng.random() < 0.04:  # a second business line
            other = _interest(rng)
            later = at + timedelta(minutes=rng.randrange(1, 120))
            if later < DAY + timedelta(days=1):
                rows.append(
                    (
                        later,
                        json.dumps(
                            _event(rng, customer, later, other),
                            ensure_ascii=False,
                            separators=(",", ":"),
                        ),
                    )
                )
    for _ in range(15):  # the evening before
        customer = rng.choice(customers)
        at = DAY - timedelta(hours=2, seconds=rng.randrange(7200))
        rows.append(
            (
                at,
                json.dumps(
                    _event(rng, customer, at, _interest(rng)),
                    ensure_ascii=False,
                    separators=(",", ":"),
                ),
            )
        )
    # Producers deliver in roughly, not strictly, time order.
    rows.sort(key=lambda row: row[0] + timedelta(seconds=rng.randrange(0, 90)))
    return [text for _, text in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    lines = generate(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
