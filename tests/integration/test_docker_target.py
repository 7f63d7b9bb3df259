"""A DAG author's view of the Docker target: real containers on a real Docker Engine.

scripts/docker.sh starts the engine and makes the base image amlrun-base:py3.11 (Debian's python3, nothing
else: not even airflow_amlrun) once; every test here runs real containers of it.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from airflow_amlrun import Environment, Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.environment import PythonSection, resolve_environment
from airflow_amlrun.environment.image_recipe import image_recipe
from airflow_amlrun.errors import ConfigurationError, RunFailedError
from airflow_amlrun.submission import AirflowTask
from airflow_amlrun.targets.docker import LABEL_RUN_ID, LABEL_TRANSFER, container_name
from tests.conftest import worker_dies_mid_run, write_script
from tests.integration.docker_engine import SocketProxy, containers_of

pytest_plugins = ["tests.integration.docker_engine"]

TRAIN = """
import os, sys
from airflow_amlrun.run_context import Run

run = Run.get_context()
for epoch in range(3):
    run.log("loss", 1.0 / (epoch + 1), step=epoch)
    print(f"epoch {epoch} done", flush=True)
print("warming up the GPU that is not there", file=sys.stderr)
os.makedirs("outputs", exist_ok=True)
open("outputs/model.txt", "w").write("weights")
print("working in", os.getcwd(), "with", sys.executable)
"""


def test_managed_environment_runs_in_an_image_built_once_from_its_lock(docker_home, tmp_path, request):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import sys
        import tomli_w  # only in the environment's image, not in the base image, not on the worker
        from airflow_amlrun.run_context import Run
        Run.get_context().log("toml_len", len(tomli_w.dumps({"a": 1})))
        print("python:", sys.executable)
    """,
    )
    # A variable of its own makes its image new to the daemon (this test sees it built), and no other test's.
    env = Environment(
        "toml-writer",
        python=PythonSection(pip_requirements=["tomli-w==1.0.0"]),
        environment_variables={"DOCKER_TARGET_TEST": secrets.token_hex(8)},
    )
    tag = image_recipe(resolve_environment(Workspace.get(), env)).reference
    request.addfinalizer(lambda: _remove_image(docker_home, tag))
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker", environment=env)
    experiment = Experiment(Workspace.get(), "docker-env")
    first: list[str] = []
    second: list[str] = []

    with _captured_logs("airflow_amlrun.targets.docker", first):
        record = experiment.submit(config).wait_for_completion(output=first.append)
    with _captured_logs("airflow_amlrun.targets.docker", second):
        again = experiment.submit(config).wait_for_completion(output=second.append)

    assert record.status == again.status == "Completed"
    assert record.metrics == again.metrics == {"toml_len": 6}
    assert "python: /opt/amlrun/env/bin/python" in first
    assert f"Building image {tag} of environment toml-writer:1 on unix:///var/run/docker.sock" in first
    # The build's own output (its install step may come from the daemon's build cache: the variable is set
    # after it).
    assert any(f"Successfully tagged {tag}" in line for line in first)
    assert docker_home.inspect_image(tag)["Config"]["Labels"]["amlrun.environment"] == "toml-writer:1"
    assert not any(line.startswith("Building image") for line in second), "the cached image was rebuilt"
    assert any(tag in line for line in second)  # the second run started a container of it
    # Each run row names the image it ran in, as the daemon knows it.
    image = docker_home.inspect_image(tag)
    for run in (record, again):
        assert Workspace.get().get_run(run.id).environment["image"] == {
            "reference": tag,
            "id": image["Id"],
            "build_key": image["Config"]["Labels"]["amlrun.build_key"],
        }


