"""Retrain runs: one row per admin `/retrain`, with its data counts, both models' metrics and the decision.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = ("queued", "running", "promoted", "rejected", "failed", "promoted_by_admin", "discarded")


def upgrade() -> None:
    op.create_table(
        "retrain_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("requested_by", sa.String(length=96), nullable=False),
        sa.Column("chat_id", sa.String(length=64), nullable=False),
        sa.Column("language", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("base_version", sa.String(length=128), nullable=True),
        sa.Column("candidate_version", sa.String(length=128), nullable=True),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("active_metrics", sa.JSON(), nullable=False),
        sa.Column("candidate_metrics", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("error", sa.String(length=2000), nullable=True),
        sa.Column("decided_by", sa.String(length=96), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.CheckConstraint(f"status IN {_STATUSES}", name=op.f("ck_retrain_runs_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrain_runs")),
    )
    op.create_index(op.f("ix_retrain_runs_status"), "retrain_runs", ["status"])
    op.create_index(op.f("ix_retrain_runs_requested_at"), "retrain_runs", ["requested_at"])


def downgrade() -> None:
    op.drop_table("retrain_runs")
