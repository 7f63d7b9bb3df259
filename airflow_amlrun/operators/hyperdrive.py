"""HyperDriveOperator: a hyperparameter sweep as one task, returning the best run's summary."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.configuration import conf
from airflow.sdk.log import mask_secret

from airflow_amlrun.environment.paths import PathBase
from airflow_amlrun.errors import AmlRunError, ConfigurationError, shown
from airflow_amlrun.links import RUN_ID_XCOM_KEY, AmlRunLink
from airflow_amlrun.workspace import check_connection_id

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.hyperdrive import HyperDriveConfig, HyperDriveRun
    from airflow_amlrun.run import FollowState
    from airflow_amlrun.submission import AirflowTask
    from airflow_amlrun.workspace import Workspace

# Why a retry ends what its earlier try's sweep left, when it does not resume it.
STARTED_ANEW = "The task running this sweep died, and its retry started the sweep anew."


class HyperDriveOperator(BaseOperator):
    """Run a sweep (a HyperDriveConfig) on its compute target; return the best run's summary and every run's id,
    parameters and metrics as the XCom: ``{"sweep_run_id", "best_run", "children"}``.

    The best run gets the tag ``best_run=true``. The task fails when no run Completed with the primary metric.
    A relative source_directory starts at the DAG file's folder.

    :param config: the sweep.
    :param experiment: experiment its runs belong to (templated); defaults to the DAG id.
    :param tags: tags recorded on the sweep's parent run (templated).
    :param workspace_conn_id: `amlrun` connection of the workspace (default: as ScriptRunOperator).
    :param deferrable: once the first runs started, free the worker slot: the triggerer follows the runs and
        applies the early termination policy, and the task comes back only to start the next runs as slots
        free up and to stop the runs the policy names (default ``[operators] default_deferrable``). As for
        ScriptRunOperator, runs on a target only this machine reaches are deferred only when a triggerer runs
        on this machine.
    :param resume_on_retry: when an earlier try of this task left its sweep unfinished (the worker died), go on
        with that sweep (default): the runs that ended count, the live ones are followed on, only the missing
        ones start. False stops what it left (recorded Failed) and starts the sweep anew. When the task fails and
        Airflow does not retry it (its last try, no retries), its sweep is ended at once instead: the live runs
        are stopped, and the sweep is recorded Failed with the task's error.
    """

    template_fields: Sequence[str] = ("experiment", "tags")
    operator_extra_links = (AmlRunLink(),)
    ui_color = "#d5f5e3"

    def __init__(
        self,
        *,
        config: HyperDriveConfig,
        experiment: str | None = None,
        tags: dict[str, Any] | None = None,
        workspace_conn_id: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        resume_on_retry: bool = True,
        **kwargs: Any,
    ) -> None:
        from airflow_amlrun.hyperdrive import HyperDriveConfig

        super().__init__(**kwargs)
        where = f"HyperDriveOperator {self.task_id!r}"
        if not isinstance(config, HyperDriveConfig):
            raise ConfigurationError(f"{where}: config must be a HyperDriveConfig, not {shown(config)}.")
        for flag, value in (("deferrable", deferrable), ("resume_on_retry", resume_on_retry)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{where}: {flag}={shown(value)} must be True or False.")
        check_connection_id(workspace_conn_id, f"{where}: workspace_conn_id")
        self.config = config
        self.experiment = experiment
        self.tags = tags
        self.workspace_conn_id = workspace_conn_id
        self.deferrable = deferrable
        self.resume_on_retry = resume_on_retry
        self.amlrun_run_id: str | None = None
        self._sweep: HyperDriveRun | None = None
        # How far the last follower (this task, or the trigger) got with each live run handed over, for ending
        # them from here without reading their output or metrics twice.
        self._handed_over: Mapping[str, FollowState] = {}

    def on_kill(self) -> None:
        """Stop the sweep's live runs now; the sweep is recorded Canceled."""
        if self._sweep is not None:
            self._sweep.stop("Canceled: the Airflow task running the sweep was stopped.")

    @cached_property
    def workspace(self) -> Workspace:
        from airflow_amlrun.workspace import Workspace

        return Workspace.get(self.workspace_conn_id)

    def _prepared(self, context: Context) -> tuple[HyperDriveConfig, AirflowTask, PathBase]:
        """The sweep as this try runs it, with the task; whatever prints the runs' secret variables or the index
        or workspace credentials shows them masked, as ScriptRunOperator does."""
        from airflow_amlrun.environment.resolve import index_secrets
        from airflow_amlrun.submission import AirflowTask

        dag_folder = PathBase.of_dag_file(context["dag"].fileloc)
        for secret in [
            *(v for v in self.config.run_config.secret_environment_variables.values() if v),
            *index_secrets(self.workspace, self.config.run_config.environment),
            *self.workspace.credentials(),
        ]:
            mask_secret(secret)
        config = replace(self.config, run_config=self.config.run_config.resolved(dag_folder))
        return config, AirflowTask.of(context["ti"]), dag_folder

    def execute(self, context: Context) -> dict[str, Any]:
        with self._ended_unless_retried(context):
            return self._execute(context)

    def _execute(self, context: Context) -> dict[str, Any]:
        from airflow_amlrun.experiment import Experiment, experiment_name_from
        from airflow_amlrun.hyperdrive import HyperDriveRun
        from airflow_amlrun.hyperdrive.takeover import settle_earlier_sweeps

        ti = context["ti"]
        config, task, dag_folder = self._prepared(context)
        experiment = Experiment(self.workspace, self.experiment or experiment_name_from(ti.dag_id))
        # Held from here: should what follows fail, the sweep is ended from this process (see _end_sweeps).
        sweep = self._sweep = self._resumed(config, task) if self.resume_on_retry else None
        for earlier in settle_earlier_sweeps(
            self.workspace, task, STARTED_ANEW, keep=sweep.id if sweep is not None else None
        ):
            self.log.warning(
                "Sweep %s of an earlier try was left unfinished: stopped, recorded Failed.", earlier
            )
        if sweep is None:
            sweep = HyperDriveRun.submit(
                self.workspace,
                experiment.name,
                config,
                tags={str(k): str(v) for k, v in (self.tags or {}).items()},
                base_dir=dag_folder,
                airflow_task=task,
            )
            self.log.info(
                "Sweep %s: up to %d runs, %d at a time, on %s (experiment %s)",
                sweep.id,
                config.max_total_runs,
                config.max_concurrent_runs,
                config.run_config.compute_target,
                experiment.name,
            )
        self._sweep = sweep
        ti.xcom_push(key=RUN_ID_XCOM_KEY, value=sweep.id)
        self.amlrun_run_id = sweep.id
        if self.deferrable and self._deferral_possible(config):
            stop_at = None
            if self.execution_timeout is not None:
                started = getattr(ti, "start_date", None) or datetime.now(UTC)
                stop_at = (started + self.execution_timeout).isoformat()
            return self._go_on_deferred(sweep, stop_at)
        return self._result(sweep, sweep.wait_for_completion())

    def _resumed(self, config: HyperDriveConfig, task: AirflowTask) -> HyperDriveRun | None:
        """The sweep an earlier try of this task left unfinished, taken over; None if there is none to resume."""
        from airflow_amlrun.hyperdrive import HyperDriveRun
        from airflow_amlrun.hyperdrive.takeover import SweepChangedError, earlier_sweeps
        from airflow_amlrun.run import RunEndedError

        for record in earlier_sweeps(self.workspace, task):
            try:
                sweep = HyperDriveRun.resumed(self.workspace, record.id, config, airflow_task=task)
            except RunEndedError:
                continue
            except SweepChangedError as err:
                self.log.warning("%s A new sweep is started.", err)
                continue
            self.log.info(
                "Resuming sweep %s, left unfinished by try %s of this task", record.id, record.try_number
            )
            return sweep
        return None

    def _deferral_possible(self, config: HyperDriveConfig) -> bool:
        from airflow_amlrun.config import load_settings
        from airflow_amlrun.operators.script_run import triggerer_shares_this_machine
        from airflow_amlrun.targets.registry import resolve_target

        target = resolve_target(config.run_config.compute_target, load_settings(), self.workspace.cache_dir)
        if not target.followed_only_here:
            return True
        problem = triggerer_shares_this_machine()
        if problem is not None:
            self.log.warning(
                "The sweep's runs are followed in this worker, not deferred: runs on %s can be followed only on "
                "this machine, and %s.",
                target.name,
                problem,
            )
        return problem is None

    def _go_on_deferred(self, sweep: HyperDriveRun, stop_at: str | None) -> dict[str, Any]:
        """Start the runs that slots allow, then hand the live ones to the triggerer until there is more to do."""
        from airflow_amlrun.operators.script_run import DEFER_SLACK
        from airflow_amlrun.triggers.hyperdrive import HyperDriveTrigger
        from airflow_amlrun.triggers.script_run import FIRST_EVENT_AFTER_SECONDS

        record = sweep.advance()
        if record is not None:
            return self._result(sweep, record)
        # A history that does not take the runs' latest metrics fails the task here: its retry resumes the sweep
        # (with no retry to come, _end_sweeps ends it).
        state = sweep.hand_over()
        self._sweep, self._handed_over = None, state.children
        self.log.info(
            "Sweep %s: its %d live runs are followed by the triggerer from here; the worker slot is freed.",
            sweep.id,
            len(state.children),
        )
        assert self.config.policy is not None
        self.defer(
            trigger=HyperDriveTrigger(
                sweep.id,
                state.to_json(),
                self.config.policy.to_dict(),
                self.config.primary_metric_name,
                self.config.goal,
                self.workspace_conn_id,
                deadline=sweep.deadline.isoformat() if sweep.deadline is not None else None,
                stop_at=stop_at,
                not_before=(datetime.now(UTC) + timedelta(seconds=FIRST_EVENT_AFTER_SECONDS)).isoformat(),
            ),
            method_name="execute_complete",
            # A backstop for a deployment whose triggerer never takes the trigger: the trigger itself hands the
            # sweep back at the execution_timeout, which Airflow does not apply to a deferred task.
            timeout=None if self.execution_timeout is None else self.execution_timeout + DEFER_SLACK,
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """The trigger handed the sweep back: record the runs that ended, stop those the policy named, start the
        next ones, and defer again (or return the result once the sweep ended)."""
        with self._ended_unless_retried(context):
            return self._taken_back(context, event)

    def _taken_back(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        from airflow_amlrun.history import RunStatus
        from airflow_amlrun.hyperdrive import HyperDriveRun
        from airflow_amlrun.hyperdrive.takeover import SweepChangedError, SweepState, end_sweep
        from airflow_amlrun.run import RunEndedError
        from airflow_amlrun.targets.base import TargetStatus
        from airflow_amlrun.triggers.hyperdrive import FOLLOWED

        config, task, _ = self._prepared(context)
        sweep_id = self.amlrun_run_id = str(event["sweep_run_id"])
        state = SweepState.from_json(event.get("state") or {})
        self._handed_over = state.children
        try:
            sweep = self._sweep = HyperDriveRun.resumed(
                self.workspace, sweep_id, config, state=state, airflow_task=task
            )
        except RunEndedError as gone:
            # Another process recorded its end meanwhile (reconcile, after a long wait for this resume).
            self.log.warning(
                "Sweep %s was recorded %s by another process meanwhile.", sweep_id, gone.record.status
            )
            reader = HyperDriveRun(self.workspace, gone.record.experiment, config, sweep_id)
            return self._result(reader, gone.record)
        except SweepChangedError as err:
            reason = f"The sweep's config changed while it ran: {err}"
            end_sweep(
                self.workspace, sweep_id, RunStatus.FAILED, reason, f"Canceled: {reason}", state.children
            )
            raise
        if event.get("status") != FOLLOWED:
            self.log.warning(
                "The triggerer stopped following sweep %s (%s); this worker follows it on.",
                sweep_id,
                event.get("message"),
            )
            return self._result(sweep, sweep.wait_for_completion())
        if event.get("timed_out"):
            return self._result(
                sweep, sweep.fail("Stopped by the Airflow task's execution_timeout (while deferred).")
            )
        ended = {
            run_id: TargetStatus(
                running=False,
                exit_code=fields.get("exit_code"),
                reason=fields.get("reason"),
                timed_out=bool(fields.get("timed_out")),
            )
            for run_id, fields in (event.get("ended") or {}).items()
        }
        sweep.take_back(ended, {str(k): str(v) for k, v in (event.get("stops") or {}).items()})
        return self._go_on_deferred(sweep, event.get("stop_at"))

    @contextmanager
    def _ended_unless_retried(self, context: Context) -> Iterator[None]:
        """What fails the task in here ends its sweep when Airflow does not retry the task (see ``_end_sweeps``);
        a retry goes on with the sweep (or, resume_on_retry=False, stops it). The error fails the task either way.
        """
        from airflow.sdk.exceptions import TaskDeferred

        try:
            yield
        except TaskDeferred:
            raise
        except BaseException as err:
            self._end_sweeps(context, err)
            raise

    def _end_sweeps(self, context: Context, err: BaseException) -> None:
        """Unless Airflow retries the task after `err`: end the sweeps of this task instance left unfinished (the
        one this try ran, whether this process still follows it or handed it over, and any an earlier try left),
        their live runs stopped and each recorded Failed with the error, rather than left for ``amlrun reconcile``.
        This never raises: `err` is what fails the task."""
        from airflow_amlrun.hyperdrive.takeover import SweepEnding, earlier_sweeps, end_sweep
        from airflow_amlrun.operators.retries import task_will_retry
        from airflow_amlrun.submission import AirflowTask

        try:
            ti = context["ti"]
            if task_will_retry(ti, err, context):
                return
            ending = SweepEnding.of(err)
            ended: list[str] = []
            held, self._sweep = self._sweep, None
            if held is not None and held.end_with(ending) is not None:
                ended.append(held.id)
            for record in earlier_sweeps(self.workspace, AirflowTask.of(ti)):
                end_sweep(
                    self.workspace,
                    record.id,
                    ending.status,
                    ending.reason,
                    ending.run_reason,
                    self._handed_over,
                )
                ended.append(record.id)
            for sweep_id in ended:
                self.log.warning(
                    "Sweep %s was recorded %s and its live runs were stopped: the task failed, and Airflow does "
                    "not retry it.",
                    sweep_id,
                    ending.status,
                )
        except Exception:
            self.log.exception(
                "The task failed and Airflow does not retry it, and ending its sweep %s failed too: what is left "
                "unfinished is settled by `amlrun reconcile`. The task fails with its own error, below.",
                self.amlrun_run_id or "(none recorded)",
            )

    def _result(self, sweep: HyperDriveRun, record: RunRecord) -> dict[str, Any]:
        from airflow_amlrun.history import RunStatus

        self._sweep = None
        summary: dict[str, Any] = sweep.summary()
        if record.status is not RunStatus.COMPLETED:
            raise AmlRunError(f"Sweep {record.id} {record.status}: {record.error}")
        best = summary["best_run"]
        self.log.info(
            "Sweep %s: best run %s, %s %s",
            record.id,
            best["run_id"],
            self.config.primary_metric_name,
            best["metrics"].get(self.config.primary_metric_name),
        )
        return summary
