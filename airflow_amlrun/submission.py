"""What a submission is made of, besides the run that follows it: the Airflow task it comes from, its code
snapshot, the job a target receives, the new run's first row, and the job and handle of a run recorded
earlier."""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun.environment import Environment, ResolvedEnvironment
from airflow_amlrun.rerun import recorded_config
from airflow_amlrun.snapshot import Snapshot, materialize, read_git_info, take_snapshot
from airflow_amlrun.targets.base import ComputeTarget, Job
from airflow_amlrun.targets.handles import RunHandle

if TYPE_CHECKING:
    from airflow_amlrun.config import Settings
    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.runconfig import ScriptRunConfig
    from airflow_amlrun.snapshot import BlobStore
    from airflow_amlrun.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AirflowTask:
    """The Airflow task instance that submitted a run, as recorded on the run row."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int | None
    try_number: int | None

    @classmethod
    def of(cls, ti: Any) -> AirflowTask:
        """The task instance an operator runs as (``context["ti"]``); a map index below 0 is no map index."""
        map_index = getattr(ti, "map_index", -1)
        return cls(
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=ti.run_id,
            map_index=map_index if map_index is not None and map_index >= 0 else None,
            try_number=getattr(ti, "try_number", None),
        )

    def row_fields(self) -> dict[str, Any]:
        return {
            "dag_id": self.dag_id,
            "task_id": self.task_id,
            "airflow_run_id": self.run_id,
            "map_index": self.map_index,
            "try_number": self.try_number,
        }


class SnapshotSource:
    """The run's code as its snapshot holds it: written from the store, never from the live tree."""

    def __init__(self, store: BlobStore, snapshot: Snapshot) -> None:
        self.store = store
        self.snapshot = snapshot

    def materialize(self, dest: Path) -> None:
        materialize(self.store, self.snapshot, dest)


def snapshot_code(
    workspace: Workspace, config: ScriptRunConfig, settings: Settings
) -> tuple[Snapshot, dict[str, Any] | None]:
    """Snapshot the source directory into the workspace store, and read its git provenance.

    Returns the snapshot and what the run records of git (None outside a repository): the summary,
    the build id and URI, and the digest of the uncommitted diff, which is stored as a blob.
    """
    source_directory = Path(config.source_directory)
    max_bytes = settings.snapshot_max_bytes
    if config.snapshot_max_size_mb is not None:
        max_bytes = int(config.snapshot_max_size_mb * 1_000_000)
    result = take_snapshot(
        source_directory,
        workspace.store,
        stat_cache_path=workspace.cache_dir / "snapshot-stat.sqlite",
        max_total_bytes=max_bytes,
        max_files=config.snapshot_max_files or settings.snapshot_max_files,
        # A script the ignore rules leave out would be missing from the run directory: refuse it now.
        required={config.script: "the run's script"} if config.script else None,
    )
    for warning in result.warnings:
        log.warning("%s", warning)
    info = read_git_info(source_directory)
    if info is None:
        return result.snapshot, None
    git = {**info.summary(), "build_id": info.build_id, "build_uri": info.build_uri}
    if info.diff:
        git["diff_digest"] = workspace.store.put_bytes(info.diff.encode())
    return result.snapshot, git


@dataclass(frozen=True)
class NewRun:
    """A run just recorded, not started: what its target receives, its code, its environment as recorded."""

    job: Job
    code: SnapshotSource
    environment: dict[str, Any]


