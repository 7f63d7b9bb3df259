"""Relative paths in a DAG file start at the DAG file's folder, whichever directory Airflow runs from: a DAG
with its training code and requirements file beside it, run by dag.test() and parsed by Airflow's DagBag
from another working directory."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from airflow_amlrun import Workspace

pytestmark = pytest.mark.usefixtures("airflow_db")

TRAIN = """\
import tomli_w  # only in the environment's virtualenv, not on the worker
from airflow_amlrun.run_context import Run
Run.get_context().log("toml_len", len(tomli_w.dumps({"a": 1})))
"""

DAG_WITH_FILES_BESIDE_IT = """
    import pendulum
    from airflow.sdk import DAG
    from airflow_amlrun import Environment, ScriptRunConfig, ScriptRunOperator

    env = Environment.from_pip_requirements("beside-the-dag", "src/requirements.txt")

    with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
        ScriptRunOperator(
            task_id="train", config=ScriptRunConfig("src", script="train.py", environment=env)
        )
"""


def test_a_dag_reads_its_requirements_file_beside_it_from_another_working_directory(
    run_dag, amlrun_home, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # neither the DAG's folder nor its parent

    result = run_dag(
        DAG_WITH_FILES_BESIDE_IT,
        beside={"src/train.py": TRAIN, "src/requirements.txt": "tomli-w==1.0.0\n"},
    )

    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    assert summary["status"] == "Completed"
    assert summary["metrics"] == {"toml_len": 6}  # tomli_w was installed, and imported by the script
    environment = summary["environment"]
    assert (environment["name"], environment["user_managed"]) == ("beside-the-dag", False)
    lock = Workspace.get().store.get_bytes(environment["lock_digest"]).decode()
    assert "tomli-w==1.0.0" in lock


def parse_errors(dag_file: Path) -> str:
    """What Airflow shows for a DAG file that fails to load: its DagBag's import error."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=dag_file, safe_mode=False)
    assert not bag.dags
    return "\n".join(str(error) for error in bag.import_errors.values())


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            "requirement.txt",
            "Requirements file 'src/requirement.txt' does not exist (relative to '{folder}', the folder of the "
            "DAG file 'train.py': relative paths in a DAG file start at its folder, whichever directory Airflow "
            "parses or runs it from; looked for '{folder}/src/requirement.txt'). Check the path, or give an "
            "absolute one.",
        ),
        (
            "environment.yml",
            "Requirements file '{folder}/src/environment.yml' is a conda environment file (it has a 'name:' "
            "line), not a pip requirements file: use Environment.from_conda_specification('train', "
            "'src/environment.yml').",
        ),
    ],
    ids=["missing", "a conda file"],
)
def test_a_dag_naming_a_wrong_requirements_file_fails_to_load_saying_what_to_do(
    tmp_path, monkeypatch, given, message
):
    folder = tmp_path / "dags"  # not the session's DAG folder, which every dag.test() parses
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "requirements.txt").write_text("tomli-w==1.0.0\n")
    (folder / "src" / "environment.yml").write_text("name: train\ndependencies:\n  - pip:\n    - tomli-w\n")
    dag_file = folder / "train.py"
    dag_file.write_text(
        textwrap.dedent(f"""
            from airflow.sdk import DAG
            from airflow_amlrun import Environment
            env = Environment.from_pip_requirements("train", "src/{given}")
        """)
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    assert message.format(folder=folder) in parse_errors(dag_file)
