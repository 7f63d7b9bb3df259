"""Runs record the configuration they were submitted with, the run a re-run repeats, and the sweep they belong to.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN and CREATE INDEX on both databases: nothing rebuilds the runs table.
    op.add_column("amlrun_runs", sa.Column("config", sa.JSON(), nullable=True))
    op.add_column("amlrun_runs", sa.Column("rerun_of", sa.String(128), nullable=True))
    op.create_index("ix_amlrun_runs_rerun_of", "amlrun_runs", ["rerun_of"])
    op.add_column("amlrun_runs", sa.Column("parent_run_id", sa.String(128), nullable=True))
    op.create_index("ix_amlrun_runs_parent_run_id", "amlrun_runs", ["parent_run_id"])


def downgrade() -> None:
    # DROP COLUMN in place (SQLite 3.35 and later), not a rebuilt table: with foreign keys on, SQLite's DROP
    # TABLE of the old runs table would delete, by cascade, the rows of every table that refers to it.
    op.drop_index("ix_amlrun_runs_parent_run_id", "amlrun_runs")
    op.drop_index("ix_amlrun_runs_rerun_of", "amlrun_runs")
    for column in ("parent_run_id", "rerun_of", "config"):
        op.execute(f"ALTER TABLE amlrun_runs DROP COLUMN {column}")
