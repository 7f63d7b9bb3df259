"""Deferred runs under a real scheduler and triggerer (dag.test runs triggers inline and would hide this).

The cluster runs one task at a time (`[core] parallelism = 1`): two deferred training runs can overlap only
if each task frees its worker slot once its run started.

A trigger that fails in the triggerer, or a deferral that times out, Airflow answers only from a scheduler and a
triggerer of its own: the task is resumed with next_method "__fail__". The triggers that do so are in
FAILING_TRIGGERS, a module the cluster's components import from $AIRFLOW_HOME/config (on every Airflow process's
path), with the operators that defer with them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from airflow_amlrun.history import RunRecord
from tests.conftest import dag_source, write_script
from tests.integration.airflow_cluster import AirflowCluster

SCRIPT = """\
import sys, time
from airflow_amlrun.run_context import Run
run = Run.get_context()
steps = int(sys.argv[1])
for step in range(steps):
    print(f"deferred step {step}", flush=True)
    run.log("loss", 1.0 / (step + 1), step=step)
    time.sleep(0.5)
print("deferred script done", flush=True)
"""


FAILING_TRIGGERS = """\
'''Triggers that fail in the triggerer, and the operators deferring with them. Each way of failing is one mixin,
over the run's trigger (ScriptRunTrigger) and the sweep's (HyperDriveTrigger) alike.'''
import asyncio
from datetime import datetime, timedelta, timezone

from airflow_amlrun import ScriptRunOperator
from airflow_amlrun.operators.hyperdrive import HyperDriveOperator
from airflow_amlrun.triggers.hyperdrive import HyperDriveTrigger
from airflow_amlrun.triggers.script_run import ERROR, ScriptRunTrigger, wait_until


async def _until(moment):
    if moment is not None:
        wait = (datetime.fromisoformat(moment) - datetime.now(timezone.utc)).total_seconds()
        if wait > 0:
            await asyncio.sleep(wait)


class _Raising:
    '''Raises in the triggerer once it may fire (the task that deferred has exited) and the task's execution_timeout
    passed, if it has one (the trigger does not stop the runs then), leaving the runs as they were handed over.'''

    broke_down = "the trigger broke down in the triggerer"

    def serialize(self):
        return f"{__name__}.{type(self).__name__}", super().serialize()[1]

    async def _until_it_fails(self):
        await _until(self.not_before)
        await _until(self.stop_at)

    async def run(self):
        await self._until_it_fails()
        raise RuntimeError(self.broke_down)
        yield


class _HandingBack(_Raising):
    '''Hands the runs back to the task as they were handed over, with an error event (as a trigger that can no longer
    follow them does), when _Raising would raise.'''

    async def run(self):
        await self._until_it_fails()
        yield self._event(ERROR, message=self.broke_down, state=self.state, stop_at=self.stop_at)


class _Hanging(_Raising):
    '''Never fires, nor follows the runs: a triggerer that hangs.'''

    async def run(self):
        await asyncio.Event().wait()
        yield


class RaisingTrigger(_Raising, ScriptRunTrigger):
    pass


class HandingBackTrigger(_HandingBack, ScriptRunTrigger):
    pass


class HangingTrigger(_Hanging, ScriptRunTrigger):
    pass


class SettlingTrigger(RaisingTrigger):
    '''Records the run's end itself, as another process (reconcile) might, then raises.'''

    async def run(self):
        run = await asyncio.to_thread(self._resume)
        await asyncio.to_thread(run.cancel, "Canceled by another process.")
        await wait_until(self.not_before)
        raise RuntimeError(self.broke_down)
        yield


class _SweepTrigger:
    broke_down = "the sweep's trigger broke down in the triggerer"


class RaisingSweepTrigger(_SweepTrigger, _Raising, HyperDriveTrigger):
    pass


class HandingBackSweepTrigger(_SweepTrigger, _HandingBack, HyperDriveTrigger):
    pass


class HangingSweepTrigger(_SweepTrigger, _Hanging, HyperDriveTrigger):
    pass