def test_an_image_without_airflow_amlrun_gets_run_context_and_the_mlflow_capture_from_the_run(
    docker_home, tmp_path
):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import importlib.metadata
        import airflow_amlrun
        import airflow_amlrun.mlflow_capture as capture
        from airflow_amlrun import run_context

        try:
            from airflow_amlrun import Workspace
        except ImportError:
            print("no Workspace in this image")
        run_context.Run.get_context().log("accuracy", 0.9)
        print("airflow_amlrun:", airflow_amlrun.__file__, run_context.__file__, capture.__file__)
        stores = importlib.metadata.entry_points(group="mlflow.tracking_store")
        print("mlflow stores:", [(e.name, e.value) for e in stores])
        """,
    )
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")
    lines: list[str] = []

    record = (
        Experiment(Workspace.get(), "docker-pylib").submit(config).wait_for_completion(output=lines.append)
    )

    assert record.status == "Completed", "\n".join(lines)
    assert record.metrics == {"accuracy": 0.9}
    assert "no Workspace in this image" in lines
    package = "/amlrun/lib/pylib/airflow_amlrun"
    assert (
        f"airflow_amlrun: {package}/__init__.py {package}/run_context.py {package}/mlflow_capture/__init__.py"
        in lines
    )
    assert "mlflow stores: [('amlrun', 'airflow_amlrun.mlflow_capture:tracking_store')]" in lines


def test_secret_variables_reach_the_script_but_no_log_nor_the_run_row(docker_home, tmp_path, caplog):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os
        print("token length", len(os.environ["API_TOKEN"]), "stage", os.environ["STAGE"])
    """,
    )
    secret = "s3cr3t-value-that-must-not-leak"
    config = ScriptRunConfig(
        tmp_path / "src",
        script="train.py",
        compute_target="docker",
        environment_variables={"STAGE": "dev"},
        secret_environment_variables={"API_TOKEN": secret},
    )
    lines: list[str] = []
    caplog.set_level("DEBUG", logger="airflow_amlrun")

    record = (
        Experiment(Workspace.get(), "docker-secret").submit(config).wait_for_completion(output=lines.append)
    )

    assert record.status == "Completed"
    assert f"token length {len(secret)} stage dev" in lines
    row = Workspace.get().get_run(record.id)
    assert secret not in json.dumps(row.handle) + json.dumps(row.environment or {}) + str(row.error)
    assert secret not in caplog.text


def test_retry_collects_a_container_that_finished_while_nobody_watched(docker_home, tmp_path):
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        """
        import time
        from airflow_amlrun.run_context import Run
        for epoch in range(3):
            print(f"epoch {epoch}", flush=True)
            Run.get_context().log("acc", 0.5 + epoch / 10, step=epoch)
        time.sleep(1.5)
    """,
    )
    orphan = worker_dies_mid_run(source, "docker")
    docker_home.wait(containers_of(docker_home, orphan.id)[0]["Id"], timeout=60)  # it ends meanwhile

    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
    lines: list[str] = []
    config = ScriptRunConfig(source, script="train.py", compute_target="docker")
    record = (
        Experiment(Workspace.get(), "reattach")
        .submit(config, airflow_task=task)
        .wait_for_completion(output=lines.append)
    )

    assert (record.id, record.status) == (orphan.id, "Completed")
    assert lines == ["epoch 0", "epoch 1", "epoch 2"]
    assert record.metrics == {"acc": pytest.approx(0.7)}


def test_retry_records_lost_a_run_its_dead_try_created_but_never_started_and_removes_its_container(
    docker_home, tmp_path
):
    # Try 1 died between creating its run's container and starting it: the row has no handle, the container
    # was created and is labelled with the run id.
    write_script(tmp_path / "src", "train.py", "print('trained', flush=True)\n")
    earlier = "reattach_1_0badf00d"
    Workspace.get().history.create_run(
        run_id=earlier,
        experiment="reattach",
        target="docker",
        **AirflowTask(
            dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=1
        ).row_fields(),
    )
    docker_home.create_container(
        "amlrun-base:py3.11",
        command=["true"],
        name=container_name(earlier),
        labels={LABEL_RUN_ID: earlier, LABEL_TRANSFER: "bind"},
    )

    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")
    record = (
        Experiment(Workspace.get(), "reattach")
        .submit(config, airflow_task=task)
        .wait_for_completion(show_output=False)
    )

    assert record.status == "Completed" and record.id != earlier
    lost = Workspace.get().get_run(earlier)
    assert lost.status == "Failed" and lost.error.startswith("Lost")
    assert containers_of(docker_home, earlier) == []  # nothing will start it any more


