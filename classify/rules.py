"""Rules files: read, checked and compiled once into an immutable `RuleSet`.

    version: 1
    defaults:                       # optional; what the caller's settings give otherwise
      business_line: personal_credit_loan
      segment: general
      priority: 30
      realtime_boost: 10            # added to the priority of real-time leads, capped at 100
    business_lines:                 # level one, first match wins
      - id: bl-car
        business_line: car_loan
        when: {product: car_loan}
    segments:                       # level two, first match among the rules for that line
      - id: seg-car-pending
        lines: [car_loan]           # optional: the rule applies to these lines only
        segment: pending_payment_30d
        priority: 90                # 0..100
        sla_class: hot              # optional
        when: {event_type: order_pending_payment, age_days: {lte: 30}}

Every mistake is reported at once, each with the file, line, column, rule id and key path, as a
`RulesError`. The rules version is a hash of the checked rules and defaults, not of the text, so
comments and formatting do not change it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path as FilePath
from typing import Any

import yaml

from classify.conditions import Cond, Parser, Path, Problem
from classify.engine import Plan

MAX_FILE_BYTES = 1024 * 1024
MAX_RULES = 1000  # per level
_MAX_YAML_DEPTH = 40
_MAX_YAML_NODES = 200_000  # after anchors/aliases are expanded
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")
_MAX_DESCRIPTION = 1000


class RulesError(ValueError):
    """A rules file that cannot be used. `str()` is for a person; `problems` lists each one."""

    def __init__(self, source: str, problems: Sequence[RuleProblem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            text = f"{self.problems[0]}"
        else:
            text = f"{source} has {len(self.problems)} problems: " + "; ".join(
                str(p) for p in self.problems
            )
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class RuleProblem:
    source: str
    line: int | None
    column: int | None
    rule_id: str | None
    where: str  # key path, e.g. segments[2].when.age_days.lte
    message: str

    def __str__(self) -> str:
        at = f"{self.source}:{self.line}:{self.column}" if self.line else self.source
        rule = f" (rule {self.rule_id})" if self.rule_id else ""
        where = f" {self.where}{rule}:" if self.where else ""
        return f"{at}:{where} {self.message}"


@dataclass(frozen=True, slots=True)
class Defaults:
    """What a lead gets when no rule of a level matches, and the real-time priority boost."""

    business_line: str = "general"
    segment: str = "general"
    priority: int = 50
    realtime_boost: int = 0


@dataclass(frozen=True, slots=True)
class LineRule:
    id: str
    business_line: str
    when: Cond
    description: str = ""
    line: int = 0  # in the rules file, for people


@dataclass(frozen=True, slots=True)
class SegmentRule:
    id: str
    segment: str
    priority: int
    when: Cond
    lines: frozenset[str] | None = None  # None: every line
    sla_class: str | None = None
    description: str = ""
    line: int = 0


@dataclass(frozen=True)
class RuleSet:
    """Checked, compiled classification rules; immutable and safe to share between threads.

    Build one with `load_rules` or `parse_rules`; a changed file means a new `RuleSet` (the
    compiled plan in `classify.engine` belongs to it).
    """

    source: str
    defaults: Defaults
    line_rules: tuple[LineRule, ...]
    segment_rules: tuple[SegmentRule, ...]
    version: str = field(init=False)
    fields: frozenset[str] = field(init=False)
    plan: Plan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        version = _version(self)
        plan = Plan(self.line_rules, self.segment_rules, self.defaults, version)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "fields", plan.reads)

    def lines(self) -> frozenset[str]:
        """The business lines these rules can give (the default included)."""
        return frozenset({self.defaults.business_line, *(r.business_line for r in self.line_rules)})


def _version(rules: RuleSet) -> str:
    document = {
        "defaults": asdict(rules.defaults),
        "business_lines": [
            {"id": r.id, "business_line": r.business_line, "when": r.when.data()}
            for r in rules.line_rules
        ],
        "segments": [
            {
                "id": r.id,
                "segment": r.segment,
                "priority": r.priority,
                "sla_class": r.sla_class,
                "lines": sorted(r.lines) if r.lines is not None else None,
                "when": r.when.data(),
            }
            for r in rules.segment_rules
        ],
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_rules(path: str | FilePath, *, defaults: Defaults | None = None) -> RuleSet:
    """Read, check and compile a rules file; raises `RulesError` naming the file."""
    path = FilePath(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise RulesError(
            str(path),
            [
                RuleProblem(
                    str(path), None, None, None, "", f"cannot read it: {exc.strerror or exc}"
                )
            ],
        ) from None
    if len(raw) > MAX_FILE_BYTES:
        raise _single(str(path), f"larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _single(str(path), f"not UTF-8 text (byte {exc.start})") from None
    return parse_rules(text, source=str(path), defaults=defaults)


def parse_rules(text: str, *, source: str = "<rules>", defaults: Defaults | None = None) -> RuleSet:
    """Check and compile rules from YAML text; raises `RulesError` with every problem found.

    `defaults` come from the caller's settings; a `defaults:` section in the text wins.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise _single(source, f"larger than {MAX_FILE_BYTES // 1024} KiB")
    document = _Document.read(text, source)
    return _RulesReader(document, source, defaults or Defaults()).read()


