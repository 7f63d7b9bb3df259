"""Experiments, runs and metrics.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "amlrun_experiments",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "amlrun_runs",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("experiment_id", sa.Integer, sa.ForeignKey("amlrun_experiments.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("script", sa.String(1024)),
        sa.Column("command", sa.Text),
        sa.Column("arguments", sa.JSON, nullable=False),
        sa.Column("environment", sa.JSON),
        sa.Column("snapshot_id", sa.String(64)),
        sa.Column("git", sa.JSON),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("handle", sa.JSON),
        sa.Column("outputs_uri", sa.String(1024)),
        sa.Column("logs_uri", sa.String(1024)),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True)),
        sa.Column("end_time", sa.DateTime(timezone=True)),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("task_id", sa.String(250)),
        sa.Column("airflow_run_id", sa.String(250)),
        sa.Column("map_index", sa.Integer),
        sa.Column("try_number", sa.Integer),
    )
    op.create_index("ix_amlrun_runs_experiment_id", "amlrun_runs", ["experiment_id"])
    op.create_index("ix_amlrun_runs_status", "amlrun_runs", ["status"])
    op.create_index(
        "ix_amlrun_runs_airflow_task", "amlrun_runs", ["dag_id", "task_id", "airflow_run_id", "map_index"]
    )
    op.create_table(
        "amlrun_metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "run_id", sa.String(128), sa.ForeignKey("amlrun_runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("step", sa.Integer),
        sa.Column("value", sa.Float),
        sa.Column("value_json", sa.Text),
        sa.Column("logged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.UniqueConstraint("run_id", "seq", name="uq_amlrun_metrics_run_seq"),
    )
    op.create_index("ix_amlrun_metrics_run_name", "amlrun_metrics", ["run_id", "name"])


def downgrade() -> None:
    op.drop_table("amlrun_metrics")
    op.drop_table("amlrun_runs")
    op.drop_table("amlrun_experiments")
