"""The roster against a real PostgreSQL: idempotent import, the status rule, tokens, loads."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from allocate.roster import (
    TOKEN_PREFIX,
    AgentRow,
    UnknownAgent,
    decode_csv,
    import_agents,
    issue_token,
    list_agents,
    parse_agents_csv,
    revoke_tokens,
    set_status,
    token_hash,
)
from ingest.store import QUEUED_CHANNEL

EXAMPLE = Path(__file__).parents[2] / "deploy" / "agents.example.csv"
ROSTER = """\
id,name,team,business_lines,segments,capacity,shift,status
a-01,王芳,car-1,car_loan,test_drive,5,09:00-18:00,available
a-02,李雷,car-1,car_loan|financial_leasing,*,8,22:00-06:00,away
a-03,韩梅梅,,*,*,10,,offline
"""


def parse(text: str) -> list[AgentRow]:
    return parse_agents_csv(text, source="agents.csv")


def agent(conn: Connection, agent_id: str) -> sa.Row[tuple[object, ...]]:
    return conn.execute(sa.text("SELECT * FROM agents WHERE id = :id"), {"id": agent_id}).one()


def test_importing_the_same_file_twice_changes_nothing(engine: Engine) -> None:
    rows = parse(ROSTER)
    with engine.connect() as conn:
        first = import_agents(conn, rows)
        stamped = {r.id: r.updated_at for r in conn.execute(sa.text("SELECT * FROM agents"))}
        second = import_agents(conn, rows)
        after = {r.id: r.updated_at for r in conn.execute(sa.text("SELECT * FROM agents"))}
    assert (first.inserted, first.updated, first.unchanged) == (3, 0, 0)
    assert (second.inserted, second.updated, second.unchanged) == (0, 0, 3)
    assert after == stamped  # not even rewritten

    with engine.connect() as conn:
        a02 = agent(conn, "a-02")
        a03 = agent(conn, "a-03")
    assert (a02.business_lines, a02.segments, a02.capacity, a02.status) == (
        ["car_loan", "financial_leasing"],
        ["*"],
        8,
        "away",
    )
    assert (str(a02.shift_start), str(a02.shift_end), a02.timezone) == (
        "22:00:00",
        "06:00:00",
        "Asia/Shanghai",
    )
    assert (a03.team, a03.shift_start, a03.shift_end, a03.daily_cap) == (None, None, None, 100)


def test_the_example_roster_imports(engine: Engine) -> None:
    rows = parse_agents_csv(decode_csv(EXAMPLE.read_bytes(), source="x"), source="x")
    with engine.connect() as conn:
        summary = import_agents(conn, rows)
        assert summary.inserted == len(rows)
        assert len(list_agents(conn)) == len(rows)


def test_one_changed_field_updates_one_agent_and_leaves_others_alone(engine: Engine) -> None:
    with engine.connect() as conn:
        import_agents(conn, parse(ROSTER))
        before = agent(conn, "a-02")
        changed = ROSTER.replace(
            "a-01,王芳,car-1,car_loan,test_drive,5", "a-01,王芳,car-2,car_loan,test_drive,7"
        )
        # a-03 is missing from the new file: it stays as it was
        summary = import_agents(conn, parse(changed.replace("a-03,韩梅梅,,*,*,10,,offline\n", "")))
        a01 = agent(conn, "a-01")
        assert (summary.inserted, summary.updated, summary.unchanged) == (0, 1, 1)
        assert (a01.team, a01.capacity) == ("car-2", 7)
        assert a01.updated_at > a01.created_at
        assert agent(conn, "a-02").updated_at == before.updated_at
        assert agent(conn, "a-03").capacity == 10


def test_status_is_kept_on_a_re_import_without_it(engine: Engine) -> None:
    with engine.connect() as conn:
        import_agents(conn, parse(ROSTER))
        assert set_status(conn, "a-01", "away") is True
        changed_at = agent(conn, "a-01").status_changed_at
        without_status = "\n".join(line.rpartition(",")[0] for line in ROSTER.splitlines())
        summary = import_agents(conn, parse(without_status + "\na-04,Lucy,x,*,*,3,\n"))
        assert (summary.inserted, summary.updated, summary.unchanged) == (1, 0, 3)
        assert agent(conn, "a-01").status == "away"  # not set back to the file's 'available'
        assert agent(conn, "a-01").status_changed_at == changed_at
        assert agent(conn, "a-04").status == "offline"  # new agents without a status

        # a file that gives the status sets it, and stamps the change
        summary = import_agents(conn, parse(ROSTER))
        assert (summary.updated, agent(conn, "a-01").status) == (1, "available")
        assert agent(conn, "a-01").status_changed_at > changed_at


def test_an_empty_status_cell_keeps_that_agents_status(engine: Engine) -> None:
    with engine.connect() as conn:
        import_agents(conn, parse(ROSTER))
        summary = import_agents(conn, parse(ROSTER.replace(",available", ",")))
        assert summary.unchanged == 3
        assert agent(conn, "a-01").status == "available"


def test_status_changes_are_stamped_logged_and_only_when_they_change(engine: Engine) -> None:
    with engine.connect() as conn:
        import_agents(conn, parse(ROSTER))
        conn.commit()
        before = agent(conn, "a-03").status_changed_at
        assert set_status(conn, "a-03", "offline") is False
        assert agent(conn, "a-03").status_changed_at == before
        assert set_status(conn, "a-03", "available") is True
        assert agent(conn, "a-03").status_changed_at > before
        log = conn.execute(
            sa.text("SELECT status FROM agent_status_log WHERE agent_id = 'a-03' ORDER BY id")
        ).scalars()
        assert list(log) == ["offline", "available"]
        with pytest.raises(UnknownAgent, match="no agent with id 'nobody'"):
            set_status(conn, "nobody", "away")
        with pytest.raises(ValueError, match="busy"):
            set_status(conn, "a-03", "busy")  # type: ignore[arg-type]


def test_an_agent_becoming_available_wakes_the_allocator(engine: Engine) -> None:
    with engine.connect() as listener, engine.connect() as conn:
        listener.execute(sa.text(f"LISTEN {QUEUED_CHANNEL}"))
        listener.commit()
        import_agents(conn, parse(ROSTER))  # a-01 is available
        set_status(conn, "a-02", "offline")  # not a wake-up
        set_status(conn, "a-03", "available")
        raw = listener.connection.dbapi_connection
        assert raw is not None
        notices = list(raw.notifies(timeout=1, stop_after=3))
    assert [n.channel for n in notices] == [QUEUED_CHANNEL, QUEUED_CHANNEL]


def test_a_token_is_stored_only_as_its_hash(engine: Engine) -> None:
    with engine.connect() as conn:
        import_agents(conn, parse(ROSTER))
        token = issue_token(conn, "a-01", label="desk 12")
        other = issue_token(conn, "a-01")
        stored = conn.execute(sa.text("SELECT * FROM api_tokens ORDER BY id")).all()
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) > 40
    assert token != other
    assert [row.token_hash for row in stored] == [token_hash(token), token_hash(other)]
    assert token_hash(token) == hashlib.sha256(token.encode()).hexdigest()
    assert (stored[0].role, stored[0].agent_id, stored[0].label) == ("agent", "a-01", "desk 12")
    secret = token.removeprefix(TOKEN_PREFIX)
    for row in stored:
        assert all(secret not in str(value) for value in row)


def test_tokens_for_unknown_agents_other_roles_and_revoking(engine: Engine) -> None:
    with engine.connect() as conn:
        import_agents(conn, parse(ROSTER))
        with pytest.raises(UnknownAgent):
            issue_token(conn, "a-99")
        with pytest.raises(ValueError, match="needs an agent"):
            issue_token(conn, None)
        ops = issue_token(conn, None, role="ops", label="dashboard")
        issue_token(conn, "a-01")
        issue_token(conn, "a-01")
        assert revoke_tokens(conn, "a-01") == 2
        assert revoke_tokens(conn, "a-01") == 0
        with pytest.raises(UnknownAgent):
            revoke_tokens(conn, "a-99")
        live = conn.execute(
            sa.text("SELECT token_hash, role FROM api_tokens WHERE revoked_at IS NULL")
        ).all()
    assert [tuple(row) for row in live] == [(token_hash(ops), "ops")]


def _lead(conn: Connection, customer_id: int, at: datetime) -> int:
    return int(
        conn.execute(
            sa.text(
                "INSERT INTO leads (customer_id, business_line, segment, priority, intake,"
                " first_event_at, last_event_at, state)"
                " VALUES (:c, 'car_loan', 'test_drive', 50, 'realtime', :at, :at, 'assigned')"
                " RETURNING id"
            ),
            {"c": customer_id, "at": at},
        ).scalar_one()
    )


def _assign(
    conn: Connection, agent_id: str, at: datetime, status: str = "open", customer: int = 0
) -> None:
    lead = _lead(conn, customer, at)
    conn.execute(
        sa.text(
            "INSERT INTO assignments (id, lead_id, agent_id, queue, strategy, reason, status,"
            " attempt, assigned_at, closed_at)"
            " VALUES (:id, :lead, :agent, 'car', 'round_robin', 'test', :status, 1, :at,"
            " CASE WHEN :status = 'open' THEN NULL ELSE CAST(:at AS timestamptz) END)"
        ),
        {"id": uuid.uuid4(), "lead": lead, "agent": agent_id, "status": status, "at": at},
    )


def test_list_counts_open_assignments_and_those_since_local_midnight(engine: Engine) -> None:
    # 2026-11-24 02:00 UTC is 10:00 in Shanghai (day began 2026-11-23 16:00 UTC) and
    # 2026-11-23 18:00 in Los Angeles (day began 2026-11-23 08:00 UTC).
    now = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    roster = ROSTER + "b-01,Bob,us,*,*,4,,available\n"
    with engine.connect() as conn:
        import_agents(conn, parse(roster))
        conn.execute(
            sa.text("UPDATE agents SET timezone = 'America/Los_Angeles' WHERE id = 'b-01'")
        )
        customer = conn.execute(
            sa.text("INSERT INTO customers (phone_e164) VALUES ('+8613800138000') RETURNING id")
        ).scalar_one()
        for agent_id in ("a-01", "b-01"):
            _assign(conn, agent_id, now - timedelta(hours=1), customer=customer)  # open, today
            _assign(conn, agent_id, now - timedelta(hours=9), customer=customer)  # open, 17:00 UTC
            _assign(conn, agent_id, now - timedelta(hours=12), "completed", customer)  # 14:00 UTC
            _assign(conn, agent_id, now - timedelta(days=2), "expired", customer)
        conn.commit()
        loads = {a.id: a for a in list_agents(conn, now=now)}
        with pytest.raises(ValueError, match="timezone-aware"):
            list_agents(conn, now=datetime(2026, 11, 24))  # noqa: DTZ001
    assert list(loads) == ["a-01", "a-02", "a-03", "b-01"]
    assert (loads["a-01"].open_count, loads["a-01"].today_count) == (2, 2)
    assert (loads["b-01"].open_count, loads["b-01"].today_count) == (2, 3)
    assert (loads["a-02"].open_count, loads["a-02"].today_count) == (0, 0)
    assert (loads["a-01"].name, loads["a-01"].capacity, str(loads["a-01"].shift)) == (
        "王芳",
        5,
        "09:00-18:00",
    )
    assert loads["a-03"].shift is None


def test_an_import_is_all_or_nothing(engine: Engine) -> None:
    rows = parse(ROSTER)
    # Written first (agents without a status go in their own statement) ...
    fine = dataclasses.replace(rows[0], status=None)
    # ... then this one, past the parser, which the database refuses.
    broken = dataclasses.replace(rows[2], capacity=-1)
    with engine.connect() as conn:
        with pytest.raises(sa.exc.IntegrityError):
            import_agents(conn, [fine, rows[1], broken])
        assert list_agents(conn) == []


def test_an_import_inside_a_callers_transaction_is_theirs_to_commit(engine: Engine) -> None:
    with engine.connect() as conn:
        transaction = conn.begin()
        import_agents(conn, parse(ROSTER))
        assert len(list_agents(conn)) == 3
        transaction.rollback()
        assert list_agents(conn) == []
