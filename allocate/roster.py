"""The agent roster: agents from a CSV file into PostgreSQL, their load, status and API tokens.

Supervisors keep the roster in a spreadsheet, so the file format is what Excel writes ("CSV
UTF-8", a byte-order mark included) and a mistake anywhere stops the whole import: a roster
half imported is worse than one not imported, because the agents it missed would silently get
no leads. `parse_agents_csv` is pure (text in, rows or every error out, each as
`file:line: column: reason`); `import_agents` writes the rows as one idempotent upsert, so
importing the same file twice changes nothing.

The CSV format (header names are case-insensitive; only `id`, `name` and `business_lines` are
required; any other column is optional, and an unknown one is an error)::

    id,name,team,business_lines,segments,languages,capacity,daily_cap,weight,timezone,shift,status
    a-01,王芳,car-1,car_loan|financial_leasing,*,zh|en,8,120,1.5,Asia/Shanghai,09:00-18:00,available

- `id`: letters, digits, `.`, `_`, `-` (at most 64), unique in the file.
- `business_lines`, `segments`: `|`-separated slugs; `*` means every one. Segments default to `*`.
- `languages`: `|`-separated language tags (`zh`, `en`, `yue`); empty means every language.
- `capacity`: most open assignments at once, 1..1000, default 10.
- `daily_cap`: most assignments per local day, 1..10000, default 100.
- `weight`: share under the `weighted` strategy, > 0, default 1.
- `timezone`: IANA name, default `Asia/Shanghai` (the caller may pass another default); the
  agent's shift and the day of the daily cap are in this zone.
- `shift`: `HH:MM-HH:MM` in the agent's timezone, may wrap midnight (`22:00-06:00`); empty
  means no shift limit.
- `status`: `available`, `away` or `offline`.

Re-import rules: every column is set from the file (its default where absent or empty), except
`status`. A new agent gets the file's status, `offline` when none is given; an existing agent's
status changes only where the file gives one, so re-importing a roster without a status column
(or with empty cells) never knocks agents offline mid-shift. Agents missing from the file are
left alone: the import adds and updates, it never deletes.

Write functions take a SQLAlchemy `Connection` and run in one transaction of their own, or in a
savepoint when the caller already has a transaction open (and then the caller commits).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from allocate.model import ANY, Window
from ingest.store import QUEUED_CHANNEL
from schemas.tables import Agent, ApiToken
from schemas.vocab import AGENT_STATUSES, ROLES, AgentStatus, Role

COLUMNS: Final = (
    "id",
    "name",
    "team",
    "business_lines",
    "segments",
    "languages",
    "capacity",
    "daily_cap",
    "weight",
    "timezone",
    "shift",
    "status",
)
REQUIRED_COLUMNS: Final = ("id", "name", "business_lines")
DEFAULT_CAPACITY: Final = 10
DEFAULT_DAILY_CAP: Final = 100
DEFAULT_WEIGHT: Final = 1.0
DEFAULT_TIMEZONE: Final = "Asia/Shanghai"
#: Upper bounds that catch a typo (an extra zero) rather than describe a real limit.
MAX_CAPACITY: Final = 1000
MAX_DAILY_CAP: Final = 10_000
#: Errors shown before "... and N more".
MAX_ERRORS_SHOWN: Final = 20
#: Prefix of every bearer token, so a leaked one is recognisable (secret scanners, logs).
TOKEN_PREFIX: Final = "lf_"  # noqa: S105 (a public prefix, not a secret)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SLUG = re.compile(r"^[a-z][a-z0-9_]*$")
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_MAX_NAME = 200
_MAX_TEAM = 100
#: Rows per INSERT statement: 13 parameters each stays far below PostgreSQL's 65535.
_CHUNK = 1000
_AGENTS = cast(sa.Table, Agent.__table__)
_TOKENS = cast(sa.Table, ApiToken.__table__)


class RosterInvalid(ValueError):
    """A roster file that cannot be imported; `errors` has one `file:line: ...` line each."""

    def __init__(self, source: str, errors: Sequence[str]) -> None:
        self.source = source
        self.errors = list(errors)
        shown = self.errors[:MAX_ERRORS_SHOWN]
        more = len(self.errors) - len(shown)
        count = len(self.errors)
        lines = [f"{source}: {count} error{'s' if count != 1 else ''}, nothing imported:"]
        lines += (f"  {error}" for error in shown)
        if more:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))


class UnknownAgent(LookupError):
    """No agent with this id."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        super().__init__(f"no agent with id {agent_id!r}")


