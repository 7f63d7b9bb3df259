"""The run history through a real Airflow API server: signed-in users only, each seeing the runs they may read.

One `airflow api-server` on loopback serves this module, with the session's Airflow home, a run history
holding runs of two DAGs and one run from plain Python, and an auth manager that answers DAG questions by
DAG id (tests/integration/dag_access_auth_manager.py). Users: admin (role admin), vic (viewer, every DAG),
ann (viewer, DAG A only).
"""

from __future__ import annotations

import base64
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
from urllib.parse import quote, unquote

import httpx
import pytest

from airflow_amlrun.history import MetricPoint, RunHistory, RunStatus
from airflow_amlrun.snapshot import BlobStore, take_snapshot
from airflow_amlrun.targets.common import STD_LOG
from tests.conftest import DAGS_FOLDER, REPO, write_script

AIRFLOW = str(Path(sys.executable).parent / "airflow")
DAG_A = "amlrun_access_dag_a"
DAG_B = "amlrun_access_dag_b"
# A DAG Airflow does not have (deleted, or never parsed): its runs are shown as runs of no DAG.
DAG_GONE = "amlrun_access_dag_deleted"
# An output whose name is beyond Latin-1, the character set of HTTP headers.
WIDE_NAME = "模型 ☃.txt"
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
    amlrun_home: Path
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
        return [r["run_id"] for r in answer.json()["runs"]]


def _finished_run(history: RunHistory, store: BlobStore, run_id: str, code: Path, **fields) -> None:
    """A run with its code snapshot, its environment's lock, a stored log and output files, as a finished run
    leaves them."""
    snapshot = take_snapshot(code, store).snapshot
    lock = store.put_bytes(f"numpy==2.0.0  # lock of {run_id}\n".encode())
    environment = {"name": "amlrun-test", "version": 1, "lock_digest": lock}
    history.create_run(
        run_id=run_id,
        target="local",
        snapshot_id=snapshot.id,
        task_id="train",
        environment=environment,
        **fields,
    )
    store.put_object(f"runs/{run_id}/logs/{STD_LOG}", f"epoch 1 of {run_id}\ndone\n".encode())
    store.put_object(f"runs/{run_id}/outputs/model/weights.txt", f"weights of {run_id}".encode())
    store.put_object(f"runs/{run_id}/outputs/{WIDE_NAME}", "☃".encode())
    history.update_run(
        run_id,
        status=RunStatus.COMPLETED,
        logs_uri=store.uri_for(f"runs/{run_id}/logs"),
        outputs_uri=store.uri_for(f"runs/{run_id}/outputs"),
    )


