"""Sweeps under a real scheduler and triggerer (the session's LocalExecutor deployment): a retry of a sweep
whose task runner was killed resumes it, and a deferred sweep is followed by the triggerer."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun.history import RunRecord, RunStatus
from tests.conftest import write_script
from tests.integration.airflow_cluster import AirflowCluster

pytestmark = pytest.mark.timeout(900)

SCRIPT = """\
import argparse, os, time
from pathlib import Path
from airflow_amlrun.run_context import Run
parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float)
parser.add_argument("--steps", type=int)
parser.add_argument("--starts")
args = parser.parse_args()
Path(args.starts, f"{args.alpha!r}-{os.getpid()}").touch()
run = Run.get_context()
for step in range(args.steps):
    run.log("loss", args.alpha * (1 + 1 / (step + 1)), step=step)
    # A worse run goes on slowly once a policy may stop it: a policy that does not stop it fails the test by
    # far, and one that does never races the clock.
    time.sleep(0.3 if args.alpha <= 1.2 or step < 2 else 5)
"""

HEADER = """
import datetime
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import ScriptRunConfig
from airflow_amlrun.hyperdrive import (
    BanditPolicy, GridParameterSampling, HyperDriveConfig, RandomParameterSampling, choice, uniform,
)
from airflow_amlrun.operators.hyperdrive import HyperDriveOperator


def sweep(starts, steps, sampling, policy=None, total=6, at_once=2):
    return HyperDriveConfig(
        run_config=ScriptRunConfig(SOURCE, script="train.py", arguments=["--steps", steps, "--starts", starts]),
        hyperparameter_sampling=sampling,
        policy=policy,
        primary_metric_name="loss",
        primary_metric_goal="minimize",
        max_total_runs=total,
        max_concurrent_runs=at_once,
    )
"""


@pytest.fixture(scope="module")
def cluster(local_cluster: AirflowCluster) -> AirflowCluster:
    return local_cluster


@pytest.fixture(scope="module")
def source(cluster: AirflowCluster) -> Path:
    folder = cluster.home / "sweep_src"
    write_script(folder, "train.py", SCRIPT)
    return folder


def dag(source: Path, body: str) -> str:
    return HEADER.replace("SOURCE", repr(str(source))) + body


def starts_dir(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return folder


def sweep_of(cluster: AirflowCluster, dag_id: str, task_id: str) -> tuple[RunRecord, list[RunRecord]]:
    """The task's one sweep and its runs, oldest first."""
    history = cluster.history()
    [parent] = [r for r in history.list_runs(dag_id=dag_id, task_id=task_id) if r.target == "hyperdrive"]
    return parent, history.child_runs(parent.id)


def alpha(record: RunRecord) -> Any:
    return json.loads(record.tags["hyperparameters"])["--alpha"]


def kill_mid_sweep(
    cluster: AirflowCluster,
    dag_id: str,
    run_id: str,
    ready: dict[str, Callable[[list[RunRecord]], bool]],
) -> dict[str, list[str]]:
    """SIGKILL the task runner of try 1 of each task once `ready` says so of its sweep's runs (and none of them
    is between being recorded and running); the ids of the runs each sweep had then."""
    history = cluster.history()
    killed: dict[str, list[str]] = {}
    deadline = time.monotonic() + 300
    while len(killed) < len(ready) and time.monotonic() < deadline:
        for task_id, condition in ready.items():
            if task_id in killed:
                continue
            ti = cluster.task_instances(dag_id, run_id).get(task_id)
            parents = [
                r for r in history.list_runs(dag_id=dag_id, task_id=task_id) if r.target == "hyperdrive"
            ]
            if ti is None or ti.state != "running" or ti.try_number != 1 or not parents:
                continue
            children = history.child_runs(parents[0].id)
            settled = all(c.status in (RunStatus.RUNNING, *TERMINAL) for c in children)
            if settled and condition(children):
                os.kill(cluster.task_runner_pid(ti), signal.SIGKILL)
                killed[task_id] = [c.id for c in children]
        time.sleep(0.1)
    if len(killed) < len(ready):
        pytest.fail(f"Not every sweep reached its kill point ({sorted(killed)}):\n{cluster.component_logs()}")
    return killed