@dataclass(frozen=True, slots=True)
class AgentRow:
    """One valid row of a roster file."""

    id: str
    name: str
    team: str | None
    business_lines: tuple[str, ...]  # may be (ANY,)
    segments: tuple[str, ...]  # may be (ANY,)
    languages: tuple[str, ...]  # empty: every language
    capacity: int
    daily_cap: int
    weight: float
    timezone: str
    shift: Window | None
    #: None: not given; offline for a new agent, unchanged for an existing one.
    status: AgentStatus | None
    line: int


@dataclass(frozen=True, slots=True)
class ImportSummary:
    inserted: int
    updated: int
    unchanged: int

    @property
    def total(self) -> int:
        return self.inserted + self.updated + self.unchanged


@dataclass(frozen=True, slots=True)
class AgentLoad:
    """An agent as stored, with their open assignments and assignments since local midnight."""

    id: str
    name: str
    team: str | None
    business_lines: tuple[str, ...]
    segments: tuple[str, ...]
    languages: tuple[str, ...]
    capacity: int
    daily_cap: int
    weight: float
    timezone: str
    shift: Window | None
    status: AgentStatus
    status_changed_at: datetime
    open_count: int
    today_count: int


# --- parsing (pure) ---------------------------------------------------------------------------


def decode_csv(data: bytes, *, source: str) -> str:
    """The text of a roster file; a clear RosterInvalid when it is not UTF-8 (Excel's
    plain "CSV" on a Chinese Windows is GBK: "CSV UTF-8" is the format to choose)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RosterInvalid(
            source,
            [
                f"{source}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file "
                'as "CSV UTF-8"'
            ],
        ) from None


def parse_agents_csv(
    text: str, *, source: str, default_timezone: str = DEFAULT_TIMEZONE
) -> list[AgentRow]:
    """Every row of a roster file, or RosterInvalid listing every error in it.

    `source` names the file in the messages. A leading byte-order mark is ignored; blank lines
    are skipped; cells are stripped of surrounding spaces.
    """
    errors: list[str] = []
    rows: list[AgentRow] = []
    # strict: a quote left open is an error, not a row that swallows the rest of the file
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), strict=True)
    end = 0  # the last line read of the previous row
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)  # blank lines before the header
        if header is None:
            raise RosterInvalid(source, [f"{source}: the file is empty; expected a header row"])
        header_line = reader.line_num
        columns = [cell.strip().lower() for cell in header]
        _check_header(columns, f"{source}:{header_line}", errors)
        if errors:
            raise RosterInvalid(source, errors)

        first_line: dict[str, int] = {}
        end = reader.line_num
        for cells in reader:
            line, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            where = f"{source}:{line}"
            if len(cells) != len(columns):
                errors.append(
                    f"{where}: {len(cells)} fields, but the header has {len(columns)}"
                    " (a comma inside a value needs quotes)"
                )
                continue
            values = dict(zip(columns, (cell.strip() for cell in cells), strict=True))
            row = _parse_row(values, where, line, default_timezone, errors)
            agent_id = values["id"]
            if agent_id in first_line:
                errors.append(
                    f"{where}: id: {agent_id!r} is already on line {first_line[agent_id]}"
                )
            elif agent_id:
                first_line[agent_id] = line
            if row is not None:
                rows.append(row)
    except csv.Error as exc:
        errors.append(f"{source}:{end + 1}: not readable as CSV ({exc}): is a quote left open?")
    if not errors and not rows:
        errors.append(f"{source}: no agents: the file has a header but no rows")
    if errors:
        raise RosterInvalid(source, errors)
    return rows


def _check_header(columns: list[str], where: str, errors: list[str]) -> None:
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        errors.append(
            f"{where}: unknown column{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(c) for c in unknown)}; the columns are {', '.join(COLUMNS)}"
        )
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        errors.append(f"{where}: column{'s' if len(repeated) > 1 else ''} "
                      f"{', '.join(repeated)} given more than once")  # fmt: skip
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        errors.append(f"{where}: missing required column{'s' if len(missing) > 1 else ''} "
                      f"{', '.join(missing)}")  # fmt: skip


def _parse_row(
    cells: dict[str, str], where: str, line: int, default_timezone: str, errors: list[str]
) -> AgentRow | None:
    before = len(errors)

    def bad(column: str, reason: str) -> None:
        errors.append(f"{where}: {column}: {reason}")

    agent_id = cells["id"]
    if not agent_id:
        bad("id", "required")
    elif not _ID.match(agent_id):
        bad("id", f"{agent_id!r} is not an id (letters, digits, '.', '_', '-'; at most 64)")

    name = cells["name"]
    if not name:
        bad("name", "required")
    elif len(name) > _MAX_NAME:
        bad("name", f"longer than {_MAX_NAME} characters")

    team = cells.get("team") or None
    if team is not None and len(team) > _MAX_TEAM:
        bad("team", f"longer than {_MAX_TEAM} characters")

    lines = _skills(cells["business_lines"], "business_lines", "car_loan", bad)
    if lines is not None and not lines:
        bad("business_lines", "required: the lines this agent takes, or * for every line")
    segments = _skills(cells.get("segments", ""), "segments", "pending_payment_30d", bad)

    languages: list[str] = []
    for tag in _split(cells.get("languages", "")):
        if _LANGUAGE.match(tag):
            languages.append(tag)
        else:
            bad("languages", f"{tag!r} is not a language tag such as zh or en")

    capacity = _integer(cells.get("capacity", ""), "capacity", DEFAULT_CAPACITY, MAX_CAPACITY, bad)
    daily_cap = _integer(
        cells.get("daily_cap", ""), "daily_cap", DEFAULT_DAILY_CAP, MAX_DAILY_CAP, bad
    )

    weight = DEFAULT_WEIGHT
    if raw := cells.get("weight", ""):
        try:
            weight = float(raw)
        except ValueError:
            bad("weight", f"{raw!r} is not a number")
        else:
            if not (math.isfinite(weight) and weight > 0):
                bad("weight", f"{raw} is not a number greater than 0")

    timezone = cells.get("timezone", "") or default_timezone
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        bad("timezone", f"{timezone!r} is not an IANA timezone such as Asia/Shanghai")

    shift = None
    if raw := cells.get("shift", ""):
        try:
            shift = Window.parse(raw)
        except ValueError as exc:
            bad("shift", str(exc))

    status: AgentStatus | None = None
    if raw := cells.get("status", "").lower():
        if raw in AGENT_STATUSES:
            status = raw
        else:
            bad("status", f"{raw!r} is not one of {', '.join(AGENT_STATUSES)}")

    if len(errors) > before:
        return None
    assert lines is not None
    assert segments is not None
    return AgentRow(
        id=agent_id,
        name=name,
        team=team,
        business_lines=lines,
        segments=segments or (ANY,),
        languages=tuple(dict.fromkeys(languages)),
        capacity=capacity,
        daily_cap=daily_cap,
        weight=weight,
        timezone=timezone,
        shift=shift,
        status=status,
        line=line,
    )


def _split(cell: str) -> list[str]:
    """`a|b|` -> ['a', 'b']: empty pieces (a trailing '|') are ignored."""
    return [part.strip() for part in cell.split("|") if part.strip()]


def _skills(cell: str, column: str, example: str, bad: Any) -> tuple[str, ...] | None:
    """Slugs or `*`, deduplicated in file order; None when invalid (reported through `bad`)."""
    parts = list(dict.fromkeys(_split(cell)))
    wrong = [p for p in parts if p != ANY and not _SLUG.match(p)]
    for part in wrong:
        bad(column, f"{part!r} is not a name such as {example} (lower case, digits, _)")
    if ANY in parts and len(parts) > 1:
        bad(column, f"{ANY} already means every one; list names or {ANY}, not both")
        return None
    return None if wrong else tuple(parts)


def _integer(raw: str, column: str, default: int, maximum: int, bad: Any) -> int:
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        bad(column, f"{raw!r} is not a whole number")
        return default
    if not 1 <= value <= maximum:
        bad(column, f"{value} is not between 1 and {maximum}")
    return value


# --- database ---------------------------------------------------------------------------------


@contextmanager
def _transaction(conn: Connection) -> Iterator[None]:
    """A transaction of our own, or a savepoint inside the caller's."""
    with conn.begin_nested() if conn.in_transaction() else conn.begin():
        yield


