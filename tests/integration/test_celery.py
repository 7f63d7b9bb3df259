"""ScriptRunOperator tasks on CeleryExecutor with two workers: parallel tasks spread over the workers and all
their runs land, complete, in the one workspace the deployment shares."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_script
from tests.integration.airflow_cluster import AirflowCluster

pytestmark = pytest.mark.timeout(1200)

TASKS = 10
STEPS = 8


@pytest.fixture(scope="module")
def cluster() -> Iterator[AirflowCluster]:
    # Five slots a worker: ten tasks queued at once cannot all be taken by one of them. Ten tasks starting
    # together load this machine's two cores: the heartbeat timeout leaves them room.
    with AirflowCluster(
        executor="CeleryExecutor",
        celery_workers=2,
        worker_concurrency=TASKS // 2,
        parallelism=TASKS,
        heartbeat_timeout=90,
    ) as started:
        yield started


def test_parallel_tasks_spread_over_both_workers_and_record_every_run(
    cluster: AirflowCluster, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        f"""
        import sys, time
        from airflow_amlrun.run_context import Run

        shard = int(sys.argv[1])
        run = Run.get_context()
        for step in range({STEPS}):
            print(f"shard {{shard}} line {{step}}", flush=True)
            run.log("loss", shard + 1 / (step + 1), step=step)
            time.sleep(0.5)
        run.log("shard", shard)
        """,
    )
    dag_id = cluster.write_dag(
        f"""
        import pendulum
        from airflow.sdk import DAG
        from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

        with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
            for shard in range({TASKS}):
                ScriptRunOperator(
                    task_id=f"train_{{shard}}",
                    config=ScriptRunConfig({str(source)!r}, script="train.py"),
                    arguments=[str(shard)],
                )
        """
    )
    run_id = cluster.trigger(dag_id)

    assert cluster.wait_for_dag_run(dag_id, run_id) == "success"
    tis = cluster.task_instances(dag_id, run_id)
    assert {ti.state for ti in tis.values()} == {"success"} and len(tis) == TASKS
    machine = os.uname().nodename
    assert {ti.hostname for ti in tis.values()} == {f"w1@{machine}", f"w2@{machine}"}

    history = cluster.history()
    runs = history.list_runs(dag_id=dag_id)
    assert sorted(str(run.task_id) for run in runs) == sorted(f"train_{shard}" for shard in range(TASKS))
    assert {run.experiment for run in runs} == {dag_id}
    for run in runs:
        task_id = str(run.task_id)
        shard = int(task_id.removeprefix("train_"))
        assert run.status == "Completed", (run.id, run.error)
        log = Path(str(run.logs_uri), "std_log.txt").read_text().splitlines()
        assert [line for line in log if line.startswith("shard")] == [
            f"shard {shard} line {step}" for step in range(STEPS)
        ]
        assert [p.step for p in history.get_metrics(run.id, "loss")] == list(range(STEPS))
        assert run.metrics["shard"] == shard
        assert f"shard {shard} line {STEPS - 1}" in cluster.task_log(dag_id, run_id, task_id)
