"""What the demo feeds: product events, warehouse users, data-team extracts, agents' choices.

Pure generators over a seeded `random.Random` and a `now` passed in, so tests can hold the mix
to the demo rules (leadflow/demo/rules.yaml): every business line and segment shows up, valid
events are accepted and the spoiled ones are rejected with the code they are meant to get.
The feeder (leadflow/demo/feeder.py) decides when; this module decides what.
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import phonenumbers

from schemas.vocab import Disposition

SURNAMES: Final = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
GIVEN: Final = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超兰霞平刚华建国志文辉玉红梅海燕晓东子轩雨涵欣怡浩然梓萱宇思远佳嘉俊雪婷鹏飞晨阳"
REGIONS: Final = ("CN-31", "CN-11", "CN-44", "CN-32", "CN-33", "CN-51", "CN-42", "CN-37", "CN-50")
MOBILE_PREFIXES: Final = (
    "130", "131", "132", "133", "134", "135", "136", "137", "138", "139", "150", "151", "152",
    "153", "155", "156", "157", "158", "159", "177", "180", "181", "182", "183", "185", "186",
    "187", "188", "189", "199",
)  # fmt: skip
INVALID_PHONES: Final = ("12345", "138001", "000-0000", "0086 1", "call me", "+86 999")
DOMAINS: Final = ("qq.com", "163.com", "126.com", "gmail.com", "outlook.com", "sina.com")

MessageKind = Literal[
    "new",  # a new customer
    "returning",  # a customer seen before, same business line: merges into the open lead
    "cross_sell",  # a customer seen before, another business line
    "redelivery",  # an earlier message again, byte for byte: a no-op
    "no_consent",  # consent.telemarketing false: stored, never allocated
    "invalid_phone",
    "not_json",
    "bad_utf8",
    "missing_customer",
    "naive_time",
    "schema_v2",
]
#: What the intake answers to each kind of message (None: accepted).
EXPECTED_REJECT: Final[dict[MessageKind, str | None]] = {
    "new": None,
    "returning": None,
    "cross_sell": None,
    "redelivery": None,
    "no_consent": None,
    "invalid_phone": "invalid_phone",
    "not_json": "invalid_json",
    "bad_utf8": "invalid_utf8",
    "missing_customer": "schema_violation",
    "naive_time": "schema_violation",
    "schema_v2": "unsupported_schema_version",
}
POISON: Final = frozenset({"not_json", "bad_utf8", "missing_customer", "naive_time", "schema_v2"})


def chinese_name(rng: random.Random) -> str:
    given = "".join(rng.choice(GIVEN) for _ in range(rng.choice((1, 2, 2))))
    return rng.choice(SURNAMES) + given


def mainland_mobile(rng: random.Random) -> str:
    """Eleven digits of a mainland mobile number."""
    return rng.choice(MOBILE_PREFIXES) + f"{rng.randrange(10**8):08d}"


def written(rng: random.Random, digits: str) -> str:
    """A mainland mobile as people write it."""
    style = rng.random()
    if style < 0.5:
        return digits
    if style < 0.75:
        return f"{digits[:3]} {digits[3:7]} {digits[7:]}"
    if style < 0.9:
        return f"+86 {digits[:3]}-{digits[3:7]}-{digits[7:]}"
    return f"+86{digits}"


@dataclass
class Customer:
    digits: str  # the phone as first seen; written differently on later events
    foreign: str | None  # a full non-mainland number, when the customer is abroad
    external_id: str
    name: str
    email: str | None
    region: str | None
    timezone: str | None
    line: str  # the business line of their last event

    def phone(self, rng: random.Random) -> str:
        return self.foreign if self.foreign is not None else written(rng, self.digits)


def _foreign(rng: random.Random, country: str, first: str) -> str:
    """A valid mobile number of Hong Kong or Singapore, written with spaces."""
    while True:
        local = f"{rng.choice(first)}{rng.randrange(10**7):07d}"
        text = f"{country} {local[:4]} {local[4:]}"
        if phonenumbers.is_valid_number(phonenumbers.parse(text)):
            return text


def new_customer(rng: random.Random, serial: int) -> Customer:
    roll = rng.random()
    foreign: str | None = None
    timezone: str | None = None
    if roll < 0.015:
        foreign, timezone = _foreign(rng, "+852", "569"), "Asia/Hong_Kong"
    elif roll < 0.025:
        foreign, timezone = _foreign(rng, "+65", "89"), "Asia/Singapore"
    email = None
    if rng.random() < 0.3:
        email = f"user{rng.randrange(10**6)}@{rng.choice(DOMAINS)}"
    return Customer(
        digits=mainland_mobile(rng),
        foreign=foreign,
        external_id=f"u-{serial}",
        name=chinese_name(rng),
        email=email,
        region=None if timezone else rng.choice(REGIONS),
        timezone=timezone,
        line="",
    )


@dataclass(frozen=True)
class Interest:
    """What a customer came for: the fields of an event that the rules read."""

    line: str  # the business line the demo rules should give it (for the mix, not the rules)
    source: str
    event_type: str
    channel: str
    product: str | None = None
    campaign: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


LINE_WEIGHTS: Final = {
    "personal_credit": 38,
    "car": 16,
    "wealth": 12,
    "enterprise": 9,
    "leasing": 6,
    "partner": 7,
    "browse": 12,
}


def interest(rng: random.Random, kind: str | None = None) -> Interest:
    """A product team's event mix over the five business lines of the demo rules."""
    kind = kind or rng.choices(list(LINE_WEIGHTS), weights=list(LINE_WEIGHTS.values()))[0]
    if kind == "personal_credit":
        event_type = rng.choices(
            ["order_pending_payment", "signup", "ad_click", "order_created"], [35, 30, 25, 10]
        )[0]
        channel = "ad" if event_type == "ad_click" else rng.choice(["app", "app", "web"])
        return Interest(
            "personal_credit_loan",
            "loan-app" if channel == "app" else ("ad-platform" if channel == "ad" else "web"),
            event_type,
            channel,
            rng.choices(["personal_credit_loan", "cash_loan", "credit_card"], [5, 3, 2])[0],
            rng.choice([None, None, "2026-double-11", "winter-cash"]),
            {"amount": rng.choice([3000, 5000, 10000, 20000, 50000])},
        )
    if kind == "car":
        test_drive = rng.random() < 0.45
        return Interest(
            "car_loan",
            "car-mall",
            "form_submit"
            if test_drive
            else rng.choice(["signup", "ad_click", "order_pending_payment"]),
            rng.choice(["web", "app"]),
            rng.choice(["car_loan", "used_car_loan"]),
            rng.choice([None, "auto-winter-2026", "auto-nev"]),
            {"form": "test_drive"} if test_drive else {"model": rng.choice(["sedan", "suv", "ev"])},
        )
    if kind == "wealth":
        return Interest(
            "wealth_management",
            "wealth-app",
            rng.choice(["signup", "order_pending_payment", "browse", "ad_click"]),
            "app",
            rng.choice(["wealth_management", "fund", "deposit_plus"]),
            None,
            {"assets": rng.choice([50000, 200000, 1000000])},
        )
    if kind == "enterprise":
        return Interest(
            "enterprise_loan",
            "web",
            rng.choice(["form_submit", "signup", "order_pending_payment"]),
            "web",
            rng.choice(["enterprise_loan", "sme_credit", "invoice_financing"]),
            None,
            {
                "customer_type": "business",
                "annual_revenue": rng.choice([2_000_000, 8_000_000, 30_000_000, 120_000_000]),
            },
        )
    if kind == "leasing":
        return Interest(
            "financial_leasing",
            "web",
            rng.choice(["form_submit", "signup"]),
            "web",
            rng.choice(["financial_leasing", "equipment_leasing"]),
            None,
            {"equipment": rng.choice(["truck", "excavator", "medical"])},
        )
    if kind == "partner":
        return Interest(
            "personal_credit_loan",
            rng.choice(["partner-ctrip", "partner-meituan", "partner-unionpay"]),
            "form_submit",
            "partner",
            rng.choice(["personal_credit_loan", "credit_card", None]),
            "partner-q4",
            {},
        )
    return Interest(
        "personal_credit_loan",
        "web",
        "browse",
        "web",
        None,
        None,
        {"pages": rng.randrange(1, 12), "ordered": False},
    )


