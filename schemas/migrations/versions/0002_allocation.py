"""Allocation state: fair-queueing clocks, the round-robin cursor as an agent id, agents'
status history, customers' last agent, why an assignment closed, the queue order with real-time
leads first.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

- `queues.rr_cursor` becomes the id of the agent round robin served last (text): an id keeps the
  rotation's place when agents join or leave, a position in a list would not.
- `queues.virtual_time` and `queue_agent_state.vtime` are start-time fair queueing clocks
  (allocate/decide.py): fairness over the time each agent was available.
- `agent_status_log` records every status change (a trigger, so SQL and every code path are
  covered); available hours per agent come from it (fairness figures, reports). It stamps
  `clock_timestamp()`, the moment the row lock was had, not the transaction's start: a status
  change that waited for an allocator holding the agent is logged after that allocator's
  assignments, as it took effect.
- `customers.last_agent_id` is who last worked the customer, for the `sticky` strategy.
- `assignments.close_reason` says why an assignment ended (SLA expired, rejected, disposition).
- `ix_leads_queued` orders by priority, then real-time first, then age, as the allocator does.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AGENT_STATUSES = "('available', 'away', 'offline')"
TIMESTAMPTZ = sa.DateTime(timezone=True)

_LOG_STATUS = """
CREATE FUNCTION leadflow_log_agent_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO agent_status_log (agent_id, status, at)
        VALUES (NEW.id, NEW.status, clock_timestamp());
    END IF;
    RETURN NULL;
END
$$
"""
_STATUS_TRIGGER = """
CREATE TRIGGER agents_status_log AFTER INSERT OR UPDATE OF status ON agents
FOR EACH ROW EXECUTE FUNCTION leadflow_log_agent_status()
"""


def upgrade() -> None:
    op.drop_column("queues", "rr_cursor")
    op.add_column("queues", sa.Column("rr_cursor", sa.Text(), nullable=True))
    op.add_column(
        "queues",
        sa.Column("virtual_time", sa.Double(), server_default=sa.text("0"), nullable=False),
    )
    op.create_table(
        "queue_agent_state",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("agent_id", sa.Text(), nullable=False),
        sa.Column("vtime", sa.Double(), server_default=sa.text("0"), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_queue_agent_state_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("queue", "agent_id", name=op.f("pk_queue_agent_state")),
    )
    op.create_table(
        "agent_status_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("agent_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(f"status IN {AGENT_STATUSES}", name=op.f("ck_agent_status_log_status")),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_agent_status_log_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_status_log")),
    )
    op.create_index("ix_agent_status_log_agent_id_at", "agent_status_log", ["agent_id", "at"])
    op.execute(_LOG_STATUS)
    op.execute(_STATUS_TRIGGER)
    # Agents that exist already start their history now.
    op.execute("INSERT INTO agent_status_log (agent_id, status) SELECT id, status FROM agents")

    op.add_column("customers", sa.Column("last_agent_id", sa.Text(), nullable=True))
    op.create_foreign_key(
        op.f("fk_customers_last_agent_id_agents"),
        "customers",
        "agents",
        ["last_agent_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.add_column("assignments", sa.Column("close_reason", sa.Text(), nullable=True))

    op.drop_index("ix_leads_queued", table_name="leads")
    op.create_index(
        "ix_leads_queued",
        "leads",
        ["queue", sa.text("priority DESC"), sa.text("realtime DESC"), "queued_at", "id"],
        postgresql_where=sa.text("state = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index("ix_leads_queued", table_name="leads")
    op.create_index(
        "ix_leads_queued",
        "leads",
        ["queue", sa.text("priority DESC"), "queued_at"],
        postgresql_where=sa.text("state = 'queued'"),
    )
    op.drop_column("assignments", "close_reason")
    op.drop_constraint(op.f("fk_customers_last_agent_id_agents"), "customers", type_="foreignkey")
    op.drop_column("customers", "last_agent_id")
    op.execute("DROP TRIGGER agents_status_log ON agents")
    op.execute("DROP FUNCTION leadflow_log_agent_status()")
    op.drop_index("ix_agent_status_log_agent_id_at", table_name="agent_status_log")
    op.drop_table("agent_status_log")
    op.drop_table("queue_agent_state")
    op.drop_column("queues", "virtual_time")
    op.drop_column("queues", "rr_cursor")
    op.add_column(
        "queues",
        sa.Column("rr_cursor", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