def _wake_allocator(conn: Connection) -> None:
    """Capacity appeared (an agent became available): allocators start a pass on commit."""
    conn.execute(sa.select(sa.func.pg_notify(QUEUED_CHANNEL, "")))


def _values(row: AgentRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "team": row.team,
        "business_lines": list(row.business_lines),
        "segments": list(row.segments),
        "languages": list(row.languages),
        "capacity": row.capacity,
        "daily_cap": row.daily_cap,
        "weight": row.weight,
        "timezone": row.timezone,
        "shift_start": row.shift.start if row.shift else None,
        "shift_end": row.shift.end if row.shift else None,
        "status": row.status or "offline",
    }


#: The columns an import sets on an existing agent; `status` only where the file gives one.
_ROSTER_COLUMNS: Final = (
    "name", "team", "business_lines", "segments", "languages", "capacity", "daily_cap", "weight",
    "timezone", "shift_start", "shift_end",
)  # fmt: skip


def import_agents(conn: Connection, rows: Sequence[AgentRow]) -> ImportSummary:
    """Insert new agents and update changed ones, in one transaction; agents not in `rows`
    are left alone. Unchanged agents are not written at all (no `updated_at` bump), so a
    second import of the same file reports them all unchanged."""
    table = _AGENTS
    inserted = updated = 0
    woke = False
    with _transaction(conn):
        for with_status in (False, True):
            batch = [_values(row) for row in rows if (row.status is not None) is with_status]
            columns = _ROSTER_COLUMNS + (("status",) if with_status else ())
            for start in range(0, len(batch), _CHUNK):
                values = pg_insert(table).values(batch[start : start + _CHUNK])
                new = values.excluded
                changes: dict[str, Any] = {c: new[c] for c in columns}
                changes["updated_at"] = sa.func.now()
                if with_status:
                    changes["status_changed_at"] = sa.case(
                        (table.c.status.is_distinct_from(new.status), sa.func.now()),
                        else_=table.c.status_changed_at,
                    )
                statement = values.on_conflict_do_update(
                    index_elements=[table.c.id],
                    set_=changes,
                    where=sa.or_(*(table.c[c].is_distinct_from(new[c]) for c in columns)),
                ).returning(table.c.status, sa.literal_column("xmax = 0").label("inserted"))
                for status, was_inserted in conn.execute(statement):
                    inserted += bool(was_inserted)
                    updated += not was_inserted
                    woke |= status == "available"
        if woke:
            _wake_allocator(conn)
    return ImportSummary(inserted, updated, len(rows) - inserted - updated)


