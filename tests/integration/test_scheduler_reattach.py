"""A task whose process (its task runner, or the whole worker) is killed mid-run, under a real scheduler
(LocalExecutor, then CeleryExecutor): its retry follows the run the killed try left behind (one execution, one run row, every line of the log), or,
with ``reattach_on_retry=False``, stops that run and starts a fresh one."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_script
from tests.integration.airflow_cluster import AirflowCluster
from tests.integration.conftest import alive

pytestmark = pytest.mark.timeout(1200)

STEPS = 30  # the script prints and logs one step every half second: about 15 s of training


@pytest.fixture(scope="module", params=["LocalExecutor", "CeleryExecutor"])
def cluster(request: pytest.FixtureRequest) -> Iterator[AirflowCluster]:
    if request.param == "LocalExecutor":
        yield request.getfixturevalue("local_cluster")
        return
    with AirflowCluster(executor=request.param, celery_workers=1) as started:
        yield started


@dataclass(frozen=True)
class Training:
    """A training script that leaves one file, named by its pid, in `starts` each time it starts."""

    source: Path
    starts: Path

    def started_pids(self) -> list[int]:
        return sorted(int(p.name) for p in self.starts.iterdir())


@pytest.fixture
def training(tmp_path: Path) -> Training:
    starts = tmp_path / "starts"
    starts.mkdir()
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        f"""
        import os, time
        from pathlib import Path
        from airflow_amlrun.run_context import Run

        Path({str(starts)!r}, str(os.getpid())).touch()
        run = Run.get_context()
        for step in range({STEPS}):
            print(f"line {{step}}", flush=True)
            run.log("loss", 1 / (step + 1), step=step)
            time.sleep(0.5)
        print("done", flush=True)
        """,
    )
    return Training(source, starts)


def _dag(training: Training, **operator: Any) -> str:
    extra = "".join(f"        {name}={value!r},\n" for name, value in operator.items())
    return f"""
import datetime
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    ScriptRunOperator(
        task_id="train",
        config=ScriptRunConfig({str(training.source)!r}, script="train.py"),
        retries=1,
        retry_delay=datetime.timedelta(seconds=2),
{extra}    )
"""


def _kill_task_mid_run(cluster: AirflowCluster, dag_id: str, run_id: str, supervisor: bool = False) -> Any:
    """SIGKILL the process running try 1 of task `train` (and with `supervisor`, the worker process above it)
    once its script has trained a few steps; the run as the history holds it then."""
    ti = cluster.wait_for_task(dag_id, run_id, "train", "running")
    history = cluster.history()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = history.list_runs(dag_id=dag_id)
        if runs and runs[0].status == "Running" and len(history.get_metrics(runs[0].id, "loss")) >= 3:
            break
        time.sleep(0.2)
    else:
        pytest.fail(
            f"The run of {dag_id}.train did not train 3 steps within 300 s:\n{cluster.component_logs()}"
        )
    victims = [cluster.task_runner_pid(ti)]
    if supervisor:
        victims.insert(0, cluster.task_supervisor_pid(ti))
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    return runs[0]


def _lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("line ") or line == "done"]


ALL_LINES = [f"line {n}" for n in range(STEPS)] + ["done"]


# The task runner alone: its supervisor reports the try failed at once. With the supervisor: the worker is
# gone, and the scheduler notices only when the task's heartbeats stop ([scheduler]
# task_instance_heartbeat_timeout).
@pytest.mark.parametrize("worker_dies", [False, True], ids=["task-runner-killed", "worker-killed"])
def test_retry_of_a_killed_task_reattaches_to_its_run(
    cluster: AirflowCluster, training: Training, worker_dies: bool
) -> None:
    dag_id = cluster.write_dag(_dag(training))
    run_id = cluster.trigger(dag_id)
    orphan = _kill_task_mid_run(cluster, dag_id, run_id, supervisor=worker_dies)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "success"
    assert cluster.task_instances(dag_id, run_id)["train"].try_number == 2
    assert len(training.started_pids()) == 1  # the script ran once
    [run] = cluster.history().list_runs(dag_id=dag_id)
    assert (run.id, run.status, run.try_number) == (orphan.id, "Completed", 2)
    assert _lines(Path(str(run.logs_uri), "std_log.txt").read_text()) == ALL_LINES
    assert [p.step for p in cluster.history().get_metrics(run.id, "loss")] == list(range(STEPS))
    retry_log = cluster.task_log(dag_id, run_id, "train", try_number=2)
    assert f"Re-attaching to run {run.id}" in retry_log
    assert f"Run {run.id} followed on local" in retry_log and "submitted to" not in retry_log


def test_retry_without_reattach_cancels_the_killed_tasks_run_and_starts_anew(
    cluster: AirflowCluster, training: Training
) -> None:
    dag_id = cluster.write_dag(_dag(training, reattach_on_retry=False))
    run_id = cluster.trigger(dag_id)
    orphan = _kill_task_mid_run(cluster, dag_id, run_id)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "success"
    assert cluster.task_instances(dag_id, run_id)["train"].try_number == 2
    first, second = training.started_pids()  # two executions...
    assert not alive(first) and not alive(second)  # ...of which none still runs
    runs = {run.id: run for run in cluster.history().list_runs(dag_id=dag_id)}
    assert len(runs) == 2
    old = runs.pop(orphan.id)
    [new] = runs.values()
    assert (old.status, old.try_number) == ("Canceled", 1)
    assert "reattach_on_retry=False" in str(old.error)
    assert (new.status, new.try_number) == ("Completed", 2)
    assert _lines(Path(str(new.logs_uri), "std_log.txt").read_text()) == ALL_LINES
    retry_log = cluster.task_log(dag_id, run_id, "train", try_number=2)
    assert orphan.id in retry_log and new.id in retry_log
    assert "Re-attaching" not in retry_log
