"""The condition language of classification rules: checked data compiled to closures.

A condition is YAML data, never code:

    when:
      event_type: order_pending_payment        # equal to
      channel: [app, web]                      # one of
      campaign: null                           # missing
      age_days: {lte: 30}                      # operators, several are all required
      attributes.tags: {contains: high_value}  # inside the event's free-form attributes
      any:                                     # combinators: all, any, not
        - product: car_loan
        - not: {source: partner-batch}

Why data and not an expression string: the ops team writes these, and a mapping can be checked
key by key with a YAML position for every mistake, cannot smuggle code, and compiles straight to
small Python closures: ~0.1 µs for `event_type = x and age_days <= 30`, where rule-engine's
`matches` took ~3.7 µs for the same rule on the same machine and DESIGN.md measured cel-python
at ~300 µs. Nothing here reaches eval, exec, compile, getattr or imports:
field names come from a fixed table, attribute paths only index into the event's `attributes`
mapping, there is no arithmetic (so no huge exponent to compute) and every size is bounded.

Semantics: a missing value (absent, or null) fails every test except `ne`, `not_in` and
`exists: false`. Values inside `attributes` are compared by JSON type, so `1` never equals `true`
or `"1"`. Comparisons (`lt`, `lte`, `gt`, `gte`) hold only for numbers.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Literal, TypeAlias, get_args

Facts: TypeAlias = Mapping[str, Any]
Test: TypeAlias = Callable[[Facts], bool]
Scalar: TypeAlias = str | int | float | bool
Path: TypeAlias = tuple[str | int, ...]

FieldType = Literal["text", "number", "bool", "any"]
Op = Literal[
    "eq",
    "ne",
    "in",
    "not_in",
    "lt",
    "lte",
    "gt",
    "gte",
    "exists",
    "contains",
    "contains_any",
    "starts_with",
    "ends_with",
]
OPS: tuple[Op, ...] = get_args(Op)

#: Bounds that keep a hostile or mistaken rules file from costing time or memory.
MAX_DEPTH = 10  # nested all/any/not
MAX_NODES_PER_RULE = 500  # tests and combinators in one rule's condition
MAX_TEXT = 256  # characters of one text literal
MAX_LIST = 1000  # items of one list literal
MAX_NUMBER = 1e12  # magnitude of a number literal
MAX_ATTRIBUTE_DEPTH = 4  # attributes.a.b.c.d
_ATTRIBUTE_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")

ATTRIBUTES_PREFIX = "attributes."


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """A field conditions may read: its type, whether it can be missing, where it is known."""

    type: FieldType
    nullable: bool
    doc: str
    segment_only: bool = False


FIELDS: Mapping[str, FieldSpec] = {
    "event_type": FieldSpec("text", False, "signup, browse, order_pending_payment, ad_click, ..."),
    "source": FieldSpec("text", False, "the producing system"),
    "channel": FieldSpec("text", True, "web, app, ad, partner, ..."),
    "product": FieldSpec("text", True, "the product the event is about"),
    "campaign": FieldSpec("text", True, "the marketing campaign"),
    "region": FieldSpec("text", True, "the customer's region, ISO 3166-2 (CN-31)"),
    "timezone": FieldSpec("text", True, "the customer's IANA timezone"),
    "country": FieldSpec("text", True, "ISO 3166-1 region of the phone number (CN)"),
    "intake": FieldSpec("text", False, "how the lead came in: realtime, stock, staging, http"),
    "realtime": FieldSpec("bool", False, "came in real time (Kafka or HTTP)"),
    "consent": FieldSpec("bool", True, "consent.telemarketing of the event"),
    "age_days": FieldSpec("number", False, "days from occurred_at to now, fractional"),
    "hour_local": FieldSpec("number", False, "hour of now in the lead's timezone (UTC without)"),
    "weekday_local": FieldSpec("number", False, "ISO weekday of now there, 1 Monday .. 7 Sunday"),
    "is_returning_customer": FieldSpec("bool", False, "the customer was known before"),
    "open_leads_other_lines": FieldSpec(
        "number", False, "open leads of the customer in other lines", segment_only=True
    ),
    "business_line": FieldSpec("text", False, "the line chosen at level one", segment_only=True),
}
_ATTRIBUTE_SPEC = FieldSpec("any", True, "a value inside the event's attributes")

_OPS_FOR: Mapping[FieldType, frozenset[Op]] = {
    "text": frozenset(
        {"eq", "ne", "in", "not_in", "exists", "contains", "starts_with", "ends_with"}
    ),
    "number": frozenset({"eq", "ne", "in", "not_in", "lt", "lte", "gt", "gte", "exists"}),
    "bool": frozenset({"eq", "ne", "exists"}),
    "any": frozenset(OPS),
}
_SYMBOL: Mapping[Op, str] = {
    "eq": "=",
    "ne": "!=",
    "in": "in",
    "not_in": "not in",
    "lt": "<",
    "lte": "<=",
    "gt": ">",
    "gte": ">=",
    "contains": "contains",
    "contains_any": "contains any of",
    "starts_with": "starts with",
    "ends_with": "ends with",
}


def field_spec(name: str) -> FieldSpec | None:
    """The spec of a field or attribute path, None when conditions may not read it."""
    if name.startswith(ATTRIBUTES_PREFIX):
        return _ATTRIBUTE_SPEC if _attribute_path_problem(name) is None else None
    return FIELDS.get(name)


def _attribute_path_problem(name: str) -> str | None:
    keys = name.split(".")[1:]
    if not keys or len(keys) > MAX_ATTRIBUTE_DEPTH:
        return f"an attribute path has 1 to {MAX_ATTRIBUTE_DEPTH} keys after 'attributes.'"
    for key in keys:
        if key.startswith("__"):
            return f"attribute key {key[:64]!r}: names starting with '__' are not allowed"
        if not _ATTRIBUTE_KEY.match(key):
            return (
                f"attribute key {key[:64]!r}: use 1 to 64 letters, digits, '_' or '-' "
                "(keys are looked up in the event's attributes, nothing else)"
            )
    return None


# --- the condition tree ---------------------------------------------------------------------


def type_tag(value: Any) -> tuple[str, Any] | None:
    """A JSON-type-aware identity for scalars (1, 1.0 and True must not all be equal)."""
    kind = type(value)
    if kind is str:
        return ("s", value)
    if kind is bool:
        return ("b", value)
    if kind is int or kind is float:
        return ("n", value)
    return None


@dataclass(frozen=True, slots=True)
class Atom:
    """One test of one field: `age_days lte 30`."""

    field: str
    op: Op
    value: Any  # a Scalar, a tuple of Scalars (in, not_in, contains_any, ...) or a bool (exists)
    test: Test = dc_field(compare=False, repr=False)

    def text(self) -> str:
        if self.op == "exists":
            return f"{self.field} {'exists' if self.value else 'is missing'}"
        value = self.value
        if isinstance(value, tuple) and len(value) == 1 and self.op in ("starts_with", "ends_with"):
            value = value[0]
        shown = (
            "[" + ", ".join(map(_show, value)) + "]" if isinstance(value, tuple) else _show(value)
        )
        return f"{self.field} {_SYMBOL[self.op]} {shown}"

    def data(self) -> Any:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {self.field: {self.op: value}}


@dataclass(frozen=True, slots=True)
class All:
    """Every child holds; no children means always."""

    children: tuple[Cond, ...]
    test: Test = dc_field(compare=False, repr=False)

    def text(self) -> str:
        if not self.children:
            return "always"
        return " and ".join(_wrapped(c) for c in self.children)

    def data(self) -> Any:
        return {"all": [c.data() for c in self.children]}


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one child holds."""

    children: tuple[Cond, ...]
    test: Test = dc_field(compare=False, repr=False)

    def text(self) -> str:
        return " or ".join(_wrapped(c) for c in self.children)

    def data(self) -> Any:
        return {"any": [c.data() for c in self.children]}