def record_new_run(
    workspace: Workspace,
    experiment: str,
    config: ScriptRunConfig,
    environment: ResolvedEnvironment,
    target: ComputeTarget[Any],
    settings: Settings,
    *,
    tags: dict[str, str] | None,
    airflow_task: AirflowTask | None,
    rerun_of: RunRecord | None,
    parent_run_id: str | None,
) -> NewRun:
    """Check what the run needs on this worker and on its target, snapshot its code, and write its first row
    (Queued). Whatever fails before the row is written leaves no run behind."""
    # Building the environment needs its index credentials on this worker: a missing one fails now.
    environment.index_credentials()
    job = job_for(new_run_id(experiment), experiment, config, environment, None)
    target.check(job)
    if rerun_of is not None and rerun_of.snapshot_id is not None:
        # The code is the recorded run's, as the store holds it; source_directory is a restored copy.
        snapshot, git = workspace.store.get_manifest(rerun_of.snapshot_id), rerun_of.git
    else:
        # A snapshot too large fails here, before anything is stored.
        snapshot, git = snapshot_code(workspace, config, settings)
    job = replace(job, snapshot_id=snapshot.id)
    recorded_environment = {**environment.summary(), "framework": job.framework}
    if environment.lock is not None:
        # The lock itself is kept once in the store, by its hash; the run names it.
        recorded_environment["lock_digest"] = workspace.store.put_bytes(environment.lock.encode())
    workspace.history.create_run(
        run_id=job.run_id,
        experiment=experiment,
        target=target.name,
        script=job.script,
        command=json.dumps(job.command) if isinstance(job.command, list) else job.command,
        arguments=job.arguments,
        environment=recorded_environment,
        snapshot_id=snapshot.id,
        git=git,
        tags=dict(tags or {}),
        max_run_duration_seconds=job.max_run_duration_seconds,
        heartbeat_at=datetime.now(UTC),
        config=recorded_config(config, environment, rerun_of),
        rerun_of=rerun_of.id if rerun_of is not None else None,
        parent_run_id=parent_run_id,
        **(airflow_task.row_fields() if airflow_task else {}),
    )
    return NewRun(job, SnapshotSource(workspace.store, snapshot), recorded_environment)


def warn_of_unused_sections(environment: ResolvedEnvironment, target: ComputeTarget[Any]) -> None:
    """Say so when the environment asks for something the target does not do, rather than drop it silently."""
    spark = environment.spec.spark
    if not spark.empty and target.kind != "spark":
        listed = (
            ", ".join([*spark.packages, *spark.configuration]) or f"{len(spark.repositories)} repositories"
        )
        log.warning(
            "Environment %r has a spark section (%s), which the %s target %r ignores: only a Spark compute "
            "target passes packages, repositories and configuration to spark-submit. The run goes on without "
            "them; remove the section from the environment, or submit to a Spark target.",
            environment.name,
            listed,
            target.kind,
            target.name,
        )


def new_run_id(experiment: str) -> str:
    """Run ids as users know them: `<experiment>_<unix time>_<8 hex>`."""
    return f"{experiment}_{int(time.time())}_{secrets.token_hex(4)}"


def job_for(
    run_id: str,
    experiment: str,
    config: ScriptRunConfig,
    environment: ResolvedEnvironment,
    snapshot_id: str | None,
) -> Job:
    return Job(
        run_id=run_id,
        experiment=experiment,
        source_directory=Path(config.source_directory),
        script=config.script,
        command=config.command,
        arguments=list(config.arguments or []),
        environment=environment,
        environment_variables=dict(config.environment_variables),
        max_run_duration_seconds=config.max_run_duration_seconds,
        snapshot_id=snapshot_id,
        secret_environment_variables=dict(config.secret_environment_variables),
        framework=config.framework,
    )


def recorded_handle(target: ComputeTarget[Any], record: RunRecord, job: Job) -> RunHandle | None:
    """The handle of a recorded run: the one its row holds, else the one its target finds by its run id."""
    handle: RunHandle | None = (
        target.handle_type.from_json(record.handle) if record.handle else target.find(job)
    )
    return handle


def discard_lost(target: ComputeTarget[Any], job: Job) -> None:
    """Remove what a run recorded lost left on its target (nothing starts it any more); never fatal."""
    try:
        target.discard(job)
    except Exception as err:
        log.warning("Run %s: what it left on %s was not removed (%s)", job.run_id, target.name, err)


def recorded_job(record: RunRecord) -> Job:
    """The job of a recorded run, as much as following it needs: its id, limit and the handle's target."""
    recorded = record.environment or {}
    spec = Environment()
    environment = ResolvedEnvironment(
        spec=spec,
        name=str(recorded.get("name") or spec.name),
        version=recorded.get("version"),
        lock=None,
        build_key=recorded.get("build_key"),
        user_managed=bool(recorded.get("user_managed", True)),
    )
    command: str | list[str] | None = record.command
    if record.command and record.command.startswith("["):
        command = list(json.loads(record.command))
    return Job(
        run_id=record.id,
        experiment=record.experiment,
        source_directory=Path("."),
        script=record.script,
        command=command,
        arguments=[str(a) for a in record.arguments],
        environment=environment,
        environment_variables={},
        max_run_duration_seconds=record.max_run_duration_seconds,
        snapshot_id=record.snapshot_id,
    )
