"""A real Airflow deployment on this machine, for a test module: what a scheduler does to a task that
`dag.test` never shows (another process per task, retries, Celery workers).

`AirflowCluster` gives the module its own AIRFLOW_HOME, a metadata database on the machine's PostgreSQL,
`airflow db migrate`, then the scheduler, dag-processor, triggerer and api-server (loopback, a free port; the
executor API of the tasks is that server's), with LocalExecutor or CeleryExecutor and its workers (broker: a
database of the machine's Redis of its own; results: the metadata database). Every component shares one
workspace, `amlrun_default`, on a PostgreSQL database of its own, so all runs land in one history.

A test writes DAG files into `dags`, triggers a DAG through the REST API and waits for its state, reads task
instances (state, hostname, pid) and their log files, and finds the task runner processes. `stop()` ends
every process the cluster started, and every process they started in turn (the training scripts lead
sessions of their own: they are found by a variable only this cluster's processes carry), then drops the
databases and empties the Redis database.

Use it as a context manager in a module-scoped fixture:

    @pytest.fixture(scope="module")
    def cluster() -> Iterator[AirflowCluster]:
        with AirflowCluster(executor="CeleryExecutor", celery_workers=2) as started:
            yield started
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import pytest

if TYPE_CHECKING:
    from airflow_amlrun.history import RunHistory

PG_SERVER = os.environ.get("AMLRUN_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS = "redis://127.0.0.1:6379"
# The key claiming a Redis database for one cluster, and how long a claim lasts: longer than any test module.
CLAIM_KEY = "amlrun-test-broker"
CLAIM_SECONDS = 3 * 60 * 60
# Marks a database a test cluster used, for as long as that cluster has not emptied it: only such a database is
# emptied when found holding keys and no live claim.
USED_KEY = "amlrun-test-broker-used"
AIRFLOW = str(Path(sys.executable).parent / "airflow")
# The variable every process of a cluster inherits (the training scripts too): how teardown finds them.
MARKER = "AMLRUN_TEST_CLUSTER"
ADMIN = ("admin", "admin-pw")

# Each Celery worker reports a hostname of its own (`wN@<machine>`, its Celery node name), as workers on
# separate machines would: Airflow records it on each task instance it runs.
_HOSTNAME_MODULE = '''\
"""[core] hostname_callable of a test cluster's Celery workers."""
import os


def worker_hostname() -> str:
    return f"{os.environ['AMLRUN_TEST_WORKER']}@{os.uname().nodename}"
