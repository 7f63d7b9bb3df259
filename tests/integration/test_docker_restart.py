"""A Docker daemon that restarts while a run goes on: the run ends with a clear status, and never stays Running.

Without live-restore the daemon stops its containers as it stops: the run ends Failed, saying that the daemon's
restart stopped it and what to do, with the log and metrics it wrote until then. With live-restore the
container goes on: the same task follows it again once the daemon answers, and the run ends Completed with
every line of its log once and every metric.

The daemon is one of the test's own, beside the suite's (which other sessions use, and which is never stopped):
its own socket, data root, exec root (and so its own containerd), no bridge, and the base image copied from
the suite's daemon. The test restarts it as an administrator would: SIGTERM, wait until it exited, start it
again on the same folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from tests.conftest import write_script
from tests.integration.docker_engine import SOCKET, containers_of

pytest_plugins = ["tests.integration.docker_engine"]

IMAGE = "amlrun-base:py3.11"
# The Airflow connection through which the runs reach the test's own daemon.
CONN_ID = "restarting_docker"
# How long the daemon may take to start or stop on a busy machine.
DAEMON_WAIT_SECONDS = 120

# About 20 s of training: the daemon restarts after epoch 3, while most of it is still to come.
EPOCHS = """
import time
from airflow_amlrun.run_context import Run

open("outputs/starts.txt", "a").write("started\\n")
run = Run.get_context()
for epoch in range(40):
    print(f"epoch {epoch}", flush=True)
    run.log("loss", 1 / (epoch + 1), step=epoch)
    time.sleep(0.5)
