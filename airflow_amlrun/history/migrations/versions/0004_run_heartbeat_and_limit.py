"""Runs record their time limit and when their follower last reported, so orphaned runs can be settled.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("amlrun_runs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("max_run_duration_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    # DROP COLUMN in place (SQLite 3.35 and later), not a rebuilt table: with foreign keys on, SQLite's DROP
    # TABLE of the old runs table would delete every run's metrics by cascade.
    for column in ("max_run_duration_seconds", "heartbeat_at"):
        op.execute(f"ALTER TABLE amlrun_runs DROP COLUMN {column}")