@dataclass(frozen=True)
class Message:
    """One message for the raw topic: its key, its bytes, and what it is meant to be."""

    key: bytes | None
    value: bytes
    kind: MessageKind


def _dumps(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


class EventStream:
    """Real-time LeadEvents as product teams send them.

    Mostly new customers; returning ones (merging into their open lead, or a cross-sell in
    another line), redeliveries, a little withdrawn consent, invalid phones, and now and then
    a poison message. Remembers the last `memory` customers and messages, no more.
    """

    def __init__(self, rng: random.Random, *, memory: int = 2000, prefix: str = "demo") -> None:
        self.rng = rng
        self.prefix = prefix
        self.customers: deque[Customer] = deque(maxlen=memory)
        self.sent: deque[Message] = deque(maxlen=200)
        self.serial = 0

    def _event_id(self) -> str:
        return f"{self.prefix}-{self.rng.getrandbits(64):016x}"

    def _event(self, customer: Customer, what: Interest, now: datetime) -> dict[str, Any]:
        rng = self.rng
        person: dict[str, Any] = {
            "phone": customer.phone(rng),
            "external_id": customer.external_id,
            "name": customer.name,
            "email": customer.email,
            "region": customer.region,
            "timezone": customer.timezone,
        }
        event: dict[str, Any] = {
            "schema_version": 1,
            "event_id": self._event_id(),
            "occurred_at": (now - timedelta(seconds=rng.uniform(0, 5))).isoformat(
                timespec="milliseconds"
            ),
            "source": what.source,
            "event_type": what.event_type,
            "channel": what.channel,
            "customer": {k: v for k, v in person.items() if v is not None},
        }
        if what.product:
            event["product"] = what.product
        if what.campaign:
            event["campaign"] = what.campaign
        if what.attributes:
            event["attributes"] = dict(what.attributes)
        if rng.random() < 0.5:  # half of the producers say it
            event["consent"] = {"telemarketing": True}
        return event

    def _message(self, event: dict[str, Any], kind: MessageKind) -> Message:
        customer = event.get("customer") or {}
        key = customer.get("external_id") or customer.get("phone")
        return Message(key.encode() if key else None, _dumps(event), kind)

    def next(self, now: datetime) -> Message:
        """The next message of the stream."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.03 and self.sent:
            old = rng.choice(self.sent)
            return replace(old, kind="redelivery")
        if roll < 0.04:
            return self._poison(now)
        if roll < 0.16 and self.customers:
            customer = rng.choice(self.customers)
            if rng.random() < 0.65:  # the same business line again: merges
                what = replace(
                    interest(rng, _kind_of(customer.line)),
                    event_type=rng.choice(["order_pending_payment", "browse", "order_created"]),
                )
                kind: MessageKind = "returning"
            else:  # interested in something else now: a cross-sell
                what = replace(
                    interest(rng, rng.choice(["car", "wealth", "leasing", "enterprise"])),
                    event_type="order_created",
                )
                kind = "cross_sell"
            customer.line = what.line
            event = self._event(customer, what, now)
        else:
            self.serial += 1
            customer = new_customer(rng, self.serial)
            what = interest(rng)
            customer.line = what.line
            event = self._event(customer, what, now)
            kind = "new"
            if roll > 0.985:
                event["customer"]["phone"] = rng.choice(INVALID_PHONES)
                kind = "invalid_phone"
            elif roll > 0.975:
                event["consent"] = {"telemarketing": False}
                kind = "no_consent"
            if kind != "invalid_phone":
                self.customers.append(customer)
        message = self._message(event, kind)
        if kind in ("new", "returning", "cross_sell"):
            self.sent.append(message)
        return message

    def _poison(self, now: datetime) -> Message:
        rng = self.rng
        self.serial += 1
        event = self._event(new_customer(rng, self.serial), interest(rng), now)
        kind: MessageKind = rng.choice(
            ["not_json", "bad_utf8", "missing_customer", "naive_time", "schema_v2"]
        )
        if kind == "not_json":
            text = _dumps(event)
            return Message(None, text[: len(text) // 2], kind)
        if kind == "bad_utf8":
            return Message(None, _dumps(event).replace(b'"event_type"', b'"\xff\xfe_type"'), kind)
        if kind == "missing_customer":
            del event["customer"]
        elif kind == "naive_time":
            event["occurred_at"] = now.replace(tzinfo=None).isoformat(timespec="seconds")
        else:
            event["schema_version"] = 2
        return self._message(event, kind)


def _kind_of(line: str) -> str | None:
    return {
        "personal_credit_loan": "personal_credit",
        "car_loan": "car",
        "wealth_management": "wealth",
        "enterprise_loan": "enterprise",
        "financial_leasing": "leasing",
    }.get(line)


# --- the warehouse's silent high-value users (stock source) ----------------------------------

CRM_TAGS: Final = (
    ("high_value",),
    ("high_value", "frequent_login"),
    ("high_value", "card_holder"),
    ("vip",),
    ("vip", "high_value"),
)


@dataclass(frozen=True)
class CrmUser:
    user_id: str
    mobile: str
    nick: str
    region: str
    ltv: int
    tags: tuple[str, ...]
    silent_days: int
    silent: bool


def crm_user(rng: random.Random, user_id: str, *, silent: float = 1.0) -> CrmUser:
    """One user with a high-value tag, silent with probability `silent` (the source reads only
    silent ones); 2% with a phone the poller will reject."""
    mobile = mainland_mobile(rng)
    if rng.random() < 0.02:
        mobile = rng.choice(INVALID_PHONES)
    return CrmUser(
        user_id=user_id,
        mobile=mobile,
        nick=chinese_name(rng),
        region=rng.choice(REGIONS),
        # Most are worth the wealth team's call (>= 50,000); the rest go to personal credit.
        ltv=rng.choice([20_000, 35_000, 60_000, 80_000, 150_000, 300_000, 1_200_000]),
        tags=rng.choice(CRM_TAGS),
        silent_days=rng.randrange(30, 365),
        silent=rng.random() < silent,
    )


# --- the data team's ad-hoc extracts (staging) ----------------------------------------------

STAGING_COLUMNS: Final = (
    ("phone", "text"),
    ("name", "text"),
    ("email", "text"),
    ("external_id", "text"),
    ("product", "text"),
    ("event_type", "text"),
    ("occurred_at", "timestamptz"),
    ("region", "text"),
    ("campaign", "text"),
    ("pages", "integer"),
    ("ordered", "boolean"),
    ("amount", "numeric(12,2)"),
)


@dataclass(frozen=True)
class Extract:
    """A table the data team fills and submits, with the hints it submits it with."""

    kind: str
    source: str | None
    event_type: str | None
    business_line: str | None
    segment: str | None
    priority: int | None
    campaign: str | None
    rows: list[tuple[Any, ...]]  # in STAGING_COLUMNS order

    def table_name(self, at: datetime) -> str:
        return f"demo_{self.kind}_{at:%Y%m%d_%H%M%S}"


EXTRACT_KINDS: Final = (
    "browsed_no_order_10d",
    "pending_payment_30d_unpaid",
    "partner_batch",
    "auto_campaign",
)
EXTRACT_PRODUCTS: Final[dict[str, tuple[str | None, ...]]] = {
    "browsed_no_order_10d": ("personal_credit_loan", "cash_loan", "fund", None),
    "pending_payment_30d_unpaid": ("personal_credit_loan", "credit_card", "car_loan", "fund"),
    "partner_batch": ("personal_credit_loan", "credit_card"),
    "auto_campaign": ("car_loan", "used_car_loan"),
}
EXTRACT_EVENT_TYPES: Final = {
    "browsed_no_order_10d": "browse",
    "pending_payment_30d_unpaid": "order_pending_payment",
    "partner_batch": "form_submit",
    "auto_campaign": "browse",
}


def staging_extract(rng: random.Random, now: datetime, kind: str, rows: int) -> Extract:
    """`rows` rows of one kind of extract, about 5% of them dirty (bad or missing phones,
    event types that are not slugs, names too long), a few stale (over 30 days old)."""
    products = EXTRACT_PRODUCTS[kind]
    event_type = EXTRACT_EVENT_TYPES[kind]
    max_age = 10 if event_type == "browse" else 30
    out: list[tuple[Any, ...]] = []
    for _ in range(rows):
        age = timedelta(days=rng.uniform(0.1, max_age))
        if rng.random() < 0.04:
            age = timedelta(days=rng.uniform(31, 90))  # stale
        phone: str | None = written(rng, mainland_mobile(rng))
        row_type = None if rng.random() < 0.7 else event_type
        name = chinese_name(rng)
        dirt = rng.random()
        if dirt < 0.02:
            phone = rng.choice(INVALID_PHONES)
        elif dirt < 0.03:
            phone = None
        elif dirt < 0.04:
            row_type = "Browse Page"
        elif dirt < 0.05:
            name = name * 200
        out.append(
            (
                phone,
                name,
                f"u{rng.randrange(10**6)}@{rng.choice(DOMAINS)}" if rng.random() < 0.2 else None,
                f"dwh-{rng.randrange(10**7)}" if rng.random() < 0.8 else None,
                rng.choice(products),
                row_type,
                now - age,
                rng.choice(REGIONS),
                None,
                rng.randrange(1, 20) if event_type == "browse" else None,
                False if event_type == "browse" else None,
                rng.choice([3000, 5000, 10000, 20000]) if event_type != "browse" else None,
            )
        )
    if kind == "browsed_no_order_10d":
        return Extract(kind, "dwh", event_type, None, None, None, None, out)
    if kind == "pending_payment_30d_unpaid":
        return Extract(kind, "dwh", event_type, None, None, None, "winter-cash", out)
    if kind == "partner_batch":
        return Extract(kind, "partner-unionpay", event_type, None, None, None, "partner-q4", out)
    return Extract(kind, "dwh", event_type, "car_loan", None, 65, "auto-winter-2026", out)


# --- what simulated agents do with an assignment --------------------------------------------

OUTCOME_WEIGHTS: Final[dict[Disposition, int]] = {
    "converted": 12,
    "not_interested": 26,
    "no_answer": 26,
    "callback": 14,
    "invalid_number": 5,
    "do_not_call": 3,
}
NOTES: Final[dict[Disposition, tuple[str, ...]]] = {
    "converted": ("客户有意向，已发送申请链接", "已成交，资料已提交", "客户同意办理"),
    "not_interested": ("暂无需求", "已在他行办理", "利率不合适"),
    "no_answer": ("无人接听", "占线", "关机"),
    "callback": ("客户在开会，约好稍后回电", "晚点再联系", "客户要求下午回电"),
    "invalid_number": ("空号", "号码错误"),
    "do_not_call": ("客户要求不再来电",),
}
REJECT_REASONS: Final = ("客户只讲粤语", "非本组业务", "客户是同事亲属，需回避")


@dataclass(frozen=True)
class Plan:
    """An agent's plan for one assignment."""

    action: Literal["work", "ignore", "reject"]
    outcome: Disposition | None = None
    contact: bool = False  # record first contact before the disposition (the call was answered)
    dial_seconds: float = 0.0  # from opening the lead to first contact (or a no-answer)
    talk_seconds: float = 0.0  # from first contact to the disposition
    callback_in: timedelta | None = None
    note: str = ""


def plan_assignment(rng: random.Random) -> Plan:
    """Mostly work the lead; now and then leave it to expire, or hand it back."""
    roll = rng.random()
    if roll < 0.04:
        return Plan("ignore")
    if roll < 0.07:
        return Plan("reject", note=rng.choice(REJECT_REASONS))
    outcome: Disposition = rng.choices(
        list(OUTCOME_WEIGHTS), weights=list(OUTCOME_WEIGHTS.values())
    )[0]
    answered = outcome not in ("no_answer", "invalid_number")
    return Plan(
        "work",
        outcome,
        contact=answered,
        dial_seconds=rng.uniform(1.0, 3.0),
        talk_seconds=rng.uniform(2.0, 5.0) if answered else 0.0,
        callback_in=timedelta(seconds=rng.uniform(60, 180)) if outcome == "callback" else None,
        note=rng.choice(NOTES[outcome]),
    )
