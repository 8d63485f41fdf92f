"""Classification rules at run time: the configured file, hot reload, and `leadflow rules`.

- `RulesHolder` owns the rules of one process: it loads the file named by the settings,
  refuses a broken one, and swaps a new `RuleSet` in with one reference assignment. Workers read
  `holder.rules` once per batch, so a batch is classified by exactly one rule set and a reload
  never loses or re-processes events.
- `watch_rules(...)` is the task a worker runs beside its loop: it reloads when the file
  changes (polling), on SIGHUP, and on `NOTIFY leadflow_rules_reload` (sent by
  `leadflow rules reload` through PostgreSQL, so it reaches every worker of the deployment).
- `lead_from_event`, the case files of `leadflow rules test`, and the views the CLI prints.

A file that cannot be used at start stops the process (`RulesInvalid`); one that breaks later
is refused with a log line and `leadflow_rules_reloads_total{outcome="refused"}`, and the old
rules keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import psycopg
import yaml
from prometheus_client import Counter, Gauge, Info
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.engine import make_url

from classify import (
    Defaults,
    Explanation,
    Level,
    RulesError,
    RuleSet,
    RuleWarning,
    classify,
    load_rules,
)
from ingest.chain import ChainConfig, IntakeChain, Record, Rejected
from leadflow.errors import LeadflowError, ServiceUnavailable
from leadflow.logs import get_logger
from leadflow.settings import Settings, masked_url
from schemas.events import LeadEvent
from schemas.lead import Classification, CustomerContext, Hints, Lead
from schemas.vocab import INTAKES, Intake

log = get_logger("leadflow.rules")

#: The PostgreSQL channel `leadflow rules reload` notifies and workers listen on.
RELOAD_CHANNEL = "leadflow_rules_reload"
#: application_name of the listening connections, so the CLI can count them.
LISTENER_NAME = "leadflow-rules-listener"
#: The demo rules, used when classification.rules_file is not set (shipped in the package; the
#: same file as deploy/rules.example.yaml).
DEMO_RULES = Path(__file__).resolve().parent / "demo" / "rules.yaml"

ReloadOutcome = Literal["applied", "unchanged", "refused"]

RELOADS = Counter(
    "leadflow_rules_reloads_total",
    "Attempts to reload the classification rules, by outcome (applied, unchanged, refused).",
    ["outcome"],
)
LOADED_AT = Gauge(
    "leadflow_rules_loaded_timestamp_seconds",
    "When the classification rules in use were loaded (Unix time).",
    multiprocess_mode="livemax",
)
RULES_INFO = Info("leadflow_rules", "The classification rules in use: version and file.")


class RulesInvalid(LeadflowError):
    """A rules file (or a case or event file for `leadflow rules`) that cannot be used."""


def rules_path(settings: Settings) -> Path:
    """The rules file of these settings: classification.rules_file, else the demo rules."""
    return settings.classification.rules_file or DEMO_RULES


def defaults_of(settings: Settings) -> Defaults:
    section = settings.classification
    return Defaults(
        business_line=section.default_business_line,
        segment=section.default_segment,
        priority=section.default_priority,
        realtime_boost=section.realtime_boost,
    )


def load(path: Path, defaults: Defaults) -> RuleSet:
    """`classify.load_rules`, with the error as the CLI shows it."""
    try:
        return load_rules(path, defaults=defaults)
    except RulesError as exc:
        hint = ""
        if path == DEMO_RULES and not path.exists():
            hint = (
                " The demo rules ship inside leadflow and are missing from this installation; set "
                "classification.rules_file (or LEADFLOW_CLASSIFICATION_RULES_FILE) to your rules file."
            )
        raise RulesInvalid(f"invalid classification rules: {exc}{hint}") from None


# --- the rules of a running process ---------------------------------------------------------


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class RulesHolder:
    """The rules in use by one process, swapped atomically on reload. Thread-safe.

    Construction loads the file and raises `RulesInvalid` if it cannot be used.
    """

    def __init__(self, path: Path, defaults: Defaults) -> None:
        self.path = path
        self.defaults = defaults
        self._lock = threading.Lock()
        self._stamp = _stamp(path)
        self._rules = load(path, defaults)
        self._published(self._rules)
        log.info(
            "classification rules loaded",
            file=str(path),
            version=self._rules.version,
            rules=len(self._rules.line_rules) + len(self._rules.segment_rules),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> RulesHolder:
        return cls(rules_path(settings), defaults_of(settings))

    @property
    def rules(self) -> RuleSet:
        """The current rules; read it once per batch and use that for the whole batch."""
        return self._rules

    def changed_on_disk(self) -> bool:
        """The file was modified, replaced or removed since it was last read."""
        return _stamp(self.path) != self._stamp

    def reload(self, reason: str) -> ReloadOutcome:
        """Read the file again; swap the rules in if they are valid and different.

        Never raises for a bad file: it is refused, logged and counted, the old rules stay.
        """
        with self._lock:
            # Stamp first: a file that changes while it is read is read again next time.
            self._stamp = _stamp(self.path)
            try:
                rules = load(self.path, self.defaults)
            except RulesInvalid as exc:
                RELOADS.labels("refused").inc()
                log.error(
                    "classification rules refused; the previous rules stay in use",
                    reason=reason,
                    version=self._rules.version,
                    error=str(exc),
                )
                return "refused"
            if rules.version == self._rules.version:
                RELOADS.labels("unchanged").inc()
                log.info("classification rules unchanged", reason=reason, version=rules.version)
                return "unchanged"
            previous, self._rules = self._rules.version, rules
            self._published(rules)
            RELOADS.labels("applied").inc()
            log.info(
                "classification rules reloaded",
                reason=reason,
                version=rules.version,
                previous=previous,
            )
            return "applied"

    def _published(self, rules: RuleSet) -> None:
        LOADED_AT.set(time.time())
        RULES_INFO.info({"version": rules.version, "file": str(self.path)})


async def watch_rules(
    holder: RulesHolder,
    settings: Settings,
    database_url: str | None,
    stop: asyncio.Event,
) -> None:
    """Keep `holder` current until `stop` is set.

    Reloads when the file changes (checked every classification.reload_interval; 0 turns that
    off), on SIGHUP (when running in the main thread), and on NOTIFY leadflow_rules_reload
    when `database_url` is given. Never raises for a bad file or a database that is down: the
    listener reconnects with backoff and reloads once reconnected, in case it missed a request.
    Run one per process and share its holder between the roles there: a process has one
    SIGHUP handler, and the watcher removes it when it stops.
    """
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    reasons: list[str] = []

    def request(reason: str) -> None:
        reasons.append(reason)
        wake.set()

    hup = _on_sighup(loop, lambda: request("SIGHUP"))
    listener = None
    if database_url:
        listener = asyncio.create_task(_listen(database_url, request, stop), name="rules-listen")
    interval = settings.classification.reload_interval.total_seconds()
    stopped = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            woken = asyncio.create_task(wake.wait())
            await asyncio.wait(
                {woken, stopped},
                timeout=interval if interval > 0 else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            woken.cancel()
            if stop.is_set():
                break
            if wake.is_set():
                wake.clear()
                reason = "; ".join(dict.fromkeys(reasons))
                reasons.clear()
                await asyncio.to_thread(holder.reload, reason)
            elif interval > 0 and holder.changed_on_disk():
                await asyncio.to_thread(holder.reload, "the file changed")
    finally:
        stopped.cancel()
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


def _on_sighup(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False  # signal handlers belong to the main thread
    try:
        loop.add_signal_handler(signal.SIGHUP, callback)
    except (NotImplementedError, RuntimeError, AttributeError, ValueError):
        return False  # no SIGHUP here (e.g. Windows)
    return True


def libpq_url(database_url: str) -> str:
    """A SQLAlchemy-style or libpq PostgreSQL URL as psycopg takes it."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def _listen(database_url: str, request: Callable[[str], None], stop: asyncio.Event) -> None:
    backoff = 1.0
    first = True
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(
                libpq_url(database_url),
                autocommit=True,
                application_name=LISTENER_NAME,
                connect_timeout=10,
            ) as conn:
                await conn.execute(f"LISTEN {RELOAD_CHANNEL}")
                log.info("listening for rules reloads", channel=RELOAD_CHANNEL)
                if not first:
                    request("reconnected to PostgreSQL (a reload may have been missed)")
                first, backoff = False, 1.0
                async for notify in conn.notifies():
                    request(f"NOTIFY {notify.payload}" if notify.payload else "NOTIFY")
        except (psycopg.Error, OSError) as exc:
            log.warning(
                "rules reload listener cannot reach PostgreSQL; retrying",
                database=masked_url(database_url),
                error=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                retry_in=backoff,
            )
            first = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 30.0)


