"""How a run's folder reaches its container when the daemon does not see the worker's files, on the real
Docker Engine: the ``archive`` transfer, chosen or found out, and what it costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.targets.common import CONTROL_DIR, EVENTS
from airflow_amlrun.targets.docker_transfer import RUN_DIR
from tests.conftest import write_script
from tests.integration.docker_engine import SocketProxy, containers_of

pytest_plugins = ["tests.integration.docker_engine"]

POINTS = 100_000

MANY_POINTS = f"""
import time
from airflow_amlrun.run_context import Run

run = Run.get_context()
for second in range(4):
    for i in range({POINTS // 4}):
        run.log("loss", 1.0 / (i + 1), step=second * {POINTS // 4} + i)
    print("logged", (second + 1) * {POINTS // 4}, "points", flush=True)
    time.sleep(0.5)
open("outputs/model.txt", "w").write("weights")
time.sleep(2.5)  # idle: the worker has read everything by now
"""


def test_archive_transfer_brings_back_every_metric_fetching_each_byte_once(
    docker_home, tmp_path, monkeypatch
):
    write_script(tmp_path / "src", "train.py", MANY_POINTS)
    monkeypatch.setenv("AMLRUN_DOCKER_TRANSFER", "archive")
    monkeypatch.setenv("AMLRUN_DOCKER_AUTO_REMOVE", "false")  # kept, to measure its events file
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")
    lines: list[str] = []

    # The local daemon, through a socket that counts what the daemon sends.
    with SocketProxy(unix_path=tmp_path / "docker.sock") as proxy:
        monkeypatch.setenv("DOCKER_HOST", proxy.url)
        record = (
            Experiment(Workspace.get(), "many-points").submit(config).wait_for_completion(output=lines.append)
        )
        received = proxy.received

    assert record.status == "Completed", record.error
    [container] = containers_of(docker_home, record.id)
    try:
        stream, stat = docker_home.get_archive(container["Id"], f"{RUN_DIR}/{CONTROL_DIR}/{EVENTS}")
        b"".join(stream)
        # Nothing was bind-mounted: the code went in, and everything came back, through the API.
        assert not docker_home.inspect_container(container["Id"])["Mounts"]
    finally:
        docker_home.remove_container(container["Id"], force=True)
    points = Workspace.get().history.get_metrics(record.id, "loss")
    assert [p.step for p in points] == list(range(POINTS))
    assert f"logged {POINTS} points" in lines
    assert Path(record.outputs_uri, "model.txt").read_text() == "weights"
    assert f"logged {POINTS} points" in Path(record.logs_uri, "std_log.txt").read_text()
    # Each byte of the events file crossed once (plus the API's own chatter), not once per poll.
    assert stat["size"] > 4_000_000
    assert received < 1.3 * stat["size"] + 1_000_000, (received, stat["size"])


SUBMIT = """
import json, sys
from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.errors import ConfigurationError

config = ScriptRunConfig(sys.argv[1], script="train.py", compute_target="docker")
try:
    record = Experiment(Workspace.get(), "compose").submit(config).wait_for_completion(show_output=False)
except ConfigurationError as err:
    print(json.dumps({"error": str(err)}))
else:
    print(json.dumps({"id": record.id, "status": record.status}))
"""

TRAIN = """
from airflow_amlrun.run_context import Run

for epoch in range(3):
    Run.get_context().log("acc", 0.5 + epoch / 10, step=epoch)
    print(f"epoch {epoch}", flush=True)
open("outputs/model.txt", "w").write("weights")
"""


@pytest.mark.parametrize("transfer", ["auto", "bind"])
def test_a_worker_whose_files_the_daemon_does_not_see(docker_home, tmp_path, transfer):
    """As a worker in a container of its own with the host's socket (docker-compose): here, a worker in a
    mount namespace of its own, whose runs folder is a tmpfs the daemon cannot see."""
    source = str(write_script(tmp_path / "src", "train.py", TRAIN).parent)
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "AIRFLOW__AMLRUN__LOCAL_RUNS_DIR": str(runs), "AMLRUN_DOCKER_TRANSFER": transfer}
    worker = 'mount -t tmpfs amlrun-worker-runs "$AIRFLOW__AMLRUN__LOCAL_RUNS_DIR" && exec "$0" -c "$1" "$2"'

    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            worker,
            sys.executable,
            SUBMIT,
            source,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if transfer == "bind":
        # Said before anything is recorded, with the fix.
        assert "transfer = 'bind'" in result["error"]
        assert f"does not see this worker's runs folder {runs}" in result["error"]
        assert "Set transfer to 'archive' (or 'auto')" in result["error"]
        assert Workspace.get().list_runs() == []
        return
    run = Workspace.get().get_run(result["id"])
    assert run.status == "Completed", run.error
    assert run.metrics == {"acc": pytest.approx(0.7)}
    assert Path(run.outputs_uri, "model.txt").read_text() == "weights"
    assert "epoch 2" in Path(run.logs_uri, "std_log.txt").read_text()
    assert containers_of(docker_home, run.id) == []
