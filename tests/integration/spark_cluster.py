"""Real Spark for the Spark target's tests: connections to a local[2] master, and a standalone master and one
worker on 127.0.0.1, started once per session on free ports and stopped at its end.

A test module uses the fixtures with ``pytest_plugins = ["tests.integration.spark_cluster"]``
(PYTEST_DONT_REWRITE: test modules import it before pytest would). spark-submit and spark-class come with
pyspark (installed in the test environment); Java with scripts/services.sh.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

LOCAL_CONN_ID = "spark_local"
STANDALONE_CONN_ID = "spark_standalone"
START_TIMEOUT_SECONDS = 60.0


def spark_variables() -> dict[str, str]:
    """What Spark processes of the tests get: loopback only (Spark would take the machine's public address)."""
    return {"SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOCAL_HOSTNAME": "localhost"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, host: str, **extra: Any) -> str:
    """An Airflow connection of type `spark` (as the provider's form writes it), in the environment."""
    conn = {"conn_type": "spark", "host": host, "extra": {"deploy-mode": "client", **extra}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


@dataclass
class StandaloneCluster:
    """A standalone master and one worker, and how to look at them."""

    master_url: str
    ui_url: str
    processes: list[subprocess.Popen[bytes]]

    def state(self) -> dict[str, Any]:
        """The master's JSON view: its workers, active and completed applications."""
        with urllib.request.urlopen(f"{self.ui_url}/json/", timeout=10) as answer:
            return dict(json.load(answer))


@pytest.fixture(autouse=True)
def _spark_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in spark_variables().items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def spark_local(monkeypatch: pytest.MonkeyPatch, amlrun_home: Path) -> str:
    """A fresh workspace and the connection `spark_local` (master local[2])."""
    return set_connection(monkeypatch, LOCAL_CONN_ID, "local[2]")


def _spark_class() -> str:
    return str(Path(sys.executable).parent / "spark-class")


@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneCluster]:
    """A standalone master and one worker (1 core, 1 GiB) on 127.0.0.1, for the whole session."""
    work = tmp_path_factory.mktemp("spark-standalone")
    port, ui_port, worker_ui = free_port(), free_port(), free_port()
    env = {**os.environ, **spark_variables(), "SPARK_LOG_DIR": str(work), "SPARK_WORKER_DIR": str(work / "w")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    master_url = f"spark://127.0.0.1:{port}"
    processes = []
    with open(work / "master.log", "wb") as master_log:
        processes.append(
            subprocess.Popen(
                [
                    _spark_class(),
                    "org.apache.spark.deploy.master.Master",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--webui-port",
                    str(ui_port),
                ],
                env=env,
                stdout=master_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    with open(work / "worker.log", "wb") as worker_log:
        processes.append(
            subprocess.Popen(
                [
                    _spark_class(),
                    "org.apache.spark.deploy.worker.Worker",
                    "--host",
                    "127.0.0.1",
                    "--webui-port",
                    str(worker_ui),
                    "--cores",
                    "1",
                    "--memory",
                    "1g",
                    "--work-dir",
                    str(work / "w"),
                    master_url,
                ],
                env=env,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    cluster = StandaloneCluster(master_url, f"http://127.0.0.1:{ui_port}", processes)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                if cluster.state().get("aliveworkers", 0) >= 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join((work / name).read_text()[-3000:] for name in ("master.log", "worker.log"))
                pytest.fail(f"The standalone Spark master and worker did not start:\n{logs}")
            time.sleep(0.5)
        yield cluster
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


@pytest.fixture
def spark_standalone(
    monkeypatch: pytest.MonkeyPatch, amlrun_home: Path, standalone_cluster: StandaloneCluster
) -> str:
    """A fresh workspace and the connection `spark_standalone` to the session's standalone master."""
    return set_connection(monkeypatch, STANDALONE_CONN_ID, standalone_cluster.master_url)
