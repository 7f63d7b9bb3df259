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
    with op.batch_alter_table("amlrun_runs") as batch:
        batch.add_column(sa.Column("config", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("rerun_of", sa.String(128), nullable=True))
        batch.create_index("ix_amlrun_runs_rerun_of", ["rerun_of"])
        batch.add_column(sa.Column("parent_run_id", sa.String(128), nullable=True))
        batch.create_index("ix_amlrun_runs_parent_run_id", ["parent_run_id"])


def downgrade() -> None:
    with op.batch_alter_table("amlrun_runs") as batch:
        batch.drop_index("ix_amlrun_runs_parent_run_id")
        batch.drop_column("parent_run_id")
        batch.drop_index("ix_amlrun_runs_rerun_of")
        batch.drop_column("rerun_of")
        batch.drop_column("config")
