"""The run history through a real Airflow API server: signed-in users only, each seeing the runs they may read.

One `airflow api-server` on loopback serves this module, with the session's Airflow home, a run history
holding runs of two DAGs and one run from plain Python, and an auth manager that answers DAG questions by
DAG id (tests/integration/dag_access_auth_manager.py). Users: admin (role admin), vic (viewer, every DAG),
ann (viewer, DAG A only).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from airflow_amlrun.history import MetricPoint, RunHistory, RunStatus
from tests.conftest import DAGS_FOLDER, REPO

AIRFLOW = str(Path(sys.executable).parent / "airflow")
DAG_A = "amlrun_access_dag_a"
DAG_B = "amlrun_access_dag_b"
PASSWORDS = {"admin": "admin-pw", "vic": "vic-pw", "ann": "ann-pw"}
ROLES = {"admin": "admin", "vic": "viewer", "ann": "viewer"}
DAG_ACCESS = {"ann": [DAG_A]}
SCRIPT = '<script>alert("experiment")</script>'
IMAGE = "<img src=x onerror=alert(1)>"

_DAG_SOURCE = """
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG

with DAG("DAG_ID", schedule=None):
    EmptyOperator(task_id="train")
"""


@dataclass
class ApiServer:
    """A running API server, the ids of the runs its history holds, and a client per user."""

    url: str
    runs: dict[str, str]
    _tokens: dict[str, str] = field(default_factory=dict)

    def token(self, user: str) -> str:
        if user not in self._tokens:
            answer = httpx.post(
                f"{self.url}/auth/token", json={"username": user, "password": PASSWORDS[user]}, timeout=30
            )
            assert answer.status_code == 201, answer.text
            self._tokens[user] = answer.json()["access_token"]
        return self._tokens[user]

    def get(self, path: str, user: str | None = None, *, cookie: bool = False) -> httpx.Response:
        """GET a path of the plugin app, as nobody, or as a user by bearer token or by the UI's cookie."""
        headers, cookies = {}, {}
        if user is not None and cookie:
            cookies["_token"] = self.token(user)
        elif user is not None:
            headers["Authorization"] = f"Bearer {self.token(user)}"
        return httpx.get(f"{self.url}/amlrun{path}", headers=headers, cookies=cookies, timeout=30)

    def run_ids(self, user: str, query: str = "") -> list[str]:
        answer = self.get(f"/api/runs{query}", user)
        assert answer.status_code == 200, answer.text
        return [r["run_id"] for r in answer.json()]


