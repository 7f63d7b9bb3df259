"""HyperDriveOperator: a hyperparameter sweep as one task, returning the best run's summary."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.sdk.configuration import conf
from airflow.sdk.log import mask_secret

from airflow_amlrun.environment.paths import PathBase
from airflow_amlrun.errors import AmlRunError, ConfigurationError, shown
from airflow_amlrun.links import RUN_ID_XCOM_KEY, AmlRunLink
from airflow_amlrun.operators.deferral import RunKind, SettlesFailedDeferral
from airflow_amlrun.operators.script_run import DEFER_SLACK, _known_part, rendered_later
from airflow_amlrun.run.outcome import DEFERRED_TIMED_OUT, TIMED_OUT
from airflow_amlrun.runconfig import render_tags
from airflow_amlrun.workspace import check_connection_id

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.hyperdrive import HyperDriveConfig, HyperDriveRun
    from airflow_amlrun.hyperdrive.takeover import SweepState
    from airflow_amlrun.run import FollowState
    from airflow_amlrun.submission import AirflowTask
    from airflow_amlrun.triggers.hyperdrive import HyperDriveTrigger
    from airflow_amlrun.workspace import Workspace

# Why a retry ends what its earlier try's sweep left, when it does not resume it.
STARTED_ANEW = "The task running this sweep died, and its retry started the sweep anew."
# The error of a sweep (and its live runs) stopped because Airflow killed its task.
KILLED = "Canceled: the Airflow task running the sweep was stopped."


class HyperDriveOperator(SettlesFailedDeferral):
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
    :param resume_on_retry: when an earlier try of this task left its sweep unfinished (it failed and Airflow
        retries the task, or the worker died), go on with that sweep (default): the runs that ended count, the live
        ones are followed on, only the missing ones start. A try that fails leaves its sweep and the live runs as
        they are for the retry, and says so in the task log. False ends the sweep when the try fails (its live runs
        stopped, the sweep recorded Failed with the error), or stops what a dead worker left, and the retry starts
        the sweep anew. When the task fails and Airflow does not retry it (its last try, no retries), or it is
        interrupted (killed, its execution_timeout), its sweep is ended at once either way: the live runs are
        stopped, and the sweep is recorded Failed with the task's error (Canceled if killed).
    """

    deferred_kind = RunKind.SWEEP
    template_fields: Sequence[str] = ("experiment", "tags")
    # How long past its execution_timeout a deferred task waits for its trigger before Airflow fails it (see
    # ScriptRunOperator.defer_slack).
    defer_slack: timedelta = DEFER_SLACK
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
        if tags is not None and not rendered_later(tags):
            try:
                render_tags(_known_part(tags))
            except ConfigurationError as err:
                raise ConfigurationError(f"{where}: {err}") from None
        self.config = config
        self.experiment = experiment
        self.tags = tags
        self.workspace_conn_id = workspace_conn_id
        self.deferrable = deferrable
        self.resume_on_retry = resume_on_retry
        self.amlrun_run_id: str | None = None
        self._sweep: HyperDriveRun | None = None
        # Whether Airflow killed the task (on_kill): its handler returns, and execute goes on.
        self._killed = False
        # How far the last follower (this task, or the trigger) got with each live run handed over, for ending
        # them from here without reading their output or metrics twice.
        self._handed_over: Mapping[str, FollowState] = {}
        # The sweep whose runs this task handed over and is deferring with: a kill until it is deferred ends it.
        self._deferring: str | None = None

    def on_kill(self) -> None:
        """Stop the sweep's live runs now; the sweep is recorded Canceled. Airflow's SIGTERM handler calls this and
        returns: a sweep not yet held (being submitted, or looked up) is stopped once it is (_hold)."""
        self._killed = True
        if self._sweep is not None:
            self._sweep.stop(KILLED)
        elif self._deferring is not None:
            try:
                self._end_handed_over(self._deferring, at_once=False)
            except Exception:
                # Raised from here, it would surface wherever the task was interrupted: the task fails as killed
                # (_settle_sweeps ends the sweep once more).
                self.log.exception("Sweep %s was not ended as its task was killed", self._deferring)

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
        # Held from here: should what follows fail, the sweep is ended or left for the retry (see _settle_sweeps).
        sweep = self._resumed(config, task) if self.resume_on_retry else None
        if sweep is not None:
            self._hold(sweep)
        for earlier in settle_earlier_sweeps(
            self.workspace, task, STARTED_ANEW, keep=sweep.id if sweep is not None else None
        ):
            self.log.warning(
                "Sweep %s of an earlier try was left unfinished: stopped, recorded Failed.", earlier
            )
        if sweep is None:
            sweep = self._hold(
                HyperDriveRun.submit(
                    self.workspace,
                    experiment.name,
                    config,
                    tags=render_tags(self.tags, f"HyperDriveOperator {self.task_id!r}: tags"),
                    base_dir=dag_folder,
                    airflow_task=task,
                )
            )
            self.log.info(
                "Sweep %s: up to %d runs, %d at a time, on %s (experiment %s)",
                sweep.id,
                config.max_total_runs,
                config.max_concurrent_runs,
                config.run_config.compute_target,
                experiment.name,
            )
        ti.xcom_push(key=RUN_ID_XCOM_KEY, value=sweep.id)
        self.amlrun_run_id = sweep.id
        if self.deferrable and not self._killed and self._deferral_possible(config):
            stop_at = self.try_deadline(ti)
            return self._go_on_deferred(sweep, stop_at.isoformat() if stop_at is not None else None)
        return self._result(sweep, sweep.wait_for_completion())

    def _hold(self, sweep: HyperDriveRun) -> HyperDriveRun:
        """The sweep this try goes on with, held: should the try fail, _settle_sweeps ends it, or lets go of it for
        the retry to resume."""
        # A failure of the sweep's own steps is left to _settle_sweeps (an interruption still ends it there and then).
        sweep.end_on_failure = False
        self._sweep = sweep
        if self._killed:
            sweep.stop(KILLED)
        return sweep

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
        record = sweep.advance()
        if record is not None:
            return self._result(sweep, record)
        if self._killed:
            # Killed while it started runs (on_kill stopped the sweep): not deferred, its end is recorded here.
            return self._result(sweep, sweep.wait_for_completion())
        # A history that does not take the runs' latest metrics fails the task here: its retry resumes the sweep
        # (with no retry to come, _settle_sweeps ends it).
        state = sweep.hand_over()
        # From here until the deferral is raised, a kill ends the handed-over sweep from on_kill: published before
        # the looks below, so that a kill between a look and the deferral is not lost.
        self._sweep, self._handed_over, self._deferring = None, state.children, sweep.id
        try:
            if not self._killed:
                self.log.info(
                    "Sweep %s: its %d live runs are followed by the triggerer from here; the worker slot is freed.",
                    sweep.id,
                    len(state.children),
                )
                trigger = self._trigger_for(sweep, state, stop_at)
                # The last look: a kill after it, as the deferral is raised, still ends the sweep (on_kill), and the
                # trigger then finds it ended.
                if not self._killed:
                    self._defer(trigger)
        finally:
            self._deferring = None
        # Killed as it handed its runs over (on_kill found none left to stop here) or before it deferred: the runs are
        # stopped from how far this task got with them (again, if on_kill did already: what ended stays as it is),
        # and the sweep is recorded Canceled, not deferred.
        self._end_handed_over(sweep.id)
        return self._result(sweep, self.workspace.history.get_run(sweep.id))

    def _end_handed_over(self, sweep_id: str, *, at_once: bool = True) -> None:
        """Stop the runs this task handed over and record the sweep Canceled, as a killed deferred task's trigger
        does (one run after another from on_kill, Airflow's signal handler)."""
        from airflow_amlrun.history import RunStatus
        from airflow_amlrun.hyperdrive.takeover import end_sweep

        end_sweep(
            self.workspace, sweep_id, RunStatus.CANCELED, KILLED, KILLED, self._handed_over, at_once=at_once
        )

    def _trigger_for(self, sweep: HyperDriveRun, state: SweepState, stop_at: str | None) -> HyperDriveTrigger:
        from airflow_amlrun.triggers.hyperdrive import HyperDriveTrigger
        from airflow_amlrun.triggers.script_run import FIRST_EVENT_AFTER_SECONDS

        assert self.config.policy is not None
        return HyperDriveTrigger(
            sweep.id,
            state.to_json(),
            self.config.policy.to_dict(),
            self.config.primary_metric_name,
            self.config.goal,
            self.workspace_conn_id,
            deadline=sweep.deadline.isoformat() if sweep.deadline is not None else None,
            stop_at=stop_at,
            not_before=(datetime.now(UTC) + timedelta(seconds=FIRST_EVENT_AFTER_SECONDS)).isoformat(),
        )

    def _defer(self, trigger: HyperDriveTrigger) -> NoReturn:
        self.defer(
            trigger=trigger,
            method_name="execute_complete",
            # A backstop for a deployment whose triggerer never takes the trigger: the trigger itself hands the
            # sweep back at the execution_timeout, which Airflow does not apply to a deferred task.
            timeout=None if self.execution_timeout is None else self.execution_timeout + self.defer_slack,
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
            sweep = self._hold(
                HyperDriveRun.resumed(self.workspace, sweep_id, config, state=state, airflow_task=task)
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
            if event.get("stop_at"):
                # The try's own deadline, which the trigger applied: Airflow times this resumed task anew.
                sweep.stop_at(datetime.fromisoformat(str(event["stop_at"])), DEFERRED_TIMED_OUT)
            return self._result(sweep, sweep.wait_for_completion())
        if event.get("timed_out"):
            return self._result(sweep, sweep.fail(DEFERRED_TIMED_OUT))
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

    def _taken_over(self, context: Context, record: RunRecord) -> HyperDriveRun:
        """The sweep this try handed to a trigger that is gone, taken over with no state: each live run's output and
        metrics are read again from their start (a metric point is recorded once)."""
        from airflow_amlrun.hyperdrive import HyperDriveRun
        from airflow_amlrun.hyperdrive.takeover import SweepState

        config, task, _ = self._prepared(context)
        self.amlrun_run_id = record.id
        return self._hold(
            HyperDriveRun.resumed(self.workspace, record.id, config, state=SweepState(), airflow_task=task)
        )

    def _followed_on_after_trigger(
        self, context: Context, record: RunRecord, stop_at: datetime | None
    ) -> dict[str, Any]:
        """Follow on, in this worker, a sweep whose trigger failed, ended at `stop_at` if it still goes on then; the
        task ends as the sweep does."""
        with self._ended_unless_retried(context):
            sweep = self._taken_over(context, record)
            if stop_at is not None:
                sweep.stop_at(stop_at, TIMED_OUT)
            return self._result(sweep, sweep.wait_for_completion())

    def _stopped_unfollowed(self, context: Context, record: RunRecord, reason: str) -> RunRecord:
        """End Failed, its live runs stopped, a sweep nobody followed past the task's execution_timeout."""
        with self._ended_unless_retried(context):
            return self._taken_over(context, record).fail(reason)

    @contextmanager
    def _ended_unless_retried(self, context: Context) -> Iterator[None]:
        """What fails the task in here ends its sweep, unless Airflow retries the task to resume it (see
        ``_settle_sweeps``). The error fails the task either way."""
        from airflow.sdk.exceptions import TaskDeferred

        try:
            yield
        except TaskDeferred:
            raise
        except BaseException as err:
            self._settle_sweeps(context, err)
            raise

    def _settle_sweeps(self, context: Context, err: BaseException) -> None:
        """What becomes of the sweeps of this task instance left unfinished once `err` failed this try (the one this
        try runs, whether this process still follows it or handed it over, and any an earlier try left):

        - Airflow retries the task, resume_on_retry is true and `err` is a failure, not an interruption (the task
          killed, its execution_timeout): they are left as they are, their live runs going on on their targets,
          for the retry to resume; this process lets go of the one it follows (its runs' heartbeats end).
        - Otherwise they are ended: their live runs stopped, each recorded Failed with the error (Canceled for a
          kill), rather than left for the retry to stop or for ``amlrun reconcile``.

        This never raises: `err` is what fails the task."""
        from airflow_amlrun.history import RunStatus
        from airflow_amlrun.hyperdrive.takeover import SweepEnding, earlier_sweeps, end_sweep, interrupts
        from airflow_amlrun.operators.retries import task_will_retry
        from airflow_amlrun.submission import AirflowTask

        held, self._sweep = self._sweep, None
        retried, why = False, "The task failed, and Airflow does not retry it"
        try:
            ti = context["ti"]
            retried = task_will_retry(ti, err, context)
            # A killed task's error may be anything on_kill cut into (a history error in its handler): it is
            # an interruption all the same.
            interrupted = self._killed or interrupts(err)
            if retried and self.resume_on_retry and not interrupted:
                if held is not None:
                    held.let_go()
                self._say_left_for_retry(AirflowTask.of(ti), held)
                return
            if retried:
                why = (
                    f"The task was interrupted ({type(err).__name__}), and its retry starts a new sweep"
                    if interrupted
                    else "The task failed, and its retry starts a new sweep (resume_on_retry=False)"
                )
            ending = SweepEnding(RunStatus.CANCELED, KILLED, KILLED) if self._killed else SweepEnding.of(err)
            ended: list[str] = []
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
                    "Sweep %s was recorded %s and its live runs were stopped. %s.",
                    sweep_id,
                    ending.status,
                    why,
                )
        except Exception:
            if held is not None:
                held.let_go()  # its runs' heartbeats end with this try, for the retry or reconcile to see
            self.log.exception(
                "%s, and ending its sweep %s failed too: what is left unfinished is settled by %s. The task fails "
                "with its own error, below.",
                why,
                self.amlrun_run_id or "(none recorded)",
                "its retry" if retried else "`amlrun reconcile`",
            )

    def _say_left_for_retry(self, task: AirflowTask, held: HyperDriveRun | None) -> None:
        """Name in the task log the sweeps left for the retry (the history's word, else the one this try held)."""
        from airflow_amlrun.hyperdrive.takeover import earlier_sweeps

        try:
            left = [record.id for record in earlier_sweeps(self.workspace, task)]
        except Exception as err:
            left = [held.id] if held is not None else []
            self.log.warning("The run history did not say which sweeps this try leaves unfinished: %s", err)
        for sweep_id in left:
            self.log.warning(
                "Sweep %s is left as it is for the retry of this task to resume (resume_on_retry): the task failed, "
                "and Airflow retries it. Its live runs go on on their targets; the runs that ended keep their "
                "results.",
                sweep_id,
            )

    def _result(self, sweep: HyperDriveRun, record: RunRecord) -> dict[str, Any]:
        from airflow_amlrun.history import RunStatus

        self._sweep = None
        summary: dict[str, Any] = sweep.summary()
        # The task's error, worded as a single run's (RunFailedError, RunCanceledError).
        if record.status is RunStatus.CANCELED:
            raise AmlRunError(f"Sweep {record.id} was canceled. {record.error or ''}".strip())
        if record.status is not RunStatus.COMPLETED:
            raise AmlRunError(f"Sweep {record.id} failed: {record.error or 'no error recorded'}")
        best = summary["best_run"]
        self.log.info(
            "Sweep %s: best run %s, %s %s",
            record.id,
            best["run_id"],
            self.config.primary_metric_name,
            best["metrics"].get(self.config.primary_metric_name),
        )
        return summary