TERMINAL = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED)


def reports(cluster: AirflowCluster, record: RunRecord) -> int:
    return len(cluster.history().get_metrics(record.id, "loss"))


GRID = [1, 1.1, 30, 31, 32, 33]


def test_a_retry_of_a_killed_sweep_resumes_it(cluster: AirflowCluster, source: Path, tmp_path: Path) -> None:
    grid_starts, random_starts = starts_dir(tmp_path, "grid"), starts_dir(tmp_path, "random")
    body = f"""
with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    retry = dict(retries=1, retry_delay=datetime.timedelta(seconds=2))
    HyperDriveOperator(
        task_id="grid",
        config=sweep(
            {str(grid_starts)!r}, 12, GridParameterSampling({{"--alpha": choice(*{GRID!r})}}),
            BanditPolicy(slack_factor=0.2, delay_evaluation=3),
        ),
        **retry,
    )
    HyperDriveOperator(
        task_id="random",
        config=sweep({str(random_starts)!r}, 6, RandomParameterSampling({{"--alpha": uniform(0, 1)}}, seed=11)),
        **retry,
    )
"""
    dag_id = cluster.write_dag(dag(source, body))
    run_id = cluster.trigger(dag_id)

    def worse_runs_reported_but_not_judged(children: list[RunRecord]) -> bool:
        # The two good runs ended; two worse ones go on, each with a report, the policy's first look to come.
        live = [c for c in children if c.status is RunStatus.RUNNING]
        return (
            len(children) == 4
            and [str(c.status) for c in children[:2]] == ["Completed", "Completed"]
            and len(live) == 2
            and all(1 <= reports(cluster, c) <= 3 for c in live)
        )

    def some_ended_some_live(children: list[RunRecord]) -> bool:
        live = [c for c in children if c.status is RunStatus.RUNNING]
        return len(children) >= 3 and len(live) >= 1 and all(reports(cluster, c) >= 1 for c in live)

    killed = kill_mid_sweep(
        cluster,
        dag_id,
        run_id,
        {"grid": worse_runs_reported_but_not_judged, "random": some_ended_some_live},
    )

    assert cluster.wait_for_dag_run(dag_id, run_id) == "success", cluster.component_logs()
    tis = cluster.task_instances(dag_id, run_id)
    for task_id in ("grid", "random"):
        assert tis[task_id].try_number == 2
        parent, children = sweep_of(cluster, dag_id, task_id)
        # One sweep, taken over by the retry: the runs of the killed try are its first ones, none started twice.
        assert (parent.status, parent.try_number) == (RunStatus.COMPLETED, 2)
        assert len(children) == 6 and all(c.parent_run_id == parent.id for c in children)
        assert [c.id for c in children[: len(killed[task_id])]] == killed[task_id]
        starts = sorted(
            p.name.rsplit("-", 1)[0] for p in (grid_starts if task_id == "grid" else random_starts).iterdir()
        )
        assert starts == sorted(repr(float(alpha(c))) for c in children)
        retry_log = cluster.task_log(dag_id, run_id, task_id, try_number=2)
        assert f"Resuming sweep {parent.id}" in retry_log
        taken_over = re.search(r"taken over: (\d+) of its (\d+) runs ended, (\d+) followed on", retry_log)
        assert taken_over is not None, retry_log
        assert int(taken_over[2]) == len(killed[task_id]) and int(taken_over[3]) >= 1

    # Grid: every point once. The policy of the retry judged with the killed try's runs: the worse runs, which
    # alone stay within the slack of each other, were all stopped against the good runs that ended before.
    _, children = sweep_of(cluster, dag_id, "grid")
    assert sorted(alpha(c) for c in children) == sorted(GRID)
    for child in children:
        if alpha(child) in (1, 1.1):
            assert child.status is RunStatus.COMPLETED
            continue
        assert child.status is RunStatus.CANCELED, (alpha(child), child.status, child.error)
        assert str(child.error).startswith("Canceled by BanditPolicy at report 4"), child.error
        assert reports(cluster, child) < 12 - 3

    # Random: the seeded sequence went on where the killed try left it.
    import optuna

    from airflow_amlrun.hyperdrive import RandomParameterSampling, uniform

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        sampler=RandomParameterSampling({"--alpha": uniform(0, 1)}, seed=11).sampler()
    )
    expected = [study.ask({"--alpha": uniform(0, 1).distribution()}).params["--alpha"] for _ in range(6)]
    _, children = sweep_of(cluster, dag_id, "random")
    assert [alpha(c) for c in children] == expected
    assert all(c.status is RunStatus.COMPLETED and reports(cluster, c) == 6 for c in children)