def _fill_history(database_url: str) -> dict[str, str]:
    """Runs of DAG A (one with markup in its experiment name and error), DAG B, and one from plain Python."""
    history = RunHistory(database_url)
    history.create_run(
        run_id="run_of_a",
        experiment="churn",
        target="local",
        arguments=["--alpha", "0.5"],
        tags={"team": "fraud"},
        dag_id=DAG_A,
        task_id="train",
        airflow_run_id="manual_1",
        try_number=1,
    )
    history.add_metrics("run_of_a", [MetricPoint("fold_mse", 1.0 / (i + 1), seq=i, step=i) for i in range(5)])
    history.update_run("run_of_a", status=RunStatus.COMPLETED)
    history.create_run(run_id="marked_up", experiment=SCRIPT, target="local", dag_id=DAG_A, task_id="train")
    history.update_run("marked_up", status=RunStatus.FAILED, error=f"Traceback: {IMAGE}")
    history.create_run(run_id="run_of_b", experiment="churn", target="local", dag_id=DAG_B, task_id="train")
    history.create_run(run_id="plain_python", experiment="notebook", target="local")
    history.dispose()
    return {"a": "run_of_a", "marked_up": "marked_up", "b": "run_of_b", "plain": "plain_python"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def api_server(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    home = tmp_path_factory.mktemp("api-server")
    amlrun_home = home / "amlrun"
    runs = _fill_history(f"sqlite:///{amlrun_home / 'history.db'}")

    passwords = home / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    env = os.environ.copy()
    env.pop("AIRFLOW_CONN_AMLRUN_DEFAULT", None)
    env.update(
        {
            "AIRFLOW__AMLRUN__HOME": str(amlrun_home),
            "AIRFLOW__CORE__AUTH_MANAGER": "tests.integration.dag_access_auth_manager.DagAccessAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in ROLES.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AMLRUN_TEST_DAG_ACCESS": json.dumps(DAG_ACCESS),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        }
    )
    url = f"http://127.0.0.1:{_free_port()}"
    log_path = home / "api-server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # Airflow knows a DAG once it has parsed it (the auth manager lists readable DAGs from its
        # database); parsing while the server starts costs no extra wait.
        for dag_id in (DAG_A, DAG_B):
            (DAGS_FOLDER / f"{dag_id}.py").write_text(textwrap.dedent(_DAG_SOURCE).replace("DAG_ID", dag_id))
        subprocess.run(
            [AIRFLOW, "dags", "reserialize"],
            check=True,
            capture_output=True,
            env=os.environ.copy(),
            timeout=300,
        )
        _wait_until_serving(server, url, log_path)
        yield ApiServer(url=url, runs=runs)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_until_serving(server: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(
                f"airflow api-server exited with {server.returncode}:\n{log_path.read_text()[-4000:]}"
            )
        try:
            if httpx.get(f"{url}/api/v2/monitor/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"airflow api-server did not answer on {url} within 120 s:\n{log_path.read_text()[-4000:]}")


def _routes(server: ApiServer) -> list[str]:
    run = server.runs["a"]
    return ["/api/runs", f"/api/runs/{run}", "/api/experiments", "/runs", f"/runs/{run}"]


def test_anonymous_callers_get_401_on_every_route(api_server):
    for path in [*_routes(api_server), "/openapi.json"]:
        answer = api_server.get(path)
        expected = 404 if path == "/openapi.json" else 401
        assert answer.status_code == expected, (path, answer.text)
        assert "run_of_a" not in answer.text and "fold_mse" not in answer.text


def test_a_signed_in_admin_reads_every_route_and_every_run(api_server):
    for path in _routes(api_server):
        assert api_server.get(path, "admin").status_code == 200, path
    assert set(api_server.run_ids("admin")) == set(api_server.runs.values())

    detail = api_server.get(f"/api/runs/{api_server.runs['a']}", "admin").json()
    assert [p["step"] for p in detail["metric_history"] if p["name"] == "fold_mse"] == [0, 1, 2, 3, 4]
    assert detail["arguments"] == ["--alpha", "0.5"]
    assert detail["airflow"]["dag_id"] == DAG_A
    assert api_server.get(f"/api/runs/{api_server.runs['plain']}", "admin").status_code == 200
    missing = api_server.get("/api/runs/no_such_run", "admin")
    # The answer names the run, not where the history database lives.
    assert (missing.status_code, missing.json()) == (404, {"detail": "No run 'no_such_run'."})

    experiments = {e["name"]: e["runs"] for e in api_server.get("/api/experiments", "admin").json()}
    assert experiments == {"churn": 2, "notebook": 1, SCRIPT: 1}


def test_a_user_sees_only_the_runs_of_the_dags_they_may_read(api_server):
    runs = api_server.runs
    assert set(api_server.run_ids("ann")) == {runs["a"], runs["marked_up"]}
    # The filter is part of the query: the two newest runs she may see, though newer ones exist.
    assert api_server.run_ids("ann", "?limit=2") == [runs["marked_up"], runs["a"]]
    assert api_server.get(f"/api/runs/{runs['a']}", "ann").status_code == 200
    assert api_server.get(f"/runs/{runs['a']}", "ann").status_code == 200
    for path in (f"/api/runs/{runs['b']}", f"/runs/{runs['b']}"):
        answer = api_server.get(path, "ann")
        assert answer.status_code == 403, (path, answer.text)
        assert "churn" not in answer.text
    page = api_server.get("/runs", "ann").text
    assert runs["a"] in page and runs["b"] not in page and runs["plain"] not in page

    experiments = {e["name"]: e["runs"] for e in api_server.get("/api/experiments", "ann").json()}
    assert experiments == {"churn": 1, SCRIPT: 1}


def test_a_run_without_a_dag_is_shown_only_to_who_may_read_the_workspace_connection(api_server):
    runs = api_server.runs
    # vic may read every DAG, but not connections: the plain-Python run is not his to see.
    assert set(api_server.run_ids("vic")) == {runs["a"], runs["marked_up"], runs["b"]}
    answer = api_server.get(f"/api/runs/{runs['plain']}", "vic")
    assert answer.status_code == 403
    assert "outside any DAG" in answer.json()["detail"] and "amlrun_default" in answer.json()["detail"]
    assert api_server.get(f"/runs/{runs['plain']}", "ann").status_code == 403
    assert "notebook" not in {e["name"] for e in api_server.get("/api/experiments", "vic").json()}
    assert runs["plain"] in api_server.run_ids("admin")


def test_the_ui_cookie_signs_in_the_pages_with_the_same_limits(api_server):
    runs = api_server.runs
    page = api_server.get("/runs", "ann", cookie=True)
    assert page.status_code == 200
    assert runs["a"] in page.text and runs["b"] not in page.text
    assert api_server.get(f"/runs/{runs['b']}", "ann", cookie=True).status_code == 403
    assert api_server.get(f"/api/runs/{runs['a']}", "ann", cookie=True).status_code == 200


def test_the_pages_show_recorded_markup_as_text(api_server):
    listing = api_server.get("/runs", "ann").text
    assert "&lt;script&gt;alert(&quot;experiment&quot;)&lt;/script&gt;" in listing
    assert "<script>" not in listing
    detail = api_server.get(f"/runs/{api_server.runs['marked_up']}", "ann").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in detail
    assert "<img" not in detail