def test_canceling_a_run_sends_sigterm_to_the_script_which_can_save_its_work(docker_home, tmp_path):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os, signal, sys, time

        def save_and_exit(signum, frame):
            print("SIGTERM received: saving a checkpoint", flush=True)
            open("outputs/checkpoint.txt", "w").write("epoch 1")
            sys.exit(0)

        signal.signal(signal.SIGTERM, save_and_exit)
        print("training", flush=True)
        time.sleep(300)
    """,
    )
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")
    run = Experiment(Workspace.get(), "docker-stop").submit(config)
    lines: list[str] = []
    training = threading.Event()

    def follow() -> None:
        def output(line: str) -> None:
            lines.append(line)
            if line == "training":
                training.set()

        run.wait_for_completion(output=output, raise_on_error=False)

    follower = threading.Thread(target=follow)
    follower.start()
    assert training.wait(60)
    run.cancel()  # docker stop
    follower.join(60)

    record = Workspace.get().get_run(run.id)
    assert record.status == "Canceled"
    assert "SIGTERM received: saving a checkpoint" in lines
    assert Path(record.outputs_uri, "checkpoint.txt").read_text() == "epoch 1"


def test_a_run_in_an_image_without_python_fails_saying_what_the_image_needs(docker_home, tmp_path):
    write_script(tmp_path / "src", "train.sh", "echo hello\n")
    env = Environment.from_dockerfile(
        "no-python", "FROM amlrun-base:py3.11\nRUN rm -f /usr/bin/python3 /usr/bin/python3.11\n"
    )
    config = ScriptRunConfig(
        tmp_path / "src", command=["sh", "train.sh"], compute_target="docker", environment=env
    )

    with pytest.raises(RunFailedError) as raised:
        Experiment(Workspace.get(), "no-python").submit(config).wait_for_completion(show_output=False)

    [run] = Workspace.get().list_runs()
    assert run.status == "Failed"
    assert "could not run 'python3'" in run.error and "Python 3.7 or newer in the image" in run.error
    assert run.error in str(raised.value)
    assert containers_of(docker_home, run.id) == []


@pytest.mark.parametrize("where", ["DOCKER_HOST", "connection"])
def test_unreachable_daemon_is_refused_before_anything_is_recorded(docker_home, tmp_path, monkeypatch, where):
    write_script(tmp_path / "src", "train.py", "print('never runs')\n")
    if where == "DOCKER_HOST":
        url, target, hint = f"unix://{tmp_path}/no-daemon.sock", "docker", "scripts/docker.sh"
        monkeypatch.setenv("DOCKER_HOST", url)
    else:
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]  # a port nobody listens on once closed
        url, target, hint = f"tcp://127.0.0.1:{port}", "gpu_box", "listens on that address"
        monkeypatch.setenv("AIRFLOW_CONN_GPU_BOX", json.dumps({"conn_type": "amlrun_docker", "host": url}))
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target=target)

    with pytest.raises(ConfigurationError) as raised:
        Experiment(Workspace.get(), "docker-down").submit(config)

    message = str(raised.value)
    assert f"The Docker daemon at {url}" in message and "is not reachable" in message
    assert hint in message
    assert Workspace.get().list_runs() == []


def test_log_lines_reach_the_task_log_while_the_container_runs(docker_home, tmp_path):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import time
        print("epoch 0", flush=True)
        time.sleep(2)
        print("epoch 1", flush=True)
    """,
    )
    seen: dict[str, float] = {}
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")

    record = (
        Experiment(Workspace.get(), "docker-stream")
        .submit(config)
        .wait_for_completion(output=lambda line: seen.setdefault(line, time.monotonic()))
    )

    assert record.status == "Completed"
    assert list(seen) == ["epoch 0", "epoch 1"]
    assert seen["epoch 1"] - seen["epoch 0"] > 1.5  # the first line was shown before the script went on


