"""A Docker run outlives what its task loses on the way: the daemon, or the run history for the final write.

Either way the container goes on, or ends, untouched, the run row stays unfinished, and a retry of the task
re-attaches to the container and records its outcome. Real containers on the real Docker Engine, reached
through a socket proxy that the test stops; a PostgreSQL history of the test's own, that it stops.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.environment.image_recipe import tar_of
from airflow_amlrun.errors import TargetUnreachableError
from airflow_amlrun.history import HistoryUnavailableError
from airflow_amlrun.submission import AirflowTask
from airflow_amlrun.targets.docker_transfer import RUN_DIR
from tests.conftest import wait_until_running, write_script
from tests.integration.docker_engine import SocketProxy, containers_of

pytest_plugins = ["tests.integration.docker_engine"]

EPOCHS = """
import os, time
from airflow_amlrun.run_context import Run

open("outputs/starts.txt", "a").write("started\\n")
run = Run.get_context()
for epoch in range(16):
    print(f"epoch {epoch}", flush=True)
    run.log("loss", 1 / (epoch + 1), step=epoch)
    time.sleep(0.5)
"""


def try_number(n: int) -> AirflowTask:
    return AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=n)


def container_runs(api: Any) -> Any:
    return lambda run: any(c["State"] == "running" for c in containers_of(api, run.id))


def test_a_daemon_that_stops_answering_leaves_the_run_to_a_retry(docker_home, tmp_path, monkeypatch):
    from airflow_amlrun.targets import docker as docker_target

    monkeypatch.setattr(docker_target, "UNREACHABLE_GRACE_SECONDS", 1.0)
    write_script(tmp_path / "src", "train.py", EPOCHS)
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="gpu_box")

    def daemon_at(url: str) -> None:
        monkeypatch.setenv("AIRFLOW_CONN_GPU_BOX", json.dumps({"conn_type": "amlrun_docker", "host": url}))

    # Try 1 follows the run through a proxy, which goes away while the script runs.
    first: list[str] = []
    with SocketProxy() as proxy:
        daemon_at(proxy.url)
        run = Experiment(Workspace.get(), "lost-daemon").submit(config, airflow_task=try_number(1))

        def output(line: str) -> None:
            first.append(line)
            if line == "epoch 1":
                proxy.stop()

        with pytest.raises(TargetUnreachableError) as raised:
            run.wait_for_completion(output=output)

    assert first[:2] == ["epoch 0", "epoch 1"]
    assert "is not reachable" in str(raised.value) and "left as it is" in str(raised.value)
    row = Workspace.get().get_run(run.id)
    assert row.status == "Running" and row.error is None  # neither Failed nor Canceled
    [container] = containers_of(docker_home, run.id)
    assert container["State"] == "running"  # untouched

    # Try 2, once the daemon answers again (through another proxy), re-attaches and records the outcome.
    lines: list[str] = []
    with SocketProxy() as proxy:
        daemon_at(proxy.url)
        record = (
            Experiment(Workspace.get(), "lost-daemon")
            .submit(config, airflow_task=try_number(2))
            .wait_for_completion(output=lines.append)
        )

    assert (record.id, record.status) == (run.id, "Completed")
    assert lines == [f"epoch {n}" for n in range(16)]
    assert [p.step for p in Workspace.get().history.get_metrics(run.id, "loss")] == list(range(16))
    assert Path(record.outputs_uri, "starts.txt").read_text() == "started\n"  # the script ran once
    assert len(Workspace.get().list_runs()) == 1
    assert containers_of(docker_home, run.id) == []


WAITS_FOR_GO = """
import os, time
from airflow_amlrun.run_context import Run

print("training", flush=True)
while not os.path.exists("go"):
    time.sleep(0.05)
Run.get_context().log("accuracy", 0.93)
open("outputs/model.txt", "w").write("weights")
print("trained", flush=True)
"""


@pytest.mark.parametrize(("transfer", "auto_remove"), [("bind", "true"), ("archive", "false")])
def test_a_finished_run_whose_outcome_the_history_missed_is_recorded_by_the_retry(
    docker_home, own_postgres, tmp_path, monkeypatch, transfer, auto_remove
):
    from airflow_amlrun.history import bookkeeping

    monkeypatch.setattr(bookkeeping, "FINAL_WRITE_SECONDS", 2.0)
    monkeypatch.setenv("AMLRUN_DOCKER_TRANSFER", transfer)
    monkeypatch.setenv("AMLRUN_DOCKER_AUTO_REMOVE", auto_remove)
    write_script(tmp_path / "src", "train.py", WAITS_FOR_GO)
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")

    def stop_the_history_then_let_the_script_end() -> None:
        running = wait_until_running(also=container_runs(docker_home))
        if running is None:
            return
        own_postgres.stop()
        [container] = containers_of(docker_home, running.id)
        docker_home.put_archive(container["Id"], RUN_DIR, tar_of({"go": b""}))

    stopper = threading.Thread(target=stop_the_history_then_let_the_script_end)
    stopper.start()
    lines: list[str] = []
    with pytest.raises(HistoryUnavailableError):
        Experiment(Workspace.get(), "lost-history").submit(
            config, airflow_task=try_number(1)
        ).wait_for_completion(output=lines.append)
    stopper.join()
    own_postgres.start()

    assert "trained" in lines
    [run] = Workspace.get().list_runs()
    assert run.status == "Running"  # its outcome was never written
    # The ended container is kept for the retry, with its exit code (and, archive, its outputs).
    [container] = containers_of(docker_home, run.id)
    assert container["State"] == "exited"

    record = (
        Experiment(Workspace.get(), "lost-history")
        .submit(config, airflow_task=try_number(2))
        .wait_for_completion(show_output=False)
    )

    assert (record.id, record.status) == (run.id, "Completed")
    assert record.metrics == {"accuracy": 0.93}
    assert Path(record.outputs_uri, "model.txt").read_text() == "weights"
    assert "trained" in Path(record.logs_uri, "std_log.txt").read_text()
    assert len(Workspace.get().list_runs()) == 1
    kept = containers_of(docker_home, run.id)
    if auto_remove == "true":
        assert kept == []  # removed once the outcome was recorded
    else:
        assert [c["State"] for c in kept] == ["exited"]
        docker_home.remove_container(kept[0]["Id"])
