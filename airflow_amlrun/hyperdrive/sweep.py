"""Running a sweep: a parent run that records it, and child runs started, followed and stopped by this process.

The parent run is a row of its own (target ``hyperdrive``) whose config holds the sweep; each child is an
ordinary run of the same experiment with ``parent_run_id`` naming the parent and its parameters in the tag
``hyperparameters``. This process keeps ``max_concurrent_runs`` children going, follows each (their output,
metrics and limits as any run's), reads the primary metric each one streams, asks the policy about every run
with a new report, and stops those it names (Canceled, with the policy's reason as the run's error; a run whose
stop fails goes on, followed, and is stopped again a few seconds later). Optuna is told every run's outcome, so
Bayesian sampling learns from the runs that ended.

Another process can take a sweep over from the history alone (``resumed``): a retry of its task after the
worker died, or a deferred task coming back from the triggerer. The sampler is rebuilt from the recorded
runs (replay.py), the runs that ended are counted, the live ones are followed on, and only the runs still
missing are started: never more than ``max_total_runs`` in all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow_amlrun.config import load_settings
from airflow_amlrun.errors import AmlRunError, TargetUnreachableError
from airflow_amlrun.heartbeat import Heartbeat, heartbeat_seconds
from airflow_amlrun.history import RunRecord, RunStatus
from airflow_amlrun.hyperdrive.config import HyperDriveConfig
from airflow_amlrun.hyperdrive.parameters import argument_words
from airflow_amlrun.hyperdrive.replay import (
    HYPERPARAMETERS_TAG,
    Sampler,
    new_sampler,
    outcome,
    parameters_tag,
    restored_sampler,
)
from airflow_amlrun.hyperdrive.results import SweepResults, metric_of
from airflow_amlrun.hyperdrive.stopping import stop_all
from airflow_amlrun.hyperdrive.takeover import (
    SweepChangedError,
    SweepEnding,
    SweepState,
    Unstopped,
    interrupts,
)
from airflow_amlrun.hyperdrive.watch import PolicyWatch
from airflow_amlrun.rerun import recorded_config
from airflow_amlrun.run import FollowState, RunEndedError, ScriptRun
from airflow_amlrun.runconfig import SWEEP_TARGET
from airflow_amlrun.submission import AirflowTask, discard_lost, new_run_id, recorded_job

if TYPE_CHECKING:
    from airflow_amlrun.targets.base import TargetStatus
    from airflow_amlrun.workspace import Workspace

log = logging.getLogger(__name__)

TARGET = SWEEP_TARGET
# How often the primary metric of the live runs is read for the policy.
_REPORT_SECONDS = 0.25


class HyperDriveRun(SweepResults):
    """A submitted sweep; ``wait_for_completion`` runs it to its end in this process."""

    def __init__(
        self, workspace: Workspace, experiment: str, config: HyperDriveConfig, parent_id: str
    ) -> None:
        assert config.policy is not None
        self.workspace = workspace
        self.experiment = experiment
        self.config = config
        self.id = parent_id
        self._settings = load_settings()
        self._children: dict[str, ScriptRun] = {}
        self._sampler: Sampler | None = None
        self._watch = PolicyWatch(workspace.history, config.policy, config.primary_metric_name, config.goal)
        self._submitted = 0
        self._exhausted = False
        self._begun = False
        self._deadline: datetime | None = None
        self._emit: Callable[[str], None] | None = None
        self._finished: RunRecord | None = None
        self._airflow_task: AirflowTask | None = None
        self._heartbeat = Heartbeat(workspace.history, parent_id, heartbeat_seconds(self._settings))
        # Set by stop() (the task's on_kill): the loop ends its runs and the sweep, Canceled with this reason.
        self._stop_reason: str | None = None
        # Set by stop_at(): when the loop ends the sweep Failed (the task's execution_timeout), and why.
        self._fail_at: tuple[datetime, str] | None = None
        # Runs the policy stopped whose stop failed: why, and when to stop them again. They go on meanwhile,
        # followed as any run of the sweep, and end recorded as they end if no stop takes.
        self._unstopped: dict[str, Unstopped] = {}
        # Whether ``guarded`` ends the sweep when one of its steps fails, as it does when interrupted. False for a
        # caller that decides that itself: HyperDriveOperator, whose retry may resume the sweep (see let_go).
        self.end_on_failure = True

    @classmethod
    def submit(
        cls,
        workspace: Workspace,
        experiment: str,
        config: HyperDriveConfig,
        *,
        tags: dict[str, str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        airflow_task: AirflowTask | None = None,
    ) -> HyperDriveRun:
        """Record the sweep's parent run; its children start in ``wait_for_completion``.

        :param base_dir: where a relative source_directory starts (see ScriptRunConfig.resolved).
        :param airflow_task: the task running the sweep, recorded on the parent and on every run of it.
        """
        from airflow_amlrun.environment import resolve_environment
        from airflow_amlrun.targets.registry import resolve_target

        run_config = config.run_config.resolved(base_dir)
        environment = resolve_environment(workspace, run_config.environment)
        # What would fail every run fails here, before the sweep is recorded: the target, the parameter space.
        resolve_target(run_config.compute_target, load_settings(), workspace.cache_dir)
        for expression in config.hyperparameter_sampling.parameter_space.values():
            expression.distribution()
        parent_id = new_run_id(experiment)
        workspace.history.create_run(
            run_id=parent_id,
            experiment=experiment,
            target=TARGET,
            script=run_config.script,
            command=None,
            arguments=list(run_config.arguments or []),
            environment=environment.summary(),
            tags={**(tags or {}), "run_type": "hyperdrive"},
            config={"hyperdrive": config.to_dict(), "run_config": recorded_config(run_config, environment)},
            **(airflow_task.row_fields() if airflow_task else {}),
        )
        sweep = cls(workspace, experiment, replace(config, run_config=run_config), parent_id)
        sweep._airflow_task = airflow_task
        return sweep

    @classmethod
    def resumed(
        cls,
        workspace: Workspace,
        run_id: str,
        config: HyperDriveConfig,
        *,
        state: SweepState | None = None,
        airflow_task: AirflowTask | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> HyperDriveRun:
        """A recorded sweep, to go on with in this process from where another left it.

        :param config: the sweep as submitted; its sampling, policy and limits must be the recorded ones.
        :param state: what ``hand_over`` returned in the process that followed it so far (None: that process
            died; its live runs are followed from their start, their metrics recorded once).
        :param airflow_task: the task (try) going on with it, recorded on the parent.
        :raises RunEndedError: the sweep was recorded ended meanwhile.
        :raises SweepChangedError: the recorded sweep is not this config's.
        """
        history = workspace.history
        record = history.get_run(run_id)
        if record.target != TARGET:
            raise AmlRunError(f"Run {run_id} is not a sweep (its target is {record.target!r}).")
        if record.status.is_terminal:
            raise RunEndedError(record)
        recorded = (record.config or {}).get("hyperdrive")
        if _canonical(recorded) != _canonical(config.to_dict()):
            raise SweepChangedError(
                f"Sweep {run_id} was recorded as {_canonical(recorded)}, and the config given to go on with it "
                f"is {_canonical(config.to_dict())}: it cannot be resumed as that config."
            )
        sweep = cls(
            workspace,
            record.experiment,
            replace(config, run_config=config.run_config.resolved(base_dir)),
            run_id,
        )
        sweep._airflow_task = airflow_task
        sweep._restore(record, state or SweepState())
        return sweep

    def _restore(self, parent: RunRecord, state: SweepState) -> None:
        history = self.workspace.history
        fields: dict[str, Any] = {"heartbeat_at": _now()}
        if self._airflow_task is not None:
            fields["try_number"] = self._airflow_task.try_number
        if not history.update_unfinished_run(self.id, **fields):
            raise RunEndedError(history.get_run(self.id))
        children = history.child_runs(self.id)
        self._sampler = restored_sampler(self.config, children)
        self._submitted = len(children)
        self._watch.looked_at.update(state.looked_at)
        ended = 0
        for record in children:
            if record.status.is_terminal:
                ended += 1
                self._watch.ended(record.id)
                continue
            try:
                followed = state.children.get(record.id, FollowState())
                self._children[record.id] = ScriptRun.resumed(self.workspace, record.id, followed)
            except RunEndedError as gone:
                ended += 1
                self._ended(record.id, gone.record)
            except AmlRunError as err:
                ended += 1
                self._ended(record.id, self._lost(record, err))
        # Stopped again at the next look: their stop failed in the process that handed the sweep over.
        self._unstopped = {run_id: u for run_id, u in state.unstopped.items() if run_id in self._children}
        log.info(
            "Sweep %s taken over: %d of its %d runs ended, %d followed on, up to %d more to start",
            self.id,
            ended,
            len(children),
            len(self._children),
            self.config.max_total_runs - len(children),
        )

    def _lost(self, record: RunRecord, err: AmlRunError) -> RunRecord:
        """Record Failed a run of the sweep that this process cannot follow (it never reached its target, or
        runs where this process cannot reach it): the sweep goes on without it."""
        reason = f"Lost: the sweep's new process cannot follow it ({err}); the sweep went on without it."
        log.warning("Sweep %s: run %s %s", self.id, record.id, reason)
        self.workspace.history.update_unfinished_run(
            record.id, status=RunStatus.FAILED, end_time=_now(), error=reason
        )
        if not isinstance(err, TargetUnreachableError):
            # Nothing starts what it left on its target any more (a container created, never started).
            with contextlib.suppress(Exception):
                from airflow_amlrun.targets.registry import resolve_target

                target = resolve_target(record.target, self._settings, self.workspace.cache_dir)
                discard_lost(target, recorded_job(record))
        return self.workspace.history.get_run(record.id)

    # the loop

    def wait_for_completion(
        self, show_output: bool = False, output: Callable[[str], None] | None = None
    ) -> RunRecord:
        """Run the sweep to its end: every run started, followed and ended; returns the parent run's record."""
        if self._finished is not None:
            return self._finished
        self._emit = output if output is not None else (print if show_output else None)
        try:
            with self.guarded():
                self._begin()
                last_judged = 0.0
                while self._stop_reason is None:
                    judge = time.monotonic() - last_judged >= _REPORT_SECONDS
                    if judge:
                        last_judged = time.monotonic()
                    record = self._tick(judge)
                    if record is not None:
                        return record
                    time.sleep(self._settings.poll_interval_seconds)
                return self._canceled(self._stop_reason)
        finally:
            self._heartbeat.stop()

    def advance(self) -> RunRecord | None:
        """One pass of the sweep in this process: runs started where slots are free, every live run looked at
        once, the policy applied. The parent's record once the sweep ended, else None: call again, or
        ``hand_over`` the sweep to another process."""
        if self._finished is not None:
            return self._finished
        with self.guarded():
            self._begin()
            if self._stop_reason is not None:
                return self._canceled(self._stop_reason)
            return self._tick(judge=True)

    def take_back(self, ended: Mapping[str, TargetStatus], stops: Mapping[str, str]) -> None:
        """What another process saw while it followed the sweep's runs: runs that ended on their target (their
        outcome is recorded from here) and runs the policy stops (stopped from here, Canceled with why)."""
        with self.guarded():
            for run_id, status in ended.items():
                child = self._children.get(run_id)
                if child is not None:
                    self._ended(run_id, child.conclude(status, self._emit))
            for run_id, reason in stops.items():
                if run_id in self._children:
                    self._stop(run_id, reason)

    def fail(self, reason: str) -> RunRecord:
        """End the sweep Failed with `reason`, its live runs Canceled (e.g. the task's execution_timeout)."""
        self._stop_all(f"Canceled: {reason}")
        return self._finish(RunStatus.FAILED, reason)

    def hand_over(self) -> SweepState:
        """Stop following the sweep from this process, its runs going on; how far it got, for the next one.

        :raises HistoryUnavailableError: a run's latest metrics could not be recorded; the sweep is left as it
            is in the history, for a retry of its task to take over.
        """
        states = {run_id: child.hand_over() for run_id, child in self._children.items()}
        unstopped = {run_id: u for run_id, u in self._unstopped.items() if run_id in states}
        self._children.clear()
        self._unstopped.clear()
        self._heartbeat.stop()
        return SweepState(states, {k: v for k, v in self._watch.looked_at.items() if k in states}, unstopped)

    def let_go(self) -> None:
        """Stop following the sweep from this process, whatever the history says, leaving it unfinished as the
        history has it: its live runs go on on their targets, for another process to take the sweep over from the
        history alone (``resumed`` with no state, as a retry of its task does). Each run's heartbeat and streams
        end here (what was read of it is recorded if the history takes it within moments, else read again by the
        next process), and so does the sweep's heartbeat."""
        for child in self._children.values():
            child.let_go()
        self._children.clear()
        self._unstopped.clear()
        self._heartbeat.stop()

    def stop_at(self, when: datetime, reason: str) -> None:
        """End the sweep at `when` if it still goes on, as ``fail`` does: its live runs Canceled, the sweep recorded
        Failed with `reason` (the task's execution_timeout, for a process whose own time the task does not count).

        :param when: an aware datetime; one already past ends the sweep at the loop's next look.
        """
        self._fail_at = (when, reason)

    @property
    def deadline(self) -> datetime | None:
        """When max_duration_minutes ends the sweep (once it began), if it has a limit."""
        return self._deadline

    def stop(self, reason: str = "Canceled: the task running the sweep was stopped.") -> None:
        """End the sweep from outside its loop (the task's on_kill): its live runs are stopped now, one after
        another, and the loop, if it runs, records the sweep Canceled."""
        self._stop_reason = reason
        # One after another: this is Airflow's signal handler, where starting threads can hang (see stopping.py).
        for run_id, error in stop_all(
            dict(self._children), lambda child: child.request_stop(reason), at_once=False
        ).items():
            log.error("Sweep %s: stopping run %s failed", self.id, run_id, exc_info=error)

    def _begin(self) -> None:
        if self._begun:
            return
        self._begun = True
        if self._sampler is None:
            self._sampler = new_sampler(self.config)
        history = self.workspace.history
        record = history.get_run(self.id)
        start = record.start
        if start is None or record.status is RunStatus.QUEUED:
            start = _now()
            history.update_run(self.id, status=RunStatus.RUNNING, start_time=start)
        if self.config.max_duration_minutes is not None:
            self._deadline = start + timedelta(minutes=self.config.max_duration_minutes)
        self._heartbeat.start()

    def _tick(self, judge: bool) -> RunRecord | None:
        config = self.config
        if (failed := self._failed_at()) is not None:
            return failed
        expired = self._deadline is not None and _now() >= self._deadline
        if expired:
            self._stop_all(
                f"Canceled: the sweep's max_duration_minutes ({config.max_duration_minutes:g}) was reached."
            )
        while not expired and not self._exhausted and len(self._children) < (config.max_concurrent_runs or 1):
            # Starting a run can take long (an environment built): none starts once the sweep is to end, or
            # once it was stopped from outside (its task killed).
            if (failed := self._failed_at()) is not None:
                return failed
            if self._stop_reason is not None:
                break
            if self._submitted >= config.max_total_runs or not self._start_next():
                self._exhausted = True
        self._step_all()
        if judge:
            stops = {run_id: u.reason for run_id, u in self._unstopped.items()}
            stops.update(self._watch.judge(list(self._children)))
            for run_id, reason in stops.items():
                self._stop(run_id, reason)
        if not self._children and (self._exhausted or expired):
            return self._conclude()
        return None

    def _failed_at(self) -> RunRecord | None:
        """The sweep ended Failed, if the time given to ``stop_at`` has come; else None."""
        if self._fail_at is None or _now() < self._fail_at[0]:
            return None
        return self.fail(self._fail_at[1])

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """Whatever interrupts the sweep in this process ends it, its live runs stopped, and is raised on:
        Canceled for an interruption (Ctrl-C, the task killed), Failed for the task's execution_timeout, Failed
        naming the error for a failure (unless ``end_on_failure`` is False: the caller then ends the sweep, or
        lets go of it, itself).

        The sweep's own steps run in it; so may what a caller does between ``submit`` and
        ``wait_for_completion`` (naming the sweep, say), so that the sweep does not stay Queued, for
        ``amlrun reconcile`` to settle it later as Failed, when that fails or is interrupted.
        """
        try:
            yield
        except BaseException as err:
            if self.end_on_failure or interrupts(err):
                try:
                    self.end_with(SweepEnding.of(err))
                except Exception:
                    log.exception("Sweep %s: recording its end after %r failed too", self.id, err)
            raise

    def end_with(self, ending: SweepEnding) -> RunRecord | None:
        """End the sweep from this process as `ending` says (an error stopped the process going on with it): its
        live runs are stopped, and it is recorded with the ending's status and reason. None if it had ended
        already (recorded by the sweep's own steps, e.g. in ``guarded``).

        :raises Exception: what recording the sweep's end raised (the history is away); a run whose stop failed is
            let go (logged), for ``amlrun reconcile``.
        """
        if self._finished is not None:
            return None
        self._stop_all(ending.run_reason)
        return self._finish(ending.status, ending.reason)

    def _start_next(self) -> bool:
        config = self.config
        assert self._sampler is not None
        drawn = self._sampler.next_parameters(config)
        if drawn is None:
            return False
        params, trial = drawn
        words = [w for name, value in params.items() for w in argument_words(name, value)]
        child_config = replace(config.run_config, arguments=[*(config.run_config.arguments or []), *words])
        self._submitted += 1
        held: list[ScriptRun] = []

        def hold(child: ScriptRun) -> None:
            # From the moment it is recorded: an interruption (Ctrl-C, the task's execution_timeout) as it starts
            # or just after stops it with the others, rather than leave it running with nobody to stop it.
            self._children[child.id] = child
            held.append(child)
            if self._stop_reason is not None:
                # Stopped before the run was recorded (as it was drawn, its code snapshotted): it never starts.
                child.request_stop(self._stop_reason)

        try:
            child = ScriptRun.submit(
                self.workspace,
                self.experiment,
                child_config,
                tags={HYPERPARAMETERS_TAG: parameters_tag(params)},
                parent_run_id=self.id,
                airflow_task=self._airflow_task,
                on_created=hold,
            )
        except Exception as err:
            for stopped in held:
                ended = stopped.recorded_end
                if self._stop_reason is not None and ended is not None and ended.status is RunStatus.CANCELED:
                    # Stopped as it was prepared (the task killed), and the preparing failed with it (a build's
                    # process, which the task's stop reaches too): Canceled, never started, as the stop asked.
                    log.info("Sweep %s: run %s was stopped as it was prepared (%s)", self.id, stopped.id, err)
                    if trial is not None:
                        self._sampler.trials[stopped.id] = trial
                    self._ended(stopped.id, ended)
                    return True
            if not isinstance(err, AmlRunError):
                raise
            # A run that cannot start (its target refused it) fails the sweep now: the next would too. Its row
            # says how it ended, or where it may run (for a retry and reconcile); the sweep no longer holds it.
            for failed in held:
                self._children.pop(failed.id, None)
            self._sampler.discard(trial)
            raise AmlRunError(
                f"Sweep {self.id}: run {self._submitted} with {params} could not start: {err}"
            ) from err
        if trial is not None:
            self._sampler.trials[child.id] = trial
        if child.recorded_end is not None:
            # Stopped as it started (the task killed): recorded Canceled, it never ran.
            self._ended(child.id, child.recorded_end)
            return True
        log.info(
            "Sweep %s: run %d of at most %d, %s, started with %s",
            self.id,
            self._submitted,
            config.max_total_runs,
            child.id,
            params,
        )
        return True

    def _step_all(self) -> None:
        for run_id, child in list(self._children.items()):
            status = child.step(self._emit, timeout=0)
            if status is not None:
                self._ended(run_id, child.conclude(status, self._emit))

    def _stop(self, run_id: str, reason: str) -> None:
        """Stop a run the policy named, recorded Canceled with `reason`. A stop that fails (the target did not
        answer) costs that run its early end, not the sweep: the run goes on, and is stopped again later."""
        failed = self._unstopped.get(run_id)
        if failed is not None:
            reason = failed.reason
            if time.time() < failed.again_at:
                return
        log.info("Sweep %s: stopping run %s: %s", self.id, run_id, reason)
        try:
            self._children[run_id].cancel(reason, output=self._emit)
        except Exception as err:
            now = time.time()
            retry = self._unstopped[run_id] = Unstopped.failed(reason, failed, now)
            log.warning(
                "Sweep %s: stopping run %s failed (%s: %s); it is followed as before, and stopped again in %g s if "
                "it still runs (should the stop have ended it all the same, it is recorded Canceled with why)",
                self.id,
                run_id,
                type(err).__name__,
                err,
                retry.again_at - now,
            )
            return
        self._ended(run_id, self.workspace.history.get_run(run_id))

    def _ended(self, run_id: str, record: RunRecord) -> None:
        self._children.pop(run_id, None)
        self._unstopped.pop(run_id, None)
        # Its whole series, for the runs compared with it later.
        self._watch.ended(run_id)
        log.info(
            "Sweep %s: run %s %s; %s %s",
            self.id,
            run_id,
            record.status,
            self.config.primary_metric_name,
            record.metrics.get(self.config.primary_metric_name),
        )
        if self._sampler is not None:
            self._sampler.tell(run_id, *outcome(record, self.config.primary_metric_name))

    def _stop_all(self, reason: str) -> None:
        children = dict(self._children)
        # What each run printed as it stopped, passed on run by run once all are stopped: the stops run at once, and
        # `output` (a user's) need not take lines from several threads.
        printed: dict[str, list[str]] = {run_id: [] for run_id in children}

        def stop(run_id: str) -> None:
            children[run_id].cancel(reason, output=printed[run_id].append if self._emit is not None else None)

        try:
            failed = stop_all({run_id: run_id for run_id in children}, stop)
        finally:
            # Passed on even when the stops were interrupted; an output that fails stops getting lines (they are in
            # the runs' logs) and keeps nothing here from ending the runs and the sweep.
            self._pass_on([line for lines in printed.values() for line in lines])
        for run_id, child in children.items():
            if run_id in failed:
                log.error("Sweep %s: stopping run %s failed", self.id, run_id, exc_info=failed[run_id])
                # No longer followed from here: its heartbeat stops, so that reconcile may settle it.
                child.abandon()
            self._children.pop(run_id, None)
            self._unstopped.pop(run_id, None)
            if self._sampler is not None:
                self._sampler.tell(run_id, "PRUNED")

    def _pass_on(self, lines: list[str]) -> None:
        if self._emit is None:
            return
        for line in lines:
            try:
                self._emit(line)
            except Exception as err:
                log.warning(
                    "Sweep %s: passing on the runs' output failed (%s); it is in each run's log", self.id, err
                )
                return

    def _canceled(self, reason: str) -> RunRecord:
        self._stop_all(reason)
        return self._finish(RunStatus.CANCELED, reason)

    def _conclude(self) -> RunRecord:
        best = self.get_best_run_by_primary_metric()
        if best is None:
            return self._finish(
                RunStatus.FAILED,
                f"No run of the sweep Completed with the primary metric {self.config.primary_metric_name!r}.",
            )
        self.workspace.history.update_run(best.id, add_tags={"best_run": "true"})
        value = metric_of(best, self.config.primary_metric_name)
        return self._finish(
            RunStatus.COMPLETED,
            None,
            tags={"best_run_id": best.id, "best_metric": f"{value:g}" if value is not None else ""},
        )

    def _finish(self, status: RunStatus, error: str | None, tags: dict[str, str] | None = None) -> RunRecord:
        self._finished = self.workspace.history.update_run(
            self.id, status=status, error=error, end_time=_now(), add_tags=tags
        )
        self._heartbeat.stop()
        return self._finished


def _canonical(sweep: Any) -> str:
    """A sweep's recorded form as text, the same for equal sweeps whatever stored it."""
    return json.dumps(sweep, sort_keys=True, default=str)


def _now() -> datetime:
    return datetime.now(UTC)
