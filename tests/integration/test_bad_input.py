"""Bad input fails before anything runs, with a clear message, and leaves no run behind."""

from __future__ import annotations

import pytest

from airflow_amlrun import Environment, Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.errors import ConfigurationError, UnknownComputeTargetError
from tests.conftest import write_script


@pytest.fixture
def source(tmp_path):
    write_script(tmp_path / "src", "train.py", "print('should never run')\n")
    return tmp_path / "src"


def assert_nothing_recorded(amlrun_home) -> None:
    assert Workspace.get().list_runs() == []
    runs_dir = amlrun_home / "runs"
    assert not runs_dir.exists() or not any(runs_dir.iterdir())
    store_runs = amlrun_home / "store" / "runs"
    assert not store_runs.exists() or not any(store_runs.iterdir())


def submit(config: ScriptRunConfig, experiment: str = "bad_input") -> None:
    Experiment(Workspace.get(), experiment).submit(config).wait_for_completion()


def test_unknown_compute_target_names_it_and_the_choices(source, amlrun_home):
    with pytest.raises(UnknownComputeTargetError, match=r"Unknown compute target 'gpu-cluster'.*'local'"):
        submit(ScriptRunConfig(source, script="train.py", compute_target="gpu-cluster"))
    assert_nothing_recorded(amlrun_home)


def test_interpreter_path_not_executable_fails_before_the_run(source, amlrun_home, tmp_path):
    env = Environment("broken")
    env.python.interpreter_path = str(tmp_path / "no-python")
    with pytest.raises(ConfigurationError, match="no-python' is not an executable file"):
        submit(ScriptRunConfig(source, script="train.py", environment=env))
    assert_nothing_recorded(amlrun_home)


def test_missing_source_directory_fails_before_the_run(tmp_path, amlrun_home):
    with pytest.raises(ConfigurationError, match="does not exist"):
        submit(ScriptRunConfig(tmp_path / "gone", script="train.py"))
    assert_nothing_recorded(amlrun_home)


def test_missing_script_fails_before_the_run(source, amlrun_home):
    with pytest.raises(ConfigurationError, match="'tarin.py' was not found"):
        submit(ScriptRunConfig(source, script="tarin.py"))
    assert_nothing_recorded(amlrun_home)


def test_invalid_experiment_name_fails_before_the_run(source, amlrun_home):
    with pytest.raises(ConfigurationError, match="Invalid experiment name 'my experiment'"):
        submit(ScriptRunConfig(source, script="train.py"), experiment="my experiment")
    assert_nothing_recorded(amlrun_home)


@pytest.mark.usefixtures("airflow_db")
def test_operator_with_an_existing_non_target_connection_says_so(run_dag, source, amlrun_home, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MY_HTTP", "http://example.invalid")
    with pytest.raises(UnknownComputeTargetError, match="connection of type 'http'"):
        submit(ScriptRunConfig(source, script="train.py", compute_target="my_http"))
    assert_nothing_recorded(amlrun_home)


def test_a_task_failing_on_its_config_logs_that_error_and_no_other(run_dag, source, amlrun_home):
    from tests.conftest import dag_source

    result = run_dag(dag_source(source, script="missing.py"))

    assert result.task_states == {"train": "failed"}
    assert "missing.py" in result.log
    # The run's extra link finds no run to link to: that is no error of its own.
    assert "XCom not found" not in result.log
    assert_nothing_recorded(amlrun_home)
