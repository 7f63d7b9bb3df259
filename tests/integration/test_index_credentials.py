"""A package index behind a password: the token reaches the resolver and the installer, and nothing else."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_amlrun import Environment, Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.environment import PythonSection
from airflow_amlrun.errors import ConfigurationError
from tests.conftest import dag_source, write_script
from tests.private_index import PACKAGE, private_index

TOKEN_VARIABLE = "AMLRUN_TEST_INDEX_TOKEN"
AIRFLOW = str(Path(sys.executable).parent / "airflow")


def _dag(source: Path, requirements: list[str], url: str | None) -> str:
    """A DAG whose task runs the script in source in environment private-env, installed from the index."""
    environment = f"Environment('private-env', python=PythonSection(pip_requirements={requirements!r}, index_url={url!r}))"
    return dag_source(source, environment=environment)


def private_env(url: str) -> Environment:
    return Environment("private-env", python=PythonSection(pip_requirements=[PACKAGE], index_url=url))


def record_uv_command_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a shim in front of the real uv that appends each command line it is given to a file."""
    from airflow_amlrun.environment import build_venv, lock

    record = tmp_path / "uv-command-lines.txt"
    shim = tmp_path / "uv-shim"
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$0 $*" >> {record}\nexec {lock.uv_bin()} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setattr(lock, "uv_bin", lambda: str(shim))
    monkeypatch.setattr(build_venv, "uv_bin", lambda: str(shim))
    return record


def database_text() -> str:
    """Every row of every table of the workspace's run history, as text."""
    from sqlalchemy import MetaData, select

    engine = Workspace.get().history.engine
    tables = MetaData()
    tables.reflect(engine)
    with engine.connect() as connection:
        return "\n".join(
            repr(tuple(row)) for table in tables.sorted_tables for row in connection.execute(select(table))
        )


def files_holding(text: str, root: Path) -> list[Path]:
    needle = text.encode()
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def test_an_index_token_reaches_only_the_resolver_and_the_installer(
    run_dag, tmp_path, amlrun_home, workspace_backend, monkeypatch
):
    token = f"tok-{secrets.token_hex(16)}"
    monkeypatch.setenv(TOKEN_VARIABLE, token)
    uv_command_lines = record_uv_command_lines(tmp_path, monkeypatch)
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import amlrun_private_pkg
        from airflow_amlrun.run_context import Run
        Run.get_context().log("private_version", amlrun_private_pkg.VERSION)
        print("installed from the private index")
    """,
    )
    with private_index(token) as index:
        result = run_dag(_dag(tmp_path / "src", [PACKAGE], index.url()))

        assert result.state == "success", result.log
        assert index.authorized_downloads >= 1
        summary = result.xcoms["train"]
        assert summary["metrics"] == {"private_version": "1.0.0"}
        assert "installed from the private index" in result.log

        # Stored and hashed with the reference, never the value.
        ws = Workspace.get()
        lock = ws.store.get_bytes(summary["environment"]["lock_digest"]).decode()
        assert f"--index-url {index.url()}" in lock
        assert token not in result.log
        assert token not in json.dumps(result.xcoms)
        assert token not in database_text()
        assert files_holding(token, amlrun_home) == []  # store, lock blob, uv cache, builds, run dirs
        command_lines = uv_command_lines.read_text()
        assert "pip compile" in command_lines and "pip sync" in command_lines
        assert token not in command_lines

        # A rotated token is the same environment: same version, nothing resolved again.
        requests = len(index.requests)
        monkeypatch.setenv(TOKEN_VARIABLE, f"rotated-{secrets.token_hex(8)}")
        assert private_env(index.url()).register(ws).version == summary["environment"]["version"] == "1"
        assert len(index.requests) == requests


def test_a_direct_url_requirement_behind_a_password_installs_with_its_token_kept_out_of_everything(
    run_dag, tmp_path, amlrun_home, workspace_backend, monkeypatch
):
    token = f"tok-{secrets.token_hex(16)}"
    monkeypatch.setenv(TOKEN_VARIABLE, token)
    uv_command_lines = record_uv_command_lines(tmp_path, monkeypatch)
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import amlrun_private_pkg
        from airflow_amlrun.run_context import Run
        Run.get_context().log("private_version", amlrun_private_pkg.VERSION)
    """,
    )
    with private_index(token) as index:
        requirement = f"{PACKAGE} @ {index.wheel_url()}"
        result = run_dag(_dag(tmp_path / "src", [requirement], None))

        assert result.state == "success", result.log
        assert index.authorized_downloads >= 2  # the resolver hashed the wheel, the installer installed it
        summary = result.xcoms["train"]
        assert summary["metrics"] == {"private_version": "1.0.0"}

        ws = Workspace.get()
        lock = ws.store.get_bytes(summary["environment"]["lock_digest"]).decode()
        assert f"{requirement} \\\n    --hash=sha256:" in lock
        assert token not in result.log
        assert token not in json.dumps(result.xcoms)
        assert token not in database_text()
        assert files_holding(token, amlrun_home) == []  # store, lock blob, uv cache, the venv, run dirs
        assert token not in uv_command_lines.read_text()

        # A rotated token is the same environment; a worker without the variable is told which one to set.
        spec = Environment("private-env", python=PythonSection(pip_requirements=[requirement]))
        monkeypatch.setenv(TOKEN_VARIABLE, f"rotated-{secrets.token_hex(8)}")
        assert spec.register(ws).version == summary["environment"]["version"]
        monkeypatch.delenv(TOKEN_VARIABLE)
        with pytest.raises(ConfigurationError, match=r"needs \$\{AMLRUN_TEST_INDEX_TOKEN\} for its package"):
            spec.copy(name="private-env-2").register(ws)