_LIST = sa.text("""
SELECT a.id, a.name, a.team, a.business_lines, a.segments, a.languages, a.capacity,
       a.daily_cap, a.weight, a.timezone, a.shift_start, a.shift_end, a.status,
       a.status_changed_at,
       (SELECT count(*) FROM assignments s WHERE s.agent_id = a.id AND s.status = 'open'),
       (SELECT count(*) FROM assignments s
        WHERE s.agent_id = a.id
          AND s.assigned_at >= (date_trunc('day', t.now AT TIME ZONE a.timezone)
                                AT TIME ZONE a.timezone))
FROM agents a, (SELECT coalesce(CAST(:now AS timestamptz), now()) AS now) t
ORDER BY a.id
""")


def list_agents(conn: Connection, *, now: datetime | None = None) -> list[AgentLoad]:
    """Every agent by id, with open assignments and assignments (any status) since the start
    of the agent's local day at `now` (default: the database's current time) — the figures
    the allocator holds against capacity and the daily cap."""
    if now is not None and now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return [
        AgentLoad(
            id=r[0],
            name=r[1],
            team=r[2],
            business_lines=tuple(r[3]),
            segments=tuple(r[4]),
            languages=tuple(r[5]),
            capacity=r[6],
            daily_cap=r[7],
            weight=r[8],
            timezone=r[9],
            shift=Window(r[10], r[11]) if r[10] is not None else None,
            status=r[12],
            status_changed_at=r[13],
            open_count=r[14],
            today_count=r[15],
        )
        for r in conn.execute(_LIST, {"now": now})
    ]


