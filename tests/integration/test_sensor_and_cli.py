"""Waiting on a run from another task, and reading the run history from a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace

AMLRUN = str(Path(sys.executable).parent / "amlrun")


@pytest.mark.usefixtures("airflow_db")
def test_deferrable_sensor_returns_the_summary_of_a_completed_run(run_dag, train_dir, amlrun_home):
    result = run_dag(f"""
        import pendulum
        from airflow.sdk import DAG
        from airflow_amlrun import ScriptRunConfig, ScriptRunOperator
        from airflow_amlrun.sensors.run_status import RunStatusSensor

        with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
            train = ScriptRunOperator(task_id="train", config=ScriptRunConfig({str(train_dir)!r}, script="train.py"))
            wait = RunStatusSensor(
                task_id="wait",
                run_id="{{{{ ti.xcom_pull(task_ids='train')['run_id'] }}}}",
                deferrable=True,
                poke_interval=1,
            )
            train >> wait
    """)
    assert result.task_states == {"train": "success", "wait": "success"}
    assert result.xcoms["wait"]["run_id"] == result.xcoms["train"]["run_id"]
    assert result.xcoms["wait"]["status"] == "Completed"


def test_cli_lists_and_shows_runs_with_metrics(amlrun_home, train_dir):
    run = Experiment(Workspace.get(), "cli_view").submit(
        ScriptRunConfig(train_dir, script="train.py", arguments=["--alpha", 2])
    )
    run.wait_for_completion(show_output=False)

    env = os.environ.copy()
    listed = subprocess.run(
        [AMLRUN, "runs", "list", "--json"], capture_output=True, text=True, env=env, check=True
    )
    [summary] = json.loads(listed.stdout)
    assert summary["run_id"] == run.id and summary["metrics"]["alpha"] == 2

    shown = subprocess.run(
        [AMLRUN, "runs", "show", run.id], capture_output=True, text=True, env=env, check=True
    )
    assert "Completed" in shown.stdout and "fold_mse" in shown.stdout and "--alpha 2" in shown.stdout

    missing = subprocess.run([AMLRUN, "runs", "show", "no_such_run"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2
    assert "No run 'no_such_run'" in missing.stderr
