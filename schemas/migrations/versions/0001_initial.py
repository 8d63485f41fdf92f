"""The initial leadflow schema.

Revision ID: 0001
Revises:
Create Date: 2026-11-24

Vocabularies are frozen here as they were at this revision (they come from schemas.vocab in
the models); adding a value later takes a migration that replaces the CHECK constraint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STAGING = "staging"

LEAD_STATES = "('new', 'queued', 'assigned', 'in_progress', 'converted', 'closed', 'do_not_call')"
INTAKES = "('realtime', 'stock', 'staging', 'http')"
ASSIGNMENT_STATUSES = "('open', 'completed', 'expired', 'revoked')"
DISPOSITIONS = (
    "('no_answer', 'callback', 'converted', 'not_interested', 'invalid_number', 'do_not_call')"
)
STRATEGIES = "('round_robin', 'least_loaded', 'weighted', 'sticky')"
AGENT_STATUSES = "('available', 'away', 'offline')"
ROLES = "('agent', 'supervisor', 'ops', 'product')"
EXTRACT_STATES = "('pending', 'loading', 'loaded', 'failed')"
REJECT_CODES = (
    "('invalid_json', 'invalid_utf8', 'schema_violation', 'unsupported_schema_version',"
    " 'invalid_phone', 'too_large', 'consent_missing')"
)
E164 = r"'^\+[1-9][0-9]{6,14}$'"

NOW = sa.text("now()")
ZERO = sa.text("0")
EMPTY_ARRAY = sa.text("'{}'")
EMPTY_OBJECT = sa.text("'{}'")
JSONB = postgresql.JSONB(astext_type=sa.Text())
TIMESTAMPTZ = sa.DateTime(timezone=True)


def _check(condition: str, name: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(condition, name=op.f(name))


def _timestamp(name: str, *, nullable: bool = True) -> sa.Column[Any]:
    return sa.Column(name, TIMESTAMPTZ, nullable=nullable)


def _now(name: str) -> sa.Column[Any]:
    return sa.Column(name, TIMESTAMPTZ, server_default=NOW, nullable=False)


def _text(name: str, *, nullable: bool = True) -> sa.Column[Any]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _bigint_id() -> sa.Column[Any]:
    return sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False)


def _counter(name: str, type_: type[sa.Integer] = sa.BigInteger) -> sa.Column[Any]:
    return sa.Column(name, type_(), server_default=ZERO, nullable=False)


def upgrade() -> None:
    # Customers and their identities.
    op.create_table(
        "customers",
        _bigint_id(),
        _text("phone_e164", nullable=False),
        _text("name"),
        _text("email"),
        _text("region"),
        _text("timezone"),
        _text("language"),
        _now("created_at"),
        _now("updated_at"),
        _check(f"phone_e164 ~ {E164}", "ck_customers_phone_e164"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customers")),
        sa.UniqueConstraint("phone_e164", name=op.f("uq_customers_phone_e164")),
    )
    op.create_table(
        "customer_identities",
        _text("source", nullable=False),
        _text("external_id", nullable=False),
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        _now("first_seen_at"),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name=op.f("fk_customer_identities_customer_id_customers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("source", "external_id", name=op.f("pk_customer_identities")),
    )
    op.create_index("ix_customer_identities_customer_id", "customer_identities", ["customer_id"])

    # Leads, the events merged into them, and their audit trail.
    op.create_table(
        "leads",
        _bigint_id(),
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        _text("business_line", nullable=False),
        _text("segment", nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("state", sa.Text(), server_default="new", nullable=False),
        _text("queue"),
        _text("intake", nullable=False),
        _text("channel"),
        _text("source"),
        _text("event_type"),
        _text("product"),
        _text("campaign"),
        sa.Column("realtime", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("matched_rules", sa.ARRAY(sa.Text()), server_default=EMPTY_ARRAY, nullable=False),
        _text("rules_version"),
        _counter("attempts", sa.Integer),
        sa.Column("event_count", sa.Integer(), server_default=sa.text("1"), nullable=False),
        _timestamp("first_event_at", nullable=False),
        _timestamp("last_event_at", nullable=False),
        _timestamp("queued_at"),
        _timestamp("next_action_at"),
        _timestamp("closed_at"),
        _now("created_at"),
        _now("updated_at"),
        sa.Column("attributes", JSONB, server_default=EMPTY_OBJECT, nullable=False),
        _check("priority BETWEEN 0 AND 100", "ck_leads_priority_range"),
        _check(f"state IN {LEAD_STATES}", "ck_leads_state"),
        _check(f"intake IN {INTAKES}", "ck_leads_intake"),
        _check("attempts >= 0", "ck_leads_attempts_min"),
        _check("event_count >= 1", "ck_leads_event_count_min"),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_leads_customer_id_customers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leads")),
    )
    op.create_index(
        "ix_leads_queued",
        "leads",
        ["queue", sa.text("priority DESC"), "queued_at"],
        postgresql_where=sa.text("state = 'queued'"),
    )
    op.create_index(
        "ix_leads_customer_line", "leads", ["customer_id", "business_line", "created_at"]
    )
    op.create_index(
        "ix_leads_next_action_at",
        "leads",
        ["next_action_at"],
        postgresql_where=sa.text("next_action_at IS NOT NULL"),
    )

    op.create_table(
        "lead_events",
        _bigint_id(),
        _text("event_id", nullable=False),
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        sa.Column("lead_id", sa.BigInteger(), nullable=True),
        _text("intake", nullable=False),
        _text("source", nullable=False),
        _text("event_type", nullable=False),
        _text("channel"),
        _timestamp("occurred_at", nullable=False),
        _now("received_at"),
        sa.Column("payload", JSONB, nullable=False),
        _text("kafka_topic"),
        sa.Column("kafka_partition", sa.Integer(), nullable=True),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=True),
        _check("char_length(event_id) BETWEEN 1 AND 128", "ck_lead_events_event_id_length"),
        _check(f"intake IN {INTAKES}", "ck_lead_events_intake"),
        _check(
            "(kafka_topic IS NULL) = (kafka_partition IS NULL)"
            " AND (kafka_partition IS NULL) = (kafka_offset IS NULL)",
            "ck_lead_events_kafka_position",
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_lead_events_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["lead_id"], ["leads.id"], name=op.f("fk_lead_events_lead_id_leads")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lead_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_lead_events_event_id")),
    )
    op.create_index("ix_lead_events_lead_id", "lead_events", ["lead_id"])

    op.create_table(
        "lead_transitions",
        _bigint_id(),
        sa.Column("lead_id", sa.BigInteger(), nullable=False),
        _text("from_state"),
        _text("to_state", nullable=False),
        _text("actor", nullable=False),
        _text("reason", nullable=False),
        _now("at"),
        _check(f"from_state IN {LEAD_STATES}", "ck_lead_transitions_from_state"),
        _check(f"to_state IN {LEAD_STATES}", "ck_lead_transitions_to_state"),
        sa.ForeignKeyConstraint(
            ["lead_id"], ["leads.id"], name=op.f("fk_lead_transitions_lead_id_leads")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lead_transitions")),
    )
    op.create_index("ix_lead_transitions_lead_id_at", "lead_transitions", ["lead_id", "at"])

    # Allocation: queues, agents, assignments, dispositions, the do-not-call list.
    op.create_table(
        "queues",
        _text("name", nullable=False),
        _text("business_line", nullable=False),
        sa.Column("segments", sa.ARRAY(sa.Text()), nullable=False),
        _text("strategy", nullable=False),
        _text("fallback_strategy"),
        sa.Column("sla_seconds", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("call_window_start", sa.Time(), nullable=True),
        sa.Column("call_window_end", sa.Time(), nullable=True),
        _counter("rr_cursor"),
        sa.Column("config", JSONB, nullable=True),
        _now("updated_at"),
        _check(f"strategy IN {STRATEGIES}", "ck_queues_strategy"),
        _check(f"fallback_strategy IN {STRATEGIES}", "ck_queues_fallback_strategy"),
        _check("sla_seconds > 0", "ck_queues_sla_seconds_positive"),
        _check("max_attempts >= 1", "ck_queues_max_attempts_min"),
        _check("(call_window_start IS NULL) = (call_window_end IS NULL)", "ck_queues_call_window"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_queues")),
    )

    op.create_table(
        "agents",
        _text("id", nullable=False),
        _text("name", nullable=False),
        _text("team"),
        sa.Column(
            "business_lines", sa.ARRAY(sa.Text()), server_default=EMPTY_ARRAY, nullable=False
        ),
        sa.Column("segments", sa.ARRAY(sa.Text()), server_default=EMPTY_ARRAY, nullable=False),
        sa.Column("languages", sa.ARRAY(sa.Text()), server_default=EMPTY_ARRAY, nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("daily_cap", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Double(), server_default=sa.text("1"), nullable=False),
        sa.Column("timezone", sa.Text(), server_default="UTC", nullable=False),
        sa.Column("shift_start", sa.Time(), nullable=True),
        sa.Column("shift_end", sa.Time(), nullable=True),
        sa.Column("status", sa.Text(), server_default="offline", nullable=False),
        _now("status_changed_at"),
        _now("created_at"),
        _now("updated_at"),
        _check("capacity >= 0", "ck_agents_capacity_min"),
        _check("daily_cap >= 0", "ck_agents_daily_cap_min"),
        _check("weight > 0", "ck_agents_weight_positive"),
        _check(f"status IN {AGENT_STATUSES}", "ck_agents_status"),
        _check("(shift_start IS NULL) = (shift_end IS NULL)", "ck_agents_shift"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
    )

    op.create_table(
        "assignments",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("lead_id", sa.BigInteger(), nullable=False),
        _text("agent_id", nullable=False),
        _text("queue", nullable=False),
        _text("strategy", nullable=False),
        _text("reason", nullable=False),
        sa.Column("status", sa.Text(), server_default="open", nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        _now("assigned_at"),
        _timestamp("sla_deadline"),
        _timestamp("first_contact_at"),
        _timestamp("closed_at"),
        _check(f"strategy IN {STRATEGIES}", "ck_assignments_strategy"),
        _check(f"status IN {ASSIGNMENT_STATUSES}", "ck_assignments_status"),
        _check("attempt >= 1", "ck_assignments_attempt_min"),
        _check("(status = 'open') = (closed_at IS NULL)", "ck_assignments_closed_at"),
        sa.ForeignKeyConstraint(
            ["lead_id"], ["leads.id"], name=op.f("fk_assignments_lead_id_leads")
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_assignments_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assignments")),
    )
    # The core invariant: at most one open assignment per lead.
    op.create_index(
        "uq_assignments_one_open_per_lead",
        "assignments",
        ["lead_id"],
        unique=True,
        postgresql_where=sa.text("status = 'open'"),
    )
    op.create_index(
        "ix_assignments_open_per_agent",
        "assignments",
        ["agent_id"],
        postgresql_where=sa.text("status = 'open'"),
    )
    op.create_index(
        "ix_assignments_agent_id_assigned_at", "assignments", ["agent_id", "assigned_at"]
    )
    op.create_index("ix_assignments_lead_id", "assignments", ["lead_id"])
    op.create_index(
        "ix_assignments_open_sla_deadline",
        "assignments",
        ["sla_deadline"],
        postgresql_where=sa.text("status = 'open'"),
    )

    op.create_table(
        "dispositions",
        _bigint_id(),
        sa.Column("assignment_id", sa.Uuid(), nullable=False),
        sa.Column("lead_id", sa.BigInteger(), nullable=False),
        _text("agent_id", nullable=False),
        _text("outcome", nullable=False),
        _text("note"),
        _timestamp("callback_at"),
        _now("created_at"),
        _check(f"outcome IN {DISPOSITIONS}", "ck_dispositions_outcome"),
        _check(
            "outcome <> 'callback' OR callback_at IS NOT NULL",
            "ck_dispositions_callback_needs_time",
        ),
        sa.ForeignKeyConstraint(
            ["assignment_id"],
            ["assignments.id"],
            name=op.f("fk_dispositions_assignment_id_assignments"),
        ),
        sa.ForeignKeyConstraint(
            ["lead_id"], ["leads.id"], name=op.f("fk_dispositions_lead_id_leads")
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_dispositions_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dispositions")),
    )
    op.create_index("ix_dispositions_assignment_id", "dispositions", ["assignment_id"])
    op.create_index("ix_dispositions_lead_id", "dispositions", ["lead_id"])

    op.create_table(
        "dnc",
        _text("phone_e164", nullable=False),
        _text("reason"),
        _text("source"),
        _now("added_at"),
        _check(f"phone_e164 ~ {E164}", "ck_dnc_phone_e164"),
        sa.PrimaryKeyConstraint("phone_e164", name=op.f("pk_dnc")),
    )

    # Intake bookkeeping: poller watermarks, Kafka offsets, the outbox.
    op.create_table(
        "poller_state",
        _text("source", nullable=False),
        sa.Column("watermark", JSONB, nullable=True),
        _timestamp("last_run_at"),
        _timestamp("last_success_at"),
        _text("last_error"),
        _counter("consecutive_failures", sa.Integer),
        _counter("rows_total"),
        _now("updated_at"),
        _check("consecutive_failures >= 0", "ck_poller_state_consecutive_failures_min"),
        _check("rows_total >= 0", "ck_poller_state_rows_total_min"),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_poller_state")),
    )

    op.create_table(
        "consumer_offsets",
        _text("consumer_group", nullable=False),
        _text("topic", nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        _now("updated_at"),
        _check("partition >= 0", "ck_consumer_offsets_partition_min"),
        _check("next_offset >= 0", "ck_consumer_offsets_next_offset_min"),
        sa.PrimaryKeyConstraint(
            "consumer_group", "topic", "partition", name=op.f("pk_consumer_offsets")
        ),
    )

    op.create_table(
        "outbox",
        _bigint_id(),
        _text("topic", nullable=False),
        _text("key"),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("headers", JSONB, nullable=True),
        _now("created_at"),
        _timestamp("published_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        postgresql_where=sa.text("published_at IS NULL"),
    )

    # HTTP API tokens (hashes only).
    op.create_table(
        "api_tokens",
        _bigint_id(),
        _text("token_hash", nullable=False),
        _text("role", nullable=False),
        _text("agent_id"),
        _text("label"),
        _now("created_at"),
        _timestamp("revoked_at"),
        _timestamp("last_used_at"),
        _check("token_hash ~ '^[0-9a-f]{64}$'", "ck_api_tokens_token_hash_sha256"),
        _check(f"role IN {ROLES}", "ck_api_tokens_role"),
        _check("role <> 'agent' OR agent_id IS NOT NULL", "ck_api_tokens_agent_role_needs_agent"),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_api_tokens_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )

    # The staging manifest, beside the data team's tables (the schema may already exist).
    op.execute(sa.schema.CreateSchema(STAGING, if_not_exists=True))
    op.create_table(
        "extracts",
        _bigint_id(),
        _text("table_name", nullable=False),
        sa.Column(
            "submitted_by", sa.Text(), server_default=sa.text("CURRENT_USER"), nullable=False
        ),
        _now("submitted_at"),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        _text("source"),
        _text("event_type"),
        _text("business_line"),
        _text("segment"),
        sa.Column("priority", sa.SmallInteger(), nullable=True),
        _text("campaign"),
        _counter("rows_total"),
        _counter("rows_loaded"),
        _counter("rows_merged"),
        _counter("rows_rejected"),
        sa.Column("checkpoint", JSONB, nullable=True),
        _timestamp("started_at"),
        _timestamp("finished_at"),
        _text("error"),
        _text("worker"),
        _check("char_length(table_name) BETWEEN 1 AND 63", "ck_extracts_table_name_length"),
        _check(f"state IN {EXTRACT_STATES}", "ck_extracts_state"),
        _check("priority BETWEEN 0 AND 100", "ck_extracts_priority_range"),
        _check("rows_total >= 0", "ck_extracts_rows_total_min"),
        _check("rows_loaded >= 0", "ck_extracts_rows_loaded_min"),
        _check("rows_merged >= 0", "ck_extracts_rows_merged_min"),
        _check("rows_rejected >= 0", "ck_extracts_rows_rejected_min"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_extracts")),
        schema=STAGING,
    )
    op.create_index(
        "ix_extracts_active",
        "extracts",
        ["state"],
        schema=STAGING,
        postgresql_where=sa.text("state IN ('pending', 'loading')"),
    )

    op.create_table(
        "extract_rejects",
        _bigint_id(),
        sa.Column("extract_id", sa.BigInteger(), nullable=False),
        sa.Column("row_number", sa.BigInteger(), nullable=False),
        _text("code", nullable=False),
        _text("detail", nullable=False),
        sa.Column("row", JSONB, nullable=True),
        _now("created_at"),
        _check(f"code IN {REJECT_CODES}", "ck_extract_rejects_code"),
        sa.ForeignKeyConstraint(
            ["extract_id"],
            [f"{STAGING}.extracts.id"],
            name=op.f("fk_extract_rejects_extract_id_extracts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_extract_rejects")),
        sa.UniqueConstraint(
            "extract_id", "row_number", name=op.f("uq_extract_rejects_extract_id_row_number")
        ),
        schema=STAGING,
    )


def downgrade() -> None:
    # Dependents first; dropping a table drops its indexes and constraints with it.
    op.drop_table("extract_rejects", schema=STAGING)
    op.drop_table("extracts", schema=STAGING)
    for table in (
        "api_tokens",
        "outbox",
        "consumer_offsets",
        "poller_state",
        "dnc",
        "dispositions",
        "assignments",
        "agents",
        "queues",
        "lead_transitions",
        "lead_events",
        "leads",
        "customer_identities",
        "customers",
    ):
        op.drop_table(table)
    # The data team's tables may live in the schema too: drop it only if it is now empty.
    op.execute(
        f"""
        DO $$
        BEGIN
            DROP SCHEMA IF EXISTS {STAGING};
        EXCEPTION WHEN dependent_objects_still_exist THEN
            NULL;
        END
        $$
        """
    )
