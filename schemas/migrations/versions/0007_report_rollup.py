"""The reports' rollup: a narrow row per lead and per assignment with what the funnel counts.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24

The lead funnel (`/api/v1/reports/funnel`, `/ops/reports`, `leadflow report funnel`) reads these
tables instead of joining leads to their assignments for every report (on 10 million events, a
30-day funnel by source took about ten times longer that way; README, Reports). Dimension values
are codes into `report_values` and speeds are bucket numbers, so a row is small and a month of
leads scans fast. `leadflow/reports.py` refreshes the rollup before it reads (new leads, and
open leads whose row changed); the tables start empty and the first refresh builds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LEAD_DIMENSIONS = (
    "intake", "source", "channel", "event_type", "campaign", "business_line", "segment",
)  # fmt: skip


def _codes(*names: str) -> list[sa.Column[int]]:
    return [sa.Column(name, sa.SmallInteger(), nullable=True) for name in names]


def upgrade() -> None:
    op.create_table(
        "report_values",
        sa.Column("dimension", sa.Text(), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("dimension", "id", name=op.f("pk_report_values")),
        sa.UniqueConstraint("dimension", "value", name=op.f("uq_report_values_dimension_value")),
    )
    op.create_table(
        "report_leads",
        sa.Column("lead_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        *_codes(*_LEAD_DIMENSIONS, "queue"),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("queued", sa.Boolean(), nullable=False),
        sa.Column("assignments", sa.SmallInteger(), nullable=False),
        sa.Column("attempts", sa.SmallInteger(), nullable=False),
        sa.Column("expired", sa.SmallInteger(), nullable=False),
        sa.Column("recycles", sa.SmallInteger(), nullable=False),
        sa.Column("assign_bucket", sa.SmallInteger(), nullable=True),
        sa.Column("contact_bucket", sa.SmallInteger(), nullable=True),
        sa.Column("outcome", sa.SmallInteger(), nullable=True),
        sa.PrimaryKeyConstraint("lead_id", name=op.f("pk_report_leads")),
    )
    op.create_index("ix_report_leads_created_at", "report_leads", ["created_at"])
    op.create_table(
        "report_open_leads",
        sa.Column("lead_id", sa.BigInteger(), nullable=False),
        sa.Column("lead_xmin", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("lead_id", name=op.f("pk_report_open_leads")),
    )
    op.create_table(
        "report_assignments",
        sa.Column("assignment_id", sa.Uuid(), nullable=False),
        sa.Column("lead_id", sa.BigInteger(), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("agent", sa.Integer(), nullable=True),
        *_codes("queue", *_LEAD_DIMENSIONS),
        sa.Column("open", sa.Boolean(), nullable=False),
        sa.Column("attempt", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.SmallInteger(), nullable=True),
        sa.Column("contact_bucket", sa.SmallInteger(), nullable=True),
        sa.PrimaryKeyConstraint("assignment_id", name=op.f("pk_report_assignments")),
    )
    op.create_index("ix_report_assignments_assigned_at", "report_assignments", ["assigned_at"])
    op.create_index("ix_report_assignments_lead_id", "report_assignments", ["lead_id"])
    op.create_table(
        "report_refresh",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cutoff", sa.DateTime(timezone=True), nullable=False),
        sa.Column("max_lead_id", sa.BigInteger(), nullable=False),
        sa.Column("leads_refreshed", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_report_refresh_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report_refresh")),
    )


def downgrade() -> None:
    op.drop_table("report_refresh")
    op.drop_table("report_assignments")
    op.drop_table("report_open_leads")
    op.drop_table("report_leads")
    op.drop_table("report_values")
