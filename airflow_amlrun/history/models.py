"""Tables of the run history: experiments, runs, their metrics, and registered environments."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
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

    __table_args__ = (
        Index("ix_amlrun_runs_airflow_task", "dag_id", "task_id", "airflow_run_id", "map_index"),
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