def _single(
    source: str, message: str, line: int | None = None, column: int | None = None
) -> RulesError:
    return RulesError(source, [RuleProblem(source, line, column, None, "", message)])


# --- YAML with positions --------------------------------------------------------------------

_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


@dataclass
class _Document:
    """Plain YAML data plus the line and column of every value and key, by key path."""

    data: Any
    marks: dict[Path, tuple[int, int]]
    key_marks: dict[Path, tuple[int, int]]

    @classmethod
    def read(cls, text: str, source: str) -> _Document:
        try:
            # The composer recurses once per nesting level: refuse deep nesting from the event
            # stream (which does not recurse) before composing.
            depth = 0
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                    depth += 1
                    if depth > _MAX_YAML_DEPTH:
                        mark = event.start_mark
                        raise _single(
                            source,
                            f"nested more than {_MAX_YAML_DEPTH} levels deep",
                            mark.line + 1 if mark else None,
                            mark.column + 1 if mark else None,
                        )
                elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                    depth -= 1
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            raise _single(
                source,
                f"not valid YAML: {problem}",
                mark.line + 1 if mark else None,
                mark.column + 1 if mark else None,
            ) from None
        document = cls(None, {}, {})
        if node is not None:
            walker = _Walker(document, source)
            document.data = walker.walk(node, ())
        return document


