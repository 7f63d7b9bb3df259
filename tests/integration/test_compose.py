"""The shipped docker-compose.yaml: valid, and brought up for real, runs the example DAG on CeleryExecutor
with the run history in its PostgreSQL and the store on the volume every Airflow component shares.

No image can be pulled here, so deploy/offline/build-images.sh builds the images the compose file names from
amlrun-base:py3.11 (scripts/docker.sh makes it, and installs docker-compose), each tagged by the hash of its
recipe: a later session finds them and builds nothing. The deployment has a project name of its own, its API
server a free loopback port and its admin a fresh password; it is taken down with its volumes whatever
happens.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pytest
import yaml

from tests.conftest import REPO

pytest_plugins = ["tests.integration.docker_engine"]

# The first test to bring the deployment up builds its images on a machine that has none (about 4 minutes).
pytestmark = pytest.mark.timeout(1500)

COMPOSE_FILE = REPO / "docker-compose.yaml"
DAG_ID = "train_local"
ALPHA = 0.3  # not the DAG's default, so the run row is seen to be this trigger's

T = TypeVar("T")


def _clean_environment() -> dict[str, str]:
    """The variables a user's shell would have: none of the compose file's own, so its defaults apply."""
    keep = ("PATH", "HOME", "DOCKER_HOST", "LANG")
    return {key: os.environ[key] for key in keep if key in os.environ}


def _compose(
    *args: str, env_file: Path | None = None, project: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    command = ["docker-compose", "--file", str(COMPOSE_FILE)]
    if project:
        command += ["--project-name", project]
    if env_file:
        command += ["--env-file", str(env_file)]
    return subprocess.run(
        [*command, *args], cwd=REPO, env=_clean_environment(), capture_output=True, text=True, timeout=timeout
    )


def test_the_compose_file_is_valid_and_names_the_official_images(docker_api: Any) -> None:
    done = _compose("config", "-q")
    assert done.returncode == 0, done.stderr

    config = yaml.safe_load(_compose("config").stdout)
    services = config["services"]
    assert {
        "postgres",
        "redis",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "ssh-target",
        "spark-master",
        "spark-worker",
    } <= set(services)
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7.2-bookworm"
    assert services["airflow-worker"]["build"]["args"] == {
        "AIRFLOW_BASE_IMAGE": "apache/airflow:3.3.2-python3.11"
    }
    assert services["airflow-worker"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert services["spark-master"]["image"].startswith("apache/spark:")
    # The Spark services are examples: a plain `up` starts neither.
    assert services["spark-master"]["profiles"] == services["spark-worker"]["profiles"] == ["spark"]


@dataclass(frozen=True)
class Deployment:
    """A running deployment of docker-compose.yaml, and how a user reaches it."""

    project: str
    env_file: Path
    api: httpx.Client

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _compose(*args, env_file=self.env_file, project=self.project, timeout=timeout)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def exec(
        self, service: str, *command: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A command in the service's container, as `docker exec` runs it."""
        options = [f"--env={key}={value}" for key, value in (env or {}).items()]
        return subprocess.run(
            ["docker", "exec", "-i", *options, self.container(service), *command],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def logs(self, *services: str) -> str:
        return self.compose("logs", "--no-color", "--tail=40", *services).stdout

    def wait_for(
        self, what: str, poll: Callable[[], T | None], *, seconds: float, logs_of: tuple[str, ...] = ()
    ) -> T:
        """What poll() returns once it returns something; fails saying `what` did not happen, with the logs
        of the services named, when `seconds` pass first."""
        end = time.monotonic() + seconds
        unanswered: httpx.TransportError | None = None
        while time.monotonic() < end:
            try:
                found = poll()
            except httpx.TransportError as err:
                # The deployment did not answer in time (a loaded machine): it is asked again until `seconds` pass.
                unanswered, found = err, None
            if found:
                return found
            time.sleep(2)
        last = f" (its API last failed to answer: {unanswered!r})" if unanswered else ""
        pytest.fail(f"{what} within {seconds:.0f} s{last}\n{self.logs(*logs_of)}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def deployment(docker_api: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """docker-compose.yaml up on the images built here, signed in to its API server as its admin."""
    built = subprocess.run(
        [str(REPO / "deploy" / "offline" / "build-images.sh")], capture_output=True, text=True, timeout=1200
    )
    if built.returncode != 0:
        pytest.fail(f"deploy/offline/build-images.sh failed:\n{built.stderr[-3000:]}")
    port, password = _free_port(), secrets.token_urlsafe(12)
    env_file = tmp_path_factory.mktemp("compose") / "offline.env"
    env_file.write_text(
        built.stdout + f"AIRFLOW_API_PORT=127.0.0.1:{port}\n_AIRFLOW_WWW_USER_PASSWORD={password}\n"
    )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deployed = Deployment(f"amlrun-compose-{secrets.token_hex(3)}", env_file, api)
    try:
        up = deployed.compose("up", "--detach", "--no-build", timeout=600)
        if up.returncode != 0:
            pytest.fail(f"docker-compose up failed:\n{up.stderr[-3000:]}\n{deployed.logs()}")
        token = api.post("/auth/token", json={"username": "airflow", "password": password})
        assert token.status_code == 201, token.text
        api.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        yield deployed
    finally:
        api.close()
        down = deployed.compose("down", "--volumes", "--remove-orphans", "--timeout", "5")
        assert down.returncode == 0, down.stderr


def _psql(deployment: Deployment, query: str, **variables: str) -> list[list[str]]:
    """Rows of a query on the run-history database, as psql in the postgres container answers it."""
    options = [f"--set={key}={value}" for key, value in variables.items()]
    done = deployment.exec(
        "postgres", "psql", "-U", "airflow", "-d", "amlrun", "-At", "-F", "\t", *options, stdin=query
    )
    assert done.returncode == 0, done.stderr
    return [line.split("\t") for line in done.stdout.splitlines()]


def test_the_example_dag_runs_on_the_deployment_into_the_shared_history_and_store(
    deployment: Deployment,
) -> None:
    api = deployment.api
    # The DAG is paused at creation; it can be unpaused once the dag processor has parsed it.
    deployment.wait_for(
        f"the dag processor did not parse {DAG_ID}",
        lambda: api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200,
        seconds=180,
        logs_of=("airflow-dag-processor",),
    )
    conf = {"alpha": ALPHA}
    triggered = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
    assert triggered.status_code == 200, triggered.text
    dag_run_id = triggered.json()["dag_run_id"]
    dag_run_url = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(dag_run_id, safe='')}"

    def finished() -> str | None:
        state = str(api.get(dag_run_url).json()["state"])
        return state if state in ("success", "failed") else None

    state = deployment.wait_for(
        f"DAG run {dag_run_id} did not finish",
        finished,
        seconds=300,
        logs_of=("airflow-scheduler", "airflow-worker"),
    )
    if state != "success":
        log = api.get(f"{dag_run_url}/taskInstances/train/logs/1", headers={"Accept": "application/json"})
        pytest.fail(f"DAG run {dag_run_id} ended {state}; its task's log:\n{log.text[-4000:]}")

    # The run row, as the run-history database holds it.
    rows = _psql(
        deployment,
        "SELECT id, status, target, outputs_uri FROM amlrun_runs"
        " WHERE dag_id = :'dag' AND airflow_run_id = :'run'",
        dag=DAG_ID,
        run=dag_run_id,
    )
    assert len(rows) == 1, rows
    run_id, status, target, outputs_uri = rows[0]
    assert (status, target) == ("Completed", "local")
    alpha = _psql(
        deployment, "SELECT value FROM amlrun_metrics WHERE run_id = :'id' AND name = 'alpha'", id=run_id
    )
    assert alpha == [[str(ALPHA)]]

    # The outputs a worker collected, read from the store in another container: the API server's.
    outputs = deployment.exec("airflow-apiserver", "cat", f"{outputs_uri}/metrics.json")
    assert outputs.returncode == 0, outputs.stderr
    assert json.loads(outputs.stdout)["alpha"] == ALPHA

    # The run in the Training runs pages' API, which the API server reads from the same history.
    shown = api.get(f"/amlrun/api/runs/{run_id}")
    assert shown.status_code == 200, shown.text
    assert (shown.json()["status"], shown.json()["experiment"]) == ("Completed", "diabetes_ridge")


def test_the_workers_reach_the_example_vm_through_its_connection(deployment: Deployment) -> None:
    # amlrun_vm names the host key airflow-init made for the VM: the SSH hook verifies it and logs in by key.
    tested = deployment.exec(
        "airflow-worker",
        "airflow",
        "connections",
        "test",
        "amlrun_vm",
        env={"AIRFLOW__CORE__TEST_CONNECTION": "Enabled"},
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "Connection success!" in tested.stdout, tested.stdout + tested.stderr
