"""Real Spark for the Spark target's tests: connections to a local[2] master, and a standalone master and one
worker on 127.0.0.1, started once per session on free ports and stopped at its end.

A test module uses the fixtures with ``pytest_plugins = ["tests.integration.spark_cluster"]``
(PYTEST_DONT_REWRITE: test modules import it before pytest would). spark-submit and spark-class come with
pyspark (installed in the test environment); Java with scripts/services.sh.
"""

from __future__ import annotations

import contextlib
import http.client
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
            except (OSError, ValueError, http.client.HTTPException):
                # Not listening yet, or its web UI answers before it has its JSON view (an empty body): ask again.
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


# ---------------------------------------------------------------------------------------------- cluster mode
#
# No YARN or Kubernetes cluster is reachable from the project's machines, so cluster mode runs against
# stand-ins for the two commands the provider's hook runs there: spark-submit, which submits to YARN and then
# reports the application as YARN's client does, and YARN's CLI, whose `yarn application -kill ID` the hook's
# on_kill runs. Everything else (the target, the supervisor, the hook's process, the hook, its on_kill) is real.

YARN_CONN_ID = "spark_yarn"
YARN_APPLICATION = "application_1700000000000_0042"
YARN_STATE_ENV = "AMLRUN_TEST_YARN_STATE"
# Longer than a plain run's grace on SIGTERM (common.TERM_GRACE_SECONDS): YARN's client is a JVM that asks the
# ResourceManager, which takes seconds.
YARN_KILL_SECONDS = 6.0

_SPARK_SUBMIT_ON_YARN = """#!{python}
# Stands in for spark-submit in YARN cluster mode: reports the application it submitted, as YARN's client does,
# every half second until the file `finish` appears in the state folder, or until it is killed.
import json, os, sys, time

state = os.environ[{state_env!r}]
application = {application!r}
with open(os.path.join(state, ".spark-submit.json"), "w") as out:
    json.dump({{"pid": os.getpid(), "argv": sys.argv[1:]}}, out)
os.replace(os.path.join(state, ".spark-submit.json"), os.path.join(state, "spark-submit.json"))
print("INFO Client: Submitted application " + application, flush=True)
print("INFO Client: \\n\\t tracking URL: http://127.0.0.1:8088/proxy/" + application + "/", flush=True)
while not os.path.exists(os.path.join(state, "finish")):
    print("INFO Client: Application report for " + application + " (state: RUNNING)", flush=True)
    time.sleep(0.5)
print("INFO Client: Application report for " + application + " (state: FINISHED)", flush=True)
"""

_YARN_CLI = """#!{python}
# Stands in for YARN's CLI (`yarn application -kill ID`): says when it started and when it was done.
import os, sys, time

def note(what):
    with open(os.path.join(os.environ[{state_env!r}], "yarn.log"), "a") as out:
        out.write(" ".join(sys.argv[1:]) + " " + what + "\\n")

note("started")
time.sleep({seconds!r})
note("done")
"""


@dataclass
class StandinYarn:
    """A spark connection to YARN in cluster mode, and what its stand-in commands saw."""

    conn_id: str
    state: Path
    application: str
    password: str
    keytab: bytes
    keytab_base64: str

    def submission(self, timeout: float = 60.0) -> dict[str, Any]:
        """What spark-submit was started with (its pid and arguments), once it has reported the application."""
        path = self.state / "spark-submit.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                pytest.fail(f"spark-submit was not started within {timeout:g} s")
            time.sleep(0.05)
        return dict(json.loads(path.read_text()))

    def finish(self) -> None:
        """The application ends on the cluster (spark-submit reports it FINISHED and exits)."""
        (self.state / "finish").touch()

    def yarn_calls(self) -> list[str]:
        log = self.state / "yarn.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def yarn_cluster_mode(
    monkeypatch: pytest.MonkeyPatch, amlrun_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StandinYarn]:
    """A fresh workspace and the connection `spark_yarn` (YARN, deploy-mode cluster, a queue, a password and a
    keytab), with the stand-in commands first on PATH.

    The connection comes from a secrets backend (a file), as a deployment keeps its secrets, not from an
    AIRFLOW_CONN_* variable: every process started on the worker would inherit that one.
    """
    import base64

    from airflow.sdk.configuration import clear_secrets_backends_cache

    root = tmp_path_factory.mktemp("yarn")
    bin_dir, state = root / "bin", root / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (
        (
            "spark-submit",
            _SPARK_SUBMIT_ON_YARN.format(
                python=sys.executable, state_env=YARN_STATE_ENV, application=YARN_APPLICATION
            ),
        ),
        (
            "yarn",
            _YARN_CLI.format(python=sys.executable, state_env=YARN_STATE_ENV, seconds=YARN_KILL_SECONDS),
        ),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv(YARN_STATE_ENV, str(state))
    # The hook writes the connection's keytab to a file in the temporary folder: this one.
    monkeypatch.setenv("TMPDIR", str(root))
    password = "pw-" + os.urandom(8).hex()
    keytab = b"keytab-" + os.urandom(8).hex().encode()
    keytab_base64 = base64.b64encode(keytab).decode()
    connections = root / "connections.json"
    connections.write_text(
        json.dumps(
            {
                YARN_CONN_ID: {
                    "conn_type": "spark",
                    "host": "yarn",
                    "login": "trainer",
                    "password": password,
                    "extra": {"deploy-mode": "cluster", "queue": "q-amlrun", "keytab": keytab_base64},
                }
            }
        )
    )
    connections.chmod(0o600)
    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND", "airflow.secrets.local_filesystem.LocalFilesystemBackend")
    monkeypatch.setenv(
        "AIRFLOW__SECRETS__BACKEND_KWARGS", json.dumps({"connections_file_path": str(connections)})
    )
    clear_secrets_backends_cache()
    try:
        yield StandinYarn(YARN_CONN_ID, state, YARN_APPLICATION, password, keytab, keytab_base64)
    finally:
        monkeypatch.undo()
        clear_secrets_backends_cache()


# ---------------------------------------------------------------------------------------------- Spark packages

MAVEN_PACKAGE = "org.example.amlrun:hello:1.0"
_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>org.example.amlrun</groupId>
  <artifactId>hello</artifactId>
  <version>1.0</version>
  <packaging>jar</packaging>
</project>
"""


@dataclass
class MavenRepository:
    """A Maven repository over HTTP on 127.0.0.1 holding one package (MAVEN_PACKAGE, an empty jar)."""

    url: str
    package: str = MAVEN_PACKAGE


@pytest.fixture(scope="session")
def maven_repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MavenRepository]:
    import functools
    import http.server
    import threading
    import zipfile

    root = tmp_path_factory.mktemp("maven")
    folder = root / "org" / "example" / "amlrun" / "hello" / "1.0"
    folder.mkdir(parents=True)
    (folder / "hello-1.0.pom").write_text(_POM)
    with zipfile.ZipFile(folder / "hello-1.0.jar", "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield MavenRepository(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