def set_status(conn: Connection, agent_id: str, status: AgentStatus) -> bool:
    """Set an agent's status; True when it changed. `status_changed_at` (and the status log,
    by trigger) move only on a change, so repeating a status keeps its start time.
    Raises UnknownAgent, or ValueError for a status outside the vocabulary."""
    if status not in AGENT_STATUSES:
        raise ValueError(f"{status!r} is not one of {', '.join(AGENT_STATUSES)}")
    table = _AGENTS
    with _transaction(conn):
        changed = conn.execute(
            sa.update(table)
            .where(table.c.id == agent_id, table.c.status.is_distinct_from(status))
            .values(status=status, status_changed_at=sa.func.now(), updated_at=sa.func.now())
            .returning(table.c.id)
        ).first()
        if changed is None:
            _require_agent(conn, agent_id)
            return False
        if status == "available":
            _wake_allocator(conn)
    return True


def token_hash(token: str) -> str:
    """What `api_tokens.token_hash` stores for a bearer token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(
    conn: Connection, agent_id: str | None, *, role: Role = "agent", label: str | None = None
) -> str:
    """A new bearer token; the secret is returned once and only its hash is stored.

    An `agent` token needs an agent; other roles (supervisor, ops, product) may name one or
    not. Raises UnknownAgent for an agent id that does not exist, ValueError for a bad role.
    """
    if role not in ROLES:
        raise ValueError(f"{role!r} is not one of {', '.join(ROLES)}")
    if role == "agent" and agent_id is None:
        raise ValueError("an agent token needs an agent id")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with _transaction(conn):
        if agent_id is not None:
            _require_agent(conn, agent_id)
        conn.execute(
            sa.insert(_TOKENS).values(
                token_hash=token_hash(token), role=role, agent_id=agent_id, label=label
            )
        )
    return token


def revoke_tokens(conn: Connection, agent_id: str) -> int:
    """Revoke every live token of an agent; how many were revoked. Raises UnknownAgent."""
    table = _TOKENS
    with _transaction(conn):
        _require_agent(conn, agent_id)
        result = conn.execute(
            sa.update(table)
            .where(table.c.agent_id == agent_id, table.c.revoked_at.is_(None))
            .values(revoked_at=sa.func.now())
        )
    return result.rowcount


def _require_agent(conn: Connection, agent_id: str) -> None:
    table = _AGENTS
    if conn.execute(sa.select(table.c.id).where(table.c.id == agent_id)).first() is None:
        raise UnknownAgent(agent_id)
