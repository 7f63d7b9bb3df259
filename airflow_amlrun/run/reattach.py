"""A retry of a task finds the run an earlier try left unfinished, and follows it rather than start a second one."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow_amlrun.history import RunStatus
from airflow_amlrun.run.outcome import ended_as_stopped, stopped_on_target
from airflow_amlrun.run.state import STOP_REQUESTED_TAG, FollowState, RunEndedError, never_started_outcome
from airflow_amlrun.submission import AirflowTask, discard_lost, job_for, recorded_handle
from airflow_amlrun.targets.handles import RunHandle, UnreadableHandleError

if TYPE_CHECKING:
    from airflow_amlrun.config import Settings
    from airflow_amlrun.environment import ResolvedEnvironment
    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.run.script_run import ScriptRun
    from airflow_amlrun.runconfig import ScriptRunConfig
    from airflow_amlrun.targets.base import ComputeTarget, TargetStatus
    from airflow_amlrun.workspace import Workspace

log = logging.getLogger(__name__)


def reattach(
    run_class: type[ScriptRun],
    workspace: Workspace,
    config: ScriptRunConfig,
    environment: ResolvedEnvironment,
    target: ComputeTarget[Any],
    airflow_task: AirflowTask,
    settings: Settings,
    *,
    follow: bool,
) -> ScriptRun | None:
    """The run an earlier try of this task left unfinished, to follow instead of starting a second one.

    A run whose target still runs it (or finished it while nobody watched) is followed to its end; one that never
    reached its target is recorded Failed (Canceled with why, if a stop of it was asked as it was prepared), and
    None says a new run is to be submitted. Without `follow`
    (``reattach_on_retry=False``), a run still on its target is stopped and recorded Canceled.
    """
    history = workspace.history
    earlier = [r for r in left_unfinished(workspace, airflow_task) if r.target == target.name]
    attached: ScriptRun | None = None
    for record in earlier:
        job = job_for(record.id, record.experiment, config, environment, record.snapshot_id)
        try:
            handle = recorded_handle(target, record, job)
        except UnreadableHandleError as err:
            # Nothing can be followed or stopped from it; the row ends, rather than fail every retry.
            log.warning("Run %s, left unfinished by an earlier try: %s", record.id, err)
            history.update_run(
                record.id,
                status=RunStatus.FAILED,
                end_time=_now(),
                error=f"Lost: {err} A new run was started.",
            )
            continue
        unreachable = target.attachable(handle) if handle is not None else None
        if handle is None or unreachable is not None or attached is not None:
            status = RunStatus.FAILED
            if handle is None:
                status, error = never_started_outcome(
                    record, "Lost: the task that submitted it stopped before the run reached its target."
                )
            elif unreachable is not None:
                error = f"Lost: this retry cannot reach it ({unreachable}); a new run was started."
            else:
                error = "Superseded: another unfinished run of the same task was re-attached."
            log.warning("Run %s, left unfinished by an earlier try: %s", record.id, error)
            if handle is not None and unreachable is None:
                # Still on its target: one execution per task, so the superseded one is stopped.
                try:
                    target.cancel(handle)
                except Exception as err:
                    log.warning("Run %s: stopping it on %s failed: %s", record.id, target.name, err)
            history.update_run(record.id, status=status, end_time=_now(), error=error)
            if handle is None:
                discard_lost(target, job)
            continue
        if not follow:
            log.warning(
                "Run %s, left unfinished by try %s of this task, is stopped: reattach_on_retry=False "
                "starts a new run",
                record.id,
                record.try_number,
            )
            try:
                stale = run_class.following(workspace, target, job, handle, record, settings)
            except RunEndedError:
                continue  # another process recorded it meanwhile
            stale.cancel(reason="Canceled: a retry of its task started a new run (reattach_on_retry=False).")
            continue
        log.info(
            "Re-attaching to run %s, left unfinished by try %s of this task", record.id, record.try_number
        )
        try:
            attached = run_class.following(workspace, target, job, handle, record, settings)
        except RunEndedError:
            continue  # another process (reconcile) recorded it meanwhile: a new run starts
        ended = _look(target, handle, record)
        if ended is not None and _ended_by_earlier_stop(ended, record):
            # The stop an earlier try sent (it was killed) reached the run, and that try was killed before it
            # recorded the end: the run is recorded Canceled, not as failed by the stop's signal, and this try
            # starts a new one.
            log.warning(
                "Run %s, left by try %s of this task, was stopped as that try was killed: recorded Canceled; "
                "a new run is started",
                record.id,
                record.try_number,
            )
            attached.conclude(ended)
            attached = None
            continue
        if ended is not None:
            attached.found_ended(ended)
        attached.reattached = True
        # A stop an earlier try asked (as it was killed) and that never reached the run is this try's no more: it
        # follows the run to its end, and nobody (reconcile) is to carry that stop out later.
        attached.forget_stop_request()
        history.update_run(record.id, try_number=airflow_task.try_number, drop_tags=[STOP_REQUESTED_TAG])
    return attached


def _look(target: ComputeTarget[Any], handle: RunHandle, record: RunRecord) -> TargetStatus | None:
    """How the run ended, if it did; None while it runs, and when the target cannot tell now (following the run
    then deals with that)."""
    try:
        ended = target.wait(handle, 0)
    except Exception as err:
        log.warning("Run %s: looking whether it ended failed: %s", record.id, err)
        return None
    return None if ended.running else ended


def _ended_by_earlier_stop(ended: TargetStatus, record: RunRecord) -> bool:
    """Whether the run ended by a stop: one its supervisor saw reach it while it ran, or, if an earlier try
    recorded that it asked one, an end by a stop's signal."""
    return stopped_on_target(ended) or (STOP_REQUESTED_TAG in record.tags and ended_as_stopped(ended))