'''

FINISHED = ("success", "failed")


@dataclass(frozen=True)
class TaskInstance:
    """A task instance as the REST API shows it (its latest try)."""

    id: str
    task_id: str
    state: str | None
    try_number: int
    hostname: str | None
    pid: int | None
    map_index: int


@dataclass
class _Component:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


class AirflowCluster:
    """An Airflow 3 deployment of its own: scheduler, dag-processor, triggerer, api-server, Celery workers.

    :param executor: ``LocalExecutor`` or ``CeleryExecutor``.
    :param celery_workers: how many ``airflow celery worker`` processes (CeleryExecutor only).
    :param worker_concurrency: task slots of each Celery worker.
    :param parallelism: ``[core] parallelism``: most tasks running at once (a LocalExecutor keeps as many
        worker processes).
    :param heartbeat_timeout: ``[scheduler] task_instance_heartbeat_timeout``: seconds without a heartbeat after
        which the scheduler takes a running task for dead.
    :param env: more variables for every component.
    """

    def __init__(
        self,
        *,
        executor: str = "LocalExecutor",
        celery_workers: int = 0,
        worker_concurrency: int = 4,
        parallelism: int = 8,
        heartbeat_timeout: int = 20,
        env: dict[str, str] | None = None,
    ) -> None:
        if executor not in ("LocalExecutor", "CeleryExecutor"):
            raise ValueError(f"executor must be LocalExecutor or CeleryExecutor, not {executor!r}")
        if (executor == "CeleryExecutor") != (celery_workers > 0):
            raise ValueError("CeleryExecutor needs celery_workers >= 1, and only it takes workers")
        self.executor = executor
        self.celery_workers = celery_workers
        self.token = secrets.token_hex(4)
        self.home = Path(tempfile.mkdtemp(prefix=f"amlrun-cluster-{self.token}-"))
        self.dags = self.home / "dags"
        self.logs = self.home / "logs"
        self.store = self.home / "store"
        self.metadata_db = f"amlrun_af_{self.token}"
        self.workspace_db = f"amlrun_af_{self.token}_runs"
        self.workspace_url = f"{PG_SERVER}/{self.workspace_db}"
        self.redis_db = 0
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._components: list[_Component] = []
        self._databases: list[str] = []
        self._redis_used = False
        self._token: str | None = None
        self._history: RunHistory | None = None
        self.env = self._environment(worker_concurrency, parallelism, heartbeat_timeout, env or {})

    # ---------------------------------------------------------------- life cycle

    def __enter__(self) -> AirflowCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Create the databases, migrate, start every component and wait until each reports healthy."""
        self.dags.mkdir(parents=True)
        (self.home / "components").mkdir()
        # The metadata database is a copy of one migrated once per test process: `airflow db migrate` takes
        # a quarter of a minute, a copy of its result a moment.
        template = _migrated_template(self.env)
        _admin_sql(f'CREATE DATABASE "{self.metadata_db}" TEMPLATE "{template}"')
        self._databases.append(self.metadata_db)
        _admin_sql(f'CREATE DATABASE "{self.workspace_db}"')
        self._databases.append(self.workspace_db)
        if self.executor == "CeleryExecutor":
            self._claim_redis_db()
        self._start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port))
        self._start("scheduler", "scheduler")
        self._start("dag-processor", "dag-processor")
        self._start("triggerer", "triggerer")
        for n in range(1, self.celery_workers + 1):
            self._start(
                f"worker-w{n}",
                "celery",
                "worker",
                "--celery-hostname",
                f"w{n}@%h",
                extra_env={"AMLRUN_TEST_WORKER": f"w{n}"},
            )
        self._wait_healthy()

    def stop(self) -> None:
        """Stop every process the cluster started and theirs, then drop its databases. Safe to call twice."""
        for component in self._components:
            _signal_group(component.process.pid, signal.SIGTERM)
        # A short grace: nothing of a test cluster needs a clean shutdown (its databases are dropped and its
        # stray processes killed below), and the api-server alone takes several seconds to end on SIGTERM.
        deadline = time.monotonic() + 3
        for component in self._components:
            with contextlib.suppress(subprocess.TimeoutExpired):
                component.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for component in self._components:
            _signal_group(component.process.pid, signal.SIGKILL)
            component.process.wait()
        self._components.clear()
        if self._history is not None:
            self._history.engine.dispose()
            self._history = None
        # What the components started outside their groups (the runs' supervisors and scripts).
        for _ in range(50):
            left = self.marked_processes()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for name in self._databases:
            with contextlib.suppress(Exception):
                _admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._databases.clear()
        if self._redis_used:
            with contextlib.suppress(Exception):
                _redis(self.redis_db).flushdb()
            self._redis_used = False
        shutil.rmtree(self.home, ignore_errors=True)

    # ---------------------------------------------------------------- DAGs and runs

    def write_dag(self, source: str, dag_id: str | None = None) -> str:
        """Write a DAG file (``DAG_ID`` in `source` is replaced by the id) and wait until Airflow serves it."""
        dag_id = dag_id or f"c_{secrets.token_hex(4)}"
        (self.dags / f"{dag_id}.py").write_text(textwrap.dedent(source).replace("DAG_ID", dag_id))
        return self.wait_for_dag(dag_id)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> str:
        """Wait until Airflow serves a DAG of a file in `dags` (one copied there, say); its id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._api("GET", f"/api/v2/dags/{dag_id}", ok=(200, 404)).status_code == 200:
                return dag_id
            time.sleep(1)
        self._fail(f"DAG {dag_id} did not appear in the API within {timeout} s")

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a DAG run; its run id."""
        response = self._api(
            "POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}}
        )
        return str(response.json()["dag_run_id"])

    def dag_run_state(self, dag_id: str, run_id: str) -> str:
        return str(self._api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"])

    def wait_for_dag_run(self, dag_id: str, run_id: str, timeout: float = 600) -> str:
        """The DAG run's final state (success or failed); fails the test, with the components' logs, if it
        has not finished within timeout seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.dag_run_state(dag_id, run_id)
            if state in FINISHED:
                return state
            time.sleep(1)
        self._fail(f"DAG run {dag_id} {run_id} did not finish within {timeout} s")

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, TaskInstance]:
        """The run's task instances by task id."""
        body = self._api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()
        return {
            ti["task_id"]: TaskInstance(
                id=ti["id"],
                task_id=ti["task_id"],
                state=ti["state"],
                try_number=ti["try_number"],
                hostname=ti["hostname"] or None,
                pid=ti["pid"],
                map_index=ti["map_index"],
            )
            for ti in body["task_instances"]
        }

    def wait_for_task(
        self, dag_id: str, run_id: str, task_id: str, state: str, try_number: int = 1, timeout: float = 300
    ) -> TaskInstance:
        """The task instance once its try `try_number` is in `state` and its task runner has a pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ti = self.task_instances(dag_id, run_id).get(task_id)
            if ti is not None and ti.try_number == try_number and ti.state == state and ti.pid:
                return ti
            time.sleep(0.5)
        self._fail(f"Task {dag_id}.{task_id} (try {try_number}) was not {state} within {timeout} s")

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """A task's XCom (its return value by default), as the REST API gives it."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        value = self._api("GET", path).json()["value"]
        # Stored as JSON text, which the API passes on as it is.
        return json.loads(value) if isinstance(value, str) else value

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> None:
        """Set a task instance's state as a user does in the UI ("Mark as failed"): a running or deferred task
        is then stopped by Airflow."""
        self._api(
            "PATCH",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}",
            json={"new_state": state},
        )

    def clear_task(self, dag_id: str, run_id: str, task_id: str) -> None:
        """Clear a task instance as a user does in the UI ("Clear"), whatever its state: it runs again, as a new
        try, and its DAG run with it."""
        self._api(
            "POST",
            f"/api/v2/dags/{dag_id}/clearTaskInstances",
            json={"dry_run": False, "dag_run_id": run_id, "task_ids": [task_id], "only_failed": False},
        )

    def task_log_records(
        self, dag_id: str, run_id: str, task_id: str, try_number: int = 1
    ) -> list[dict[str, Any]]:
        """The records of one try's task log as Airflow stores them (each with its `event` and `level`): the
        worker's and those the triggerer wrote while the task was deferred (files of their own beside it), in
        time order."""
        folder = self.logs / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        name = f"attempt={try_number}.log"
        records: list[tuple[str, int, dict[str, Any]]] = []
        for path in [folder / name, *sorted(folder.glob(f"{name}.trigger.*.log"))]:
            if not path.exists():
                continue
            when = ""
            for raw in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(raw)
                except ValueError:
                    record = {"event": raw}
                if not isinstance(record, dict):
                    record = {"event": raw}
                # A record without a time (a raw line) stays after the one before it.
                when = str(record.get("timestamp") or when)
                records.append((when, len(records), record))
        return [record for _, _, record in sorted(records, key=lambda item: item[:2])]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """The task log of one try as the UI shows it (see task_log_records): each record's message, and its
        exception."""
        texts = []
        for record in self.task_log_records(dag_id, run_id, task_id, try_number):
            text = str(record.get("event", ""))
            if record.get("error_detail"):
                text += "\n" + json.dumps(record["error_detail"])
            texts.append(text)
        return "\n".join(texts)

    def history(self) -> RunHistory:
        """The workspace's run history, which every component shares, as this test process reads it."""
        from airflow_amlrun.history import RunHistory

        if self._history is None:
            self._history = RunHistory(self.workspace_url)
        return self._history

    # ---------------------------------------------------------------- processes

    def task_runner_pid(self, ti: TaskInstance) -> int:
        """The pid of the process running a task instance's code (not its supervisor), checked by its
        command line: Airflow names it ``airflow worker -- <task instance id>``."""
        for pid in _pids():
            if _cmdline(pid) == f"airflow worker -- {ti.id}":
                return pid
        self._fail(f"No task runner process of task instance {ti.id} ({ti.task_id}, pid {ti.pid})")

    def task_supervisor_pid(self, ti: TaskInstance) -> int:
        """The pid of the process supervising a task instance's task runner (a LocalExecutor worker, or a
        Celery worker's pool process): the task runner's parent."""
        runner = self.task_runner_pid(ti)
        stat = Path(f"/proc/{runner}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])

    def marked_processes(self) -> list[int]:
        """Live processes that this cluster started, directly or not."""
        marker = f"{MARKER}={self.token}".encode()
        found = []
        for pid in _pids():
            if pid == os.getpid():
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0") and _state(pid) not in ("Z", None):
                found.append(pid)
        return found

    def marked_processes_running_script(self, script: str) -> list[int]:
        """Live processes of this cluster whose command line runs a file named `script` (a training script)."""
        return [
            pid for pid in self.marked_processes() if any(Path(arg).name == script for arg in _argv(pid)[1:])
        ]

    def component_logs(self, tail: int = 4000) -> str:
        """The end of each component's own output, for a failure's message."""
        parts = []
        for path in sorted((self.home / "components").glob("*.log")):
            parts.append(f"----- {path.stem}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- internals

    def _environment(
        self, concurrency: int, parallelism: int, heartbeat_timeout: int, extra: dict[str, str]
    ) -> dict[str, str]:
        metadata = f"{PG_SERVER}/{self.metadata_db}".replace("postgresql://", "postgresql+psycopg://", 1)
        (self.home / "passwords.json").write_text(json.dumps({ADMIN[0]: ADMIN[1]}))
        pylib = self.home / "pylib"
        pylib.mkdir()
        (pylib / "amlrun_cluster_host.py").write_text(_HOSTNAME_MODULE)
        # Nothing of the test session's own Airflow (its home, its connections) reaches the cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AMLRUN"))}
        env.update(
            {
                MARKER: self.token,
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": self.executor,
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN[0]}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
                # psycopg 3 is async too: no asyncpg needed for the api-server.
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": metadata,
                "AIRFLOW__API__BASE_URL": self.url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.logs),
                # A task whose supervisor died is noticed in seconds, not minutes.
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(heartbeat_timeout),
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
                # New DAG files are listed within seconds.
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
                "AIRFLOW_CONN_AMLRUN_DEFAULT": json.dumps(
                    {
                        "conn_type": "amlrun",
                        "extra": {"database_url": self.workspace_url, "store_url": str(self.store)},
                    }
                ),
                "AIRFLOW__AMLRUN__HOME": str(self.home / "amlrun"),
                "AIRFLOW__AMLRUN__POLL_INTERVAL_SECONDS": "0.1",
            }
        )
        if self.executor == "CeleryExecutor":
            result_db = metadata.replace("postgresql+psycopg://", "db+postgresql+psycopg://", 1)
            env.update(
                {
                    # The database is chosen at start (_claim_redis_db).
                    "AIRFLOW__CELERY__BROKER_URL": f"{REDIS}/0",
                    "AIRFLOW__CELERY__RESULT_BACKEND": result_db,
                    "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
                }
            )
        env.update(extra)
        return env

    def _claim_redis_db(self) -> None:
        """Take a database of the machine's Redis (1-15) that no live cluster claims as the broker's; it is emptied
        at the end."""
        import redis

        for db in secrets.SystemRandom().sample(range(1, 16), 15):
            try:
                free = _claim(_redis(db), self.home.name)
            except redis.RedisError as err:
                pytest.fail(f"Redis is not reachable at {REDIS} ({err}); `make services` starts it.")
            if free:
                self.redis_db = db
                self._redis_used = True
                self.env["AIRFLOW__CELERY__BROKER_URL"] = f"{REDIS}/{db}"
                return
        pytest.fail(
            f"Every database 1-15 of the Redis at {REDIS} is claimed by a live test cluster ({CLAIM_KEY!r}, which "
            f"expires {CLAIM_SECONDS} s after it was set) or holds keys of something else: none is free for a test "
            "broker."
        )

    def _start(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> None:
        env = dict(self.env)
        if extra_env and "AMLRUN_TEST_WORKER" in extra_env:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(self.home / "pylib"), env.get("PYTHONPATH")])
            )
            env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] = "amlrun_cluster_host.worker_hostname"
        env.update(extra_env or {})
        log = self.home / "components" / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [AIRFLOW, *args],
                env=env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._components.append(_Component(name, process, log))

    def _wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        waiting_for = ["the api-server"]
        while time.monotonic() < deadline:
            for component in self._components:
                if component.process.poll() is not None:
                    self._fail(f"{component.name} exited with status {component.process.returncode} at start")
            waiting_for = self._not_ready()
            if not waiting_for:
                return
            time.sleep(1)
        self._fail(f"The cluster was not ready within {timeout} s: waiting for {', '.join(waiting_for)}")

    def _not_ready(self) -> list[str]:
        try:
            health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return ["the api-server"]
        missing = [
            name
            for name in ("metadatabase", "scheduler", "triggerer", "dag_processor")
            if (health.get(name) or {}).get("status") != "healthy"
        ]
        for component in self._components:
            if component.name.startswith("worker-") and b" ready." not in component.log.read_bytes():
                missing.append(component.name)
        return missing

    def _api(self, method: str, path: str, ok: tuple[int, ...] = (200, 201), **kwargs: Any) -> httpx.Response:
        for attempt in range(2):
            if self._token is None:
                response = httpx.post(
                    f"{self.url}/auth/token",
                    json={"username": ADMIN[0], "password": ADMIN[1]},
                    timeout=30,
                )
                if response.status_code not in (200, 201):
                    self._fail(f"POST /auth/token answered {response.status_code}: {response.text}")
                self._token = response.json()["access_token"]
            response = httpx.request(
                method,
                f"{self.url}{path}",
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=60,
                **kwargs,
            )
            if response.status_code == 401 and attempt == 0:
                self._token = None
                continue
            if response.status_code not in ok:
                self._fail(f"{method} {path} answered {response.status_code}: {response.text[:2000]}")
            return response
        raise AssertionError("unreachable")

    def _fail(self, message: str) -> NoReturn:
        pytest.fail(f"{message}\nThe cluster's components said:\n{self.component_logs()}", pytrace=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_template: str | None = None


def _migrated_template(env: dict[str, str]) -> str:
    """The name of a metadata database `airflow db migrate` made for this test process (dropped at its exit)."""
    global _template
    if _template is None:
        name = f"amlrun_af_template_{secrets.token_hex(4)}"
        _admin_sql(f'CREATE DATABASE "{name}"')
        atexit.register(_admin_sql, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        url = f"{PG_SERVER}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
        migrate = subprocess.run(
            [AIRFLOW, "db", "migrate"],
            env={
                **env,
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url,
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": url,
            },
            capture_output=True,
            text=True,
            timeout=600,
        )
        if migrate.returncode != 0:
            pytest.fail(f"`airflow db migrate` failed:\n{migrate.stdout[-3000:]}\n{migrate.stderr[-3000:]}")
        _template = name
    return _template


def _admin_sql(statement: str) -> None:
    import psycopg

    try:
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=10) as admin:
            admin.execute(statement.encode())
    except psycopg.OperationalError as err:
        pytest.fail(f"PostgreSQL is not reachable at {PG_SERVER} ({err}); `make services` starts it.")


def _claim(client: Any, owner: str) -> bool:
    """Claim a Redis database by its claim key, unless a cluster holds it or it holds data of anything else.

    A claim expires: a test session that was killed (and so never emptied its database) holds it no longer than
    that. What such a session left (its broker's keys, and the mark that a test cluster used the database) is
    emptied as the database is claimed again, in one transaction with the claim; a database that holds keys but
    no such mark is someone else's, and is left alone."""
    import redis

    with client.pipeline() as pipe:
        try:
            pipe.watch(CLAIM_KEY, USED_KEY)
            if pipe.exists(CLAIM_KEY) or (pipe.dbsize() and not pipe.exists(USED_KEY)):
                return False
            pipe.multi()
            pipe.flushdb()
            pipe.set(CLAIM_KEY, owner, ex=CLAIM_SECONDS)
            pipe.set(USED_KEY, owner)
            pipe.execute()
        except redis.WatchError:
            return False  # claimed by another process meanwhile
    return True


def _redis(db: int) -> Any:
    import redis

    return redis.Redis.from_url(f"{REDIS}/{db}", socket_timeout=10)


def _pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return (
        raw.decode(errors="replace").split("\0")[:-1]
        if raw.endswith(b"\0")
        else [raw.decode(errors="replace")]
    )


def _cmdline(pid: int) -> str:
    return " ".join(_argv(pid)).strip()


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
