"""A deferred task that Airflow resumes only to fail it: the run its try handed to the trigger is settled from here.

Airflow resumes a deferred task with next_method "__fail__" when its trigger failed in the triggerer (an exception
escaped it, the triggerer could not import it, its event could not be handed to the task) or when the deferral's
timeout passed (no triggerer followed the run: down, hung, or not running at all). ``BaseOperator.resume_execution``
then raises TaskDeferralError or TaskDeferralTimeout before the task's own method is called, and the run would go on
on its target with its row Running, settled by nobody unless a retry re-attaches to it.

An operator that defers a run (or a sweep) derives from ``SettlesFailedDeferral`` and says how to follow its kind
of run on and how to stop it; ``failed_deferral`` and ``settle_failed_deferral`` do the rest.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from airflow.sdk import BaseOperator
from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR
from airflow.sdk.exceptions import TaskDeferralError, TaskDeferralTimeout

from airflow_amlrun.errors import RunFailedError
from airflow_amlrun.history import RunStatus
from airflow_amlrun.runconfig import SWEEP_TARGET
from airflow_amlrun.submission import AirflowTask

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.workspace import Workspace

T = TypeVar("T")

# The next_method with which Airflow resumes a deferred task only to fail it.
FAIL_METHOD = TRIGGER_FAIL_REPR
# The error of a run stopped because its deferral timed out.
NOT_FOLLOWED = (
    "Stopped: the Airflow task's execution_timeout passed while no triggerer followed the run (its deferral timed "
    "out)."
)


class RunKind(enum.Enum):
    """Which of a try's rows an operator hands to a trigger: a single run (ScriptRunOperator) or a sweep's parent
    (HyperDriveOperator)."""

    RUN = "run"
    SWEEP = "sweep"

    def holds(self, record: RunRecord) -> bool:
        return (record.target == SWEEP_TARGET) == (self is RunKind.SWEEP)


@dataclass(frozen=True)
class FailedDeferral:
    """Why Airflow resumed a deferred task only to fail it.

    :param error: what Airflow fails the task with: TaskDeferralTimeout (the deferral's timeout passed) or
        TaskDeferralError (the trigger failed).
    :param cause: what failed, in a line: the last line of the trigger's traceback (its exception), else Airflow's
        reason.
    """

    error: TaskDeferralError | TaskDeferralTimeout
    cause: str

    @property
    def timed_out(self) -> bool:
        """Whether the deferral's timeout passed (rather than the trigger failing)."""
        return isinstance(self.error, TaskDeferralTimeout)


def failed_deferral(resume: Callable[[], object], next_kwargs: dict[str, Any] | None) -> FailedDeferral:
    """Airflow's own resume of a task it resumed with "__fail__" (``BaseOperator.resume_execution``): it writes the
    trigger's traceback to the task log and raises the error it fails the task with, which is returned.

    :param resume: ``super().resume_execution`` with next_method "__fail__", bound to its arguments.
    :param next_kwargs: what Airflow resumed the task with (the reason, and the trigger's traceback if any).
    """
    try:
        resume()
    except (TaskDeferralError, TaskDeferralTimeout) as err:
        traceback = (next_kwargs or {}).get("traceback")
        lines = "".join(traceback).splitlines() if isinstance(traceback, list) else []
        cause = next((line.strip() for line in reversed(lines) if line.strip()), None)
        return FailedDeferral(err, cause or str(err))
    raise RuntimeError(
        'Airflow resumed the task with next_method "__fail__" and its resume_execution did not fail it: this '
        "version of Airflow is not one airflow-amlrun knows."
    )


def runs_of_this_try(workspace: Workspace, task: AirflowTask, kind: RunKind) -> list[RunRecord]:
    """This try's runs (or sweeps) as the run history records them, newest first.

    Found by the task's fields rather than the run id the task pushed as its XCom: Airflow 3 keeps a try's XComs
    across a deferral (it clears them only when a try starts with no next_method), but has lost them at a resume
    before (apache/airflow#22931, #41098); a run's row names its task and try itself (a retry that takes a run over
    records its own try), is where the reactions read the run's status anyway, and needs no XCom backend.
    """
    records = workspace.history.runs_of_task_try(
        dag_id=task.dag_id,
        task_id=task.task_id,
        airflow_run_id=task.run_id,
        map_index=task.map_index,
        try_number=task.try_number,
    )
    return [record for record in records if kind.holds(record)]


def settle_failed_deferral(
    failure: FailedDeferral,
    workspace: Workspace,
    task: AirflowTask,
    kind: RunKind,
    *,
    stop_at: datetime | None,
    follow_on: Callable[[RunRecord, datetime | None], T],
    stop: Callable[[RunRecord, str], RunRecord],
    log: Any,
) -> T:
    """Settle the run this try handed to its trigger, now that Airflow resumed the task only to fail it.

    - The trigger failed: the run is followed on in this worker to its end (`follow_on`, which returns what the
      task returns, or raises as the run ended), with no deferring again; should it still go on at `stop_at`,
      it is stopped then, recorded Failed with TIMED_OUT.
    - The deferral timed out (the execution_timeout passed while nobody followed the run): the run is stopped and
      recorded Failed (`stop`, with the reason; a run that had ended meanwhile is recorded as it ended), and the
      task fails.
    - No unfinished run of this try (another process recorded its end): the task fails with Airflow's error, and
      the log says what the row says.

    :param failure: what ``failed_deferral`` returned.
    :param task: the task instance resumed (``AirflowTask.of(context["ti"])``).
    :param kind: which of the try's rows the operator hands to a trigger.
    :param stop_at: when the try's execution_timeout passes (``SettlesFailedDeferral.try_deadline``), if it has
        one: Airflow times the resumed task anew, from the resume, so a run followed on from here would otherwise
        outlive it.
    :param follow_on: follows the given unfinished run (or sweep) on from this process to its end, stopping it at
        the given time (if any), recorded Failed with TIMED_OUT.
    :param stop: stops the given unfinished run (or sweep) now, recording it Failed with the given reason, and
        returns its row as recorded.
    :param log: the task's log.
    """
    runs = runs_of_this_try(workspace, task, kind)
    unfinished = [record for record in runs if not record.status.is_terminal]
    what = "sweep" if kind is RunKind.SWEEP else "run"
    if not unfinished:
        if runs:
            record = runs[0]
            log.warning(
                "The %s, and %s %s of this try was recorded %s by another process meanwhile (%s): nothing is left "
                "to settle. The task fails with Airflow's error.",
                _what_failed(failure),
                what,
                record.id,
                record.status,
                record.error or "no error recorded",
            )
        else:
            log.warning(
                "The %s, and the run history at %s holds no %s of try %s of this task to settle. The task fails with "
                "Airflow's error.",
                _what_failed(failure),
                workspace.history.url_for_display,
                what,
                task.try_number,
            )
        raise failure.error
    record = unfinished[0]
    if not failure.timed_out:
        log.warning(
            "The trigger following %s %s failed in the triggerer (%s); this worker follows the %s on to its end.",
            what,
            record.id,
            failure.cause,
            what,
        )
        if stop_at is not None:
            log.info(
                "%s %s is stopped at %s if it still goes on then: the task's execution_timeout, counted from the "
                "start of this try (or, for a try Airflow gave no start, from the resume).",
                what.capitalize(),
                record.id,
                stop_at.isoformat(timespec="seconds"),
            )
        return follow_on(record, stop_at)
    log.warning(
        "The task's execution_timeout passed while no triggerer followed %s %s (Airflow's deferral timed out): it "
        "is stopped.",
        what,
        record.id,
    )
    ended = stop(record, NOT_FOLLOWED)
    if ended.status is RunStatus.FAILED and ended.error == NOT_FOLLOWED:
        raise RunFailedError(
            f"{what.capitalize()} {record.id} was stopped and recorded Failed: the task's execution_timeout passed "
            "while no triggerer followed it (Airflow's deferral timed out). Check that a triggerer runs "
            "(`airflow triggerer`) and what its log says of this task's trigger.",
            run_id=record.id,
        ) from failure.error
    log.warning(
        "%s %s had ended before it was stopped: recorded %s (%s).",
        what.capitalize(),
        record.id,
        ended.status,
        ended.error or "no error",
    )
    raise failure.error


def _what_failed(failure: FailedDeferral) -> str:
    if failure.timed_out:
        return "task's deferral timed out (no triggerer followed it within its execution_timeout)"
    return f"trigger of this task failed in the triggerer ({failure.cause})"


class SettlesFailedDeferral(BaseOperator):
    """An operator that hands a run (or a sweep) to a trigger: when Airflow resumes it only to fail it, the run its
    try handed over is settled from here (see the module): a trigger that failed leaves the run to this worker to
    follow on to its end; a deferral that timed out (the execution_timeout passed while no triggerer followed the
    run) stops it, recorded Failed, and fails the task."""

    # Which of a try's rows the operator hands to a trigger.
    deferred_kind: ClassVar[RunKind]

    @property
    def workspace(self) -> Workspace:
        raise NotImplementedError

    def try_deadline(self, ti: Any) -> datetime | None:
        """When the task's execution_timeout ends try `ti`, if the task has one: counted from the try's start, which
        Airflow keeps across a deferral. Airflow itself times a deferred task not at all and a resumed one anew,
        from the resume: whatever follows the try's run (the trigger, or this worker after the trigger) stops it
        at this time."""
        if self.execution_timeout is None:
            return None
        # Airflow 3 gives every try its start; a try without one is timed from now, as Airflow would time it.
        started = getattr(ti, "start_date", None) or datetime.now(UTC)
        return started + self.execution_timeout

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        if next_method != FAIL_METHOD:
            return super().resume_execution(next_method, next_kwargs, context)
        failure = failed_deferral(
            partial(super().resume_execution, next_method, next_kwargs, context), next_kwargs
        )
        return settle_failed_deferral(
            failure,
            self.workspace,
            AirflowTask.of(context["ti"]),
            self.deferred_kind,
            stop_at=self.try_deadline(context["ti"]),
            follow_on=lambda record, stop_at: self._followed_on_after_trigger(context, record, stop_at),
            stop=lambda record, reason: self._stopped_unfollowed(context, record, reason),
            log=self.log,
        )

    def _followed_on_after_trigger(
        self, context: Context, record: RunRecord, stop_at: datetime | None
    ) -> Any:
        """Follow on, in this worker, the run whose trigger failed; returns what the task returns. Should it still
        go on at `stop_at` (the try's execution_timeout), it is stopped then, recorded Failed with TIMED_OUT."""
        raise NotImplementedError

    def _stopped_unfollowed(self, context: Context, record: RunRecord, reason: str) -> RunRecord:
        """Stop the run nobody followed past the task's execution_timeout, recorded Failed with `reason`."""
        raise NotImplementedError