def left_unfinished(workspace: Workspace, airflow_task: AirflowTask) -> list[RunRecord]:
    """The runs earlier tries of this task recorded and did not see end (a sweep's runs are its sweep's)."""
    return [
        record
        for record in workspace.history.list_runs(
            dag_id=airflow_task.dag_id,
            task_id=airflow_task.task_id,
            airflow_run_id=airflow_task.run_id,
            map_index=airflow_task.map_index,
        )
        if not record.status.is_terminal and record.parent_run_id is None
    ]


def stop_left_unfinished(
    run_class: type[ScriptRun], workspace: Workspace, airflow_task: AirflowTask, reason: str
) -> list[str]:
    """Stop the runs earlier tries of this task left unfinished, recorded Canceled with `reason`, for a try killed
    before it re-attached to them: a killed task's run does not go on unseen. Returns what became of each, for the
    task's error; one that cannot be reached or stopped is left as it is, for `amlrun reconcile`."""
    said = []
    for record in left_unfinished(workspace, airflow_task):
        run_left = f"run {record.id}, left by an earlier try,"
        try:
            run = run_class.resumed(workspace, record.id, FollowState())
        except RunEndedError as ended:
            said.append(f"{run_left} had ended ({ended.record.status})")
            continue
        except Exception as err:
            log.warning("Run %s, left unfinished by an earlier try, is left as it is: %s", record.id, err)
            said.append(f"{run_left} could not be stopped (amlrun reconcile settles it)")
            continue
        try:
            run.cancel(reason)
        except Exception as err:
            log.warning("Run %s, left unfinished by an earlier try: stopping it failed: %s", record.id, err)
            run.abandon()
            said.append(f"{run_left} could not be stopped (amlrun reconcile settles it)")
            continue
        status = workspace.history.get_run(record.id).status
        said.append(
            f"{run_left} was stopped" if status is RunStatus.CANCELED else f"{run_left} had ended ({status})"
        )
    return said


def _now() -> datetime:
    return datetime.now(UTC)