@pytest.fixture(scope="module")
def execution_api(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `airflow api-server` on loopback, so tasks can run under Airflow's own task supervisor.

    dag.test() runs a task inside the test process, where Airflow masks nothing; the task log a user reads
    is written by the supervisor of an executor, which masks. Yields the settings a process running tasks
    through that server needs.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = {
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
    }
    log = tmp_path_factory.mktemp("api-server") / "api-server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **settings},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/version", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"airflow api-server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield settings
    finally:
        # The server renames its process; it is stopped through the process group this test made for it.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_an_index_token_printed_by_anything_is_masked_in_the_task_log(
    execution_api, tmp_path, amlrun_home, monkeypatch
):
    from tests.conftest import AIRFLOW_HOME, DAGS_FOLDER

    token = f"tok-{secrets.token_hex(16)}"
    monkeypatch.setenv(TOKEN_VARIABLE, token)
    write_script(
        tmp_path / "src",
        "train.py",
        f"""
        import os
        print("the index token is", os.environ[{TOKEN_VARIABLE!r}])
    """,
    )
    dag_id = f"t_{secrets.token_hex(4)}"
    with private_index(token) as index:
        source = _dag(tmp_path / "src", [PACKAGE], index.url())
        (DAGS_FOLDER / f"{dag_id}.py").write_text(source.replace("DAG_ID", dag_id))
        done = subprocess.run(
            [AIRFLOW, "dags", "test", "--use-executor", dag_id],
            # One LocalExecutor worker: with the default 32, Airflow's executor now and then leaves one
            # without its shutdown message and waits for it forever (apache/airflow#45329).
            env={**os.environ, **execution_api, "AIRFLOW__CORE__PARALLELISM": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    [task_log] = (AIRFLOW_HOME / "logs" / f"dag_id={dag_id}").rglob("attempt=1.log")
    events = [json.loads(line).get("event", "") for line in task_log.read_text().splitlines() if line.strip()]

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the index token is ***" in events
    assert token not in task_log.read_text()


def test_a_missing_index_variable_fails_before_anything_is_recorded(amlrun_home, tmp_path, monkeypatch):
    write_script(tmp_path / "src", "train.py", "import amlrun_private_pkg\n")
    ws = Workspace.get()
    token = f"tok-{secrets.token_hex(16)}"
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)

    def submit(env: Environment) -> None:
        Experiment(ws, "private").submit(
            ScriptRunConfig(tmp_path / "src", script="train.py", environment=env)
        )

    with private_index(token) as index:
        with pytest.raises(ConfigurationError) as unregistered:
            submit(private_env(index.url()))
        assert index.requests == []
        assert Environment.list(ws, "private-env") == []

        # Registered from a process that has the token; submitted from a worker that lacks it.
        monkeypatch.setenv(TOKEN_VARIABLE, token)
        registered = private_env(index.url()).register(ws)
        monkeypatch.delenv(TOKEN_VARIABLE)
        with pytest.raises(ConfigurationError) as on_worker:
            submit(registered)

    for caught in (unregistered, on_worker):
        message = str(caught.value)
        assert "needs ${AMLRUN_TEST_INDEX_TOKEN} for its package index" in message
        assert "Set the variable on every worker" in message
    assert ws.list_runs() == []
    assert not (amlrun_home / "store").exists()