def send_reload(database_url: str, payload: str) -> int:
    """NOTIFY every listening worker; returns how many listeners the database sees."""
    try:
        with psycopg.connect(libpq_url(database_url), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = %s AND datname = current_database()",
                [LISTENER_NAME],
            ).fetchone()
            conn.execute("SELECT pg_notify(%s, %s)", [RELOAD_CHANNEL, payload])
    except psycopg.Error as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServiceUnavailable(
            f"Cannot reach PostgreSQL at {masked_url(database_url)} to send the reload: {cause}. "
            "Check database.url (or LEADFLOW_DATABASE_URL), or run this beside the `leadflow up` "
            "whose workers should reload."
        ) from None
    return int(row[0]) if row else 0


def reload_payload(rules: RuleSet) -> str:
    return f"version {rules.version} checked by {socket.gethostname()} (pid {os.getpid()})"


# --- events and cases -----------------------------------------------------------------------


def lead_from_event(
    event: LeadEvent,
    intake: Intake = "realtime",
    hints: Hints | None = None,
    default_region: str = "CN",
) -> Lead:
    """The `Lead` the intake chain would make of a valid LeadEvent (phone in E.164, timezone
    from the phone when the event has none), or `RulesInvalid` when the intake would reject it.
    """
    outcome = _normaliser(default_region).normalise(Record(None), event, intake, "", hints)
    if isinstance(outcome, Rejected):
        raise RulesInvalid(
            f"the intake would reject this event ({outcome.code}): {outcome.detail}."
        )
    return outcome.lead