@dataclass(frozen=True, slots=True)
class Not:
    child: Cond
    test: Test = dc_field(compare=False, repr=False)

    def text(self) -> str:
        return f"not {_wrapped(self.child)}"

    def data(self) -> Any:
        return {"not": self.child.data()}


Cond: TypeAlias = Atom | All | AnyOf | Not


def _wrapped(cond: Cond) -> str:
    simple = isinstance(cond, Atom | Not) or (isinstance(cond, All) and len(cond.children) < 2)
    return cond.text() if simple else f"({cond.text()})"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value if re.fullmatch(r"[\w.\-+:]+", value) else repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def fields_read(cond: Cond) -> set[str]:
    """Every field the condition reads."""
    if isinstance(cond, Atom):
        return {cond.field}
    if isinstance(cond, Not):
        return fields_read(cond.child)
    return set().union(*(fields_read(c) for c in cond.children))


def atoms(cond: Cond) -> list[Atom]:
    if isinstance(cond, Atom):
        return [cond]
    if isinstance(cond, Not):
        return atoms(cond.child)
    return [a for c in cond.children for a in atoms(c)]


# --- building the tree (compiling as it goes) -----------------------------------------------


def _always(facts: Facts) -> bool:
    return True


def make_all(children: Sequence[Cond]) -> All:
    tests = tuple(c.test for c in children)
    test: Test
    if not tests:
        test = _always
    elif len(tests) == 1:
        test = tests[0]
    elif len(tests) == 2:
        first, second = tests

        def test(f: Facts) -> bool:
            return first(f) and second(f)

    else:

        def test(f: Facts) -> bool:
            for t in tests:  # noqa: SIM110 - a plain loop is faster than all() over a generator
                if not t(f):
                    return False
            return True

    return All(tuple(children), test)


