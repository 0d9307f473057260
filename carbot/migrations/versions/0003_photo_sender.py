"""Who sent a prediction's photo, when that is not who asked (a /top3 reply, Discord's "Identify car").

The photo's sender's /forget then deletes those predictions too, and with them the last
reference to the photo, so its file goes as well.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No foreign key: SQLite cannot add one to a table in place, and a batch migration would copy the table and
    # drop the old one, which with foreign keys on cascade-deletes the feedback. `Store.forget` deletes the rows.
    op.add_column("predictions", sa.Column("photo_sender_id", sa.Integer(), nullable=True))
    op.create_index(op.f("ix_predictions_photo_sender_id"), "predictions", ["photo_sender_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_predictions_photo_sender_id"), table_name="predictions")
    op.drop_column("predictions", "photo_sender_id")  # in place (SQLite 3.35+), for the reason above
