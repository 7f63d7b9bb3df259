"""Tables of the run history: experiments, runs, their metrics, and registered environments."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Columns of a run the list may be sorted by that get an index of their own (created_at has one above).
SORTED_COLUMNS = ("status", "target", "start_time", "end_time", "dag_id", "task_id")


class Base(DeclarativeBase):
    """Declarative base of every history table."""

    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ExperimentRow(Base):
    __tablename__ = "amlrun_experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RunRow(Base):
    __tablename__ = "amlrun_runs"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("amlrun_experiments.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    target: Mapped[str] = mapped_column(String(256))
    script: Mapped[str | None] = mapped_column(String(1024))
    command: Mapped[str | None] = mapped_column(Text)
    arguments: Mapped[list[Any]] = mapped_column(JSON, default=list)
    environment: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    snapshot_id: Mapped[str | None] = mapped_column(String(64))
    git: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    handle: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    outputs_uri: Mapped[str | None] = mapped_column(String(1024))
    logs_uri: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    start_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dag_id: Mapped[str | None] = mapped_column(String(250))
    task_id: Mapped[str | None] = mapped_column(String(250))
    airflow_run_id: Mapped[str | None] = mapped_column(String(250))
    map_index: Mapped[int | None] = mapped_column(Integer)
    try_number: Mapped[int | None] = mapped_column(Integer)
    # When the task following the run last reported in; a run nobody reports on may be settled (reconcile).
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    max_run_duration_seconds: Mapped[float | None] = mapped_column(Float)
    # The ScriptRunConfig as submitted (no secrets; the environment as the exact version it resolved to), which
    # a re-run submits again; None for runs recorded before it was kept.
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The run this one re-runs (`amlrun rerun`).
    rerun_of: Mapped[str | None] = mapped_column(String(128), index=True)
    # The sweep (HyperDrive parent run) this run is a child of.
    parent_run_id: Mapped[str | None] = mapped_column(String(128), index=True)
    # What its users call the run and say of it (``run.display_name``, ``run.description``).
    display_name: Mapped[str | None] = mapped_column(String(256))
    description: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_amlrun_runs_airflow_task", "dag_id", "task_id", "airflow_run_id", "map_index"),
        # The run list's default order (newest first, the id breaking ties) and its keyset cursor.
        Index("ix_amlrun_runs_created", "created_at", "id"),
        # An experiment's runs, newest first (SQLite walks it for the list filtered by experiment).
        Index("ix_amlrun_runs_experiment_created", "experiment_id", "created_at", "id"),
        # The experiments' run counts and last activity, of the DAGs a reader may see, from the index alone.
        Index("ix_amlrun_runs_experiment_dag_created", "experiment_id", "dag_id", "created_at"),
        # The list sorted by one of these columns: each walks its index, with the id breaking ties.
        *(Index(f"ix_amlrun_runs_{c}_id", c, "id") for c in SORTED_COLUMNS),
    )


class MetricRow(Base):
    __tablename__ = "amlrun_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("amlrun_runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(256))
    # Steps count samples or tokens as often as epochs: 64-bit (a 32-bit step overflows at 2**31).
    step: Mapped[int | None] = mapped_column(BigInteger)
    value: Mapped[float | None] = mapped_column(Float)
    # A logged value that is not a number (a string, a list) keeps its JSON text here.
    value_json: Mapped[str | None] = mapped_column(Text)
    logged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    seq: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_amlrun_metrics_run_name", "run_id", "name"),
        UniqueConstraint("run_id", "seq", name="uq_amlrun_metrics_run_seq"),
    )


class MetricSummaryRow(Base):
    """One metric of one run in brief: its latest value (by seq), how many points it has, its extremes.

    Kept up to date as points are stored, so the run list shows, filters and sorts by metrics without
    reading the points.
    """

    __tablename__ = "amlrun_metric_summaries"

    run_id: Mapped[str] = mapped_column(ForeignKey("amlrun_runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    # Points stored, and how many of them are finite numbers (the charted ones, counted by the pyramid).
    count: Mapped[int] = mapped_column(BigInteger)
    numeric_count: Mapped[int] = mapped_column(BigInteger)
    last_seq: Mapped[int] = mapped_column(Integer)
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    last_value: Mapped[float | None] = mapped_column(Float)
    last_value_json: Mapped[str | None] = mapped_column(Text)
    min_value: Mapped[float | None] = mapped_column(Float)
    max_value: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        # Runs sorted or filtered by one metric's latest value.
        Index("ix_amlrun_metric_summaries_name_value", "name", "last_value", "run_id"),
    )


class MetricBucketRow(Base):
    """A bucket of a metric's min/max pyramid: the extremes of `size` consecutive finite points.

    Level L's buckets hold ``series.BUCKET_SIZES[L]`` points each; bucket b covers the points numbered
    b*size .. (b+1)*size-1 in the order they were stored. A chart of a long series reads one level's few
    thousand buckets instead of its points, and every spike is in some bucket's minimum or maximum. Only a
    metric of more than ``series.READ_LIMIT`` finite points has a pyramid: a chart reads shorter ones whole.
    """

    __tablename__ = "amlrun_metric_buckets"

    run_id: Mapped[str] = mapped_column(ForeignKey("amlrun_runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    count: Mapped[int] = mapped_column(Integer)
    # Where the extremes lie on the chart's x axis: the point's step, or its number when it has none.
    min_x: Mapped[int] = mapped_column(BigInteger)
    min_value: Mapped[float] = mapped_column(Float)
    max_x: Mapped[int] = mapped_column(BigInteger)
    max_value: Mapped[float] = mapped_column(Float)
    # Which of the two came first, to draw them in order.
    min_first: Mapped[bool] = mapped_column(Boolean)
