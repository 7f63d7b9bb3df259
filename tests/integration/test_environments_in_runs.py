"""Runs name their environment: a curated one, a registered version, a label."""

from __future__ import annotations

from airflow_amlrun import Environment, Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.environment import PythonSection
from tests.conftest import write_script


def run_with(source, environment):  # type: ignore[no-untyped-def]
    lines: list[str] = []
    record = (
        Experiment(Workspace.get(), "env_runs")
        .submit(ScriptRunConfig(source, script="train.py", environment=environment))
        .wait_for_completion(output=lines.append)
    )
    return record, lines


def test_curated_environment_by_name_runs_in_its_own_virtualenv(amlrun_home, tmp_path):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import importlib.util, sys
        from airflow_amlrun.run_context import Run
        Run.get_context().log("has_sklearn", importlib.util.find_spec("sklearn") is not None)
        print("prefix", sys.prefix)
    """,
    )
    record, lines = run_with(tmp_path / "src", "amlrun-minimal")

    assert record.status == "Completed"
    assert record.environment["name"] == "amlrun-minimal" and record.environment["version"] == "1"
    assert record.metrics == {"has_sklearn": False}  # the worker's packages do not leak in
    assert str(amlrun_home / "cache" / "envs") in lines[0]


def test_registered_version_and_label_are_resolved_by_name(amlrun_home, tmp_path):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        from importlib.metadata import version
        print("tomli-w", version("tomli-w"))
    """,
    )
    ws = Workspace.get()
    Environment("toml-env", python=PythonSection(pip_requirements=["tomli-w==1.0.0"])).register(ws)
    Environment("toml-env", python=PythonSection(pip_requirements=["tomli-w==1.1.0"])).register(ws)
    Environment.set_label(ws, "toml-env", "1", "prod")

    assert run_with(tmp_path / "src", "toml-env:1")[1] == ["tomli-w 1.0.0"]
    assert run_with(tmp_path / "src", "toml-env@prod")[1] == ["tomli-w 1.0.0"]
    latest, lines = run_with(tmp_path / "src", "toml-env")
    assert lines == ["tomli-w 1.1.0"]
    assert latest.summary()["environment"]["version"] == "2"