class _Deferring:
    '''Defers with `failing` (a failing kind of the operator's own trigger) instead of the trigger it builds.'''

    failing = None

    def defer(self, *, trigger, **kwargs):
        super().defer(trigger=self.failing(**trigger.serialize()[1]), **kwargs)


class DeferringToARaisingTrigger(_Deferring, ScriptRunOperator):
    failing = RaisingTrigger


class DeferringToAHandingBackTrigger(_Deferring, ScriptRunOperator):
    failing = HandingBackTrigger


class DeferringToAHangingTrigger(_Deferring, ScriptRunOperator):
    failing = HangingTrigger
    defer_slack = timedelta(seconds=5)


class DeferringToASettlingTrigger(_Deferring, ScriptRunOperator):
    failing = SettlingTrigger


class SweepDeferringToARaisingTrigger(_Deferring, HyperDriveOperator):
    failing = RaisingSweepTrigger


class SweepDeferringToAHandingBackTrigger(_Deferring, HyperDriveOperator):
    failing = HandingBackSweepTrigger


class SweepDeferringToAHangingTrigger(_Deferring, HyperDriveOperator):
    failing = HangingSweepTrigger
    defer_slack = timedelta(seconds=5)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[AirflowCluster]:
    prepared = AirflowCluster(env={"AIRFLOW__CORE__PARALLELISM": "1"})
    # Before the components start: Airflow puts the folder on their path when they do.
    (prepared.home / "config").mkdir()
    (prepared.home / "config" / "amlrun_failing_triggers.py").write_text(FAILING_TRIGGERS)
    with prepared as started:
        yield started


@pytest.fixture(scope="module")
def source(cluster: AirflowCluster) -> Path:
    folder = cluster.home / "src"
    write_script(folder, "train.py", SCRIPT)
    return folder


def runs_of(cluster: AirflowCluster, dag_id: str) -> list[RunRecord]:
    return cluster.history().list_runs(dag_id=dag_id, limit=1000)


def test_two_deferred_runs_overlap_on_one_slot_and_report_as_a_waiting_task_would(
    cluster: AirflowCluster, source: Path
) -> None:
    text = f"""
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    for name in ("train_a", "train_b"):
        ScriptRunOperator(
            task_id=name,
            config=ScriptRunConfig({str(source)!r}, script="train.py"),
            arguments=["40"],
            deferrable=True,
        )
"""
    dag_id = cluster.write_dag(text)
    run_id = cluster.trigger(dag_id)

    deferred_seen = set()
    while cluster.dag_run_state(dag_id, run_id) not in ("success", "failed"):
        deferred_seen |= {
            t for t, ti in cluster.task_instances(dag_id, run_id).items() if ti.state == "deferred"
        }
        time.sleep(0.3)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "success", cluster.component_logs()
    assert deferred_seen == {"train_a", "train_b"}
    runs = sorted(runs_of(cluster, dag_id), key=lambda r: r.task_id or "")
    assert [(r.task_id, str(r.status)) for r in runs] == [("train_a", "Completed"), ("train_b", "Completed")]
    first, second = runs
    assert first.start and first.end and second.start and second.end
    # One slot, and yet both ran at once: neither task held it while its run went on.
    assert max(first.start, second.start) < min(first.end, second.end)
    for record in runs:
        assert [p.step for p in cluster.history().get_metrics(record.id, "loss")] == list(range(40))
        log = cluster.task_log(dag_id, run_id, str(record.task_id))
        assert "the worker slot is freed" in log
        # The script's output reached the task log while the trigger followed the run, in order, once each.
        printed = [line for line in log.splitlines() if "deferred step" in line]
        assert [f"deferred step {n}" for n in range(40)] == [
            line[line.index("deferred step") :] for line in printed
        ]
        assert "deferred script done" in log
        assert f"Run {record.id} Completed" in log


