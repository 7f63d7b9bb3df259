"""What the run-history JSON API answers, as pydantic models: the OpenAPI schema the UI's pages are built on."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class ExperimentOut(BaseModel):
    name: str
    runs: int = Field(description="Runs of the experiment the caller may see.")
    created_at: datetime
    last_run_at: datetime | None = Field(description="When its newest run the caller may see was created.")


class AirflowTaskOut(BaseModel):
    dag_id: str | None
    task_id: str | None
    run_id: str | None
    map_index: int | None
    try_number: int | None = None


class RunOut(BaseModel):
    """A run as the list shows it."""

    run_id: str
    experiment: str
    status: str
    target: str
    created_at: datetime
    start: datetime | None
    end: datetime | None
    duration_seconds: float | None
    airflow: AirflowTaskOut
    parameters: dict[str, Any] = Field(description="Read from the arguments: --name value, --flag, arg0...")
    tags: dict[str, Any]
    metrics: dict[str, Any] = Field(description="Each metric's latest value.")


class RunPageOut(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class MetricSummaryOut(BaseModel):
    name: str
    count: int
    numeric_count: int = Field(description="Points that are finite numbers: the ones a chart draws.")
    last_step: int | None
    last: Any
    min: float | None
    max: float | None


class SweepOut(BaseModel):
    """How a sweep searched, as its parent run recorded it (hyperdrive/recorded.py RecordedSweep)."""

    sampling: str = Field(description="grid, random or bayesian.")
    seed: int | None
    parameter_space: dict[str, str] = Field(
        description="Each parameter and its values as Python writes them: choice(0.1, 0.5)."
    )
    drawn_arguments: list[str] = Field(
        description="The arguments each run adds to the sweep's own, the values it draws written <value>."
    )
    primary_metric_name: str
    primary_metric_goal: str
    policy: str | None = Field(
        description="The early termination policy; null when every run goes to its end."
    )
    max_total_runs: int
    max_concurrent_runs: int | None
    max_duration_minutes: float | None
    git: dict[str, Any] | None = Field(
        description="The git state every run of the sweep recorded of its code, as a run's `git`, when it is the "
        "same for all of them; null when they differ, the code was in no git checkout, or no run is recorded yet."
    )


class RunDetailOut(RunOut):
    script: str | None
    command: str | None
    arguments: list[Any]
    environment: dict[str, Any] | None
    snapshot_id: str | None
    git: dict[str, Any] | None
    error: str | None
    heartbeat_at: datetime | None
    max_run_duration_seconds: float | None
    parent_run_id: str | None = Field(description="The sweep this run is one run of.")
    rerun_of: str | None = Field(description="The run this one re-ran.")
    has_log: bool = Field(description="Whether the run's log was stored (else it is read on its target).")
    has_outputs: bool
    metric_summaries: list[MetricSummaryOut]
    sweep: SweepOut | None = Field(
        description="How the sweep searched, for a sweep's parent run (its runs add the values they draw to its "
        "arguments); null for any other run."
    )


class SeriesOut(BaseModel):
    name: str
    x: list[int] = Field(
        description="Each point's step, or its number among the metric's points if it had none."
    )
    values: list[float]
    points: int = Field(description="Finite points the metric has.")
    sampled: bool = Field(
        description="Whether these are a selection keeping every slice's minimum and maximum."
    )


class RunSeriesOut(BaseModel):
    run_id: str
    series: list[SeriesOut]


class ComparedRunOut(BaseModel):
    run_id: str
    experiment: str
    status: str
    parameters: dict[str, Any]
    metrics: dict[str, Any]


class CompareOut(BaseModel):
    runs: list[ComparedRunOut]
    differing_parameters: list[str] = Field(
        description="Parameters whose values are not the same in every run."
    )
    differing_metrics: list[str]
    series: list[RunSeriesOut]


class LogOut(BaseModel):
    lines: list[str]
    target_offset: int = Field(description="Pass back as target_offset to read on.")
    store_offset: int = Field(description="Pass back as store_offset to read on.")
    ended: bool = Field(description="The run ended and its stored log was read to its end.")
    status: str


class SnapshotFileOut(BaseModel):
    path: str
    size: int
    digest: str | None
    link: str | None


class SnapshotOut(BaseModel):
    snapshot_id: str
    files: list[SnapshotFileOut]


class FileTextOut(BaseModel):
    path: str
    size: int
    text: str | None = Field(description="The file's text; null if it is not UTF-8 text or too large.")


class SnapshotDiffOut(BaseModel):
    run_a: str
    run_b: str
    added: list[str]
    removed: list[str]
    changed: list[str]
    path: str | None
    diff: str | None = Field(
        description="Unified diff of `path` between the two runs, if asked for and text."
    )


class OutputOut(BaseModel):
    path: str