def make_any(children: Sequence[Cond]) -> AnyOf:
    tests = tuple(c.test for c in children)

    def test(f: Facts) -> bool:
        for t in tests:  # noqa: SIM110 - a plain loop is faster than any() over a generator
            if t(f):
                return True
        return False

    return AnyOf(tuple(children), test)


def make_not(child: Cond) -> Not:
    inner = child.test
    return Not(child, lambda f: not inner(f))


def make_atom(name: str, op: Op, value: Any) -> Atom:
    """An atom with its compiled test; `value` must already be checked (see `Parser`)."""
    spec = field_spec(name)
    if spec is None:
        raise ValueError(f"unknown field {name!r}")
    return Atom(name, op, value, _compile_atom(name, spec.type, op, value))


def _compile_atom(name: str, kind: FieldType, op: Op, value: Any) -> Test:
    # Fields of a fixed type hold that type or None, so their tests are plain comparisons;
    # attribute values can be any JSON type, so theirs check the type as well.
    typed = kind != "any"
    if op == "exists":
        if value:
            return lambda f: f[name] is not None
        return lambda f: f[name] is None
    if op in ("eq", "ne"):
        equal = _equals(name, value, typed)
        if op == "eq":
            return equal
        return lambda f: not equal(f)
    if op in ("in", "not_in"):
        member = _member(name, value, typed)
        if op == "in":
            return member
        return lambda f: not member(f)
    if op in ("lt", "lte", "gt", "gte"):
        return _compare(name, op, value, typed)
    if op == "contains":
        return _contains(name, value)
    if op == "contains_any":
        wanted = frozenset(type_tag(v) for v in value)

        def contains_any(f: Facts) -> bool:
            v = f[name]
            return type(v) is list and any(type_tag(x) in wanted for x in v)

        return contains_any
    if op in ("starts_with", "ends_with"):
        affixes = tuple(value)
        if op == "starts_with":
            return lambda f: type(v := f[name]) is str and v.startswith(affixes)
        return lambda f: type(v := f[name]) is str and v.endswith(affixes)
    raise AssertionError(op)


def _equals(name: str, value: Scalar, typed: bool) -> Test:
    if typed or type(value) is str:
        return lambda f: f[name] == value  # only a str equals a str
    if type(value) is bool:
        return lambda f: f[name] is value
    return lambda f: (v := f[name]) == value and type(v) is not bool


def _member(name: str, values: tuple[Scalar, ...], typed: bool) -> Test:
    plain = frozenset(values)
    if typed:
        return lambda f: f[name] in plain
    if all(type(v) is str for v in values):
        # the type check first: an attribute may hold a list, which cannot be hashed
        return lambda f: type(v := f[name]) is str and v in plain
    tagged = frozenset(type_tag(v) for v in values)
    return lambda f: type_tag(f[name]) in tagged


def _compare(name: str, op: Op, limit: float, typed: bool) -> Test:
    if typed:
        if op == "lt":
            return lambda f: f[name] < limit
        if op == "lte":
            return lambda f: f[name] <= limit
        if op == "gt":
            return lambda f: f[name] > limit
        return lambda f: f[name] >= limit

    def number(v: Any) -> bool:
        return type(v) is int or type(v) is float

    if op == "lt":
        return lambda f: number(v := f[name]) and v < limit
    if op == "lte":
        return lambda f: number(v := f[name]) and v <= limit
    if op == "gt":
        return lambda f: number(v := f[name]) and v > limit
    return lambda f: number(v := f[name]) and v >= limit


def _contains(name: str, value: Scalar) -> Test:
    # A list contains an item; a text contains a substring.
    if type(value) is str:
        return lambda f: type(v := f[name]) in (list, str) and value in v
    wanted = type_tag(value)
    return lambda f: type(v := f[name]) is list and any(type_tag(x) == wanted for x in v)


