"""Time indexes for the ops views and reports: BRIN on the append-only time columns.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

The ops dashboard and `/api/v1/pipeline` ask "what happened in the last hour" of tables that
only grow in time order (`lead_events.received_at`, `leads.created_at`,
`assignments.assigned_at`). A BRIN index answers such a range from a few pages of summaries, at a
tiny fraction of a B-tree's size and insert cost on the intake's hot path.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEXES = [
    ("ix_lead_events_received_at", "lead_events", "received_at"),
    ("ix_leads_created_at", "leads", "created_at"),
    ("ix_assignments_assigned_at", "assignments", "assigned_at"),
]


def upgrade() -> None:
    for name, table, column in _INDEXES:
        op.create_index(name, table, [column], postgresql_using="brin")


def downgrade() -> None:
    for name, table, _ in _INDEXES:
        op.drop_index(name, table_name=table)
