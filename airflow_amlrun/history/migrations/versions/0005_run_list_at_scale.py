"""The run list at scale: indexes for its order and filters, each metric's summary (latest value, count,
extremes) and min/max pyramid, filled from the points already stored.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from airflow_amlrun.history.series import READ_LIMIT, Point, level_buckets

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ROWS_PER_INSERT = 1000
# The columns the run list may be sorted by that get an index (column, id): models.SORTED_COLUMNS then.
SORTED_COLUMNS = ("status", "target", "start_time", "end_time", "dag_id", "task_id")


def upgrade() -> None:
    op.create_index("ix_amlrun_runs_created", "amlrun_runs", ["created_at", "id"])
    op.create_index("ix_amlrun_runs_experiment_created", "amlrun_runs", ["experiment_id", "created_at", "id"])
    op.create_index(
        "ix_amlrun_runs_experiment_dag_created", "amlrun_runs", ["experiment_id", "dag_id", "created_at"]
    )
    for column in SORTED_COLUMNS:
        op.create_index(f"ix_amlrun_runs_{column}_id", "amlrun_runs", [column, "id"])
    summaries = op.create_table(
        "amlrun_metric_summaries",
        sa.Column(
            "run_id", sa.String(128), sa.ForeignKey("amlrun_runs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("numeric_count", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("last_step", sa.BigInteger),
        sa.Column("last_value", sa.Float),
        sa.Column("last_value_json", sa.Text),
        sa.Column("min_value", sa.Float),
        sa.Column("max_value", sa.Float),
    )
    op.create_index(
        "ix_amlrun_metric_summaries_name_value", "amlrun_metric_summaries", ["name", "last_value", "run_id"]
    )
    buckets = op.create_table(
        "amlrun_metric_buckets",
        sa.Column(
            "run_id", sa.String(128), sa.ForeignKey("amlrun_runs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("level", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("bucket", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("min_x", sa.BigInteger, nullable=False),
        sa.Column("min_value", sa.Float, nullable=False),
        sa.Column("max_x", sa.BigInteger, nullable=False),
        sa.Column("max_value", sa.Float, nullable=False),
        sa.Column("min_first", sa.Boolean, nullable=False),
    )
    _fill(summaries, buckets)


def _fill(summaries: sa.Table, buckets: sa.Table) -> None:
    """Summarize every metric already stored, one metric at a time, in the order its points were logged."""
    bind = op.get_bind()
    metrics = sa.table(
        "amlrun_metrics",
        sa.column("run_id", sa.String),
        sa.column("name", sa.String),
        sa.column("seq", sa.Integer),
        sa.column("step", sa.BigInteger),
        sa.column("value", sa.Float),
        sa.column("value_json", sa.Text),
    )
    rows = bind.execute(
        sa.select(metrics).order_by(metrics.c.run_id, metrics.c.name, metrics.c.seq),
        execution_options={"yield_per": 10_000},
    )
    pending_summaries: list[dict[str, Any]] = []
    pending_buckets: list[dict[str, Any]] = []
    key: tuple[str, str] | None = None
    summary: dict[str, Any] = {}
    finite: list[Point] = []

    def close() -> None:
        if key is None:
            return
        pending_summaries.append(summary)
        # As the history keeps them: only a metric too long to chart from its points has a pyramid.
        for (level, index), bucket in (level_buckets(finite) if len(finite) > READ_LIMIT else {}).items():
            pending_buckets.append(
                {"run_id": key[0], "name": key[1], "level": level, "bucket": index, **vars(bucket)}
            )
        _flush(bind, summaries, pending_summaries, _ROWS_PER_INSERT)
        _flush(bind, buckets, pending_buckets, _ROWS_PER_INSERT)

    for run_id, name, seq, step, value, value_json in rows:
        if (run_id, name) != key:
            close()
            key, finite = (run_id, name), []
            summary = {"run_id": run_id, "name": name, "count": 0, "numeric_count": 0, "min_value": None}
            summary["max_value"] = None
        summary.update(count=summary["count"] + 1, last_seq=seq, last_step=step)
        summary.update(last_value=value, last_value_json=value_json)
        if value is not None:
            number = len(finite)
            finite.append(Point(number, number if step is None else step, value))
            summary["numeric_count"] = number + 1
            low, high = summary["min_value"], summary["max_value"]
            summary["min_value"] = value if low is None else min(low, value)
            summary["max_value"] = value if high is None else max(high, value)
    close()
    _flush(bind, summaries, pending_summaries, 1)
    _flush(bind, buckets, pending_buckets, 1)


def _flush(bind: sa.Connection, table: sa.Table, rows: list[dict[str, Any]], at_least: int) -> None:
    if len(rows) >= at_least:
        bind.execute(table.insert(), rows)
        rows.clear()


def downgrade() -> None:
    op.drop_table("amlrun_metric_buckets")
    op.drop_table("amlrun_metric_summaries")
    for column in SORTED_COLUMNS:
        op.drop_index(f"ix_amlrun_runs_{column}_id", "amlrun_runs")
    op.drop_index("ix_amlrun_runs_experiment_dag_created", "amlrun_runs")
    op.drop_index("ix_amlrun_runs_experiment_created", "amlrun_runs")
    op.drop_index("ix_amlrun_runs_created", "amlrun_runs")