# --- parsing YAML data into conditions, with positions for every mistake --------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One mistake in a rules file: where (a key path) and what."""

    path: Path
    message: str
    at_key: bool = False  # point at the key itself rather than at its value


class Parser:
    """Turns a rule's `when` data into a compiled condition, collecting problems.

    `segment_level` allows the fields known only once the business line is chosen.
    """

    def __init__(self, problems: list[Problem], *, segment_level: bool) -> None:
        self.problems = problems
        self.segment_level = segment_level
        self._nodes = 0
        self._too_big = False

    def parse(self, data: Any, path: Path) -> Cond:
        self._nodes = 0
        self._too_big = False
        if data is None:
            return make_all(())
        return self._cond(data, path, 0)

    def _problem(self, path: Path, message: str, *, at_key: bool = False) -> None:
        self.problems.append(Problem(path, message, at_key))

    def _cond(self, data: Any, path: Path, depth: int) -> Cond:
        self._nodes += 1
        if self._nodes > MAX_NODES_PER_RULE:
            if not self._too_big:  # say it once per rule
                self._too_big = True
                self._problem(path, f"a condition may hold at most {MAX_NODES_PER_RULE} tests")
            return make_all(())
        if depth > MAX_DEPTH:
            self._problem(path, f"conditions may nest at most {MAX_DEPTH} levels deep")
            return make_all(())
        if not isinstance(data, dict):
            self._problem(
                path,
                f"a condition is a mapping of field: value (or all/any/not), not {_describe(data)}",
            )
            return make_all(())
        parts: list[Cond] = []
        for key, value in data.items():
            here = (*path, key)
            if key in ("all", "any"):
                if not isinstance(value, list) or not value:
                    self._problem(here, f"'{key}' takes a non-empty list of conditions")
                    continue
                if len(value) > MAX_LIST:
                    self._problem(here, f"'{key}' takes at most {MAX_LIST} conditions")
                    continue
                children = [self._cond(v, (*here, i), depth + 1) for i, v in enumerate(value)]
                parts.append(make_all(children) if key == "all" else make_any(children))
            elif key == "not":
                parts.append(make_not(self._cond(value, here, depth + 1)))
            else:
                parts.extend(self._field(key, value, here))
        return parts[0] if len(parts) == 1 else make_all(parts)

    def _field(self, name: str, value: Any, path: Path) -> list[Cond]:
        spec = self._spec(name, path)
        if spec is None:
            return []
        if value is None:
            ops: dict[str, Any] = {"exists": False}
        elif isinstance(value, list):
            ops = {"in": value}
        elif isinstance(value, dict):
            if not value:
                self._problem(path, "give at least one operator, e.g. {eq: x}")
                return []
            ops = value
        else:
            ops = {"eq": value}
        explicit = isinstance(value, dict)
        atoms: list[Cond] = []
        for op, operand in ops.items():
            here = (*path, op) if explicit else path
            if op not in OPS:
                close = difflib.get_close_matches(str(op), OPS, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self._problem(
                    here,
                    f"unknown operator {str(op)[:40]!r}{hint}; one of {', '.join(OPS)}",
                    at_key=True,
                )
                continue
            checked = self._operand(name, spec, op, operand, here)
            if checked is not _INVALID:
                atoms.append(make_atom(name, op, checked))
            self._nodes += 1
        return atoms

    def _spec(self, name: str, path: Path) -> FieldSpec | None:
        if name.startswith(ATTRIBUTES_PREFIX):
            problem = _attribute_path_problem(name)
            if problem is not None:
                self._problem(path, problem, at_key=True)
                return None
            return _ATTRIBUTE_SPEC
        spec = FIELDS.get(name)
        if spec is None:
            if name.startswith("__"):
                reason = "names starting with '__' are not allowed"
            else:
                close = difflib.get_close_matches(name, FIELDS, n=1)
                reason = f"did you mean {close[0]}?" if close else "not a field of the lead"
            self._problem(
                path,
                f"unknown field {name[:64]!r} ({reason}); fields: {', '.join(FIELDS)}, "
                "attributes.<key>",
                at_key=True,
            )
            return None
        if spec.segment_only and not self.segment_level:
            self._problem(
                path,
                f"{name} is known only in segment rules (after the line is chosen)",
                at_key=True,
            )
            return None
        return spec

    def _operand(self, name: str, spec: FieldSpec, op: Op, operand: Any, path: Path) -> Any:
        if op not in _OPS_FOR[spec.type]:
            allowed = ", ".join(o for o in OPS if o in _OPS_FOR[spec.type])
            self._problem(path, f"{name} is {_article(spec.type)}; its operators are {allowed}")
            return _INVALID
        if op == "exists":
            if not isinstance(operand, bool):
                self._problem(path, f"exists takes true or false, not {_describe(operand)}")
                return _INVALID
            if not spec.nullable:
                self._problem(path, f"{name} always has a value; exists would be constant")
                return _INVALID
            return operand
        if op in ("in", "not_in", "contains_any"):
            return self._list(name, spec, op, operand, path, scalar_types=_scalar_kinds(spec))
        if op in ("starts_with", "ends_with"):
            items = operand if isinstance(operand, list) else [operand]
            return self._list(name, spec, op, items, path, scalar_types=("text",))
        if op in ("lt", "lte", "gt", "gte"):
            return self._scalar(name, op, operand, path, ("number",))
        if op == "contains" and spec.type == "text":
            return self._scalar(name, op, operand, path, ("text",))
        return self._scalar(name, op, operand, path, _scalar_kinds(spec))

    def _list(
        self,
        name: str,
        spec: FieldSpec,
        op: Op,
        operand: Any,
        path: Path,
        scalar_types: tuple[FieldType, ...],
    ) -> Any:
        if not isinstance(operand, list) or not operand:
            self._problem(path, f"{op} takes a non-empty list, not {_describe(operand)}")
            return _INVALID
        if len(operand) > MAX_LIST:
            self._problem(path, f"{op} takes at most {MAX_LIST} values, not {len(operand)}")
            return _INVALID
        values: list[Scalar] = []
        for i, item in enumerate(operand):
            checked = self._scalar(name, op, item, (*path, i), scalar_types)
            if checked is _INVALID:
                return _INVALID
            if not any(type_tag(checked) == type_tag(v) for v in values):
                values.append(checked)
        return tuple(values)

    def _scalar(
        self, name: str, op: Op, value: Any, path: Path, kinds: tuple[FieldType, ...]
    ) -> Any:
        if isinstance(value, str) and "text" in kinds:
            if len(value) > MAX_TEXT:
                self._problem(path, f"text longer than {MAX_TEXT} characters")
                return _INVALID
            return value
        if isinstance(value, bool):
            if "bool" in kinds:
                return value
        elif isinstance(value, int | float) and "number" in kinds:
            if not math.isfinite(value) or abs(value) > MAX_NUMBER:
                self._problem(path, f"numbers must be finite and within ±{MAX_NUMBER:.0e}")
                return _INVALID
            return value
        expected = " or ".join(_KIND_NAMES[k] for k in kinds)
        hint = " (quote it to make it text)" if "text" in kinds and type_tag(value) else ""
        self._problem(path, f"{name} {op} expects {expected}, not {_describe(value)}{hint}")
        return _INVALID


_INVALID: Any = object()
_KIND_NAMES: Mapping[FieldType, str] = {
    "text": "text",
    "number": "a number",
    "bool": "true/false",
    "any": "a value",
}


def _scalar_kinds(spec: FieldSpec) -> tuple[FieldType, ...]:
    return ("text", "number", "bool") if spec.type == "any" else (spec.type,)


def _article(kind: FieldType) -> str:
    return {"text": "text", "number": "a number", "bool": "true/false", "any": "any value"}[kind]


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "…"
        return f"text {shown!r}"
    if isinstance(value, int | float):
        return f"the number {value!r}"[:60]
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


# --- evaluation with reasons, for `leadflow rules explain` ----------------------------------


def why_not(cond: Cond, facts: Facts) -> list[str]:
    """Why `cond` fails on `facts` (empty when it holds), shown to a person.

    Follows the same short-circuit order as the compiled test, so the reason given for an `all`
    is its first failing part.
    """
    if cond.test(facts):
        return []
    if isinstance(cond, Atom):
        return [f"{cond.text()}, but {_actual(cond.field, facts)}"]
    if isinstance(cond, All):
        for child in cond.children:
            if not child.test(facts):
                return why_not(child, facts)
        raise AssertionError("an all failed with every part holding")
    if isinstance(cond, AnyOf):
        return ["none of: " + "; ".join(r for c in cond.children for r in why_not(c, facts))]
    return [f"{cond.text()}, but {cond.child.text()} holds"]


def _actual(name: str, facts: Facts) -> str:
    value = facts.get(name)
    if value is None:
        return f"{name} is missing"
    if isinstance(value, float):
        return f"{name} is {value:.2f}"
    if isinstance(value, list):
        return f"{name} is [{', '.join(map(_show, value[:20]))}{', …' if len(value) > 20 else ''}]"
    return f"{name} is {_show(value)}"
