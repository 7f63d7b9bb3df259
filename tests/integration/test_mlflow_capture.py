"""A script that logs with MLflow, unchanged, is recorded in its run: real MLflow in a real environment.

The environments are real builds from the package index (mlflow and scikit-learn: about 600 MB, a few
seconds to install from uv's cache, longer the very first time). They are built in a cache that outlives the
session (``$AMLRUN_CACHE/test-envs``, ``~/.cache/amlrun`` by default, as scripts/docker.sh keeps its image),
so that a second session only resolves the lock again and finds the build made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_amlrun import Environment, Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.environment import PythonSection
from tests.conftest import write_script

pytest_plugins = ["tests.integration.docker_engine"]

ENV_CACHE = Path(os.environ.get("AMLRUN_CACHE") or Path.home() / ".cache" / "amlrun") / "test-envs"
MLFLOW_SKLEARN = Environment(
    "mlflow-sklearn", python=PythonSection(pip_requirements=["mlflow==3.17.2", "scikit-learn==1.9.1"])
)
# The client alone (no server, no model flavours' dependencies): enough for the tracking calls in a container.
MLFLOW_SKINNY = Environment("mlflow-skinny", python=PythonSection(pip_requirements=["mlflow-skinny==3.17.2"]))

# An MLflow training script as found in the wild: nothing of airflow_amlrun in it.
TRAIN = """
import mlflow
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split

mlflow.sklearn.autolog()
X, y = load_diabetes(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0)

with mlflow.start_run(run_name="ridge") as run:
    print("mlflow run", run.info.run_id, "tracking", mlflow.get_tracking_uri())
    mlflow.log_param("data", "diabetes")
    mlflow.set_tag("team", "forecasting")
    mlflow.set_tag("amlrun.stage", "candidate")  # a name the provider keeps for its own tags
    for epoch in range(3):
        mlflow.log_metric("loss", 1.0 / (epoch + 1), step=epoch)
    mlflow.log_metrics({"rows": float(len(X)), "features": float(X.shape[1])})
    with open("notes.txt", "w") as notes:
        notes.write("trained on diabetes")
    mlflow.log_artifact("notes.txt", artifact_path="docs")

    model = Ridge(alpha=0.5).fit(X_train, y_train)
    mlflow.log_metric("test_r2", model.score(X_test, y_test))

    with mlflow.start_run(run_name="holdout", nested=True):
        mlflow.log_param("split", "test")
        mlflow.log_metric("r2", model.score(X_test, y_test))

    try:
        mlflow.register_model(f"runs:/{run.info.run_id}/model", "diabetes-ridge")
    except mlflow.exceptions.MlflowException as err:
        print("register_model:", err)