@functools.lru_cache(maxsize=8)
def _normaliser(default_region: str) -> IntakeChain:
    return IntakeChain(ChainConfig(default_region=default_region))


def read_event(path: Path) -> LeadEvent:
    """A LeadEvent v1 from a JSON file, or `RulesInvalid` saying what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesInvalid(f"{path}: cannot read the event: {exc}.") from None
    try:
        return LeadEvent.model_validate_json(text)
    except ValidationError as exc:
        raise RulesInvalid(f"{path}: not a valid LeadEvent v1: {_errors(exc)}.") from None


def _errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


EXPECTED_KEYS = ("business_line", "segment", "priority", "sla_class", "matched_rules")
_CASE_KEYS = ("name", "event", "intake", "age_days", "now", "customer", "hints", "expect")


@dataclass(frozen=True)
class Case:
    name: str
    lead: Lead
    now: datetime
    context: CustomerContext
    expect: Mapping[str, Any]


@dataclass(frozen=True)
class CaseResult:
    case: Case
    got: Classification
    differences: list[tuple[str, Any, Any]] = field(default_factory=list)  # key, expected, got

    @property
    def passed(self) -> bool:
        return not self.differences


def load_cases(path: Path, now: datetime | None = None) -> list[Case]:
    """The cases of a `leadflow rules test` file, or `RulesInvalid` naming the bad case.

        now: "2026-11-23T10:00:00+08:00"   # optional; default: the current time
        cases:
          - name: pending payment in the app
            event: {event_type: order_pending_payment, product: personal_credit_loan}
            age_days: 2                      # occurred_at = now - 2 days
            intake: realtime                 # default realtime; stock, staging or http
            customer: {returning: true, open_lines: [car_loan]}
            hints: {business_line: car_loan} # submission hints, as staging extracts give
            expect: {business_line: personal_credit_loan, segment: pending_payment_30d, priority: 100}

    An event needs only what the case is about: schema_version, event_id, occurred_at,
    source and customer.phone are filled in when missing.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesInvalid(f"{path}: cannot read the cases: {exc}.") from None
    except yaml.YAMLError as exc:
        raise RulesInvalid(f"{path}: not valid YAML: {exc}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise RulesInvalid(f"{path}: expected a mapping with a list of `cases`.")
    try:
        file_now = _when(data["now"], "now") if "now" in data else None
    except ValueError as exc:
        raise RulesInvalid(f"{path}: {exc}.") from None
    base_now = file_now or now or datetime.now(UTC)
    cases = []
    for i, item in enumerate(data["cases"]):
        label = f"{path}: cases[{i}]"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label += f" ({item['name']})"
        try:
            cases.append(_case(item, i, base_now))
        except (ValueError, TypeError) as exc:
            raise RulesInvalid(f"{label}: {exc}") from None
    return cases


def _when(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"{where}: {value!r} needs a UTC offset, e.g. +08:00")
    return moment


def _case(item: Any, index: int, base_now: datetime) -> Case:
    if not isinstance(item, dict):
        raise ValueError("each case is a mapping with name, event and expect")
    unknown = sorted(set(item) - set(_CASE_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; a case has {', '.join(_CASE_KEYS)}")
    name = str(item.get("name") or f"case {index + 1}")
    now = _when(item["now"], "now") if "now" in item else base_now
    event_data = item.get("event")
    if not isinstance(event_data, dict):
        raise ValueError("`event` is required: the LeadEvent fields the case is about")
    event_data = dict(event_data)
    event_data.setdefault("schema_version", 1)
    event_data.setdefault("event_id", f"rules-case-{index + 1}")
    event_data.setdefault("source", "rules-test")
    customer = dict(event_data.get("customer") or {})
    customer.setdefault("phone", "+8613800138000")
    event_data["customer"] = customer
    if "age_days" in item:
        age = item["age_days"]
        if isinstance(age, bool) or not isinstance(age, int | float):
            raise ValueError("age_days is a number of days")
        event_data["occurred_at"] = now - timedelta(days=age)
    event_data.setdefault("occurred_at", now)
    try:
        event = LeadEvent.model_validate(event_data)
    except ValidationError as exc:
        raise ValueError(f"not a valid LeadEvent: {_errors(exc)}") from None
    intake = item.get("intake", "realtime")
    if intake not in INTAKES:
        raise ValueError(f"intake is one of {', '.join(INTAKES)}")
    hints_data = item.get("hints")
    hints = None
    if hints_data is not None:
        if not isinstance(hints_data, dict) or set(hints_data) - {
            "business_line",
            "segment",
            "priority",
        }:
            raise ValueError("hints has business_line, segment and priority")
        hints = Hints(**hints_data)
    customer_data = item.get("customer") or {}
    if not isinstance(customer_data, dict) or set(customer_data) - {"returning", "open_lines"}:
        raise ValueError("customer has returning (true/false) and open_lines (a list of lines)")
    context = CustomerContext(
        is_returning_customer=bool(customer_data.get("returning", False)),
        open_lead_lines=frozenset(customer_data.get("open_lines") or ()),
    )
    expect = item.get("expect")
    if not isinstance(expect, dict) or not expect or set(expect) - set(EXPECTED_KEYS):
        raise ValueError(f"expect is a mapping of some of {', '.join(EXPECTED_KEYS)}")
    return Case(name, lead_from_event(event, intake, hints), now, context, expect)


def run_cases(rules: RuleSet, cases: Sequence[Case]) -> list[CaseResult]:
    results = []
    for case in cases:
        got = classify([case.lead], rules, case.now, {case.lead.phone: case.context})[0]
        differences = []
        for key, expected in case.expect.items():
            actual: Any = getattr(got, key)
            if key == "matched_rules":
                actual, expected = list(actual), list(expected or [])
            if actual != expected:
                differences.append((key, expected, actual))
        results.append(CaseResult(case, got, differences))
    return results


# --- what `leadflow rules ...` prints -------------------------------------------------------


def show_check(console: Console, rules: RuleSet, warnings: Sequence[RuleWarning]) -> None:
    console.print(f"[bold]{escape(rules.source)}[/]  version {rules.version}", highlight=False)
    lines = Table(title="business lines (first match wins)", title_justify="left")
    for column in ("#", "id", "line", "when"):
        lines.add_column(column, overflow="fold")
    for i, line_rule in enumerate(rules.line_rules, 1):
        lines.add_row(str(i), line_rule.id, line_rule.business_line, escape(line_rule.when.text()))
    segments = Table(
        title="segments (first match among the line's rules wins)", title_justify="left"
    )
    for column in ("#", "id", "segment", "priority", "sla", "lines", "when"):
        segments.add_column(column, overflow="fold")
    for i, seg in enumerate(rules.segment_rules, 1):
        segments.add_row(
            str(i),
            seg.id,
            seg.segment,
            str(seg.priority),
            seg.sla_class or "",
            ", ".join(sorted(seg.lines)) if seg.lines is not None else "any",
            escape(seg.when.text()),
        )
    console.print(lines)
    console.print(segments)
    d = rules.defaults
    console.print(
        f"defaults: line {d.business_line}, segment {d.segment}, priority {d.priority}; "
        f"real-time priority boost +{d.realtime_boost}",
        highlight=False,
    )
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(str(warning))}", highlight=False)
    console.print(
        f"[green]valid[/]: {len(rules.line_rules)} business-line and "
        f"{len(rules.segment_rules)} segment rules, "
        f"{len(warnings)} warning{'s' if len(warnings) != 1 else ''}.",
        highlight=False,
    )


def show_explanation(console: Console, explanation: Explanation, rules: RuleSet) -> None:
    facts = Table(title="what the rules see", title_justify="left")
    facts.add_column("field")
    facts.add_column("value", overflow="fold")
    for name, value in sorted(explanation.facts.items()):
        if value is None:
            shown = "missing"
        elif isinstance(value, float):
            shown = f"{value:.2f}"
        elif isinstance(value, str):
            shown = value
        else:
            shown = json.dumps(value, ensure_ascii=False, default=str)
        facts.add_row(name, escape(shown))
    console.print(facts)
    for level in (explanation.business_line, explanation.segment):
        _show_level(console, level)
    decision = explanation.classification
    console.print(
        f"decision: line [bold]{decision.business_line}[/], segment [bold]{decision.segment}[/], "
        f"priority [bold]{decision.priority}[/]"
        + (f", SLA class {decision.sla_class}" if decision.sla_class else "")
        + f"; matched {', '.join(decision.matched_rules) or 'no rule'} (rules {rules.version})",
        highlight=False,
    )


def _show_level(console: Console, level: Level) -> None:
    title = level.name.replace("_", " ")
    how = {"rule": "by rule", "default": "by default", "hint": "by the submission hint"}
    table = Table(
        title=f"{title}: {level.value} ({how[level.decided_by]})",
        title_justify="left",
    )
    table.add_column("rule")
    table.add_column("result")
    table.add_column("why not", overflow="fold")
    for step in level.steps:
        if step.matched:
            table.add_row(step.rule_id, "[green]matched[/]", "")
        elif step.skipped:
            table.add_row(f"[dim]{step.rule_id}[/]", "[dim]not applicable[/]", step.skipped)
        else:
            table.add_row(step.rule_id, "[red]no[/]", escape("; ".join(step.reasons)))
    if level.steps:
        console.print(table)
    else:
        console.print(f"[bold]{table.title}[/]", highlight=False)


def show_results(console: Console, results: Sequence[CaseResult], rules: RuleSet) -> None:
    table = Table(
        title=f"cases against {rules.source} (version {rules.version})", title_justify="left"
    )
    table.add_column("case", overflow="fold")
    table.add_column("result")
    table.add_column("got", overflow="fold")
    for result in results:
        got = result.got
        table.add_row(
            escape(result.case.name),
            "[green]pass[/]" if result.passed else "[red]FAIL[/]",
            f"{got.business_line} / {got.segment} p{got.priority} ({', '.join(got.matched_rules) or 'defaults'})",
        )
    console.print(table)
    failed = [r for r in results if not r.passed]
    if failed:
        diff = Table(title="differences", title_justify="left")
        for column in ("case", "key", "expected", "got"):
            diff.add_column(column, overflow="fold")
        for result in failed:
            for key, expected, actual in result.differences:
                diff.add_row(
                    escape(result.case.name),
                    key,
                    f"[green]{escape(str(expected))}[/]",
                    f"[red]{escape(str(actual))}[/]",
                )
        console.print(diff)
    console.print(
        f"{len(results) - len(failed)} passed, {len(failed)} failed.",
        style="red" if failed else "green",
    )


__all__ = [
    "DEMO_RULES",
    "LISTENER_NAME",
    "RELOAD_CHANNEL",
    "RulesHolder",
    "RulesInvalid",
    "defaults_of",
    "lead_from_event",
    "rules_path",
    "send_reload",
    "watch_rules",
]
