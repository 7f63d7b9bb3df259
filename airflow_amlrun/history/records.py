"""What the run history hands out: plain, immutable records of experiments, runs and metrics."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def aware(value: datetime | None) -> datetime | None:
    """A time read from the history, with its zone: SQLite hands datetimes back without it; all are UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class RunStatus(enum.StrEnum):
    """Life cycle of a run, in the order a run goes through it."""

    QUEUED = "Queued"
    PREPARING = "Preparing"
    STARTING = "Starting"
    RUNNING = "Running"
    FINALIZING = "Finalizing"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELED = "Canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED)


@dataclass(frozen=True)
class ExperimentRecord:
    """A named group of runs."""

    name: str
    created_at: datetime
    run_count: int = 0
    # When its newest run (of those counted) was created.
    last_run_at: datetime | None = None


@dataclass(frozen=True)
class MetricPoint:
    """One logged value of a metric; `seq` orders the points of a run and makes ingestion idempotent."""

    name: str
    value: Any
    seq: int
    step: int | None = None
    logged_at: datetime | None = None


@dataclass(frozen=True)
class RunRecord:
    """One run as the history holds it; `metrics` maps each metric name to its last logged value."""

    id: str
    experiment: str
    status: RunStatus
    target: str
    script: str | None
    command: str | None
    arguments: list[Any]
    environment: dict[str, Any] | None
    snapshot_id: str | None
    git: dict[str, Any] | None
    tags: dict[str, Any]
    handle: dict[str, Any] | None
    outputs_uri: str | None
    logs_uri: str | None
    error: str | None
    created_at: datetime
    start: datetime | None
    end: datetime | None
    dag_id: str | None
    task_id: str | None
    airflow_run_id: str | None
    map_index: int | None
    try_number: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    heartbeat_at: datetime | None = None
    max_run_duration_seconds: float | None = None
    # The configuration the run was submitted with (see the runs table's config column), and the run it re-runs.
    config: dict[str, Any] | None = None
    rerun_of: str | None = None
    parent_run_id: str | None = None
    # Set by its users, after it was submitted (``run.display_name = ...``).
    display_name: str | None = None
    description: str | None = None

    @property
    def duration_seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return round((self.end - self.start).total_seconds(), 3)

    def summary(self) -> dict[str, Any]:
        """The run summary a task returns as its XCom: JSON-serialisable, times in ISO 8601."""
        return {
            "run_id": self.id,
            "experiment": self.experiment,
            "status": str(self.status),
            "target": self.target,
            "metrics": dict(self.metrics),
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "duration_seconds": self.duration_seconds,
            "outputs_uri": self.outputs_uri,
            "snapshot_id": self.snapshot_id,
            "git": self.git,
            "environment": self.environment,
            "error": self.error,
            **({"rerun_of": self.rerun_of} if self.rerun_of else {}),
            **({"parent_run_id": self.parent_run_id} if self.parent_run_id else {}),
            **({"display_name": self.display_name} if self.display_name else {}),
            **({"description": self.description} if self.description else {}),
            # What the script and its target tagged the run with (a Spark run: its application id and UI).
            "tags": dict(self.tags),
        }