def _fill_history(database_url: str, store: BlobStore, code: Path) -> dict[str, str]:
    """Runs of DAG A (one with markup in its experiment name and error), DAG B, and one from plain Python; the
    runs of A and B ran different versions of one script."""
    history = RunHistory(database_url)
    code.mkdir()
    (code / "train.py").write_text("alpha = 0.5\nprint(alpha)\n")
    _finished_run(
        history,
        store,
        "run_of_a",
        code,
        experiment="churn",
        arguments=["--alpha", "0.5"],
        tags={"team": "fraud"},
        dag_id=DAG_A,
        airflow_run_id="manual_1",
        try_number=1,
    )
    history.add_metrics("run_of_a", [MetricPoint("fold_mse", 1.0 / (i + 1), seq=i, step=i) for i in range(5)])
    history.create_run(run_id="marked_up", experiment=SCRIPT, target="local", dag_id=DAG_A, task_id="train")
    history.update_run("marked_up", status=RunStatus.FAILED, error=f"Traceback: {IMAGE}")
    (code / "train.py").write_text("alpha = 0.9\nprint(alpha)\n")
    (code / "secret_plan_of_b.txt").write_text("only B's readers may see this\n")
    _finished_run(
        history, store, "run_of_b", code, experiment="churn", arguments=["--alpha", "0.9"], dag_id=DAG_B
    )
    history.add_metrics("run_of_b", [MetricPoint("fold_mse", 0.25, seq=0, step=0)])
    history.create_run(run_id="plain_python", experiment="notebook", target="local")
    history.create_run(run_id="run_of_gone", experiment="churn", target="local", dag_id=DAG_GONE)
    # A sweep from plain Python: its parent runs no code, its one run does.
    history.create_run(
        run_id="sweep", experiment="tuning", target="hyperdrive", tags={"run_type": "hyperdrive"}
    )
    _finished_run(history, store, "run_of_sweep", code, experiment="tuning", parent_run_id="sweep")
    history.dispose()
    return {
        "a": "run_of_a",
        "marked_up": "marked_up",
        "b": "run_of_b",
        "plain": "plain_python",
        "gone": "run_of_gone",
        "sweep": "sweep",
        "of_sweep": "run_of_sweep",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def api_server(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    home = tmp_path_factory.mktemp("api-server")
    amlrun_home = home / "amlrun"
    runs = _fill_history(
        f"sqlite:///{amlrun_home / 'history.db'}", BlobStore(str(amlrun_home / "store")), home / "code"
    )

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
        yield ApiServer(url=url, runs=runs, amlrun_home=amlrun_home)
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


def _run_routes(run: str) -> list[str]:
    """Every route about one run."""
    return [
        f"/api/runs/{run}",
        f"/api/runs/{run}/metrics",
        f"/api/runs/{run}/children",
        f"/api/runs/{run}/environment/lock",
        f"/api/runs/{run}/log",
        f"/api/runs/{run}/snapshot",
        f"/api/runs/{run}/snapshot/file?path=train.py",
        f"/api/runs/{run}/outputs",
        f"/api/runs/{run}/outputs/model/weights.txt",
    ]


def _routes(server: ApiServer) -> list[str]:
    a, b = server.runs["a"], server.runs["b"]
    return [
        "/api/runs",
        "/api/experiments",
        "/api/openapi.json",
        f"/api/task-runs?dag_id={DAG_A}&run_id=manual_1&task_id=train",
        f"/api/compare?run_id={a}&run_id={b}",
        f"/api/diff?run_a={a}&run_b={b}&path=train.py",
        *_run_routes(a),
    ]


def test_anonymous_callers_get_401_on_every_route(api_server):
    pages_and_bundle = ["/runs", f"/runs/{api_server.runs['a']}", "/static/amlrun-ui.js"]
    for path in [*_routes(api_server), *_run_routes(api_server.runs["b"]), *pages_and_bundle]:
        answer = api_server.get(path)
        assert answer.status_code == 401, (path, answer.text)
        assert "run_of_a" not in answer.text and "fold_mse" not in answer.text
    # FastAPI's own schema and docs routes are not served at all: the schema is a signed-in route.
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert api_server.get(path, "admin").status_code == 404, path


def test_a_signed_in_admin_reads_every_route_and_every_run(api_server):
    for path in _routes(api_server):
        assert api_server.get(path, "admin").status_code == 200, path
    assert set(api_server.run_ids("admin")) == set(api_server.runs.values())

    detail = api_server.get(f"/api/runs/{api_server.runs['a']}", "admin").json()
    assert detail["arguments"] == ["--alpha", "0.5"] and detail["parameters"] == {"alpha": "0.5"}
    assert detail["airflow"]["dag_id"] == DAG_A
    assert detail["metrics"] == {"fold_mse": 0.2}
    assert [(m["name"], m["count"], m["min"], m["max"]) for m in detail["metric_summaries"]] == [
        ("fold_mse", 5, 0.2, 1.0)
    ]
    assert api_server.get(f"/api/runs/{api_server.runs['plain']}", "admin").status_code == 200
    missing = api_server.get("/api/runs/no_such_run", "admin")
    # The answer names the run, not where the history database lives.
    assert (missing.status_code, missing.json()) == (404, {"detail": "No run 'no_such_run'."})

    experiments = {e["name"]: e["runs"] for e in api_server.get("/api/experiments", "admin").json()}
    assert experiments == {"churn": 3, "notebook": 1, SCRIPT: 1, "tuning": 2}
    schema = api_server.get("/api/openapi.json", "admin").json()
    assert {"/api/runs", "/api/runs/{run_id}/metrics", "/api/compare", "/api/diff"} <= set(schema["paths"])


def test_a_sweep_has_no_snapshot_of_its_own_and_its_answer_points_at_its_runs(api_server):
    sweep, of_sweep = api_server.runs["sweep"], api_server.runs["of_sweep"]
    for path in (f"/api/runs/{sweep}/snapshot", f"/api/runs/{sweep}/snapshot/file?path=train.py"):
        answer = api_server.get(path, "admin")
        assert (answer.status_code, answer.json()) == (
            404,
            {
                "detail": f"Run {sweep} is a sweep: it runs no code of its own, so it has no snapshot. Each of "
                "its runs has one: open one of them (the sweep's runs are listed on its page)."
            },
        )
    assert [r["run_id"] for r in api_server.get(f"/api/runs/{sweep}/children", "admin").json()] == [of_sweep]
    files = api_server.get(f"/api/runs/{of_sweep}/snapshot", "admin").json()["files"]
    assert [f["path"] for f in files] == ["secret_plan_of_b.txt", "train.py"]


def test_each_route_shows_the_run_s_data(api_server):
    a, b = api_server.runs["a"], api_server.runs["b"]

    (chart,) = api_server.get(f"/api/runs/{a}/metrics", "admin").json()
    assert (chart["name"], chart["x"], chart["values"][-1], chart["sampled"]) == (
        "fold_mse",
        [0, 1, 2, 3, 4],
        0.2,
        False,
    )
    log = api_server.get(f"/api/runs/{a}/log", "admin").json()
    assert (log["lines"], log["ended"], log["status"]) == (["epoch 1 of run_of_a", "done"], True, "Completed")
    tail = api_server.get(f"/api/runs/{a}/log?store_offset={len('epoch 1 of run_of_a') + 1}", "admin").json()
    assert tail["lines"] == ["done"]
    lock = api_server.get(f"/api/runs/{a}/environment/lock", "admin")
    assert (lock.status_code, lock.text) == (200, "numpy==2.0.0  # lock of run_of_a\n")
    files = [f["path"] for f in api_server.get(f"/api/runs/{a}/snapshot", "admin").json()["files"]]
    assert files == ["train.py"]
    shown = api_server.get(f"/api/runs/{a}/snapshot/file?path=train.py", "admin").json()
    assert shown["text"] == "alpha = 0.5\nprint(alpha)\n"
    outputs = api_server.get(f"/api/runs/{a}/outputs", "admin").json()
    assert outputs == [{"path": "model/weights.txt"}, {"path": WIDE_NAME}]
    download = api_server.get(f"/api/runs/{a}/outputs/model/weights.txt", "admin")
    assert download.content == b"weights of run_of_a"
    assert download.headers["content-disposition"] == 'attachment; filename="weights.txt"'
    assert api_server.get(f"/api/runs/{a}/outputs/..%2F..%2Fhistory.db", "admin").status_code == 404

    compared = api_server.get(f"/api/compare?run_id={a}&run_id={b}", "admin").json()
    assert [r["parameters"] for r in compared["runs"]] == [{"alpha": "0.5"}, {"alpha": "0.9"}]
    assert compared["differing_parameters"] == ["alpha"] and compared["differing_metrics"] == ["fold_mse"]
    assert [len(s["series"][0]["values"]) for s in compared["series"]] == [5, 1]

    diff = api_server.get(f"/api/diff?run_a={a}&run_b={b}&path=train.py", "admin").json()
    assert (diff["added"], diff["removed"], diff["changed"]) == (["secret_plan_of_b.txt"], [], ["train.py"])
    assert "-alpha = 0.5\n+alpha = 0.9\n" in diff["diff"]

    listed = api_server.get("/api/runs?metric=fold_mse::0.3&sort=-metrics.fold_mse", "admin").json()
    assert [r["run_id"] for r in listed["runs"]] == [b, a]
    bad = api_server.get("/api/runs?sort=nonsense", "admin")
    assert bad.status_code == 400 and "metrics.NAME" in bad.json()["detail"]

    (task_run,) = api_server.get(
        f"/api/task-runs?dag_id={DAG_A}&run_id=manual_1&task_id=train", "admin"
    ).json()
    assert (task_run["run_id"], task_run["airflow"]["try_number"]) == (a, 1)


def test_an_output_named_beyond_latin_1_downloads_under_its_name(api_server):
    # HTTP headers are Latin-1: the name goes as RFC 5987's UTF-8 filename*, an ASCII one beside it.
    answer = api_server.get(f"/api/runs/{api_server.runs['a']}/outputs/{quote(WIDE_NAME)}", "admin")
    assert (answer.status_code, answer.content) == (200, "☃".encode())
    disposition = answer.headers["content-disposition"]
    assert disposition == f"attachment; filename=\"__ _.txt\"; filename*=UTF-8''{quote(WIDE_NAME, safe='')}"
    assert unquote(disposition.split("UTF-8''")[1]) == WIDE_NAME


def _cursor(*parts: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "named"),
    [
        (f"sort=status&cursor={_cursor('status', {'a': 1}, 'r')}", _cursor("status", {"a": 1}, "r")),
        (f"sort=-metrics.x&cursor={_cursor('-metrics.x', 10**400, 'r')}", "is damaged"),
        (f"cursor={_cursor('-created_at', '2026-01-01', None)}", "is damaged"),
        ('tag="team"=fraud', "'\"team\"'"),
        ("tag=équipe=fraud", "'équipe'"),
    ],
    ids=["dict-value", "huge-number", "no-run-id", "quote-in-tag-key", "non-ascii-tag-key"],
)
def test_a_crafted_cursor_or_an_unsearchable_tag_is_a_400_naming_it(api_server, query, named):
    answer = api_server.get(f"/api/runs?{query}", "admin")
    assert answer.status_code == 400, answer.text
    assert named in answer.json()["detail"]


def test_a_user_sees_only_the_runs_of_the_dags_they_may_read(api_server):
    runs = api_server.runs
    assert set(api_server.run_ids("ann")) == {runs["a"], runs["marked_up"]}
    # The filter is part of the query: the two newest runs she may see, though newer ones exist.
    assert api_server.run_ids("ann", "?limit=2") == [runs["marked_up"], runs["a"]]
    assert api_server.get(f"/api/runs/{runs['a']}", "ann").status_code == 200
    for path in _run_routes(runs["b"]):
        answer = api_server.get(path, "ann")
        assert answer.status_code == 403, (path, answer.text)
        assert (
            "churn" not in answer.text and "fold_mse" not in answer.text and "secret_plan" not in answer.text
        )
    # A comparison or a diff with a run she may not see is refused as a route about that run is, and
    # answers nothing of it; a list leaves it out.
    for path, status in (
        (f"/api/compare?run_id={runs['a']}&run_id={runs['b']}", 403),
        (f"/api/compare?run_id={runs['b']}&run_id={runs['a']}", 403),
        (f"/api/diff?run_a={runs['a']}&run_b={runs['b']}&path=secret_plan_of_b.txt", 403),
        (f"/api/diff?run_a={runs['b']}&run_b={runs['a']}", 403),
        ("/api/runs?metric=fold_mse::0.3", 200),
        (f"/api/task-runs?dag_id={DAG_B}&run_id=manual_1&task_id=train", 200),
    ):
        answer = api_server.get(path, "ann")
        assert answer.status_code == status, (path, answer.text)
        assert "secret_plan" not in answer.text and "0.9" not in answer.text and "0.25" not in answer.text, (
            path
        )
        assert runs["b"] not in answer.text.replace(f"Run {runs['b']!r}", ""), path

    experiments = {e["name"]: e["runs"] for e in api_server.get("/api/experiments", "ann").json()}
    assert experiments == {"churn": 1, SCRIPT: 1}


def test_a_run_without_a_dag_is_shown_only_to_who_may_read_the_workspace_connection(api_server):
    runs = api_server.runs
    # vic may read every DAG, but not connections: the plain-Python run is not his to see.
    assert set(api_server.run_ids("vic")) == {runs["a"], runs["marked_up"], runs["b"]}
    answer = api_server.get(f"/api/runs/{runs['plain']}", "vic")
    assert answer.status_code == 403
    assert "outside any DAG" in answer.json()["detail"] and "amlrun_default" in answer.json()["detail"]
    assert api_server.get(f"/api/runs/{runs['plain']}", "ann").status_code == 403
    assert "notebook" not in {e["name"] for e in api_server.get("/api/experiments", "vic").json()}
    assert runs["plain"] in api_server.run_ids("admin")


def test_a_run_of_a_deleted_dag_is_shown_as_one_of_no_dag_in_lists_and_by_id(api_server):
    # No DAG permission can be granted on a DAG Airflow no longer has: its runs go to the readers of the
    # workspace connection, in the list and by id alike.
    gone = api_server.runs["gone"]
    assert gone in api_server.run_ids("admin")
    assert api_server.get(f"/api/runs/{gone}", "admin").status_code == 200
    for user in ("vic", "ann"):
        assert gone not in api_server.run_ids(user), user
        answer = api_server.get(f"/api/runs/{gone}", user)
        assert answer.status_code == 403, (user, answer.text)
        assert "its DAG was deleted" in answer.json()["detail"] and DAG_GONE not in answer.text
        compared = api_server.get(f"/api/compare?run_id={gone}&run_id={api_server.runs['a']}", user)
        assert compared.status_code == 403, user
    experiments = {e["name"]: e["runs"] for e in api_server.get("/api/experiments", "vic").json()}
    assert experiments["churn"] == 2


def test_the_ui_cookie_signs_in_with_the_same_limits(api_server):
    runs = api_server.runs
    listed = api_server.get("/api/runs", "ann", cookie=True)
    assert listed.status_code == 200
    assert runs["a"] in listed.text and runs["b"] not in listed.text
    assert api_server.get(f"/api/runs/{runs['b']}", "ann", cookie=True).status_code == 403
    assert api_server.get(f"/api/runs/{runs['a']}", "ann", cookie=True).status_code == 200
    bundle = api_server.get("/static/amlrun-ui.js", "ann", cookie=True)
    assert (bundle.status_code, bundle.headers["content-type"]) == (200, "text/javascript; charset=utf-8")


def test_the_old_page_addresses_lead_to_the_pages_in_the_airflow_ui(api_server):
    # The operator's extra link, kept by every task instance that ran, names /amlrun/runs/<id>.
    run = api_server.runs["a"]
    for path, target in (
        ("/runs", "/plugin/amlrun_runs"),
        (f"/runs/{run}", f"/plugin/amlrun_runs/runs/{run}"),
    ):
        answer = api_server.get(path, "ann", cookie=True)
        assert answer.status_code == 307, path
        assert httpx.URL(f"{api_server.url}/amlrun{path}").join(answer.headers["location"]).path == target


def test_the_airflow_ui_lists_the_pages_in_its_navigation_and_on_the_task_instance(api_server):
    answer = httpx.get(
        f"{api_server.url}/api/v2/plugins",
        headers={"Authorization": f"Bearer {api_server.token('admin')}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    (plugin,) = [p for p in answer.json()["plugins"] if p["name"] == "amlrun"]
    apps = {a["name"]: a for a in plugin["react_apps"]}
    assert {n: (a["destination"], a["url_route"]) for n, a in apps.items()} == {
        "Training runs": ("nav", "amlrun_runs"),
        "Training run": ("task_instance", "amlrun_task_run"),
    }
    bundle = apps["Training runs"]["bundle_url"]
    assert bundle.startswith("amlrun/static/amlrun-ui.js?v=") and "missing" not in bundle
    served = api_server.get(bundle.removeprefix("amlrun"), "ann", cookie=True)
    assert served.status_code == 200 and b"AirflowPlugin" in served.content


def test_a_running_run_s_log_is_followed_by_offset_until_it_ends(api_server, tmp_path, monkeypatch):
    from airflow_amlrun import Experiment, ScriptRunConfig, Workspace

    # The run is recorded in the server's workspace and runs on this machine, where the server reads its log.
    monkeypatch.setenv("AIRFLOW__AMLRUN__HOME", str(api_server.amlrun_home))
    gate = tmp_path / "gate"
    script = (
        "import pathlib, time\n"
        "print('first line', flush=True)\n"
        f"while not pathlib.Path({str(gate)!r}).exists():\n"
        "    time.sleep(0.05)\n"
        "print('second line', flush=True)\n"
    )
    write_script(tmp_path / "src", "train.py", script)
    run = Experiment(Workspace.get(), "live").submit(ScriptRunConfig(tmp_path / "src", script="train.py"))
    seen: list[str] = []
    offsets = {"target_offset": 0, "store_offset": 0}

    def read() -> dict:
        query = "&".join(f"{k}={v}" for k, v in offsets.items())
        answer = api_server.get(f"/api/runs/{run.id}/log?{query}", "admin")
        assert answer.status_code == 200, answer.text
        found = answer.json()
        seen.extend(found["lines"])
        offsets.update(target_offset=found["target_offset"], store_offset=found["store_offset"])
        return found

    deadline = time.monotonic() + 60
    while "first line" not in seen:
        assert time.monotonic() < deadline, seen
        assert not read()["ended"]
        time.sleep(0.1)
    assert seen == ["first line"]
    # Someone without the run's permission learns nothing of it, however it is asked.
    assert api_server.get(f"/api/runs/{run.id}/log", "ann").status_code == 403
    gate.touch()
    run.wait_for_completion()
    while not read()["ended"]:
        assert time.monotonic() < deadline, seen
    assert seen == ["first line", "second line"]


def test_a_sweep_lists_its_runs_that_the_user_may_see(api_server):
    history = RunHistory(f"sqlite:///{api_server.amlrun_home / 'history.db'}")
    history.create_run(run_id="sweep_of_a", experiment="churn_sweep", target="local", dag_id=DAG_A)
    for trial, dag_id in (("trial_1", DAG_A), ("trial_2", DAG_A), ("trial_of_b", DAG_B)):
        history.create_run(
            run_id=trial,
            experiment="churn_sweep",
            target="local",
            dag_id=dag_id,
            parent_run_id="sweep_of_a",
            arguments=["--alpha", trial[-1]],
        )
    history.dispose()

    assert [r["run_id"] for r in api_server.get("/api/runs/sweep_of_a/children", "admin").json()] == [
        "trial_1",
        "trial_2",
        "trial_of_b",
    ]
    children = api_server.get("/api/runs/sweep_of_a/children", "ann").json()
    assert [(c["run_id"], c["parameters"]) for c in children] == [
        ("trial_1", {"alpha": "1"}),
        ("trial_2", {"alpha": "2"}),
    ]
    assert api_server.get("/api/runs/trial_1", "ann").json()["parent_run_id"] == "sweep_of_a"
    assert api_server.get("/api/runs/run_of_b/children", "ann").status_code == 403