def test_the_tasks_execution_timeout_stops_a_deferred_run(cluster: AirflowCluster, source: Path) -> None:
    # Airflow does not time a deferred task out; only the trigger can stop the run (the target knows no
    # execution_timeout).
    text = dag_source(source, arguments=["600"], options={"deferrable": True}).replace(
        "    ScriptRunOperator(\n",
        "    ScriptRunOperator(\n        execution_timeout=datetime.timedelta(seconds=45),\n",
    )
    dag_id = cluster.write_dag("import datetime\n" + text)
    run_id = cluster.trigger(dag_id)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "failed"
    (record,) = runs_of(cluster, dag_id)
    assert str(record.status) == "Failed"
    assert record.error == "Stopped by the Airflow task's execution_timeout (while deferred)."
    assert "deferred step 3" in cluster.task_log(dag_id, run_id, "train")
    assert not cluster.marked_processes_running_script("train.py")


def test_killing_a_deferred_task_cancels_its_run(cluster: AirflowCluster, source: Path) -> None:
    dag_id = cluster.write_dag(dag_source(source, arguments=["600"], options={"deferrable": True}))
    run_id = cluster.trigger(dag_id)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ti = cluster.task_instances(dag_id, run_id).get("train")
        runs = runs_of(cluster, dag_id)
        if ti is not None and ti.state == "deferred" and runs and runs[0].metrics:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the task was not deferred with its run going on:\n{cluster.component_logs()}")

    cluster.set_task_state(dag_id, run_id, "train", "failed")

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not runs_of(cluster, dag_id)[0].status.is_terminal:
        time.sleep(0.5)
    (record,) = runs_of(cluster, dag_id)
    assert str(record.status) == "Canceled", cluster.component_logs()
    assert "deferred task was killed" in (record.error or "")
    assert not cluster.marked_processes_running_script("train.py")


def test_a_deferred_docker_run_is_followed_by_the_triggerer(cluster: AirflowCluster, source: Path) -> None:
    # The local Docker socket: a triggerer of this Airflow runs on this machine, so the run is deferred.
    dag_id = cluster.write_dag(
        dag_source(source, target="docker", arguments=["10"], options={"deferrable": True})
    )
    run_id = cluster.trigger(dag_id)
    deferred = False
    while cluster.dag_run_state(dag_id, run_id) not in ("success", "failed"):
        ti = cluster.task_instances(dag_id, run_id).get("train")
        deferred = deferred or (ti is not None and ti.state == "deferred")
        time.sleep(0.3)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "success", cluster.component_logs()
    assert deferred
    (record,) = runs_of(cluster, dag_id)
    assert (str(record.status), record.target) == ("Completed", "docker")
    assert [p.step for p in cluster.history().get_metrics(record.id, "loss")] == list(range(10))
    log = cluster.task_log(dag_id, run_id, "train")
    assert "the worker slot is freed" in log
    printed = [line[line.index("deferred step") :] for line in log.splitlines() if "deferred step" in line]
    assert printed == [f"deferred step {n}" for n in range(10)]


def failing_trigger_dag(source: Path, kind: str, trigger: str, steps: int, execution_timeout: int = 0) -> str:
    """A DAG of one deferrable task `train` whose trigger fails as `trigger` says (FAILING_TRIGGERS: "Raising",
    "HandingBack", "Hanging", "Settling"): for `kind` "run", a ScriptRunOperator running the script for `steps`
    steps; for "sweep", a HyperDriveOperator running a grid sweep of two such runs (`--lr` 0.1 or 0.2), both at once.
    """
    run_config = f"ScriptRunConfig({str(source)!r}, script='train.py', arguments=['{steps}'])"
    if kind == "run":
        operator, config = f"DeferringToA{trigger}Trigger", run_config
    else:
        operator = f"SweepDeferringToA{trigger}Trigger"
        config = f"""HyperDriveConfig(
            run_config={run_config},
            hyperparameter_sampling=GridParameterSampling({{"--lr": choice(0.1, 0.2)}}),
            primary_metric_name="loss",
            primary_metric_goal="minimize",
            max_total_runs=2,
            max_concurrent_runs=2,
        )"""
    timeout = (
        f"\n        execution_timeout=datetime.timedelta(seconds={execution_timeout}),"
        if execution_timeout
        else ""
    )
    return f"""
import datetime
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import ScriptRunConfig
from airflow_amlrun.hyperdrive import GridParameterSampling, HyperDriveConfig, choice
from amlrun_failing_triggers import {operator}

with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    {operator}(
        task_id="train",
        config={config},
        deferrable=True,{timeout}
    )
"""