"""
RESTART_AFTER = "epoch 3"


class OwnDockerDaemon:
    """A dockerd of the test's own in a temporary folder, to stop and start while a run goes on."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "docker.sock"
        self.url = f"unix://{self.socket}"
        self.log = folder / "dockerd.log"
        self.live_restore = False
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def api(self) -> Any:
        import docker

        return docker.APIClient(base_url=self.url, version="auto", timeout=60)

    def start(self, *, live_restore: bool) -> None:
        self.live_restore = live_restore
        argv = [
            "dockerd",
            f"--host={self.url}",
            f"--data-root={self.folder / 'data'}",
            f"--exec-root={self.folder / 'exec'}",
            f"--pidfile={self.folder / 'docker.pid'}",
            "--bridge=none",
            "--iptables=false",
        ]
        if live_restore:
            argv.append("--live-restore")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.starts += 1
        deadline = time.monotonic() + DAEMON_WAIT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"dockerd exited with {self.process.returncode}:\n{self._log_tail()}")
            with contextlib.suppress(Exception):
                api = self.api()
                api.ping()
                api.close()
                return
            time.sleep(0.2)
        pytest.fail(
            f"dockerd did not answer on {self.socket} within {DAEMON_WAIT_SECONDS} s:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM, then wait until the daemon exited (it stops its containers first, unless live-restore)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(DAEMON_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start(live_restore=self.live_restore)

    def use(self, *, live_restore: bool) -> None:
        """Run with or without live-restore from now on (restarting the daemon if it ran otherwise)."""
        if self.process is not None and self.process.poll() is None and self.live_restore == live_restore:
            return
        self.stop()
        self.start(live_restore=live_restore)

    def _log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


@pytest.fixture(scope="module")
def own_daemon(docker_api: Any) -> Iterator[OwnDockerDaemon]:
    """A Docker daemon of this module's own with the base image, stopped and removed at the end."""
    # Short: the daemon's and its containerd's unix sockets live under it.
    folder = Path(tempfile.mkdtemp(prefix="amlrun-dockerd-"))
    daemon = OwnDockerDaemon(folder)
    try:
        daemon.start(live_restore=False)
        # The suite's daemon has the base image (scripts/docker.sh made it); no image can be pulled.
        save = subprocess.Popen(["docker", "-H", f"unix://{SOCKET}", "save", IMAGE], stdout=subprocess.PIPE)
        load = subprocess.run(
            ["docker", "-H", daemon.url, "load"], stdin=save.stdout, capture_output=True, text=True
        )
        assert save.stdout is not None
        save.stdout.close()
        if save.wait() != 0 or load.returncode != 0:
            pytest.fail(f"copying {IMAGE} to the test's daemon failed: {load.stdout}{load.stderr}")
        yield daemon
    finally:
        _remove(daemon)


def _remove(daemon: OwnDockerDaemon) -> None:
    if daemon.process is not None and daemon.process.poll() is None:
        with contextlib.suppress(Exception):
            api = daemon.api()
            for container in api.containers(all=True):
                api.remove_container(container["Id"], force=True)
            api.close()
    daemon.stop()
    # Whatever a daemon that did not stop cleanly left mounted there.
    mounts = Path("/proc/mounts").read_text().splitlines()
    for target in sorted((line.split()[1] for line in mounts), reverse=True):
        if target.startswith(f"{daemon.folder}/"):
            subprocess.run(["umount", "-l", target], capture_output=True)
    shutil.rmtree(daemon.folder, ignore_errors=True)


@pytest.fixture(params=["bind", "archive"])
def on_own_daemon(
    request: pytest.FixtureRequest,
    own_daemon: OwnDockerDaemon,
    amlrun_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> OwnDockerDaemon:
    """A fresh workspace whose compute target CONN_ID is the test's own daemon, with the run folder
    bind-mounted (its events read on this machine) or copied in (its events read through the daemon)."""
    conn = {"conn_type": "amlrun_docker", "host": own_daemon.url, "extra": {"transfer": request.param}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    return own_daemon


def _submit_and_restart_midway(daemon: OwnDockerDaemon, source: Path) -> tuple[Any, list[str], list[str]]:
    """Run the script on the daemon, restarting the daemon once the script printed RESTART_AFTER: the record,
    the lines the task saw, and what the container was doing just before and just after the restart."""
    write_script(source, "train.py", EPOCHS)
    config = ScriptRunConfig(source, script="train.py", compute_target=CONN_ID)
    run = Experiment(Workspace.get(), "daemon-restart").submit(config)
    states: list[str] = []

    def restart() -> None:
        api = daemon.api()
        states.append(_state_of(api, run.id))
        api.close()
        daemon.restart()
        api = daemon.api()
        states.append(_state_of(api, run.id))
        api.close()

    restarter = threading.Thread(target=restart)
    lines: list[str] = []

    def output(line: str) -> None:
        lines.append(line)
        if line == RESTART_AFTER:
            restarter.start()

    try:
        record = run.wait_for_completion(output=output, raise_on_error=False)
    finally:
        if restarter.is_alive():
            restarter.join()
    return record, lines, states


def _state_of(api: Any, run_id: str) -> str:
    return ",".join(c["State"] for c in containers_of(api, run_id)) or "none"


def test_a_daemon_restart_without_live_restore_fails_the_run_saying_why(on_own_daemon, tmp_path):
    on_own_daemon.use(live_restore=False)
    starts = on_own_daemon.starts

    record, lines, states = _submit_and_restart_midway(on_own_daemon, tmp_path / "src")

    assert on_own_daemon.starts == starts + 1  # restarted once, mid-run
    # The daemon stopped the container as it stopped (being removed, or gone: the task, answered first, recorded
    # it and removed it).
    assert states[0] == "running" and states[1] in ("exited", "removing", "none"), states
    assert record.status == "Failed"
    error = str(record.error)
    assert "restarted" in error and on_own_daemon.url in error, error
    assert "live-restore" in error, error  # what to do
    assert "exit code 137" not in error and "killed by signal" not in error, error
    # The log and metrics until the restart are kept, each line once.
    assert RESTART_AFTER in lines and len(lines) < 40
    assert lines == [f"epoch {n}" for n in range(len(lines))]
    assert Path(record.logs_uri, "std_log.txt").read_text().splitlines() == lines
    steps = [p.step for p in Workspace.get().history.get_metrics(record.id, "loss")]
    assert steps == list(range(len(steps))) and len(steps) >= 4
    # Nothing stays Running: not the run, not its container (removed once the outcome was recorded).
    assert [r.status for r in Workspace.get().list_runs()] == ["Failed"]
    api = on_own_daemon.api()
    assert containers_of(api, record.id) == []
    api.close()


def test_a_daemon_restart_with_live_restore_is_followed_through(on_own_daemon, tmp_path, caplog):
    on_own_daemon.use(live_restore=True)
    starts = on_own_daemon.starts

    with caplog.at_level(logging.INFO, logger="airflow_amlrun.targets.docker"):
        record, lines, states = _submit_and_restart_midway(on_own_daemon, tmp_path / "src")

    assert on_own_daemon.starts == starts + 1
    assert states == ["running", "running"]  # the container outlived its daemon's restart
    # The task saw its daemon go away, and followed the container again once the daemon answered.
    said = [r.getMessage() for r in caplog.records]
    assert any("does not answer" in m for m in said), said
    assert any("answers again" in m and "runs on: following it again" in m for m in said), said
    assert record.status == "Completed", record.error
    expected = [f"epoch {n}" for n in range(40)]
    assert lines == expected
    assert Path(record.logs_uri, "std_log.txt").read_text().splitlines() == expected
    assert [p.step for p in Workspace.get().history.get_metrics(record.id, "loss")] == list(range(40))
    assert Path(record.outputs_uri, "starts.txt").read_text() == "started\n"  # the script ran once
    assert [r.status for r in Workspace.get().list_runs()] == ["Completed"]
    api = on_own_daemon.api()
    assert containers_of(api, record.id) == []
    api.close()
