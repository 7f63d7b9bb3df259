"""Shared fixtures: one migrated Airflow home per session, a fresh workspace per test, PostgreSQL.

Airflow reads its configuration when first imported, so the environment is set here, before any test
module imports it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="amlrun-tests-"))
AIRFLOW_HOME = _SESSION_DIR / "airflow"
DAGS_FOLDER = AIRFLOW_HOME / "dags"
DAGS_FOLDER.mkdir(parents=True)
os.environ.update(
    {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__AMLRUN__HOME": str(_SESSION_DIR / "amlrun"),
        # Polling fast keeps the tests quick; the default suits production.
        "AIRFLOW__AMLRUN__POLL_INTERVAL_SECONDS": "0.05",
    }
)
os.environ.pop("AIRFLOW_CONN_AMLRUN_DEFAULT", None)

REPO = Path(__file__).resolve().parent.parent
PG_DSN = os.environ.get("AMLRUN_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def pytest_unconfigure(config: pytest.Config) -> None:
    # Each process of a session has its own folder (`make unit` runs two, besides the one that steers them).
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Airflow's metadata database, migrated once for the whole session."""
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    return AIRFLOW_HOME


@pytest.fixture
def amlrun_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh embedded workspace (history.db, store/, runs/) for one test."""
    home = tmp_path / "amlrun"
    monkeypatch.setenv("AIRFLOW__AMLRUN__HOME", str(home))
    monkeypatch.delenv("AIRFLOW_CONN_AMLRUN_DEFAULT", raising=False)
    return home


@contextlib.contextmanager
def _postgres_database() -> Iterator[str]:
    import psycopg

    name = f"amlrun_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(f"{PG_DSN}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        pytest.fail(f"PostgreSQL is not reachable at {PG_DSN} ({err}); `make services` starts it.")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_DSN}/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A database of this session's own on the PostgreSQL server, dropped at the end."""
    with _postgres_database() as url:
        yield url


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh, empty database for one test, dropped after it."""
    with _postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def workspace_backend(
    request: pytest.FixtureRequest, amlrun_home: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Run the test once on the embedded SQLite workspace and once on PostgreSQL via a connection."""
    if request.param == "postgres":
        database = request.getfixturevalue("postgres_server")
        # Each test gets its own schema state: clean the tables this test could see.
        _truncate(database)
        monkeypatch.setenv(
            "AIRFLOW_CONN_AMLRUN_DEFAULT",
            json.dumps(
                {
                    "conn_type": "amlrun",
                    "extra": {"database_url": database, "store_url": str(amlrun_home / "pg-store")},
                }
            ),
        )
    return str(request.param)


def _truncate(database: str) -> None:
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('amlrun_runs') IS NOT NULL").fetchone()
        if exists and exists[0]:
            conn.execute(
                "TRUNCATE amlrun_metrics, amlrun_runs, amlrun_experiments, amlrun_environment_labels, "
                "amlrun_environments CASCADE"
            )


@dataclass
class DagResult:
    """What a user sees of a finished DAG run: states, XComs, and the task log printed by dag.test."""

    dag_id: str
    state: str
    task_states: dict[str, str]
    xcoms: dict[str, Any]
    log: str


