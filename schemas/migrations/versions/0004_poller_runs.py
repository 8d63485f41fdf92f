"""Stock-data pollers: run history, rejected rows, and how each source's last run ended.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

- `poller_runs`: one row per run of a source (trigger, worker, outcome, pages, rows read and
  stored by outcome, rejects by code, the watermark before and after, the error), updated in the
  same transaction as every page it stores, so a run killed mid-way shows how far it got.
- `poller_rejects`: the rows a run rejected (their identity in the source, watermark, code and a
  detail naming fields, not values), for a person to look up in the source.
- `poller_state` gains `last_outcome`, `last_rows` and `retry_at` (when a failing source is
  tried again), for `leadflow sources list` and the ops surfaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OUTCOMES = "('running', 'succeeded', 'failed', 'stopped', 'interrupted')"
TRIGGERS = "('schedule', 'retry', 'cli')"
REJECT_CODES = (
    "('invalid_json', 'invalid_utf8', 'schema_violation', 'unsupported_schema_version',"
    " 'invalid_phone', 'too_large', 'consent_missing')"
)
JSONB = postgresql.JSONB(astext_type=sa.Text())
TIMESTAMPTZ = sa.DateTime(timezone=True)
ZERO = sa.text("0")


def _counter(name: str, type_: type[sa.Integer] = sa.BigInteger) -> sa.Column[Any]:
    return sa.Column(name, type_(), server_default=ZERO, nullable=False)


def upgrade() -> None:
    op.add_column("poller_state", sa.Column("last_outcome", sa.Text(), nullable=True))
    op.add_column("poller_state", _counter("last_rows"))
    op.add_column("poller_state", sa.Column("retry_at", TIMESTAMPTZ, nullable=True))
    op.create_check_constraint(
        op.f("ck_poller_state_last_outcome"), "poller_state", f"last_outcome IN {OUTCOMES}"
    )

    op.create_table(
        "poller_runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("trigger", sa.Text(), nullable=False),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("outcome", sa.Text(), server_default="running", nullable=False),
        sa.Column("started_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", TIMESTAMPTZ, nullable=True),
        _counter("pages", sa.Integer),
        _counter("rows_read"),
        _counter("rows_new"),
        _counter("rows_merged"),
        _counter("rows_duplicate"),
        _counter("rows_rejected"),
        sa.Column("rejects", JSONB, server_default=sa.text("'{}'"), nullable=False),
        sa.Column("watermark_from", JSONB, nullable=True),
        sa.Column("watermark_to", JSONB, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(f"outcome IN {OUTCOMES}", name=op.f("ck_poller_runs_outcome")),
        sa.CheckConstraint(f"trigger IN {TRIGGERS}", name=op.f("ck_poller_runs_trigger")),
        sa.CheckConstraint(
            "(outcome = 'running') = (finished_at IS NULL)", name=op.f("ck_poller_runs_finished_at")
        ),
        sa.CheckConstraint("pages >= 0", name=op.f("ck_poller_runs_pages_min")),
        sa.CheckConstraint("rows_read >= 0", name=op.f("ck_poller_runs_rows_read_min")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_poller_runs")),
    )
    op.create_index("ix_poller_runs_source_started_at", "poller_runs", ["source", "started_at"])

    op.create_table(
        "poller_rejects",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("row_key", sa.Text(), nullable=False),
        sa.Column("watermark", JSONB, nullable=True),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(f"code IN {REJECT_CODES}", name=op.f("ck_poller_rejects_code")),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["poller_runs.id"],
            name=op.f("fk_poller_rejects_run_id_poller_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_poller_rejects")),
    )
    op.create_index("ix_poller_rejects_run_id", "poller_rejects", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_poller_rejects_run_id", table_name="poller_rejects")
    op.drop_table("poller_rejects")
    op.drop_index("ix_poller_runs_source_started_at", table_name="poller_runs")
    op.drop_table("poller_runs")
    op.drop_constraint(op.f("ck_poller_state_last_outcome"), "poller_state", type_="check")
    op.drop_column("poller_state", "retry_at")
    op.drop_column("poller_state", "last_rows")
    op.drop_column("poller_state", "last_outcome")
