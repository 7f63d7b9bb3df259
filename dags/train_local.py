"""Train a ridge regression on the local target, tracked in the run history.

Trigger it with another alpha from the UI ("Trigger DAG w/ config": {"alpha": 2.0}) to compare runs.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG(
    dag_id="train_local",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"alpha": Param(0.5, type="number", minimum=0)},
    tags=["amlrun", "example"],
    doc_md=__doc__,
) as dag:
    ScriptRunOperator(
        task_id="train",
        experiment="diabetes_ridge",
        config=ScriptRunConfig(
            source_directory="train_diabetes",  # relative to this file
            script="train.py",
            compute_target="local",
            max_run_duration_seconds=600,
        ),
        arguments=["--alpha", "{{ params.alpha }}"],
    )
