"""A DAG author's view of the local target: dag.test() on a real Airflow, real processes, real databases."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import airflow_amlrun
from airflow_amlrun import Workspace, run_context
from tests.conftest import dag_source, write_script

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_training_dag_records_a_completed_run_with_metrics_outputs_and_xcom(
    run_dag, train_dir, workspace_backend
):
    result = run_dag(
        dag_source(train_dir, arguments=["--alpha", "{{ 0.25 * 2 }}"], experiment="diabetes_ridge")
    )

    assert result.state == "success"
    summary = result.xcoms["train"]
    assert set(summary) >= {
        "run_id",
        "experiment",
        "status",
        "target",
        "metrics",
        "start",
        "end",
        "duration_seconds",
        "outputs_uri",
    }
    assert summary["status"] == "Completed"
    assert summary["experiment"] == "diabetes_ridge"
    assert summary["target"] == "local"
    assert summary["metrics"]["alpha"] == 0.5
    assert 2000 < summary["metrics"]["mse"] < 5000
    assert summary["duration_seconds"] > 0

    # The script's own lines are in the task log, as it printed them.
    assert "fold 4: mse=" in result.log
    assert "model written to outputs/model.pkl" in result.log

    ws = Workspace.get()
    run = ws.get_run(summary["run_id"])
    assert run.status == "Completed"
    assert run.arguments == ["--alpha", "0.5"]
    assert run.metrics == summary["metrics"]
    assert run.dag_id == result.dag_id
    assert run.task_id == "train" and run.try_number == 1 and run.airflow_run_id
    fold_points = ws.history.get_metrics(run.id, "fold_mse")
    assert [p.step for p in fold_points] == [0, 1, 2, 3, 4]

    # Outputs were collected into the workspace store.
    model = pickle.loads(Path(summary["outputs_uri"], "model.pkl").read_bytes())
    assert model.alpha == 0.5
    assert "fold 0: mse=" in Path(run.logs_uri, "std_log.txt").read_text()


def test_offline_run_context_in_a_hand_started_script_prints_and_never_raises(tmp_path):
    import subprocess
    import sys

    write_script(
        tmp_path,
        "train.py",
        """
        from airflow_amlrun.run_context import Run
        run = Run.get_context()
        run.log("loss", 0.5, step=1)
        run.log("weird", object())
        run.tag("stage", "dev")
        run.upload_file("model.txt", "missing-file.txt")
        print("offline:", run.offline, run.metrics["loss"])
    """,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMLRUN_")}
    done = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "offline: True [0.5]" in done.stdout
    assert "[offline run] loss = 0.5 (step 1)" in done.stderr


def test_managed_environment_runs_the_script_in_its_locked_virtualenv(run_dag, tmp_path, amlrun_home):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import sys
        import tomli_w  # only in the environment's virtualenv, not on the worker
        from airflow_amlrun.run_context import Run
        Run.get_context().log("toml_len", len(tomli_w.dumps({"a": 1})))
        print("python:", sys.executable)
    """,
    )
    env = 'Environment("toml-writer", python=PythonSection(pip_requirements=["tomli-w==1.0.0"]))'
    result = run_dag(dag_source(tmp_path / "src", environment=env))
    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    assert summary["metrics"] == {"toml_len": 6}
    environment = summary["environment"]
    assert (environment["name"], environment["version"], environment["user_managed"]) == (
        "toml-writer",
        "1",
        False,
    )
    assert f"envs/{environment['build_key']}" in result.log  # the script ran on the environment's interpreter
    lock = Workspace.get().store.get_bytes(environment["lock_digest"]).decode()
    assert "tomli-w==1.0.0" in lock and "--hash=sha256:" in lock


