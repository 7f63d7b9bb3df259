"""Estimators become the ScriptRunConfig and Environment they stand for; what cannot map is refused, naming
the argument and what to do instead. No framework is installed: only the specs are looked at."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_amlrun import Environment, Estimator, PyTorch, SKLearn, TensorFlow
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.hyperdrive import HyperDriveConfig, RandomParameterSampling, uniform


@pytest.fixture
def src(tmp_path: Path) -> Path:
    (tmp_path / "train.py").write_text("print('hi')\n")
    return tmp_path


def test_a_plain_estimator_is_a_script_run_config_with_its_params_as_arguments(src):
    est = Estimator(
        src,
        "train.py",
        script_params={"--alpha": 0.1, "--verbose": None, "--mode": "fast"},
        environment_variables={"SEED": 3},
        max_run_duration_seconds=600,
    )
    config = est.run_config
    assert (config.script, config.compute_target) == ("train.py", "local")
    assert config.arguments == ["--alpha", "0.1", "--verbose", "--mode", "fast"]
    assert config.environment_variables == {"SEED": "3"} and config.max_run_duration_seconds == 600
    # Nothing asked for: the worker's own interpreter, as a ScriptRunConfig without an environment.
    assert config.environment is None and est.environment is None


def test_pip_packages_make_a_managed_environment(src):
    est = Estimator(src, "train.py", pip_packages=["pandas>=2"], conda_packages=["python=3.11", "pip"])
    env = est.run_config.environment
    assert isinstance(env, Environment) and env.name == "estimator" and not env.user_managed
    assert env.python.pip_requirements == ["pandas>=2"] and env.python.version == "3.11"


@pytest.mark.parametrize(
    ("flavour", "curated", "framework"),
    [
        (SKLearn, "amlrun-sklearn", "scikit-learn>=1.4"),
        (PyTorch, "amlrun-pytorch", "torch>=2.4"),
        (TensorFlow, "amlrun-tensorflow", "tensorflow>=2.16"),
    ],
)
def test_a_flavour_runs_in_its_curated_environment_by_name(src, flavour, curated, framework):
    est = flavour(src, entry_script="train.py", script_params={"--epochs": 2})
    assert est.run_config.environment == curated
    assert est.environment is not None and framework in est.environment.python.pip_requirements
    assert est.run_config.arguments == ["--epochs", "2"]


@pytest.mark.parametrize(
    ("flavour", "version", "pinned", "name"),
    [
        (SKLearn, "1.5", "scikit-learn==1.5.*", "sklearn-estimator"),
        (PyTorch, "2.5.1", "torch==2.5.1", "pytorch-estimator"),
        (TensorFlow, "2.17", "tensorflow==2.17.*", "tensorflow-estimator"),
    ],
)
def test_a_framework_version_pins_the_framework_in_a_copy_of_the_curated_spec(
    src, flavour, version, pinned, name
):
    est = flavour(src, "train.py", framework_version=version, pip_packages=["mlflow"])
    env = est.run_config.environment
    assert isinstance(env, Environment) and env.name == name
    assert env.python.pip_requirements[0] == pinned and env.python.pip_requirements[-1] == "mlflow"
    assert "numpy>=1.26" in env.python.pip_requirements


def test_tensorflow_on_a_gpu_target_asks_for_its_gpu_build(src):
    env = TensorFlow(src, "train.py", use_gpu=True, compute_target="gpu_box").run_config.environment
    assert isinstance(env, Environment) and env.python.pip_requirements[0] == "tensorflow[and-cuda]>=2.16"
    # PyTorch's wheels use a GPU as they are.
    env = PyTorch(src, "train.py", use_gpu=True, compute_target="gpu_box").run_config.environment
    assert isinstance(env, Environment) and env.python.pip_requirements[0] == "torch>=2.4"


def test_docker_settings_map_to_the_docker_target_and_the_image(src):
    est = Estimator(src, "train.py", use_docker=True, custom_docker_image="amlrun-base:py3.11")
    assert est.run_config.compute_target == "docker"
    env = est.run_config.environment
    assert isinstance(env, Environment) and env.docker.base_image == "amlrun-base:py3.11" and env.user_managed


def test_an_environment_definition_is_used_as_it_is(src):
    env = Environment.from_pip_requirements("mine", ["tomli-w==1.0.0"])
    assert Estimator(src, "train.py", environment_definition=env).run_config.environment is env
    assert SKLearn(src, "train.py", environment_definition="mine:2").run_config.environment == "mine:2"


def test_requirements_and_conda_files_are_read_into_the_environment(src):
    (src / "requirements.txt").write_text("--extra-index-url https://pkgs.example.com/simple\npandas>=2\n")
    (src / "env.yml").write_text("dependencies:\n  - python=3.11\n  - pip:\n    - tomli-w==1.0.0\n")
    est = Estimator(
        src,
        "train.py",
        pip_requirements_file=src / "requirements.txt",
        conda_dependencies_file=src / "env.yml",
    )
    env = est.run_config.environment
    assert isinstance(env, Environment)
    assert env.python.pip_requirements == ["pandas>=2", "tomli-w==1.0.0"] and env.python.version == "3.11"
    assert env.python.extra_index_urls == ["https://pkgs.example.com/simple"]


def test_a_user_managed_flavour_runs_the_workers_interpreter(src):
    env = SKLearn(src, "train.py", user_managed=True).run_config.environment
    assert isinstance(env, Environment) and env.user_managed and env.name == "scikit-learn-user-managed"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda s: Estimator(s, "train.py", conda_packages=["scikit-learn=1.5", "python=3.11"]),
            r"conda_packages lists 'scikit-learn=1.5' \(as a pip package: 'scikit-learn==1.5.\*'\): conda is not",
        ),
        (lambda s: PyTorch(s, "train.py", conda_packages=["pytorch"]), "torch for pytorch"),
        (lambda s: TensorFlow(s, "train.py", use_gpu=True), r"use_gpu=True, but compute_target='local'"),
        (lambda s: SKLearn(s, "train.py", use_gpu=True, compute_target="gpu_box"), "runs on the CPU"),
        (
            lambda s: PyTorch(s, "train.py", framework_version="1.13"),
            r"framework_version='1.13' is not a PyTorch "
            r"version this package knows: use one of 2.0, 2.1",
        ),
        (lambda s: Estimator(s, "train.py", framework_version="1.5"), "needs a framework: use SKLearn"),
        (lambda s: PyTorch(s, "train.py", node_count=2), r"node_count=2: runs use one node"),
        (
            lambda s: PyTorch(s, "train.py", distributed_training=object()),
            "distributed_training has no equivalent",
        ),
        (
            lambda s: Estimator(s, "train.py", vm_size="STANDARD_D2"),
            "vm_size has no equivalent here: the machine",
        ),
        (lambda s: Estimator(s, "train.py", pip_pakages=["x"]), "unknown argument 'pip_pakages'. It takes"),
        (lambda s: Estimator(s), "entry_script is missing"),
        (
            lambda s: Estimator(s, "train.py", environment_definition="mine", pip_packages=["x"]),
            "so pip_packages cannot be added to it",
        ),
        (lambda s: Estimator(s, "train.py", custom_docker_image="img:1"), "runs only on a Docker target"),
        (
            lambda s: Estimator(s, "train.py", user_managed=True, pip_packages=["x"]),
            "user_managed=True runs the worker's interpreter as it is",
        ),
        (lambda s: Estimator(s, "train.py", use_docker=False, compute_target="docker"), "use_docker=False"),
        (lambda s: Estimator(s, "train.py", script_params=["--alpha", 1]), "script_params must be a mapping"),
        (lambda s: Estimator(s, "../train.py"), r"^Estimator: script '../train.py' leaves source_directory"),
    ],
)
def test_what_cannot_map_is_refused_naming_the_argument(src, make, message):
    with pytest.raises(ConfigurationError, match=message):
        make(src)


def test_a_sweep_takes_an_estimator_in_place_of_its_run_config(src):
    est = SKLearn(src, "train.py", script_params={"--depth": 3})
    common = {
        "hyperparameter_sampling": RandomParameterSampling({"--alpha": uniform(0, 1)}),
        "primary_metric_name": "mse",
        "primary_metric_goal": "minimize",
        "max_total_runs": 4,
    }
    config = HyperDriveConfig(estimator=est, **common)
    assert config.run_config is est.run_config
    with pytest.raises(ConfigurationError, match="give run_config or estimator, not both"):
        HyperDriveConfig(run_config=est.run_config, estimator=est, **common)
    with pytest.raises(
        ConfigurationError, match=r"run_config is missing \(give run_config=, or estimator=\)"
    ):
        HyperDriveConfig(**common)
