"""Retrain every week on the data collected so far, and promote the new model only if it is better.

Each run trains the ridge model of `train_diabetes/` on the data up to its logical date, then compares the
run's mean squared error with the run behind the model labelled `production`: a better one is registered as a
new version of `diabetes-ridge` and gets the label; a worse one is not, and the run's `promotion` tag (and the
task's XCom) says why. The first run promotes, as nothing has the label yet.

Try another alpha from the UI ("Trigger DAG w/ config": {"alpha": 0.01}).
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG(
    dag_id="scheduled_retraining",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # One promotion at a time: a manual run beside the weekly one waits its turn.
    max_active_runs=1,
    params={"alpha": Param(0.5, type="number", minimum=0)},
    tags=["amlrun", "example"],
    doc_md=__doc__,
) as dag:
    train = ScriptRunOperator(
        task_id="train",
        experiment="diabetes_retraining",
        config=ScriptRunConfig(
            source_directory="train_diabetes",  # relative to this file
            script="train.py",
            compute_target="local",
            max_run_duration_seconds=600,
        ),
        arguments=["--alpha", "{{ params.alpha }}", "--as-of", "{{ ds }}"],
    )

    @task
    def promote(summary: dict[str, Any]) -> dict[str, Any]:
        """Register and label the new model if its mse beats production's; say why either way."""
        from airflow_amlrun import Workspace
        from airflow_amlrun.model import promote_if_better

        decision = promote_if_better(
            Workspace.get(),
            summary["run_id"],
            "diabetes-ridge",
            "outputs/model.pkl",
            metric="mse",
            goal="minimize",
            tags={"alpha": summary["metrics"].get("alpha")},
        )
        print(decision.reason)
        return decision.to_dict()

    promote(train.output)