# The good values come first: the later runs are judged against their whole series. (The full statement, 12 runs 3
# at a time on local and docker, is test_hyperdrive.py's; here, what deferral changes.)
ALPHAS = [1, 1.05, 1.1, 40, 2, 30]
STEPS = 10


def test_a_deferred_sweep_waits_in_the_triggerer_and_its_policy_stops_the_worse_runs(
    cluster: AirflowCluster, source: Path, tmp_path: Path
) -> None:
    starts = starts_dir(tmp_path, "deferred")
    body = f"""
with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    HyperDriveOperator(
        task_id="tune",
        config=sweep(
            {str(starts)!r}, {STEPS}, GridParameterSampling({{"--alpha": choice(*{ALPHAS!r})}}),
            BanditPolicy(slack_factor=0.2, delay_evaluation=2), total=6, at_once=3,
        ),
        deferrable=True,
    )
"""
    dag_id = cluster.write_dag(dag(source, body))
    run_id = cluster.trigger(dag_id)
    deferred = 0
    while cluster.dag_run_state(dag_id, run_id) not in ("success", "failed"):
        ti = cluster.task_instances(dag_id, run_id).get("tune")
        deferred += ti is not None and ti.state == "deferred"
        time.sleep(0.3)

    state = cluster.wait_for_dag_run(dag_id, run_id)
    assert state == "success", cluster.task_log(dag_id, run_id, "tune")[-6000:] + cluster.component_logs()
    assert deferred
    log = cluster.task_log(dag_id, run_id, "tune")
    assert "are followed by the triggerer from here; the worker slot is freed" in log

    parent, children = sweep_of(cluster, dag_id, "tune")
    assert parent.status is RunStatus.COMPLETED
    assert sorted(alpha(c) for c in children) == sorted(ALPHAS)
    assert len(list(starts.iterdir())) == 6
    for child in children:
        if alpha(child) in (1, 1.05, 1.1):
            assert child.status is RunStatus.COMPLETED
            continue
        # Stopped by the policy the trigger applied, early, with the policy's reason.
        assert child.status is RunStatus.CANCELED, (alpha(child), child.status, child.error)
        assert str(child.error).startswith("Canceled by BanditPolicy at report "), child.error
        assert reports(cluster, child) < STEPS - 3

    # The same XCom as a sweep that waits in its worker: the best run's summary, every run's id and metrics.
    xcom = cluster.xcom(dag_id, run_id, "tune")
    best = next(c for c in children if alpha(c) == 1)
    assert xcom["sweep_run_id"] == parent.id and parent.tags["best_run_id"] == best.id
    assert xcom["best_run"]["run_id"] == best.id and xcom["best_run"]["tags"]["best_run"] == "true"
    assert xcom["best_run"]["metrics"] == {"loss": pytest.approx(1 * (1 + 1 / STEPS))}
    rows = {row["run_id"]: row for row in xcom["children"]}
    assert set(rows) == {c.id for c in children}
    assert [row["hyperparameters"]["--alpha"] for row in xcom["children"][:3]] == [1, 1.05, 1.1]
    for child in children:
        assert rows[child.id]["status"] == str(child.status)
        assert rows[child.id]["metrics"] == {"loss": pytest.approx(child.metrics["loss"])}
