"""Runs get a display name and a description, which their users set (``run.display_name = ...``).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN on both databases: nothing rebuilds the runs table.
    op.add_column("amlrun_runs", sa.Column("display_name", sa.String(256), nullable=True))
    op.add_column("amlrun_runs", sa.Column("description", sa.Text(), nullable=True))


def downgrade() -> None:
    # DROP COLUMN in place (SQLite 3.35 and later), not a rebuilt table: with foreign keys on, SQLite's DROP
    # TABLE of the old runs table would delete, by cascade, the rows of every table that refers to it.
    for column in ("description", "display_name"):
        op.execute(f"ALTER TABLE amlrun_runs DROP COLUMN {column}")
