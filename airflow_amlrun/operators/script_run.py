"""ScriptRunOperator: submit a training run to a compute target as an Airflow task."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk.configuration import conf
from airflow.sdk.log import mask_secret

from airflow_amlrun.environment.paths import PathBase
from airflow_amlrun.environment.requirements import as_path
from airflow_amlrun.errors import ConfigurationError, shown
from airflow_amlrun.estimator import Estimator
from airflow_amlrun.experiment import check_experiment_name
from airflow_amlrun.links import RUN_ID_XCOM_KEY, AmlRunLink
from airflow_amlrun.operators.deferral import RunKind, SettlesFailedDeferral
from airflow_amlrun.run.outcome import DEFERRED_TIMED_OUT, TIMED_OUT
from airflow_amlrun.runconfig import (
    ScriptRunConfig,
    render_arguments,
    render_environment_variables,
    render_tags,
)
from airflow_amlrun.workspace import check_connection_id

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.run import FollowState, ScriptRun
    from airflow_amlrun.submission import AirflowTask
    from airflow_amlrun.targets.base import TargetStatus
    from airflow_amlrun.workspace import Workspace


# How long past its execution_timeout a deferred task waits for its trigger before Airflow fails it (the default of
# ScriptRunOperator.defer_slack).
DEFER_SLACK = timedelta(minutes=5)
# Longest a starting task spends settling other tasks' orphaned runs.
RECONCILE_BUDGET_SECONDS = 10.0
# The error of a run stopped because Airflow killed its task before the task followed it (who follows a run
# records why it ended).
KILLED = "Canceled: its Airflow task was killed."


class ScriptRunOperator(SettlesFailedDeferral):
    """Run a training script on a compute target, tracked in the workspace's run history.

    The task streams the script's output into its log while it runs, records status, metrics and
    outputs in the run history, and returns the run summary (run_id, experiment, status, target,
    metrics, start, end, duration_seconds, outputs_uri, ...) as its XCom.

    :param config: a ScriptRunConfig, an Estimator (SKLearn, PyTorch, ...; its ScriptRunConfig is used), or the
        path of a YAML file holding a ScriptRunConfig (relative to the DAG file).
    :param experiment: experiment the run belongs to (templated); defaults to the DAG id.
    :param arguments: script arguments replacing the config's (templated).
    :param environment_variables: variables added to the config's (templated).
    :param secret_environment_variables: variables whose values are masked in every task log and never
        recorded (templated), e.g. ``{"HF_TOKEN": "{{ conn.hf.password }}"}``.
    :param tags: tags recorded on the run (templated).
    :param workspace_conn_id: `amlrun` connection of the workspace; defaults to ``[amlrun]
        workspace_conn_id``, falling back to the embedded workspace when that connection does not exist.
    :param show_output: stream the script's output into the task log.
    :param deferrable: once the run is started, free the worker slot and follow the run in the triggerer
        (default ``[operators] default_deferrable``). Runs on a target only this machine reaches (the local
        target, a Docker daemon on this machine's socket) are deferred only when a triggerer runs on this
        machine with its filesystem and processes; otherwise the task says so and waits in the worker.
    :param reattach_on_retry: when an earlier try of this task left its run unfinished (the worker died),
        follow that run instead of starting another (default); False stops it (Canceled) and starts anew.
    """

    deferred_kind = RunKind.RUN
    template_fields: Sequence[str] = (
        "experiment",
        "arguments",
        "environment_variables",
        "secret_environment_variables",
        "tags",
    )
    template_fields_renderers = {"arguments": "json", "environment_variables": "json", "tags": "json"}
    operator_extra_links = (AmlRunLink(),)
    ui_color = "#d6eaf8"
    # How long past its execution_timeout a deferred task waits for its trigger: past it, Airflow resumes the task
    # only to fail it, and the task stops its run (see resume_execution). A subclass may shorten it.
    defer_slack: timedelta = DEFER_SLACK

    def __init__(
        self,
        *,
        config: ScriptRunConfig | Estimator | str | os.PathLike[str],
        experiment: str | None = None,
        arguments: list[Any] | None = None,
        environment_variables: dict[str, Any] | None = None,
        secret_environment_variables: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
        workspace_conn_id: str | None = None,
        show_output: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        reattach_on_retry: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        where = f"ScriptRunOperator {self.task_id!r}"
        if isinstance(config, Estimator):
            config = config.run_config
        if not isinstance(config, ScriptRunConfig | str | os.PathLike):
            raise ConfigurationError(
                f"{where}: config must be a ScriptRunConfig or the path of a YAML file holding one, not "
                f"{type(config).__name__}."
            )
        if not isinstance(config, ScriptRunConfig):
            path = as_path(config, f"{where}: config")
            if path.suffix.lower() not in (".yaml", ".yml", ".json"):
                raise ConfigurationError(
                    f"{where}: config={shown(str(config))} is not a YAML file (.yaml, .yml or .json): pass a "
                    "ScriptRunConfig (e.g. ScriptRunConfig('src', script='train.py')), or the path of a YAML "
                    "file holding one."
                )
        for flag, value in (
            ("show_output", show_output),
            ("deferrable", deferrable),
            ("reattach_on_retry", reattach_on_retry),
        ):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{where}: {flag}={shown(value)} must be True or False.")
        check_connection_id(workspace_conn_id, f"{where}: workspace_conn_id")
        _check_before_rendering(
            where, config, experiment, arguments, environment_variables, secret_environment_variables, tags
        )
        self.config = config
        self.experiment = experiment
        self.arguments = arguments
        self.environment_variables = environment_variables
        self.secret_environment_variables = secret_environment_variables
        self.tags = tags
        self.workspace_conn_id = workspace_conn_id
        self.show_output = show_output
        self.deferrable = deferrable
        self.reattach_on_retry = reattach_on_retry
        self._run: ScriptRun | None = None
        # Whether the rest of `_run`'s output goes to the task log when a kill stops it here: not for a run read
        # from its start only to be stopped (_stopped_unfollowed), whose lines the trigger showed already.
        self._run_shown = True
        # Whether Airflow killed the task (on_kill): its handler returns, and execute goes on.
        self._killed = False
        # The run this try submitted or followed, for its extra link (AmlRunLink); None until there is one.
        self.amlrun_run_id: str | None = None

    @cached_property
    def workspace(self) -> Workspace:
        from airflow_amlrun.workspace import Workspace

        return Workspace.get(self.workspace_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_amlrun.environment.resolve import index_secrets
        from airflow_amlrun.experiment import Experiment, experiment_name_from
        from airflow_amlrun.submission import AirflowTask

        ti = context["ti"]
        dag_folder = PathBase.of_dag_file(context["dag"].fileloc)
        config = self._rendered_config(dag_folder)
        # Index credentials are read from the worker's environment while the environment is resolved and
        # built: whatever prints them (a resolver's error, a build log) shows them masked.
        for secret in [*index_secrets(self.workspace, config.environment), *self.workspace.credentials()]:
            mask_secret(secret)
        experiment = Experiment(self.workspace, self.experiment or experiment_name_from(ti.dag_id))
        task = AirflowTask.of(ti)
        if not self._killed:
            self._settle_orphaned_runs(task)
        if self._killed:  # before, or while orphaned runs were settled
            from airflow.sdk.exceptions import AirflowTaskTerminated

            from airflow_amlrun.run import ScriptRun
            from airflow_amlrun.run.reattach import stop_left_unfinished

            # A run an earlier try left for this one to re-attach to is this task's run: it stops with it.
            try:
                said = stop_left_unfinished(ScriptRun, self.workspace, task, KILLED)
            except Exception as err:
                # The task fails as killed all the same: what is left is amlrun reconcile's.
                self.log.warning("Stopping the runs earlier tries left failed: %s", err)
                said = []
            raise AirflowTaskTerminated(
                f"Task {self.task_id!r} was killed before it submitted its run: none started"
                + "".join(f"; {each}" for each in said)
                + "."
            )
        try:
            self._run = experiment.submit(
                config,
                tags={str(k): str(v) for k, v in (self.tags or {}).items()},
                base_dir=dag_folder,
                airflow_task=task,
                reattach_on_retry=self.reattach_on_retry,
                on_created=self._hold,
            )
        except BaseException:
            # Its start failed: recorded as it ended, or left Starting where the target may run it (for a retry
            # and reconcile to settle). A kill from here on must not take it for a run that never started.
            self._run = None
            raise
        if self._killed:
            # Killed while the run was submitted: recorded Canceled without starting if the kill came before
            # the start reached the target; else it is stopped now, and its end recorded.
            self.on_kill()
        ti.xcom_push(key=RUN_ID_XCOM_KEY, value=self._run.id)
        self.amlrun_run_id = self._run.id
        self.log.info(
            "Run %s %s %s (experiment %s)",
            self._run.id,
            "followed on" if self._run.reattached else "submitted to",
            config.compute_target,
            experiment.name,
        )
        if self.deferrable and not self._killed:
            self._defer_if_reachable(self._run, config, ti)  # returns when the run is not deferred
        record = self._run.wait_for_completion(show_output=self.show_output, output=self._log_line)
        return self._summary(record)

    def _defer_if_reachable(self, run: ScriptRun, config: ScriptRunConfig, ti: Any) -> None:
        """Hand the run to a trigger, if the triggerer can follow it; else say why the worker keeps it."""
        from airflow_amlrun.history import HistoryUnavailableError
        from airflow_amlrun.triggers.script_run import FIRST_EVENT_AFTER_SECONDS, ScriptRunTrigger

        if run.target.followed_only_here:
            problem = triggerer_shares_this_machine()
            if problem is not None:
                self.log.warning(
                    "Run %s is followed in this worker, not deferred: runs on %s can be followed only on this "
                    "machine, and %s.",
                    run.id,
                    run.target.name,
                    problem,
                )
                return
        try:
            state = run.hand_over()
        except HistoryUnavailableError as err:
            self.log.warning("%s It is followed in this worker instead.", err)
            return
        show_output = self.show_output
        if show_output and config.secret_environment_variables:
            # The triggerer cannot mask values it never sees, and they must not be stored for it.
            show_output = False
            self.log.info(
                "Run %s has secret variables: its output is shown here when it ends, not while the "
                "triggerer follows it.",
                run.id,
            )
        stop_at = self.try_deadline(ti)
        trigger = ScriptRunTrigger(
            run.id,
            state.to_json(),
            self.workspace_conn_id,
            show_output,
            stop_at.isoformat() if stop_at is not None else None,
            not_before=(datetime.now(UTC) + timedelta(seconds=FIRST_EVENT_AFTER_SECONDS)).isoformat(),
        )
        if self._killed:
            # Killed as the run was handed over (on_kill stopped it and recorded its end): not deferred.
            return
        self.log.info("Run %s is followed by the triggerer from here; the worker slot is freed.", run.id)
        # `_run` stays set until the task is deferred: a kill until then stops the run (the trigger then finds it
        # ended, and the task fails as it ended).
        self.defer(
            trigger=trigger,
            method_name="execute_complete",
            # A backstop for a deployment whose triggerer never takes the trigger: the trigger itself stops
            # the run at the execution_timeout, which Airflow does not apply to a deferred task.
            timeout=None if self.execution_timeout is None else self.execution_timeout + self.defer_slack,
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """The trigger saw the run end (or could not follow it): record its outcome from here."""
        from airflow_amlrun.run import FollowState
        from airflow_amlrun.targets.base import TargetStatus
        from airflow_amlrun.triggers.script_run import ENDED

        run_id = str(event["run_id"])
        ended = None
        if event.get("status") == ENDED:
            ended = TargetStatus(
                running=False,
                exit_code=event.get("exit_code"),
                reason=event.get("reason"),
                timed_out=bool(event.get("timed_out")),
            )
        else:
            self.log.warning(
                "The triggerer stopped following run %s (%s); this worker follows it on.",
                run_id,
                event.get("message"),
            )
        return self._follow_on(
            context,
            run_id,
            FollowState.from_json(event.get("state") or {}),
            stop_at=datetime.fromisoformat(str(event["stop_at"])) if event.get("stop_at") else None,
            stop_reason=DEFERRED_TIMED_OUT,
            ended=ended,
        )

    def _followed_on_after_trigger(
        self, context: Context, record: RunRecord, stop_at: datetime | None
    ) -> dict[str, Any]:
        """Follow on, in this worker, a run whose trigger failed, stopped at `stop_at` if it still runs then; the
        task ends as the run does."""
        from airflow_amlrun.run import FollowState

        if self.show_output:
            # How far the trigger got is lost with it: the output is shown again from the start.
            self.log.info("Run %s: its output is shown from its start.", record.id)
        return self._follow_on(
            context,
            record.id,
            FollowState(),
            stop_at=stop_at,
            stop_reason=TIMED_OUT,
        )

    def _stopped_unfollowed(self, context: Context, record: RunRecord, reason: str) -> RunRecord:
        """Stop a run nobody followed, now, recording it Failed with `reason` (one that ended meanwhile is recorded
        as it ended); its row as recorded."""
        from airflow_amlrun.run import FollowState, RunEndedError, ScriptRun

        try:
            self._run_shown = False
            run = self._run = ScriptRun.resumed(self.workspace, record.id, FollowState())
        except RunEndedError as ended:
            return ended.record
        run.stop_at(datetime.now(UTC), reason)
        try:
            return run.wait_for_completion(show_output=False, raise_on_error=False)
        finally:
            self._run, self._run_shown = None, True

    def _follow_on(
        self,
        context: Context,
        run_id: str,
        state: FollowState,
        *,
        stop_at: datetime | None,
        stop_reason: str,
        ended: TargetStatus | None = None,
    ) -> dict[str, Any]:
        """Follow a run on in this worker from where another process left it (`state`), to its end; record its
        outcome and return its summary (or raise as the run ended).

        :param stop_at: when to stop it if it still runs (the task's execution_timeout), recorded Failed with
            `stop_reason`.
        :param ended: how it ended, when the process that followed it saw it end.
        """
        from airflow_amlrun.errors import RunCanceledError, RunFailedError
        from airflow_amlrun.run import RunEndedError, ScriptRun

        # What the script prints now (the rest of its output) is masked as in execute. The run is under way:
        # a config that no longer renders (edited meanwhile, a newer version's checks) must not strand it.
        try:
            self._rendered_config(PathBase.of_dag_file(context["dag"].fileloc))
        except Exception as err:
            self.log.warning("The config was not rendered again to mask its secrets (%s); following on.", err)
        self.amlrun_run_id = run_id
        try:
            self._run = ScriptRun.resumed(self.workspace, run_id, state)
        except RunEndedError as gone:
            # Another process recorded its outcome meanwhile (reconcile, after a long wait for this resume).
            record = gone.record
            self.log.warning("Run %s was recorded %s by another process meanwhile.", run_id, record.status)
            if record.status == "Completed":
                return self._summary(record)
            error = RunCanceledError if record.status == "Canceled" else RunFailedError
            message = f"Run {run_id} {record.status}: {record.error or 'no error recorded'}"
            raise error(message, run_id=run_id) from None
        if stop_at is not None:
            self._run.stop_at(stop_at, stop_reason)
        if self._killed and ended is None:
            self.on_kill()  # killed while the run was looked up
        if ended is not None:
            self._run.conclude(ended, self._log_line if self.show_output else None)
        record = self._run.wait_for_completion(show_output=self.show_output, output=self._log_line)
        return self._summary(record)

    def _summary(self, record: RunRecord) -> dict[str, Any]:
        self.log.info(
            "Run %s %s in %ss; metrics: %s", record.id, record.status, record.duration_seconds, record.metrics
        )
        return record.summary()

    def _settle_orphaned_runs(self, task: AirflowTask) -> None:
        """Settle local runs whose tasks died without a retry (``amlrun reconcile``), in a few seconds at most.

        Only runs on the local target, which need no network to look at; runs on remote targets are left to
        ``amlrun reconcile`` (run it from cron). This task's own earlier tries are left to the re-attach that
        follows; a failure here never fails the task.
        """
        from airflow_amlrun.reconcile import reconcile

        def own_earlier_try(record: RunRecord) -> bool:
            return (record.dag_id, record.task_id, record.airflow_run_id, record.map_index) == (
                task.dag_id,
                task.task_id,
                task.run_id,
                task.map_index,
            )

        try:
            reconcile(
                self.workspace, skip=own_earlier_try, time_budget_seconds=RECONCILE_BUDGET_SECONDS, quick=True
            )
        except Exception as err:
            self.log.warning("Settling orphaned runs failed (the task goes on): %s", err)

    def _hold(self, run: ScriptRun) -> None:
        """From the moment the run is recorded, a kill stops it (before it starts on its target: it never does)."""
        self._run = run
        if self._killed:
            # Killed before the run was recorded (as the code was snapshotted, the environment resolved).
            run.cancel(KILLED)

    def on_kill(self) -> None:
        # Airflow's SIGTERM handler calls this and returns. Before the run exists there is nothing to stop yet:
        # execute stops it once submitted.
        self._killed = True
        if self._run is not None:
            self.log.info("Canceling run %s", self._run.id)
            # Killed before it began to follow the run, the task log still gets what the script printed.
            self._run.cancel(KILLED, output=self._log_line if self.show_output and self._run_shown else None)

    def _log_line(self, line: str) -> None:
        from airflow_amlrun.run_output import log_output_line

        log_output_line(self.log, line)

    def _rendered_config(self, dag_folder: PathBase) -> ScriptRunConfig:
        """The config this try runs: the task's templated arguments rendered into it, and checked, with the
        experiment and tags they render to."""
        where = f"ScriptRunOperator {self.task_id!r}"
        # Secrets are masked before anything is checked, so no message can show one.
        if isinstance(self.secret_environment_variables, dict):
            for value in self.secret_environment_variables.values():
                if isinstance(value, str) and value:
                    mask_secret(value)
        config = self.config
        if not isinstance(config, ScriptRunConfig):
            config = ScriptRunConfig.from_yaml(config, base_dir=dag_folder)
        try:
            if self.experiment is not None:
                check_experiment_name(self.experiment)
            render_tags(self.tags)
            changes: dict[str, Any] = {}
            if self.arguments is not None:
                if config.command is not None:
                    raise ConfigurationError(
                        f"arguments={shown(self.arguments)} only apply to a script, and this config runs a "
                        "command: write them into the command itself."
                    )
                changes["arguments"] = render_arguments(self.arguments)
            if self.environment_variables is not None:
                changes["environment_variables"] = {
                    **config.environment_variables,
                    **render_environment_variables(self.environment_variables),
                }
            if self.secret_environment_variables is not None:
                changes["secret_environment_variables"] = {
                    **config.secret_environment_variables,
                    **render_environment_variables(
                        self.secret_environment_variables, "secret_environment_variables", secret=True
                    ),
                }
            for value in {
                **config.secret_environment_variables,
                **changes.get("secret_environment_variables", {}),
            }.values():
                mask_secret(value)
            return replace(config, **changes) if changes else config
        except ConfigurationError as err:
            raise ConfigurationError(f"{where}, as rendered: {err}") from None


def triggerer_shares_this_machine(proc: str = "/proc") -> str | None:
    """None when a triggerer of this Airflow (the same AIRFLOW_HOME) runs on this machine in this process and
    mount namespace, with this root (so it can follow this machine's processes and read their files);
    otherwise what is missing.

    A triggerer elsewhere (another machine, another container) is not seen here at all. With several
    triggerers, a trigger may land on any of them: run them all beside the workers, or defer only runs on
    targets reached over the network (ssh, a Docker daemon over TCP).

    :param proc: where the process table is mounted.
    """
    try:
        here = _namespaces(proc, "self")
        processes = [entry.name for entry in os.scandir(proc) if entry.name.isdigit()]
    except OSError as err:
        return f"this machine's processes cannot be looked at ({err.strerror or err})"
    home = _airflow_home(dict(os.environ))
    seen: list[str] = []
    for pid in processes:
        try:
            argv = [
                arg.decode(errors="replace") for arg in Path(proc, pid, "cmdline").read_bytes().split(b"\0")
            ]
            if not _is_triggerer(argv):
                continue
            theirs = _namespaces(proc, pid)
            environ = Path(proc, pid, "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to look at
        variables = dict(v.decode(errors="replace").partition("=")[::2] for v in environ if b"=" in v)
        if theirs != here:
            seen.append("another process or mount namespace (a container)")
        elif _airflow_home(variables) != home:
            seen.append(f"another Airflow (AIRFLOW_HOME {_airflow_home(variables)})")
        else:
            return None
    if seen:
        return "the triggerer seen here belongs to " + " and ".join(sorted(set(seen)))
    return "no triggerer runs on this machine"


def _is_triggerer(argv: list[str]) -> bool:
    # `airflow triggerer ...`, possibly behind its interpreter, or retitled by Airflow as one word.
    names = [Path(arg).name for arg in argv if arg]
    if names and names[0].startswith("airflow triggerer"):
        return True
    return ("airflow", "triggerer") in itertools.pairwise(names)


def _namespaces(proc: str, pid: str) -> tuple[str, str, int, int]:
    root = os.stat(Path(proc, pid, "root"))
    return (
        os.readlink(Path(proc, pid, "ns", "pid")),
        os.readlink(Path(proc, pid, "ns", "mnt")),
        root.st_dev,
        root.st_ino,
    )


def _airflow_home(variables: dict[str, str]) -> str:
    home = variables.get("AIRFLOW_HOME") or os.path.join(variables.get("HOME", "~"), "airflow")
    return os.path.realpath(os.path.expanduser(home))


def rendered_later(value: object) -> bool:
    """Whether Airflow gives this value of a templated field its final form only when the task runs: a
    template, or what an upstream task returns (an XComArg, which Airflow resolves)."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    return not isinstance(value, os.PathLike) and getattr(value, "resolve", None) is not None


def _known_part(value: Any) -> Any:
    """The value with what is only known once rendered replaced by a placeholder string, for checking now."""
    if isinstance(value, list | tuple):
        return [("rendered" if rendered_later(v) and not isinstance(v, str) else v) for v in value]
    if isinstance(value, dict):
        return {
            k: ("rendered" if rendered_later(v) and not isinstance(v, str) else v) for k, v in value.items()
        }
    return value


def _check_before_rendering(
    where: str,
    config: ScriptRunConfig | str | os.PathLike[str],
    experiment: Any,
    arguments: Any,
    environment_variables: Any,
    secret_environment_variables: Any,
    tags: Any,
) -> None:
    """Check the templated arguments as far as they are known when the DAG is parsed, so a DAG with a bad
    value fails to load, naming it; what a template or an XCom gives is checked again once rendered."""
    try:
        if experiment is not None and not rendered_later(experiment):
            check_experiment_name(experiment)
        if arguments is not None and not rendered_later(arguments):
            if isinstance(config, ScriptRunConfig) and config.command is not None:
                raise ConfigurationError(
                    f"arguments={shown(arguments)} only apply to a script, and this config runs a command: "
                    "write them into the command itself."
                )
            render_arguments(_known_part(arguments))
        if environment_variables is not None and not rendered_later(environment_variables):
            render_environment_variables(_known_part(environment_variables))
        if secret_environment_variables is not None and not rendered_later(secret_environment_variables):
            render_environment_variables(
                _known_part(secret_environment_variables), "secret_environment_variables", secret=True
            )
        if tags is not None and not rendered_later(tags):
            render_tags(_known_part(tags))
    except ConfigurationError as err:
        raise ConfigurationError(f"{where}: {err}") from None
