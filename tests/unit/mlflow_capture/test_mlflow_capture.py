"""How a run is pointed at the MLflow capture: its variable, and the entry point its pylib folder declares.

The capture itself runs in tests/integration/test_mlflow_capture.py, with real MLflow in real runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from airflow_amlrun import mlflow_capture
from airflow_amlrun.environment import Environment, ResolvedEnvironment
from airflow_amlrun.targets import common
from airflow_amlrun.targets.base import Job


def _job(**variables: str) -> Job:
    return Job(
        run_id="exp_1_cafe",
        experiment="exp",
        source_directory=Path("."),
        script="train.py",
        command=None,
        arguments=[],
        environment=ResolvedEnvironment(
            spec=Environment(), name="e", version=None, lock=None, build_key=None, user_managed=True
        ),
        environment_variables=variables,
        max_run_duration_seconds=None,
    )


def test_every_run_logs_to_the_capture_unless_its_own_variables_name_a_tracking_uri():
    env = common.job_environment(_job(), run_dir="/r", events_file="/r/.amlrun/events.jsonl")
    assert env["MLFLOW_TRACKING_URI"] == "amlrun:"

    own = _job(MLFLOW_TRACKING_URI="http://mlflow.example:5000")
    env = common.job_environment(own, run_dir="/r", events_file="/r/.amlrun/events.jsonl")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"


def test_the_pylib_folder_declares_the_stores_to_any_interpreter_that_has_it_on_its_path(tmp_path):
    root = common.write_run_context_package(tmp_path / "pylib")

    # -S: no site-packages, so only the folder can declare the entry points (and provide the module).
    done = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import importlib.metadata as m, json; print(json.dumps({g: [(e.name, e.value, e.load().__module__) "
            "for e in m.entry_points(group=g)] for g in ('mlflow.tracking_store', 'mlflow.model_registry_store')}))",
        ],
        env={"PYTHONPATH": str(root)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )

    assert json.loads(done.stdout) == {
        "mlflow.tracking_store": [
            ["amlrun", "airflow_amlrun.mlflow_capture:tracking_store", "airflow_amlrun.mlflow_capture"]
        ],
        "mlflow.model_registry_store": [
            ["amlrun", "airflow_amlrun.mlflow_capture:registry_store", "airflow_amlrun.mlflow_capture"]
        ],
    }
    assert (root / "airflow_amlrun" / "mlflow_capture" / "store.py").read_bytes() == (
        Path(mlflow_capture.__file__).parent / "store.py"
    ).read_bytes()