class _Walker:
    def __init__(self, document: _Document, source: str) -> None:
        self.document = document
        self.source = source
        self.nodes = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def fail(self, node: yaml.Node, message: str) -> RulesError:
        return _single(self.source, message, node.start_mark.line + 1, node.start_mark.column + 1)

    def walk(self, node: yaml.Node, path: Path) -> Any:
        self.nodes += 1
        if self.nodes > _MAX_YAML_NODES:
            raise self.fail(node, f"more than {_MAX_YAML_NODES} values (after expanding aliases)")
        self.document.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                raise self.fail(node, f"YAML tag {node.tag} is not allowed in rules")
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if (
                    not isinstance(key_node, yaml.ScalarNode)
                    or key_node.tag == "tag:yaml.org,2002:merge"
                ):
                    raise self.fail(key_node, "keys must be plain text")
                key = str(key_node.value)
                if key in result:
                    raise self.fail(key_node, f"duplicate key {key[:64]!r}")
                here = (*path, key)
                self.document.key_marks[here] = (
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                )
                result[key] = self.walk(value_node, here)
            return result
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                raise self.fail(node, f"YAML tag {node.tag} is not allowed in rules")
            return [self.walk(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        if node.tag not in _PLAIN_TAGS:
            raise self.fail(node, f"YAML tag {node.tag} is not allowed in rules (use plain values)")
        try:
            return self.constructor.construct_object(node, deep=True)
        except (ValueError, yaml.YAMLError):  # e.g. an integer with 5,000 digits
            raise self.fail(node, f"cannot read {str(node.value)[:40]!r} as a value") from None


# --- the rules themselves -------------------------------------------------------------------

_TOP_KEYS = ("version", "defaults", "business_lines", "segments")
_DEFAULT_KEYS = ("business_line", "segment", "priority", "realtime_boost")
_LINE_RULE_KEYS = ("id", "business_line", "when", "description")
_SEGMENT_RULE_KEYS = ("id", "segment", "priority", "sla_class", "lines", "when", "description")


class _RulesReader:
    def __init__(self, document: _Document, source: str, defaults: Defaults) -> None:
        self.document = document
        self.source = source
        self.defaults = defaults
        self.problems: list[Problem] = []
        self.ids: dict[str, Path] = {}  # rule id -> (level, index)

    def problem(self, path: Path, message: str, *, at_key: bool = False) -> None:
        self.problems.append(Problem(path, message, at_key))

    def read(self) -> RuleSet:
        data = self.document.data
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.problem((), "the top level must be a mapping with business_lines and segments")
            raise self.error()
        self.known_keys(data, (), _TOP_KEYS)
        version = data.get("version", 1)
        if version != 1 or isinstance(version, bool):
            self.problem(("version",), "only version 1 exists")
        defaults = self.defaults = self.read_defaults(data.get("defaults"))
        line_rules = [
            rule
            for i, item in enumerate(self.rule_list(data, "business_lines"))
            if (rule := self.line_rule(item, ("business_lines", i))) is not None
        ]
        segment_rules = [
            seg
            for i, item in enumerate(self.rule_list(data, "segments"))
            if (seg := self.segment_rule(item, ("segments", i))) is not None
        ]
        if self.problems:
            raise self.error()
        return RuleSet(self.source, defaults, tuple(line_rules), tuple(segment_rules))

    def error(self) -> RulesError:
        problems = []
        for p in self.problems:
            marks = self.document.key_marks if p.at_key else self.document.marks
            mark = marks.get(p.path) or self.document.marks.get(p.path)
            if mark is None:  # a missing key: point at its parent
                for cut in range(len(p.path) - 1, -1, -1):
                    if (mark := self.document.marks.get(p.path[:cut])) is not None:
                        break
            rule_id = self.rule_id_at(p.path)
            problems.append(
                RuleProblem(
                    self.source,
                    mark[0] if mark else None,
                    mark[1] if mark else None,
                    rule_id,
                    _dotted(p.path),
                    p.message,
                )
            )
        return RulesError(self.source, problems)

    def rule_id_at(self, path: Path) -> str | None:
        if len(path) >= 2 and path[0] in ("business_lines", "segments"):
            data = self.document.data
            try:
                rule = data[path[0]][path[1]]
            except (KeyError, IndexError, TypeError):
                return None
            rule_id = rule.get("id") if isinstance(rule, dict) else None
            if isinstance(rule_id, str) and _RULE_ID.match(rule_id):
                return rule_id
        return None

    def known_keys(self, data: Mapping[str, Any], path: Path, keys: Sequence[str]) -> None:
        for key in data:
            if key not in keys:
                self.problem(
                    (*path, key),
                    f"unknown key {key[:64]!r}; expected one of {', '.join(keys)}",
                    at_key=True,
                )

    def read_defaults(self, data: Any) -> Defaults:
        defaults = self.defaults
        if data is None:
            return defaults
        if not isinstance(data, dict):
            self.problem(("defaults",), "defaults is a mapping of " + ", ".join(_DEFAULT_KEYS))
            return defaults
        self.known_keys(data, ("defaults",), _DEFAULT_KEYS)
        changes: dict[str, Any] = {}
        for key in ("business_line", "segment"):
            if key in data and (name := self.name(data[key], ("defaults", key))) is not None:
                changes[key] = name
        for key in ("priority", "realtime_boost"):
            if key in data and (number := self.priority(data[key], ("defaults", key))) is not None:
                changes[key] = number
        return replace(defaults, **changes)

    def rule_list(self, data: Mapping[str, Any], key: str) -> list[Any]:
        rules = data.get(key)
        if rules is None:
            return []
        if not isinstance(rules, list):
            self.problem((key,), f"{key} is a list of rules (each starting with '- id: ...')")
            return []
        if len(rules) > MAX_RULES:
            self.problem((key,), f"at most {MAX_RULES} rules per level, not {len(rules)}")
            return []
        return rules

    def common(self, data: Any, path: Path, keys: Sequence[str], output: str) -> bool:
        if not isinstance(data, dict):
            self.problem(path, f"a rule is a mapping with id, {output} and when")
            return False
        self.known_keys(data, path, keys)
        rule_id = data.get("id")
        if not isinstance(rule_id, str) or not _RULE_ID.match(rule_id):
            self.problem(
                (*path, "id"),
                "every rule needs an id: 1 to 64 letters, digits, '_', '.' or '-'"
                + _quote_hint(rule_id),
            )
            return False
        if rule_id in self.ids:
            first = self.ids[rule_id]
            self.problem((*path, "id"), f"id {rule_id!r} is already used by {_dotted(first)}")
        else:
            self.ids[rule_id] = path
        description = data.get("description", "")
        if not isinstance(description, str) or len(description) > _MAX_DESCRIPTION:
            self.problem((*path, "description"), f"text of at most {_MAX_DESCRIPTION} characters")
        return True

    def line_rule(self, data: Any, path: Path) -> LineRule | None:
        if not self.common(data, path, _LINE_RULE_KEYS, "business_line"):
            return None
        line = self.name(data.get("business_line"), (*path, "business_line"))
        when = Parser(self.problems, segment_level=False).parse(data.get("when"), (*path, "when"))
        if line is None:
            return None
        return LineRule(
            data["id"], line, when, str(data.get("description", "")), self.line_of(path)
        )

    def segment_rule(self, data: Any, path: Path) -> SegmentRule | None:
        if not self.common(data, path, _SEGMENT_RULE_KEYS, "segment, priority"):
            return None
        segment = self.name(data.get("segment"), (*path, "segment"))
        priority: int | None = self.defaults.priority
        if "priority" in data:
            priority = self.priority(data["priority"], (*path, "priority"))
        sla_class = None
        if data.get("sla_class") is not None:
            sla_class = self.name(data["sla_class"], (*path, "sla_class"))
        lines = self.scope(data.get("lines"), (*path, "lines"))
        when = Parser(self.problems, segment_level=True).parse(data.get("when"), (*path, "when"))
        if segment is None or priority is None:
            return None
        return SegmentRule(
            data["id"],
            segment,
            priority,
            when,
            lines,
            sla_class,
            str(data.get("description", "")),
            self.line_of(path),
        )

    def scope(self, data: Any, path: Path) -> frozenset[str] | None:
        if data is None:
            return None
        items = data if isinstance(data, list) else [data]
        if not items:
            self.problem(path, "lines takes one business line or a non-empty list of them")
            return None
        names = [
            self.name(item, (*path, i) if isinstance(data, list) else path)
            for i, item in enumerate(items)
        ]
        return frozenset(n for n in names if n is not None)

    def name(self, value: Any, path: Path) -> str | None:
        if value is None:
            self.problem(path, f"{path[-1]} is required")
            return None
        if not isinstance(value, str) or not _NAME.match(value):
            self.problem(
                path,
                "a name of 1 to 64 lower-case letters, digits, '_', '.' or '-' "
                f"(like personal_credit_loan), not {str(value)[:40]!r}" + _quote_hint(value),
            )
            return None
        return value

    def priority(self, value: Any, path: Path) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
            self.problem(
                path, f"{path[-1]} is a whole number from 0 to 100, not {str(value)[:40]!r}"
            )
            return None
        return value

    def line_of(self, path: Path) -> int:
        mark = self.document.marks.get(path)
        return mark[0] if mark else 0


def _quote_hint(value: Any) -> str:
    if isinstance(value, bool | int | float):
        return " (YAML reads yes/no/on/off as true/false and digits as numbers: quote it)"
    return ""


def _dotted(path: Path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