def sweep_of(records: list[RunRecord]) -> tuple[RunRecord, list[RunRecord]]:
    """The sweep's parent run and its runs."""
    [sweep] = [r for r in records if r.target == "hyperdrive"]
    return sweep, [r for r in records if r.parent_run_id == sweep.id]


def test_a_run_whose_trigger_fails_in_the_triggerer_is_followed_on_by_the_worker(
    cluster: AirflowCluster, source: Path
) -> None:
    dag_id = cluster.write_dag(failing_trigger_dag(source, "run", "Raising", 60))
    run_id = cluster.trigger(dag_id)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "success", cluster.component_logs()
    (record,) = runs_of(cluster, dag_id)
    assert (str(record.status), record.error) == ("Completed", None)
    assert [p.step for p in cluster.history().get_metrics(record.id, "loss")] == list(range(60))
    assert cluster.xcom(dag_id, run_id, "train")["status"] == "Completed"
    ti = cluster.task_instances(dag_id, run_id)["train"]
    assert ti.try_number == 1
    log = cluster.task_log(dag_id, run_id, "train")
    assert "the worker slot is freed" in log
    assert "RuntimeError: the trigger broke down in the triggerer" in log
    assert (
        f"The trigger following run {record.id} failed in the triggerer (RuntimeError: the trigger broke down in "
        "the triggerer); this worker follows the run on to its end."
    ) in log
    assert "deferred step 59" in log
    assert "deferred script done" in log
    assert f"Run {record.id} Completed" in log


def test_a_run_nobody_follows_is_stopped_once_its_deferral_times_out(
    cluster: AirflowCluster, source: Path
) -> None:
    # The triggerer hangs: the trigger never fires and never stops the run at the execution_timeout. Airflow
    # resumes the task only to fail it, 15 + 5 s after it deferred.
    dag_id = cluster.write_dag(failing_trigger_dag(source, "run", "Hanging", 600, execution_timeout=15))
    run_id = cluster.trigger(dag_id)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "failed"
    (record,) = runs_of(cluster, dag_id)
    assert str(record.status) == "Failed", cluster.component_logs()
    assert record.error == (
        "Stopped: the Airflow task's execution_timeout passed while no triggerer followed the run (its deferral "
        "timed out)."
    )
    assert not cluster.marked_processes_running_script("train.py")
    log = cluster.task_log(dag_id, run_id, "train")
    assert (
        f"Run {record.id} was stopped and recorded Failed: the task's execution_timeout passed while no triggerer "
        "followed it (Airflow's deferral timed out)."
    ) in log


def test_a_failed_trigger_whose_run_another_process_recorded_fails_the_task_saying_so(
    cluster: AirflowCluster, source: Path
) -> None:
    dag_id = cluster.write_dag(failing_trigger_dag(source, "run", "Settling", 600))
    run_id = cluster.trigger(dag_id)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "failed"
    (record,) = runs_of(cluster, dag_id)
    assert (str(record.status), record.error) == ("Canceled", "Canceled by another process.")
    assert not cluster.marked_processes_running_script("train.py")
    log = cluster.task_log(dag_id, run_id, "train")
    assert (
        "The trigger of this task failed in the triggerer (RuntimeError: the trigger broke down in the triggerer), "
        f"and run {record.id} of this try was recorded Canceled by another process meanwhile (Canceled by another "
        "process.): nothing is left to settle."
    ) in log
    assert "TaskDeferralError" in log


def test_a_sweep_whose_trigger_fails_in_the_triggerer_is_followed_on_by_the_worker(
    cluster: AirflowCluster, source: Path
) -> None:
    dag_id = cluster.write_dag(failing_trigger_dag(source, "sweep", "Raising", 30))
    run_id = cluster.trigger(dag_id)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "success", cluster.component_logs()
    sweep, trials = sweep_of(runs_of(cluster, dag_id))
    assert (str(sweep.status), sweep.error) == ("Completed", None)
    assert sorted(str(r.status) for r in trials) == ["Completed", "Completed"]
    for trial in trials:
        # Read again from their start by the worker: each point recorded once.
        assert [p.step for p in cluster.history().get_metrics(trial.id, "loss")] == list(range(30))
    log = cluster.task_log(dag_id, run_id, "train")
    assert (
        f"The trigger following sweep {sweep.id} failed in the triggerer (RuntimeError: the sweep's trigger broke "
        "down in the triggerer); this worker follows the sweep on to its end."
    ) in log


