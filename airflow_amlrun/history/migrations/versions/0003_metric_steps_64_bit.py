"""Metric steps are 64-bit integers.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite stores every INTEGER in up to 8 bytes already; rebuilding its table would change nothing.
    if op.get_bind().dialect.name == "sqlite":
        return
    op.alter_column("amlrun_metrics", "step", type_=sa.BigInteger(), existing_type=sa.Integer())


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.alter_column("amlrun_metrics", "step", type_=sa.Integer(), existing_type=sa.BigInteger())
