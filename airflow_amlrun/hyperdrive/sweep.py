"""Running a sweep: a parent run that records it, and child runs started, followed and stopped by this process.

The parent run is a row of its own (target ``hyperdrive``) whose config holds the sweep; each child is an
ordinary run of the same experiment with ``parent_run_id`` naming the parent and its parameters in the tag
``hyperparameters``. This process keeps ``max_concurrent_runs`` children going, follows each (their output,
metrics and limits as any run's), reads the primary metric each one streams, asks the policy about every run
with a new report, and stops those it names (Canceled, with the policy's reason as the run's error). Optuna is
told every run's outcome, so Bayesian sampling learns from the runs that ended.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow_amlrun.config import load_settings
from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.heartbeat import Heartbeat, heartbeat_seconds
from airflow_amlrun.history import RunRecord, RunStatus
from airflow_amlrun.hyperdrive.config import HyperDriveConfig
from airflow_amlrun.hyperdrive.parameters import GridParameterSampling, argument_words
from airflow_amlrun.reconcile import SWEEP_TARGET
from airflow_amlrun.rerun import recorded_config
from airflow_amlrun.run import FollowState, ScriptRun
from airflow_amlrun.submission import AirflowTask, new_run_id

if TYPE_CHECKING:
    from airflow_amlrun.workspace import Workspace

log = logging.getLogger(__name__)

TARGET = SWEEP_TARGET
# How often the primary metric of the live runs is read for the policy.
_REPORT_SECONDS = 0.25


class HyperDriveRun:
    """A submitted sweep; ``wait_for_completion`` runs it to its end in this process."""

    def __init__(
        self, workspace: Workspace, experiment: str, config: HyperDriveConfig, parent_id: str
    ) -> None:
        self.workspace = workspace
        self.experiment = experiment
        self.config = config
        self.id = parent_id
        self._settings = load_settings()
        self._children: dict[str, ScriptRun] = {}
        self._trials: dict[str, Any] = {}
        self._reports: dict[str, list[float]] = {}
        self._looked_at: dict[str, int] = {}
        self._submitted = 0
        self._finished: RunRecord | None = None
        self._airflow_task: AirflowTask | None = None
        self._study: Any = None
        self._heartbeat = Heartbeat(workspace.history, parent_id, heartbeat_seconds(self._settings))
        # Set by stop() (the task's on_kill): the loop ends its runs and the sweep, Canceled with this reason.
        self._stop_reason: str | None = None

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

    # the loop

    def wait_for_completion(
        self, show_output: bool = False, output: Callable[[str], None] | None = None
    ) -> RunRecord:
        """Run the sweep to its end: every run started, followed and ended; returns the parent run's record."""
        if self._finished is not None:
            return self._finished
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        config = self.config
        study = self._study = optuna.create_study(
            direction="minimize" if config.goal == "minimize" else "maximize",
            sampler=config.hyperparameter_sampling.sampler() or optuna.samplers.RandomSampler(),
        )
        grid = (
            iter(config.hyperparameter_sampling.grid())
            if isinstance(config.hyperparameter_sampling, GridParameterSampling)
            else None
        )
        deadline = (
            time.monotonic() + config.max_duration_minutes * 60
            if config.max_duration_minutes is not None
            else None
        )
        exhausted = False
        emit = output if output is not None else (print if show_output else None)
        self.workspace.history.update_run(self.id, status=RunStatus.RUNNING, start_time=_now())
        self._heartbeat.start()
        try:
            last_reports = 0.0
            while self._stop_reason is None:
                expired = deadline is not None and time.monotonic() >= deadline
                if expired:
                    self._stop_all(
                        f"Canceled: the sweep's max_duration_minutes ({config.max_duration_minutes:g}) was reached."
                    )
                while (
                    not expired and not exhausted and len(self._children) < (config.max_concurrent_runs or 1)
                ):
                    if self._submitted >= config.max_total_runs or not self._start_next(study, grid):
                        exhausted = True
                self._step_all(study, emit)
                if time.monotonic() - last_reports >= _REPORT_SECONDS:
                    last_reports = time.monotonic()
                    self._apply_policy(study)
                if not self._children and (exhausted or expired):
                    return self._conclude()
                time.sleep(self._settings.poll_interval_seconds)
            self._stop_all(self._stop_reason)
            return self._finish(RunStatus.CANCELED, self._stop_reason)
        except BaseException as err:
            name = type(err).__name__
            if name == "AirflowTaskTimeout":
                status, reason = RunStatus.FAILED, "Stopped by the Airflow task's execution_timeout."
            elif isinstance(err, Exception) and name != "AirflowTaskTerminated":
                status, reason = RunStatus.FAILED, f"The sweep failed: {err}"
            else:
                status, reason = RunStatus.CANCELED, f"Canceled: the sweep was interrupted ({name})."
            try:
                self._stop_all(reason if status is RunStatus.CANCELED else f"Canceled: {reason}")
                self._finish(status, reason)
            except Exception:
                log.exception("Sweep %s: recording its end after %r failed too", self.id, err)
            raise
        finally:
            self._heartbeat.stop()

    def stop(self, reason: str = "Canceled: the task running the sweep was stopped.") -> None:
        """End the sweep from outside its loop (the task's on_kill): its live runs are stopped at once, and the
        loop, if it runs, records the sweep Canceled."""
        self._stop_reason = reason
        for child in list(self._children.values()):
            try:
                child.request_stop()
            except Exception:
                log.exception("Sweep %s: stopping run %s failed", self.id, child.id)

    def _start_next(self, study: Any, grid: Any) -> bool:
        config = self.config
        if grid is not None:
            params = next(grid, None)
            if params is None:
                return False
            trial = None
        else:
            space = config.hyperparameter_sampling.parameter_space
            trial = study.ask({name: e.distribution() for name, e in space.items()})
            params = {name: space[name].value(trial.params[name]) for name in space}
        words = [w for name, value in params.items() for w in argument_words(name, value)]
        child_config = replace(config.run_config, arguments=[*(config.run_config.arguments or []), *words])
        self._submitted += 1
        try:
            child = ScriptRun.submit(
                self.workspace,
                self.experiment,
                child_config,
                tags={"hyperparameters": json.dumps(params, sort_keys=True)},
                parent_run_id=self.id,
                airflow_task=self._airflow_task,
            )
        except AmlRunError as err:
            # A run that cannot start (its target refused it) fails the sweep now: the next would too.
            if trial is not None:
                study.tell(trial, state=_trial_state("FAIL"))
            raise AmlRunError(
                f"Sweep {self.id}: run {self._submitted} with {params} could not start: {err}"
            ) from err
        self._children[child.id] = child
        self._trials[child.id] = trial
        self._reports[child.id] = []
        log.info(
            "Sweep %s: run %d of at most %d, %s, started with %s",
            self.id,
            self._submitted,
            config.max_total_runs,
            child.id,
            params,
        )
        return True

    def _step_all(self, study: Any, emit: Callable[[str], None] | None) -> None:
        for run_id, child in list(self._children.items()):
            status = child.step(emit, timeout=0)
            if status is not None:
                record = child.conclude(status, emit)
                self._ended(study, run_id, record)

    def _apply_policy(self, study: Any) -> None:
        config = self.config
        assert config.policy is not None
        if type(config.policy).__name__ == "NoTerminationPolicy":
            return
        for run_id in list(self._children):
            self._refresh_reports(run_id)
        for run_id, child in list(self._children.items()):
            reports = self._reports[run_id]
            seen = self._looked_at.get(run_id, 0)
            self._looked_at[run_id] = len(reports)
            # Every report that fell due since the last look, each as if the run had just logged it.
            for n in range(seen + 1, len(reports) + 1):
                reason = config.policy.stop_reason(
                    run_id, {**self._reports, run_id: reports[:n]}, config.goal
                )
                if reason is None:
                    continue
                log.info("Sweep %s: stopping run %s: %s", self.id, run_id, reason)
                child.cancel(reason)
                self._ended(study, run_id, self.workspace.history.get_run(run_id), pruned=True)
                break

    def _refresh_reports(self, run_id: str) -> None:
        """The primary metric's new points of a run, read from the history after the last one read."""
        reports = self._reports.setdefault(run_id, [])
        points = self.workspace.history.get_metrics(run_id, name=self.config.primary_metric_name)
        reports.extend(
            float(p.value)
            for p in points[len(reports) :]
            if isinstance(p.value, int | float) and not isinstance(p.value, bool)
        )

    def _ended(self, study: Any, run_id: str, record: RunRecord, *, pruned: bool = False) -> None:
        self._children.pop(run_id, None)
        # Its whole series, for the runs compared with it later.
        self._refresh_reports(run_id)
        log.info(
            "Sweep %s: run %s %s; %s %s",
            self.id,
            run_id,
            record.status,
            self.config.primary_metric_name,
            record.metrics.get(self.config.primary_metric_name),
        )
        trial = self._trials.pop(run_id, None)
        final = _metric(record, self.config.primary_metric_name)
        if trial is not None:
            if pruned:
                study.tell(trial, state=_trial_state("PRUNED"))
            elif record.status is RunStatus.COMPLETED and final is not None:
                study.tell(trial, final)
            else:
                study.tell(trial, state=_trial_state("FAIL"))

    def _stop_all(self, reason: str) -> None:
        for run_id, child in list(self._children.items()):
            try:
                child.cancel(reason)
            except Exception:
                log.exception("Sweep %s: stopping run %s failed", self.id, run_id)
            self._children.pop(run_id, None)
            trial = self._trials.pop(run_id, None)
            if trial is not None and self._study is not None:
                self._study.tell(trial, state=_trial_state("PRUNED"))

    def _conclude(self) -> RunRecord:
        best = self.get_best_run_by_primary_metric()
        if best is None:
            return self._finish(
                RunStatus.FAILED,
                f"No run of the sweep Completed with the primary metric {self.config.primary_metric_name!r}.",
            )
        self.workspace.history.update_run(best.id, add_tags={"best_run": "true"})
        value = _metric(best, self.config.primary_metric_name)
        return self._finish(
            RunStatus.COMPLETED,
            None,
            tags={"best_run_id": best.id, "best_metric": f"{value:g}" if value is not None else ""},
        )

    def _finish(self, status: RunStatus, error: str | None, tags: dict[str, str] | None = None) -> RunRecord:
        self._finished = self.workspace.history.update_run(
            self.id, status=status, error=error, end_time=_now(), add_tags=tags
        )
        return self._finished

    @classmethod
    def settle_earlier(cls, workspace: Workspace, task: AirflowTask) -> list[str]:
        """End the unfinished sweeps an earlier try of this task left (its worker died): their live runs are
        stopped, and they are recorded Failed; returns their ids. (Resuming them instead is for later.)"""
        settled = []
        for parent in workspace.history.list_runs(
            dag_id=task.dag_id, task_id=task.task_id, airflow_run_id=task.run_id, map_index=task.map_index
        ):
            if parent.target != TARGET or parent.status.is_terminal:
                continue
            reason = "Canceled: the task running its sweep died, and its retry started the sweep anew."
            for child in workspace.history.child_runs(parent.id):
                if child.status.is_terminal:
                    continue
                try:
                    ScriptRun.resumed(workspace, child.id, FollowState()).cancel(reason)
                except Exception as err:
                    # Left as it is, for `amlrun reconcile`, which settles a run it can reach or knows gone.
                    log.warning(
                        "Sweep %s: run %s of the earlier try was left as it is: %s", parent.id, child.id, err
                    )
            workspace.history.update_run(
                parent.id,
                status=RunStatus.FAILED,
                end_time=_now(),
                error="The task running this sweep died; its retry started the sweep anew.",
            )
            settled.append(parent.id)
        return settled

    # reading it

    def get_children(self) -> list[RunRecord]:
        """The sweep's runs, oldest first."""
        return self.workspace.history.child_runs(self.id)

    def get_children_sorted_by_primary_metric(self) -> list[dict[str, Any]]:
        """Every run with its parameters, status and final primary metric, the best first; runs without the
        metric last."""
        goal, name = self.config.goal, self.config.primary_metric_name
        rows = [
            {
                "run_id": r.id,
                "hyperparameters": json.loads(r.tags.get("hyperparameters", "{}")),
                "status": str(r.status),
                name: _metric(r, name),
                "error": r.error,
            }
            for r in self.get_children()
        ]

        def key(row: dict[str, Any]) -> tuple[int, float]:
            value = row[name]
            if value is None or row["status"] != RunStatus.COMPLETED.value:
                return (1, 0.0)
            return (0, value if goal == "minimize" else -value)

        return sorted(rows, key=key)

    def get_best_run_by_primary_metric(self) -> RunRecord | None:
        """The Completed run with the best final primary metric, or None."""
        goal, name = self.config.goal, self.config.primary_metric_name
        done = [
            r for r in self.get_children() if r.status is RunStatus.COMPLETED and _metric(r, name) is not None
        ]
        if not done:
            return None
        pick = min if goal == "minimize" else max
        return pick(done, key=lambda r: _metric(r, name) or 0.0)

    def summary(self) -> dict[str, Any]:
        """What a task returns: the best run's summary, and every run's id, parameters and metric."""
        best = self.get_best_run_by_primary_metric()
        return {
            "sweep_run_id": self.id,
            "best_run": best.summary() if best is not None else None,
            "children": self.get_children_sorted_by_primary_metric(),
        }


def _metric(record: RunRecord, name: str) -> float | None:
    value = record.metrics.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _trial_state(name: str) -> Any:
    from optuna.trial import TrialState

    return getattr(TrialState, name)


def _now() -> datetime:
    return datetime.now(UTC)