"""


@pytest.fixture
def workspace(amlrun_home: Path) -> Iterator[Workspace]:
    """A fresh workspace whose environment builds are those of earlier sessions."""
    ws = Workspace(f"sqlite:///{amlrun_home}/history.db", str(amlrun_home / "store"), cache_dir=ENV_CACHE)
    yield ws
    ws.history.dispose()


def test_an_unchanged_mlflow_script_with_sklearn_autolog_is_recorded_in_its_run(workspace, tmp_path):
    write_script(tmp_path / "src", "train.py", TRAIN)
    lines: list[str] = []

    record = (
        Experiment(workspace, "mlflow_capture")
        .submit(ScriptRunConfig(tmp_path / "src", script="train.py", environment=MLFLOW_SKLEARN))
        .wait_for_completion(output=lines.append)
    )

    assert record.status == "Completed", "\n".join(lines)
    # The script's MLflow run is the run: same id, and it knows where it logs.
    assert f"mlflow run {record.id} tracking amlrun:" in lines
    history = workspace.history
    assert [(p.step, p.value) for p in history.get_metrics(record.id, "loss")] == [
        (0, 1.0),
        (1, 0.5),
        (2, 1 / 3),
    ]
    metrics = record.metrics
    assert metrics["rows"] == 442.0 and metrics["features"] == 10.0
    assert 0.3 < metrics["test_r2"] < 0.5
    # autolog's training metrics, once each though log_model logs them again for its model.
    assert 0.4 < metrics["training_r2_score"] < 0.6
    assert [p.step for p in history.get_metrics(record.id, "training_r2_score")] == [0]
    tags = record.tags
    # Params as tags param.<key>: the script's own, and the estimator's that autolog logs.
    assert tags["param.data"] == "diabetes"
    assert tags["param.alpha"] == "0.5" and tags["param.fit_intercept"] == "True"
    assert tags["team"] == "forecasting"
    # A tag in the provider's own names is not recorded, and the script goes on, told why.
    assert "amlrun.stage" not in tags
    assert (
        "amlrun: WARNING: mlflow tag 'amlrun.stage' is not recorded in the run history: names starting with "
        "'amlrun.' are the provider's own. Rename the tag to keep it there."
    ) in lines
    assert tags["estimator_name"] == "Ridge"
    assert tags["mlflow.runName"] == "ridge"
    assert tags["model.model"] == "outputs/model"
    assert not {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} & set(tags)
    # The nested run, inside the run under its name.
    assert tags["holdout/param.split"] == "test"
    assert metrics["holdout/r2"] == metrics["test_r2"]
    assert any("MLflow run 'holdout' is recorded in run" in line for line in lines)
    # MLflow's registry is refused with what to do instead, and the run goes on.
    assert any(
        line.startswith("register_model: MLflow's model registry is not available")
        and "register_model(" in line
        for line in lines
    )
    # Artifacts and the model are among the run's collected outputs.
    outputs = Path(str(record.outputs_uri))
    assert (outputs / "docs" / "notes.txt").read_text() == "trained on diabetes"
    assert {"MLmodel", "model.pkl", "requirements.txt"} <= {p.name for p in (outputs / "model").iterdir()}
    assert "flavors:" in (outputs / "model" / "MLmodel").read_text()


def test_a_tracking_uri_of_the_runs_own_wins(workspace, tmp_path):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import mlflow
        print("tracking", mlflow.get_tracking_uri())
        mlflow.log_metric("elsewhere", 1.0)
    """,
    )
    config = ScriptRunConfig(
        tmp_path / "src",
        script="train.py",
        environment=MLFLOW_SKLEARN,
        environment_variables={"MLFLOW_TRACKING_URI": "file:./mlruns", "MLFLOW_ALLOW_FILE_STORE": "true"},
    )
    lines: list[str] = []

    record = Experiment(workspace, "mlflow_own").submit(config).wait_for_completion(output=lines.append)

    assert record.status == "Completed", "\n".join(lines)
    assert "tracking file:./mlruns" in lines
    assert record.metrics == {}
    assert not any(key.startswith("param.") for key in record.tags)


def test_mlflow_in_a_container_is_recorded_through_the_same_pylib(docker_home, workspace, tmp_path):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import mlflow
        mlflow.log_param("lr", 0.1)
        mlflow.set_tag("where", "container")
        mlflow.log_metrics({"loss": 0.5, "acc": 0.9}, step=7)
        with open("weights.json", "w") as f:
            f.write('{"w": 1}')
        mlflow.log_artifact("weights.json")
        print("run", mlflow.active_run().info.run_id)
    """,
    )
    config = ScriptRunConfig(
        tmp_path / "src", script="train.py", compute_target="docker", environment=MLFLOW_SKINNY
    )
    lines: list[str] = []

    record = Experiment(workspace, "mlflow_docker").submit(config).wait_for_completion(output=lines.append)

    assert record.status == "Completed", "\n".join(lines)
    assert f"run {record.id}" in lines
    assert record.metrics == {"loss": 0.5, "acc": 0.9}
    assert [p.step for p in workspace.history.get_metrics(record.id, "acc")] == [7]
    assert record.tags["param.lr"] == "0.1" and record.tags["where"] == "container"
    assert json.loads(Path(str(record.outputs_uri), "weights.json").read_text()) == {"w": 1}