def test_missing_image_is_refused_before_anything_is_recorded(docker_home, tmp_path):
    write_script(tmp_path / "src", "train.py", "print('never runs')\n")
    env = Environment.from_docker_image("nowhere", "amlrun-no-such-image:1")
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker", environment=env)

    with pytest.raises(ConfigurationError) as raised:
        Experiment(Workspace.get(), "docker-image").submit(config)

    message = str(raised.value)
    assert "'amlrun-no-such-image:1'" in message and "unix:///var/run/docker.sock" in message
    assert "docker load" in message
    assert Workspace.get().list_runs() == []


def test_failing_image_build_fails_the_run_showing_the_failing_step(docker_home, tmp_path):
    write_script(tmp_path / "src", "train.py", "print('never runs')\n")
    env = Environment.from_dockerfile(
        "broken",
        "FROM amlrun-base:py3.11\nRUN echo 'fetching weights' && echo 'disk quota exceeded' >&2 && exit 3\n",
    )
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker", environment=env)

    with pytest.raises(Exception, match="disk quota exceeded") as raised:
        Experiment(Workspace.get(), "docker-build").submit(config)

    assert "RUN echo 'fetching weights'" in str(raised.value)  # the failing step, with its output
    [run] = Workspace.get().list_runs()
    assert run.status == "Failed"
    assert "disk quota exceeded" in run.error


def test_container_killed_for_memory_fails_the_run_saying_so(docker_home, tmp_path, monkeypatch):
    monkeypatch.setenv("AMLRUN_DOCKER_MEM_LIMIT", "96m")
    write_script(
        tmp_path / "src",
        "train.py",
        """
        print("loading the whole dataset", flush=True)
        data = b"x" * (600 * 2**20)
        print("loaded", len(data))
    """,
    )
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")

    with pytest.raises(RunFailedError) as raised:
        Experiment(Workspace.get(), "docker-oom").submit(config).wait_for_completion(show_output=False)

    [run] = Workspace.get().list_runs()
    assert run.status == "Failed"
    assert "OOMKilled" in run.error and "mem_limit=96m" in run.error
    assert "loading the whole dataset" in str(raised.value)


def test_remote_daemon_gets_the_code_as_an_archive_and_returns_outputs_and_metrics(
    docker_home, tmp_path, monkeypatch
):
    write_script(tmp_path / "src", "train.py", TRAIN)
    with SocketProxy() as proxy:
        # A daemon reached over TCP is another machine as far as the target knows: nothing is bind-mounted.
        monkeypatch.setenv(
            "AIRFLOW_CONN_GPU_BOX",
            json.dumps({"conn_type": "amlrun_docker", "host": proxy.url, "extra": {"cpus": 1}}),
        )
        from airflow_amlrun.hooks.docker import AmlRunDockerHook

        ok, message = AmlRunDockerHook("gpu_box").test_connection()
        assert ok, message
        config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="gpu_box")
        lines: list[str] = []
        record = (
            Experiment(Workspace.get(), "docker-remote")
            .submit(config)
            .wait_for_completion(output=lines.append)
        )

    assert record.status == "Completed", record.error
    assert record.target == "gpu_box"
    assert record.metrics == {"loss": pytest.approx(1 / 3)}
    assert "epoch 2 done" in lines and "working in /amlrun/run with /usr/bin/python3" in lines
    assert Path(record.outputs_uri, "model.txt").read_text() == "weights"
    assert "warming up the GPU" in Path(record.logs_uri, "std_log.txt").read_text()
    assert containers_of(docker_home, record.id) == []


# helpers


def _remove_image(api: Any, tag: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        api.remove_image(tag, force=True)


class _captured_logs:
    """Collect the messages of one logger (the build output, which goes to the task log)."""

    def __init__(self, name: str, into: list[str]) -> None:
        import logging

        self.logger = logging.getLogger(name)
        self.into = into
        outer = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                outer.into.append(record.getMessage())

        self.handler = Handler(level=logging.INFO)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel("INFO")
        self.logger.addHandler(self.handler)

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
