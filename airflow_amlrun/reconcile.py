"""Settling runs that nobody follows any more: ``amlrun reconcile``, which every task also runs as it starts.

A run is followed by the task that submitted it (or by a retry of that task that re-attached to it), and
that task reports in on the run row (``heartbeat_at``) every few seconds. When the task dies and no retry
comes, the row would stay Running for good, although the run itself ended on its target, or was stopped
there at its time limit (targets enforce ``max_run_duration_seconds`` themselves). Reconcile takes every
unfinished run nobody reported on for ``[amlrun] reconcile_after_seconds`` and:

- a run that ended on its target is followed to its end from here, as a retry would: the rest of its log
  and metrics, its outputs and its outcome (Completed, or Failed with the reason, the time limit included)
  are recorded;
- a run still running past its time limit is stopped on its target and recorded Failed with the limit;
- a run still running within its limit is left alone: it is real work, and a retry of its task
  re-attaches to it; unless a stop of it was asked (its ``amlrun.stop_requested`` tag: a cancel, or a sweep's
  policy, whose process died before the stop reached the run), which reconcile then carries out, recording it
  Canceled with why;
- a run that never reached its target (no handle, nothing found there by its run id) is recorded Failed, or
  Canceled with why if a stop of it was asked as it was prepared (its task killed outright meanwhile), and
  what it left there (a container created, never started) is removed;
- a run on another machine's local target (or that machine's Docker socket) cannot be looked at from
  here and is left for a reconcile on that machine.

Several processes may reconcile at once: each run is claimed with one conditional update, so only one of
them settles it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow_amlrun.config import Settings, load_settings
from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.history import RunRecord, RunStatus
from airflow_amlrun.run import STOP_REQUESTED_TAG, RunEndedError, ScriptRun, never_started_outcome
from airflow_amlrun.runconfig import SWEEP_TARGET
from airflow_amlrun.submission import discard_lost, recorded_handle, recorded_job
from airflow_amlrun.targets.base import ComputeTarget, Job
from airflow_amlrun.targets.handles import RunHandle, UnreadableHandleError
from airflow_amlrun.targets.registry import resolve_target

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_amlrun.workspace import Workspace

log = logging.getLogger(__name__)

# The row's tag saying a run was recorded by reconcile rather than by the task that submitted it.
SETTLED_BY_TAG = "amlrun.settled_by"
LEFT = "left as it is"


@dataclass(frozen=True)
class Settlement:
    """What reconcile did with one unfinished run: the status it recorded (or LEFT), and why."""

    run_id: str
    experiment: str
    outcome: str
    reason: str

    @property
    def settled(self) -> bool:
        return self.outcome != LEFT


def reconcile(
    workspace: Workspace,
    *,
    settings: Settings | None = None,
    dry_run: bool = False,
    skip: Callable[[RunRecord], bool] | None = None,
    time_budget_seconds: float | None = None,
    quick: bool = False,
    abandon_unreachable: bool = False,
) -> list[Settlement]:
    """Settle the workspace's unfinished runs that nobody has reported on lately; see the module's docstring.

    :param workspace: the workspace whose history to settle.
    :param settings: the ``[amlrun]`` settings (``reconcile_after_seconds``); read when not given.
    :param dry_run: only say what would be done (targets are asked, nothing is changed).
    :param skip: runs not to touch (a task starting leaves its own earlier tries' runs to its re-attach).
    :param time_budget_seconds: stop looking at further runs after this long (a task starting spends
        little time on others' runs).
    :param quick: only runs on the local target, which this machine answers for at once without a network
        (what a task does as it starts); runs on other targets are counted in a log line.
    :param abandon_unreachable: record Failed the runs this machine cannot reach (another worker's local
        runs) instead of leaving them for a reconcile on that machine (which may never run again).
    """
    settings = settings or load_settings()
    started = time.monotonic()
    heard_before = datetime.now(UTC) - timedelta(seconds=settings.reconcile_after_seconds)
    settlements: list[Settlement] = []
    elsewhere = 0
    unfinished = workspace.history.unfinished_runs(heard_before=heard_before)
    # A sweep's parent is settled once its runs are: they come first, so that one pass settles both.
    unfinished.sort(key=lambda record: record.target == SWEEP_TARGET)
    for record in unfinished:
        if time_budget_seconds is not None and time.monotonic() - started > time_budget_seconds:
            break
        if skip is not None and skip(record):
            continue
        if quick and record.target != "local":
            elsewhere += 1
            continue
        try:
            settlement = _settle(workspace, settings, record, heard_before, dry_run, abandon_unreachable)
        except Exception as err:  # one run that cannot be looked at must not keep the others unsettled
            log.warning("Reconcile: run %s could not be settled: %s", record.id, err)
            settlement = Settlement(record.id, record.experiment, LEFT, f"could not be settled: {err}")
        if settlement is not None:
            settlements.append(settlement)
            if settlement.settled:
                log.warning(
                    "Reconcile: run %s of experiment %s, which no task followed any more, %s %s: %s",
                    settlement.run_id,
                    settlement.experiment,
                    "would be recorded" if dry_run else "is recorded",
                    settlement.outcome,
                    settlement.reason,
                )
    if elsewhere:
        log.info(
            "%d unfinished run(s) on remote compute targets have not been reported on for %g s; `amlrun "
            "reconcile` (e.g. run from cron) settles them",
            elsewhere,
            settings.reconcile_after_seconds,
        )
    return settlements


def _settle(
    workspace: Workspace,
    settings: Settings,
    record: RunRecord,
    heard_before: datetime,
    dry_run: bool,
    abandon_unreachable: bool,
) -> Settlement | None:
    def result(outcome: str, reason: str) -> Settlement:
        return Settlement(record.id, record.experiment, outcome, reason)

    if record.target == SWEEP_TARGET:
        # A sweep's parent runs nowhere itself: once its runs are settled, nobody is left to conclude it.
        live = [c.id for c in workspace.history.child_runs(record.id) if not c.status.is_terminal]
        if live:
            return result(LEFT, f"its runs {', '.join(live)} are settled first")
        return _record_lost(
            workspace,
            record,
            heard_before,
            "Failed: the task running this sweep stopped reporting on it.",
            dry_run,
        )
    try:
        target = resolve_target(record.target, settings, workspace.cache_dir)
    except AmlRunError as err:
        return result(LEFT, f"its compute target {record.target!r} cannot be used from here: {err}")
    job = recorded_job(record)
    try:
        handle = recorded_handle(target, record, job)
    except UnreadableHandleError as err:
        return _record_lost(workspace, record, heard_before, f"Lost: {err}", dry_run)
    if handle is None:
        recorded, reason = never_started_outcome(
            record,
            "Lost: the task that submitted it stopped before the run reached its target, and no task "
            "followed it since.",
        )
        settlement = _record_lost(workspace, record, heard_before, reason, dry_run, status=recorded)
        if settlement is not None and not dry_run:
            # Recorded lost by this process alone (claimed): nothing starts what it left on the target any more.
            discard_lost(target, job)
        return settlement
    unreachable = target.attachable(handle)
    if unreachable is not None:
        gone = target.gone(handle)
        if gone is not None:
            return _record_lost(workspace, record, heard_before, f"Lost: {gone}.", dry_run)
        if _over_limit(record, slack=settings.reconcile_after_seconds):
            reason = (
                f"Lost: it cannot be reached from here ({unreachable}), no task has reported on it since "
                f"{record.heartbeat_at or record.start}, and it is past its max_run_duration_seconds="
                f"{record.max_run_duration_seconds:g}, at which its target stopped it."
            )
            return _record_lost(workspace, record, heard_before, reason, dry_run)
        if abandon_unreachable:
            reason = (
                "Lost: abandoned by `amlrun reconcile --abandon-unreachable`: it cannot be reached from here "
                f"({unreachable})."
            )
            return _record_lost(workspace, record, heard_before, reason, dry_run)
        return result(
            LEFT,
            f"it cannot be reached from here ({unreachable}); run reconcile on that machine, or "
            "--abandon-unreachable if it is gone for good",
        )
    over_limit = _over_limit(record)
    stop_asked = record.tags.get(STOP_REQUESTED_TAG)
    if dry_run:
        # Asking the target may already act (end what a dead supervisor left behind): a dry run only says.
        if over_limit:
            otherwise = ", stopped for its limit otherwise"
        elif stop_asked is not None:
            otherwise = f", stopped as was asked otherwise ({stop_asked})"
        else:
            otherwise = ", left to a retry if it still runs"
        return result(
            "Failed" if over_limit else "ended, or left",
            "it would be looked at on its target: followed to its end if it ended" + otherwise,
        )
    status = target.wait(handle, 0)
    if status.running and not over_limit and stop_asked is None:
        return result(LEFT, "it still runs on its target, within its limit; a retry of its task re-attaches")
    if not workspace.history.claim_unheard_run(record.id, heard_before=heard_before):
        return None
    return _follow_to_end(
        workspace, target, job, handle, record, settings, stop=status.running and not over_limit
    )


def _record_lost(
    workspace: Workspace,
    record: RunRecord,
    heard_before: datetime,
    reason: str,
    dry_run: bool,
    status: RunStatus = RunStatus.FAILED,
) -> Settlement | None:
    """Record Failed (or `status`) a run that exists nowhere to be followed (never started, or its machine
    restarted)."""
    if not dry_run:
        if not workspace.history.claim_unheard_run(record.id, heard_before=heard_before):
            return None  # someone else reported on it meanwhile
        workspace.history.update_run(
            record.id,
            status=status,
            end_time=datetime.now(UTC),
            error=reason,
            add_tags={SETTLED_BY_TAG: "reconcile"},
        )
    return Settlement(record.id, record.experiment, str(status), reason)


def _follow_to_end(
    workspace: Workspace,
    target: ComputeTarget[Any],
    job: Job,
    handle: RunHandle,
    record: RunRecord,
    settings: Settings,
    *,
    stop: bool,
) -> Settlement:
    """Follow the run as a retry would: a run past its limit is stopped at once (the deadline counts from its
    start), one that ended is drained, concluded, collected and tidied.

    :param stop: the run still runs, and a stop of it was asked: stop it, to be recorded Canceled with why.
    """
    try:
        run = ScriptRun.following(workspace, target, job, handle, record, settings)
    except RunEndedError as ended:
        return Settlement(
            record.id, record.experiment, str(ended.record.status), "recorded by another process"
        )
    run.settle_only(tags={SETTLED_BY_TAG: "reconcile"})
    if stop:
        try:
            run.request_stop()
        except Exception as err:
            # Nothing is recorded: the run goes on as it was, and the next reconcile asks again.
            run.abandon()
            return Settlement(
                record.id,
                record.experiment,
                LEFT,
                f"a stop of it was asked ({record.tags[STOP_REQUESTED_TAG]}), and stopping it on "
                f"{target.name} failed: {err}; the next reconcile tries again",
            )
    final = run.wait_for_completion(show_output=False, raise_on_error=False)
    return Settlement(
        record.id, record.experiment, str(final.status), final.error or "it ended on its target"
    )


def _over_limit(record: RunRecord, slack: float = 0.0) -> bool:
    if record.max_run_duration_seconds is None or record.start is None:
        return False
    return (datetime.now(UTC) - record.start).total_seconds() > record.max_run_duration_seconds + slack
