"""An Estimator written for Azure ML runs as a DAG task: ScriptRunOperator(config=SKLearn(...)) on the local
target, with the worker's own interpreter (user-managed: no framework is installed for the test)."""

from __future__ import annotations

from airflow_amlrun import Workspace

DAG = """
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import SKLearn, ScriptRunOperator

with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    ScriptRunOperator(
        task_id="train",
        experiment="estimators",
        config=SKLearn(
            source_directory="src",
            entry_script="train.py",
            script_params={"--alpha": 0.5, "--standardize": None},
            user_managed=True,
            environment_variables={"DATA_SEED": "7"},
        ),
    )
"""

TRAIN = """
import argparse
import os

import numpy as np
from sklearn.linear_model import Ridge

from airflow_amlrun.run_context import Run

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float)
parser.add_argument("--standardize", action="store_true")
args = parser.parse_args()
rng = np.random.default_rng(int(os.environ["DATA_SEED"]))
x = rng.normal(size=(50, 3))
y = x @ np.array([1.0, 2.0, 3.0])
model = Ridge(alpha=args.alpha).fit(x, y)
Run.get_context().log("r2", float(model.score(x, y)))
print(f"alpha {args.alpha}, standardize {args.standardize}")
"""


def test_an_sklearn_estimator_runs_as_a_task(run_dag, amlrun_home):
    result = run_dag(DAG, beside={"src/train.py": TRAIN})
    assert result.task_states == {"train": "success"}, result.log[-3000:]
    summary = result.xcoms["train"]
    assert summary["status"] == "Completed" and summary["metrics"]["r2"] > 0.9
    assert "alpha 0.5, standardize True" in result.log
    run = Workspace.get().get_run(summary["run_id"])
    assert run.arguments == ["--alpha", "0.5", "--standardize"]
    assert run.environment is not None and run.environment["name"] == "scikit-learn-user-managed"
    assert run.config is not None and run.config["environment_variables"] == {"DATA_SEED": "7"}