def test_a_sweep_nobody_follows_is_ended_once_its_deferral_times_out(
    cluster: AirflowCluster, source: Path
) -> None:
    dag_id = cluster.write_dag(failing_trigger_dag(source, "sweep", "Hanging", 600, execution_timeout=15))
    run_id = cluster.trigger(dag_id)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "failed"
    sweep, trials = sweep_of(runs_of(cluster, dag_id))
    reason = (
        "Stopped: the Airflow task's execution_timeout passed while no triggerer followed the run (its deferral "
        "timed out)."
    )
    assert (str(sweep.status), sweep.error) == ("Failed", reason), cluster.component_logs()
    assert [(str(r.status), r.error) for r in trials] == [("Canceled", f"Canceled: {reason}")] * 2
    assert not cluster.marked_processes_running_script("train.py")
    log = cluster.task_log(dag_id, run_id, "train")
    assert f"Sweep {sweep.id} was stopped and recorded Failed" in log


# The task's execution_timeout in the scenario below: long enough for the task to start its runs and defer.
TIMEOUT_SECONDS = 20


@pytest.mark.parametrize(
    ("trigger", "reason"),
    [
        pytest.param("Raising", "Stopped by the Airflow task's execution_timeout.", id="raising"),
        pytest.param(
            "HandingBack",
            "Stopped by the Airflow task's execution_timeout (while deferred).",
            id="handing-back",
        ),
    ],
)
@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_the_worker_following_on_after_a_failed_trigger_stops_the_runs_at_the_tries_execution_timeout(
    cluster: AirflowCluster, source: Path, kind: str, trigger: str, reason: str
) -> None:
    # The trigger fails (raises, or hands the runs back) once the execution_timeout passed, counted from the try's
    # start: the worker then follows the runs on, and Airflow times the resumed task anew, from the resume. The
    # runs must end at once, not an execution_timeout later.
    dag_id = cluster.write_dag(
        failing_trigger_dag(source, kind, trigger, 600, execution_timeout=TIMEOUT_SECONDS)
    )
    run_id = cluster.trigger(dag_id)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "failed"
    records = runs_of(cluster, dag_id)
    if kind == "run":
        (stopped,) = records
        runs: list[RunRecord] = []
    else:
        stopped, runs = sweep_of(records)
    assert (str(stopped.status), stopped.error) == ("Failed", reason), cluster.component_logs()
    if kind == "sweep":
        # None left Running: each stopped with the sweep, as a sweep's runs are.
        assert [(str(r.status), r.error) for r in runs] == [("Canceled", f"Canceled: {reason}")] * 2
    assert not cluster.marked_processes_running_script("train.py")
    log = cluster.task_log_records(dag_id, run_id, "train")
    resumed = next(
        (
            datetime.fromisoformat(str(r["timestamp"]))
            for r in log
            if str(r.get("event")).startswith(
                (
                    f"The trigger following {kind} {stopped.id} failed",
                    f"The triggerer stopped following {kind}",
                )
            )
        ),
        None,
    )
    # The task deferred and its trigger failed, rather than Airflow timing the task out before it deferred.
    assert resumed is not None, cluster.task_log(dag_id, run_id, "train") + cluster.component_logs()
    # The try's execution_timeout had passed when the worker took the runs over: they end within moments.
    for record in [stopped, *runs]:
        assert record.end is not None
        assert record.end - resumed < timedelta(seconds=TIMEOUT_SECONDS / 2), (record.id, record.end, resumed)
    # What the task fails with.
    assert f"{kind.capitalize()} {stopped.id} failed: {reason}" in cluster.task_log(dag_id, run_id, "train")