def test_config_from_yaml_beside_the_dag_with_templated_environment_variables(run_dag, tmp_path, amlrun_home):
    from tests.conftest import DAGS_FOLDER

    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os, sys
        print("stage", os.environ["STAGE"], "seed", os.environ["SEED"], "args", sys.argv[1:])
    """,
    )
    yaml_name = f"run_{os.getpid()}_{time.monotonic_ns()}.yaml"
    (DAGS_FOLDER / yaml_name).write_text(
        f"source_directory: {tmp_path / 'src'}\nscript: train.py\narguments: [--epochs, 3]\n"
        "environment_variables: {SEED: '7'}\n"
    )
    result = run_dag(f"""
        import pendulum
        from airflow.sdk import DAG
        from airflow_amlrun import ScriptRunOperator

        with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
            ScriptRunOperator(task_id="train", config={yaml_name!r}, environment_variables={{"STAGE": "{{{{ dag.dag_id }}}}"}})
    """)
    assert result.state == "success", result.log
    assert f"stage {result.dag_id} seed 7 args ['--epochs', '3']" in result.log


def test_an_environment_spark_section_on_the_local_target_is_ignored_with_a_warning(
    run_dag, tmp_path, amlrun_home
):
    write_script(tmp_path / "src", "train.py", "print('no spark here')\n")
    env = 'Environment("with-spark", spark=SparkSection(packages=["org.apache.spark:spark-avro_2.12:3.5.1"]))'
    result = run_dag(dag_source(tmp_path / "src", environment=env))
    assert result.state == "success", result.log
    assert (
        "Environment 'with-spark' has a spark section (org.apache.spark:spark-avro_2.12:3.5.1), which the "
        "local target 'local' ignores" in result.log
    )
    assert "no spark here" in result.log


def test_a_script_on_another_path_to_the_workers_python_imports_the_whole_installed_package(
    run_dag, tmp_path, amlrun_home
):
    # The worker's virtualenv, where airflow_amlrun is installed, named by another of its links (python3 for
    # python): the local target cannot tell it is its own interpreter, so the run gets the run folder's copy of
    # run_context first on its path, which must not stand in for the installed package.
    here = Path(sys.executable)
    python = next(
        str(here.with_name(name))
        for name in ("python3", "python", f"python{sys.version_info.major}.{sys.version_info.minor}")
        if here.with_name(name).exists() and str(here.with_name(name)) != sys.executable
    )
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import sys
        import airflow_amlrun
        from airflow_amlrun import Workspace, run_context

        run_context.Run.get_context().log("accuracy", 0.9)
        print("python:", sys.executable)
        print("airflow_amlrun:", airflow_amlrun.__file__, airflow_amlrun.__version__, Workspace.__module__)
        """,
    )
    env = f'Environment("workers-venv", python=PythonSection(interpreter_path={python!r}))'

    result = run_dag(dag_source(tmp_path / "src", environment=env))

    assert result.state == "success", result.log
    assert f"python: {python}" in result.log
    installed = Path(airflow_amlrun.__file__)
    assert f"airflow_amlrun: {installed} {airflow_amlrun.__version__} airflow_amlrun.workspace" in result.log
    run = Workspace.get().get_run(result.xcoms["train"]["run_id"])
    assert run.status == "Completed"
    assert run.metrics == {"accuracy": 0.9}


def test_a_script_on_an_interpreter_with_an_older_airflow_amlrun_still_records_its_metrics(
    run_dag, tmp_path, amlrun_home
):
    # A virtualenv with an older airflow-amlrun, whose run_context knows nothing of the worker's events file (it
    # declares no run protocol) and prints what the script logs: the run must use the worker's run_context, and
    # say why.
    venv = tmp_path / "old-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "airflow_amlrun").mkdir()
    (site / "airflow_amlrun" / "__init__.py").write_text('__version__ = "0.0.1"\n')
    (site / "airflow_amlrun" / "run_context.py").write_text(
        textwrap.dedent("""
        class Run:
            @classmethod
            def get_context(cls):
                return cls()

            def log(self, name, value, step=None):
                print("offline:", name, value)
        """)
    )
    write_script(
        tmp_path / "src",
        "train.py",
        """
        from airflow_amlrun import run_context

        run_context.Run.get_context().log("accuracy", 0.9)
        """,
    )
    python = str(venv / "bin" / "python")
    env = f'Environment("old-venv", python=PythonSection(interpreter_path={python!r}))'

    result = run_dag(dag_source(tmp_path / "src", environment=env))

    assert result.state == "success", result.log
    run = Workspace.get().get_run(result.xcoms["train"]["run_id"])
    assert run.status == "Completed"
    assert run.metrics == {"accuracy": 0.9}
    assert "offline: accuracy" not in result.log
    assert (
        f"this interpreter has airflow-amlrun 0.0.1 installed ({site / 'airflow_amlrun' / '__init__.py'}), whose "
        "run_context declares no run protocol, and the worker that started the run speaks run protocol "
        f"{run_context.RUN_PROTOCOL}: the script gets the worker's airflow_amlrun.run_context" in result.log
    )