@pytest.fixture
def run_dag(
    airflow_db: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> Callable[..., DagResult]:
    """Write a DAG file into the session's DAG folder and run it with dag.test().

    The task log is what dag.test prints, plus the records of loggers whose handlers were bound to a stream
    of an earlier test (those reach pytest's log capture, not this test's file descriptors).
    """

    def run(
        source: str,
        dag_id: str | None = None,
        *,
        beside: dict[str, str] | None = None,
        logical_date: Any = None,
        **conf: Any,
    ) -> DagResult:
        """:param beside: files (relative path: text) to write beside the DAG file, which then gets a folder
        of its own in the DAG folder.
        :param logical_date: the DAG run's logical date (default: now)."""
        dag_id = dag_id or f"t_{secrets.token_hex(4)}"
        folder = DAGS_FOLDER / dag_id if beside else DAGS_FOLDER
        for name, text in (beside or {}).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(textwrap.dedent(text))
        path = folder / f"{dag_id}.py"
        path.write_text(textwrap.dedent(source).replace("DAG_ID", dag_id))
        spec = importlib.util.spec_from_file_location(dag_id, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        capfd.readouterr()
        caplog.clear()
        dag_run = module.dag.test(
            run_conf=conf or None, **({"logical_date": logical_date} if logical_date else {})
        )
        out, err = capfd.readouterr()
        err += "\n" + caplog.text
        sys.stdout.write(out)  # keep it visible in pytest's report of a failing test
        return DagResult(
            dag_id=dag_id,
            state=str(dag_run.state),
            task_states={ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()},
            xcoms=_xcoms(dag_id, dag_run.run_id),
            log=out + err,
        )

    return run


def _xcoms(dag_id: str, run_id: str) -> dict[str, Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == "return_value"
            )
        ).all()
        return {row.task_id: XComModel.deserialize_value(row) for row in rows}


def dag_source(
    source: Path | str,
    *,
    target: str = "local",
    script: str = "train.py",
    arguments: object = None,
    limit: float | None = None,
    experiment: str | None = None,
    secret_variables: dict[str, str] | None = None,
    environment: str | None = None,
    options: dict[str, object] | None = None,
    framework: str | None = None,
) -> str:
    """The text of a DAG of one ScriptRunOperator task `train`, for `run_dag`, written as a user writes it:
    what is not given is left to the defaults.

    :param target: the config's compute_target.
    :param arguments: the operator's arguments (templated by Airflow).
    :param limit: the config's max_run_duration_seconds.
    :param environment: Python source of the config's Environment, e.g.
        ``'Environment("x", python=PythonSection(pip_requirements=["tomli-w==1.0.0"]))'``.
    :param options: more keyword arguments of the operator, e.g. ``{"deferrable": True}``.
    :param framework: the config's framework ("pyspark").
    """
    config = [repr(str(source)), f"script={script!r}"]
    if target != "local":
        config.append(f"compute_target={target!r}")
    if limit is not None:
        config.append(f"max_run_duration_seconds={limit!r}")
    if secret_variables:
        config.append(f"secret_environment_variables={secret_variables!r}")
    if environment is not None:
        config.append(f"environment={environment}")
    if framework is not None:
        config.append(f"framework={framework!r}")
    operator = ['task_id="train"', f"config=ScriptRunConfig({', '.join(config)})"]
    if arguments is not None:
        operator.append(f"arguments={arguments!r}")
    if experiment is not None:
        operator.append(f"experiment={experiment!r}")
    operator.extend(f"{key}={value!r}" for key, value in (options or {}).items())
    body = "".join(f"        {argument},\n" for argument in operator)
    return (
        "import pendulum\n"
        "from airflow.sdk import DAG\n"
        "from airflow_amlrun import Environment, ScriptRunConfig, ScriptRunOperator\n"
        "from airflow_amlrun.environment import PythonSection, SparkSection\n\n"
        'with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:\n'
        f"    ScriptRunOperator(\n{body}    )\n"
    )


@pytest.fixture
def train_dir(tmp_path: Path) -> Path:
    """A copy of the example training code, free to change in a test."""
    import shutil

    dest = tmp_path / "train"
    shutil.copytree(REPO / "dags" / "train_diabetes", dest)
    return dest


# A script that trains until a file named "go" appears in its run directory, then ends on its own.
ENDS_WHEN_TOLD = """
import os, time
print("training", flush=True)
while not os.path.exists("go"):
    time.sleep(0.02)
print("done", flush=True)
"""


def ended_on_its_own_first(
    monkeypatch: pytest.MonkeyPatch, owner: Any, method: str, run_dir: Path, ended: Callable[[], bool]
) -> None:
    """Make ``owner.method`` (a step between a look that finds an ENDS_WHEN_TOLD run going and the stop of
    it) first tell the run to end, and wait until ``ended()`` says it did: the run ends on its own just
    before the stop reaches it."""
    step = getattr(owner, method)

    def run_ends_first(*args: Any, **kwargs: Any) -> Any:
        (run_dir / "go").touch()
        deadline = time.monotonic() + 60
        while not ended():
            assert time.monotonic() < deadline, "the run did not end once told to"
            time.sleep(0.02)
        return step(*args, **kwargs)

    monkeypatch.setattr(owner, method, run_ends_first)


def write_script(folder: Path, name: str, body: str) -> Path:
    """Write a training script for a test into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def git(folder: Path, *argv: str) -> str:
    """Run git in ``folder`` as a test author (no identity of the machine's needed); what it printed, stripped."""
    return subprocess.run(
        ["git", "-c", "user.email=dev@example.com", "-c", "user.name=dev", *argv],
        cwd=folder,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def commit_all(folder: Path, branch: str, message: str = "the code") -> str:
    """Make ``folder`` a git checkout on ``branch`` with everything in it committed; the commit."""
    git(folder, "init", "-q", "-b", branch)
    git(folder, "add", ".")
    git(folder, "commit", "-qm", message)
    return git(folder, "rev-parse", "HEAD")


_HOLDS_A_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def process_holding_lock(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding an exclusive flock of ``path`` (made if missing) for the block, then letting go."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDS_A_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.communicate("\n", timeout=60)


@dataclass(frozen=True)
class NewestRun:
    """The newest run of the current workspace, as a background thread of a test sees it."""

    id: str
    status: str


def newest_run() -> NewestRun | None:
    """The newest run of the workspace a test's tasks use, read with plain SQL.

    Safe in a background thread while dag.test() runs in the main one. An ORM query there would configure
    SQLAlchemy's mappers, which imports all of Airflow's models (Airflow listens for that), and deadlocks
    with the main thread importing them; an Airflow connection lookup there swaps Airflow's task-runner
    globals for a moment, which breaks the task running beside it.
    """
    import sqlalchemy

    conn = os.environ.get("AIRFLOW_CONN_AMLRUN_DEFAULT")
    if conn:
        url = json.loads(conn)["extra"]["database_url"].replace("postgresql://", "postgresql+psycopg://", 1)
    else:
        url = f"sqlite:///{Path(os.environ['AIRFLOW__AMLRUN__HOME']) / 'history.db'}"
    engine = _engines.get(url) or _engines.setdefault(url, sqlalchemy.create_engine(url))
    query = "SELECT id, status FROM amlrun_runs ORDER BY created_at DESC, id DESC LIMIT 1"
    try:
        with engine.connect() as connection:
            row = connection.execute(sqlalchemy.text(query)).first()
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError):
        # The history does not exist yet (SQLite: no file; PostgreSQL: no table yet), or is down.
        return None
    return None if row is None else NewestRun(id=row[0], status=row[1])


_engines: dict[str, Any] = {}


def wait_until_running(also: Callable[[Any], bool] = lambda run: True, timeout: float = 60) -> Any:
    """The newest run of the current workspace once it is Running (and `also(run)` holds), else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = newest_run()
        if run is not None and run.status == "Running" and also(run):
            return run
        time.sleep(0.05)
    return None


_SUBMIT_AS_TRY_1 = """
import sys
from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.submission import AirflowTask

dag_id, task_id, run_id = sys.argv[4:7]
task = AirflowTask(dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=None, try_number=1)
limit = float(sys.argv[3]) if sys.argv[3] != "none" else None
config = ScriptRunConfig(
    sys.argv[1], script="train.py", compute_target=sys.argv[2], max_run_duration_seconds=limit
)
Experiment(Workspace.get(), "reattach").submit(config, airflow_task=task).wait_for_completion(show_output=False)
"""


def worker_dies_mid_run(
    source: Path,
    compute_target: str = "local",
    settle: float = 0.0,
    max_run_duration_seconds: float | None = None,
    task: tuple[str, str, str] = ("retrain", "train", "manual_1"),
) -> Any:
    """Try 1 of a task (by default retrain.train of DAG run manual_1): a worker process submits the run, then is
    SIGKILLed once it is Running.

    :param task: the task's DAG id, task id and DAG run id.
    Returns the run as the history holds it afterwards (left Running by the dead worker).
    """
    from airflow_amlrun import Workspace

    limit = "none" if max_run_duration_seconds is None else str(max_run_duration_seconds)
    with tempfile.TemporaryFile() as said:
        worker = subprocess.Popen(
            [sys.executable, "-c", _SUBMIT_AS_TRY_1, str(source), compute_target, limit, *task],
            env=os.environ.copy(),
            stderr=said,
        )
        deadline = time.monotonic() + 60
        while wait_until_running(timeout=0.2) is None:
            if worker.poll() is None and time.monotonic() < deadline:
                continue
            worker.kill()
            status = worker.wait()
            said.seek(0)
            pytest.fail(
                f"The worker's run on {compute_target!r} did not reach Running (the worker ended with status "
                f"{status}, within 60 s), so the worker could not be killed mid-run; it said:\n"
                + said.read().decode("utf-8", "replace")[-4000:],
                pytrace=False,
            )
    time.sleep(settle)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    [orphan] = Workspace.get().list_runs()
    return orphan
