"""ScriptRunConfig refuses what cannot run, with an error that names the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_amlrun import Environment, ScriptRunConfig
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.experiment import check_experiment_name, experiment_name_from
from airflow_amlrun.runconfig import render_tags


def test_script_and_command_together_are_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="exactly one of script= .* or command="):
        ScriptRunConfig(tmp_path, script="train.py", command="python train.py")


def test_neither_script_nor_command_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="script=None and command=None"):
        ScriptRunConfig(tmp_path)


def test_a_compute_target_named_as_a_sweeps_parent_run_is_refused_naming_the_rename(tmp_path):
    with pytest.raises(ConfigurationError) as err:
        ScriptRunConfig(tmp_path, script="train.py", compute_target="hyperdrive")
    message = str(err.value)
    assert message.startswith("compute_target 'hyperdrive' is the target the run history records for a sweep")
    assert "rename the Airflow connection 'hyperdrive'" in message
    # Only that name: a connection id that merely contains it is any other.
    assert ScriptRunConfig(tmp_path, script="train.py", compute_target="hyperdrive_vm").compute_target


@pytest.mark.parametrize("script", ["../x.py", "sub/../../x.py", "/abs/train.py"])
def test_script_outside_the_source_directory_is_refused(tmp_path, script):
    with pytest.raises(ConfigurationError, match=r"'\.\.'|absolute path") as err:
        ScriptRunConfig(tmp_path, script=script)
    assert repr(script) in str(err.value)


def test_script_escaping_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "outside.py").write_text("print(1)")
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.py").symlink_to(tmp_path / "outside.py")
    with pytest.raises(ConfigurationError, match="outside source_directory"):
        ScriptRunConfig(src, script="train.py").resolved()


def test_missing_source_directory_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigurationError, match="does not exist") as err:
        ScriptRunConfig(missing, script="train.py").resolved()
    assert str(missing) in str(err.value)


def test_source_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "train.py").write_text("")
    with pytest.raises(ConfigurationError, match="is a file, not a directory"):
        ScriptRunConfig(tmp_path / "train.py", script="train.py").resolved()


def test_missing_script_lists_what_is_there(tmp_path):
    (tmp_path / "trian.py").write_text("")
    with pytest.raises(ConfigurationError, match=r"'train.py' was not found .* Files there: trian.py"):
        ScriptRunConfig(tmp_path, script="train.py").resolved()


def test_relative_source_directory_starts_at_the_base_dir(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("")
    config = ScriptRunConfig("src", script="train.py").resolved(base_dir=tmp_path)
    assert config.source_directory == str((tmp_path / "src").resolve())


@pytest.mark.parametrize("bad", [{"lr": 0.1}, None, object(), float("nan")])
def test_arguments_that_cannot_be_rendered_are_refused(tmp_path, bad):
    with pytest.raises(ConfigurationError, match=r"arguments\[1\] = .* cannot be passed to a script"):
        ScriptRunConfig(tmp_path, script="train.py", arguments=["--x", bad])


def test_arguments_given_as_one_string_are_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="must be a list"):
        ScriptRunConfig(tmp_path, script="train.py", arguments="--alpha 0.5")  # type: ignore[arg-type]


def test_numbers_booleans_and_paths_become_strings(tmp_path):
    config = ScriptRunConfig(tmp_path, script="t.py", arguments=["--a", 0.5, "--n", 3, True, Path("d/e")])
    assert config.arguments == ["--a", "0.5", "--n", "3", "True", "d/e"]


@pytest.mark.parametrize("limit", [0, -5, "10", True])
def test_non_positive_max_duration_is_refused(tmp_path, limit):
    with pytest.raises(ConfigurationError, match="max_run_duration_seconds"):
        ScriptRunConfig(tmp_path, script="t.py", max_run_duration_seconds=limit)


def test_environment_variable_with_a_bad_name_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="invalid name 'A=B'"):
        ScriptRunConfig(tmp_path, script="t.py", environment_variables={"A=B": "1"})


def test_interpreter_path_that_is_not_executable_is_refused(tmp_path):
    env = Environment("mine")
    env.python.interpreter_path = str(tmp_path / "python9")
    with pytest.raises(ConfigurationError, match="interpreter_path .*python9' is not an executable file"):
        env.local_interpreter()


@pytest.mark.parametrize("name", ["ab", "a" * 37, "_lead", "-lead", "has space", "dots.are.bad", "", None])
def test_invalid_experiment_names_are_refused(name):
    with pytest.raises(ConfigurationError, match="Invalid experiment name"):
        check_experiment_name(name)


@pytest.mark.parametrize("name", ["abc", "A" * 36, "9lives", "diabetes_ridge-2"])
def test_valid_experiment_names_pass(name):
    assert check_experiment_name(name) == name


def test_experiment_name_derived_from_a_dag_id_is_valid():
    assert experiment_name_from("team.daily retrain") == "team_daily_retrain"
    assert experiment_name_from("x") == "x_runs"
    assert len(experiment_name_from("d" * 80)) == 36


def test_yaml_round_trip_keeps_every_field(tmp_path):
    (tmp_path / "src").mkdir()
    env = Environment("mine", environment_variables={"A": "1"})
    config = ScriptRunConfig(
        "src",
        script="train.py",
        arguments=["--alpha", 1],
        environment=env,
        max_run_duration_seconds=60,
        environment_variables={"B": "2"},
        framework="pyspark",
    )
    config.to_yaml(tmp_path / "run.yaml")
    loaded = ScriptRunConfig.from_yaml(tmp_path / "run.yaml")
    assert loaded.source_directory == str(tmp_path / "src")  # relative to the YAML file
    assert loaded.arguments == ["--alpha", "1"]
    assert loaded.max_run_duration_seconds == 60
    assert loaded.environment_variables == {"B": "2"}
    assert loaded.framework == "pyspark"
    assert isinstance(loaded.environment, Environment)
    assert loaded.environment.name == "mine"
    assert loaded.environment.environment_variables == {"A": "1"}


def test_yaml_with_an_unknown_field_names_it(tmp_path):
    (tmp_path / "run.yaml").write_text("source_directory: .\nscript: t.py\nscirpt_args: [1]\n")
    with pytest.raises(ConfigurationError, match="Unknown ScriptRunConfig field.*'scirpt_args'"):
        ScriptRunConfig.from_yaml(tmp_path / "run.yaml")


@pytest.mark.parametrize("field", ["snapshot_max_size_mb", "snapshot_max_files"])
def test_non_positive_snapshot_limits_are_refused(tmp_path, field):
    with pytest.raises(ConfigurationError, match=f"{field}=0 must be a positive number"):
        ScriptRunConfig(tmp_path, script="t.py", **{field: 0})


def test_the_framework_defaults_to_python_and_an_unknown_one_is_refused_with_the_choices(tmp_path):
    assert ScriptRunConfig(tmp_path, script="train.py").framework == "python"
    assert ScriptRunConfig(tmp_path, script="train.py", framework="pyspark").framework == "pyspark"
    with pytest.raises(
        ConfigurationError, match=r"framework='spark' is not one amlrun runs: use 'python' or 'pyspark'"
    ):
        ScriptRunConfig(tmp_path, script="train.py", framework="spark")
    with pytest.raises(
        ConfigurationError, match=r"framework='pyspark' runs a Python script with Spark: give script="
    ):
        ScriptRunConfig(tmp_path, command="echo hi", framework="pyspark")


def test_spark_configuration_takes_spark_properties_with_scalar_values_only():
    env = Environment.from_dict(
        {"name": "s", "spark": {"configuration": {"spark.executor.memory": "1g", "spark.ui.enabled": False}}}
    )
    assert env.spark.configuration == {"spark.executor.memory": "1g", "spark.ui.enabled": "false"}
    assert Environment.from_dict(env.to_dict()).spark.configuration == env.spark.configuration
    # An environment without configuration keeps the spec hash it had before the field existed.
    assert "configuration" not in Environment("plain").to_dict()["spark"]
    with pytest.raises(
        ConfigurationError, match=r"key 'executor.memory' is not a Spark property: keys start with 'spark.'"
    ):
        Environment.from_dict({"name": "s", "spark": {"configuration": {"executor.memory": "1g"}}})
    with pytest.raises(
        ConfigurationError,
        match=r"spark.configuration\['spark.jars'\] = \['a.jar'\] must be a string, number or boolean",
    ):
        Environment.from_dict({"name": "s", "spark": {"configuration": {"spark.jars": ["a.jar"]}}})
    with pytest.raises(
        ConfigurationError, match=r"spark.configuration must be a mapping of Spark properties"
    ):
        Environment.from_dict({"name": "s", "spark": {"configuration": ["spark.a=1"]}})


def test_a_tag_in_the_providers_own_names_is_refused_naming_it_and_the_fix():
    with pytest.raises(
        ConfigurationError,
        match=r"tags has the name 'amlrun\.settled_by', which starts with 'amlrun\.'.*Choose another name",
    ):
        render_tags({"team": "vision", "amlrun.settled_by": "me"})
    assert render_tags({"team": "vision", "amlrunner": 1}) == {"team": "vision", "amlrunner": "1"}
    # A model's tags are its own: the provider keeps no names there.
    assert render_tags({"amlrun.source": "run 7"}, of_run=False) == {"amlrun.source": "run 7"}
