"""Registering, locking and building environments for real: uv against PyPI, real processes, a real DB."""

from __future__ import annotations

import json
import marshal
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event

from airflow_amlrun.environment import (
    Environment,
    EnvironmentNotFoundError,
    LockResolutionError,
    PythonSection,
    ensure_local_python,
    resolve_environment,
)
from airflow_amlrun.environment.build_venv import BUILD_LOG, BUILD_RECORD
from airflow_amlrun.environment.lock import locked_versions
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.workspace import Workspace

# Small, pure-Python packages: real resolution and real installs in well under a second each.
SMALL = ["six==1.16.0", "idna"]

# What a second process on the same worker does: resolve the environment by name and get its interpreter.
WORKER = textwrap.dedent(
    """
    import os, sys, time
    from airflow_amlrun.workspace import Workspace
    from airflow_amlrun.environment import ensure_local_python, resolve_environment

    db, store, cache, name, go = sys.argv[1:6]
    ws = Workspace(db, store, cache_dir=cache)
    resolved = resolve_environment(ws, name)
    while not os.path.exists(go):  # start building together with the other process
        time.sleep(0.005)
    print(ensure_local_python(resolved, ws.cache_dir))
    """
)


def make_workspace(tmp_path: Path, cache: str = "cache") -> Workspace:
    return Workspace(f"sqlite:///{tmp_path}/h.db", str(tmp_path / "store"), cache_dir=tmp_path / cache)


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    workspace = make_workspace(tmp_path)
    yield workspace
    workspace.history.dispose()


def installed(python: str) -> dict[str, str]:
    """The distributions installed in an interpreter's environment, as the script would see them."""
    out = subprocess.run(
        [
            python,
            "-c",
            "import importlib.metadata as m, json; print(json.dumps({d.name.lower(): d.version "
            "for d in m.distributions()}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out))


def builds(ws: Workspace) -> list[dict[str, object]]:
    log = ws.cache_dir / "envs" / BUILD_LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# the registry


def test_registering_a_changed_spec_gets_the_next_version_and_an_unchanged_one_its_own(ws: Workspace) -> None:
    first = Environment(name="train", python=PythonSection(pip_requirements=["six==1.16.0"])).register(ws)
    again = Environment(name="train", python=PythonSection(pip_requirements=["six==1.16.0"])).register(ws)
    changed = Environment(name="train", python=PythonSection(pip_requirements=["six==1.17.0"])).register(ws)
    assert (first.version, again.version, changed.version) == ("1", "1", "2")
    assert Environment.get(ws, "train").python.pip_requirements == ["six==1.17.0"]
    assert Environment.get(ws, "train", version="1").python.pip_requirements == ["six==1.16.0"]
    assert [e.version for e in Environment.list(ws, name="train")] == ["2", "1"]
    # Going back to an earlier spec is that earlier version, not a third one.
    assert (
        Environment(name="train", python=PythonSection(pip_requirements=["six==1.16.0"])).register(ws).version
        == "1"
    )


def test_a_registered_version_stores_a_lock_of_exact_versions_and_hashes(ws: Workspace) -> None:
    Environment(name="web", python=PythonSection(pip_requirements=["idna"])).register(ws)
    resolved = resolve_environment(ws, "web:1")
    assert resolved.lock is not None
    pins = locked_versions(resolved.lock)
    assert list(pins) == ["idna"]
    assert "--hash=sha256:" in resolved.lock
    assert resolved.summary()["version"] == "1"


def test_a_label_names_one_version_and_moves_when_set_again(ws: Workspace) -> None:
    Environment(name="train", python=PythonSection(pip_requirements=["six==1.16.0"])).register(ws)
    Environment(name="train", python=PythonSection(pip_requirements=["six==1.17.0"])).register(ws)
    Environment.set_label(ws, "train", "1", "production")
    assert Environment.get(ws, "train", label="production").version == "1"
    assert resolve_environment(ws, "train@production").version == "1"
    Environment.set_label(ws, "train", "2", "production")
    assert Environment.get(ws, "train", label="production").version == "2"
    assert Environment.get(ws, "train", label="latest").version == "2"
    with pytest.raises(
        EnvironmentNotFoundError, match=r"'train' has no label 'staging' \(labels: production\)"
    ):
        Environment.get(ws, "train", label="staging")
    with pytest.raises(EnvironmentNotFoundError, match=r"'train' has no version '9'; its versions are 1, 2"):
        Environment.set_label(ws, "train", "9", "production")


def test_curated_environments_work_by_name_without_registering(ws: Workspace) -> None:
    names = [e.name for e in Environment.list(ws)]
    assert {"amlrun-minimal", "amlrun-sklearn"} <= set(names)

    sklearn = resolve_environment(ws, "amlrun-sklearn")  # locks on first use; nothing is built here
    assert sklearn.version == "1"
    assert {"scikit-learn", "pandas", "numpy"} <= set(locked_versions(sklearn.lock or ""))
    assert resolve_environment(ws, "amlrun-sklearn").lock == sklearn.lock  # stored, not resolved again

    minimal = resolve_environment(ws, "amlrun-minimal")
    python = ensure_local_python(minimal, ws.cache_dir)
    assert Path(python).is_relative_to(ws.cache_dir / "envs" / str(minimal.build_key))
    assert "six" not in installed(python)


def test_a_curated_name_cannot_be_taken_by_a_changed_spec(ws: Workspace) -> None:
    mine = Environment(name="amlrun-minimal", python=PythonSection(pip_requirements=["six"]))
    with pytest.raises(ConfigurationError, match=r"'amlrun-minimal' belongs to a curated environment"):
        mine.register(ws)


def test_an_unknown_environment_name_lists_the_ones_there_are(ws: Workspace) -> None:
    Environment(name="train", python=PythonSection(pip_requirements=["six==1.16.0"])).register(ws)
    with pytest.raises(
        EnvironmentNotFoundError,
        match=r"No environment named 'trian'.*Registered: train; curated: amlrun-minimal, amlrun-pytorch, amlrun-sklearn, amlrun-tensorflow",
    ):
        resolve_environment(ws, "trian")


# resolving what a run names


def test_an_environment_object_is_registered_when_a_run_uses_it(ws: Workspace) -> None:
    env = Environment(name="adhoc", python=PythonSection(pip_requirements=["six==1.16.0"]))
    resolved = resolve_environment(ws, env)
    assert (resolved.name, resolved.version, resolved.user_managed) == ("adhoc", "1", False)
    assert Environment.get(ws, "adhoc").version == "1"


def test_a_user_managed_environment_object_is_used_as_is_and_not_registered(ws: Workspace) -> None:
    env = Environment(name="mine", python=PythonSection(interpreter_path=sys.executable))
    resolved = resolve_environment(ws, env)
    assert resolved.version is None
    assert resolved.build_key is None
    assert ensure_local_python(resolved, ws.cache_dir) == sys.executable
    assert Environment.list(ws, name="mine") == []


def test_resolving_an_unchanged_environment_costs_at_most_two_queries(ws: Workspace) -> None:
    env = Environment(name="train", python=PythonSection(pip_requirements=["six==1.16.0"]))
    resolve_environment(ws, env)
    resolve_environment(ws, "amlrun-minimal")
    statements: list[str] = []
    event.listen(ws.history.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    for reference in (env, "train", "train:1", "amlrun-minimal"):
        statements.clear()
        resolve_environment(ws, reference)
        assert len(statements) <= 2, (reference, statements)


def test_an_unresolvable_requirement_fails_with_the_resolvers_message_naming_it(ws: Workspace) -> None:
    env = Environment(name="broken", python=PythonSection(pip_requirements=["idna", "six==99.1"]))
    with pytest.raises(LockResolutionError) as raised:
        env.register(ws)
    message = str(raised.value)
    assert "requirement(s) 'six==99.1' cannot be resolved" in message
    assert "No solution found" in message  # uv's own words
    assert raised.value.requirements == ["six==99.1"]
    assert Environment.list(ws, name="broken") == []


# building


def test_a_managed_environment_runs_in_a_venv_with_exactly_the_locked_packages(ws: Workspace) -> None:
    resolved = resolve_environment(
        ws, Environment(name="small", python=PythonSection(pip_requirements=SMALL))
    )
    python = ensure_local_python(resolved, ws.cache_dir)
    assert python == str(ws.cache_dir / "envs" / str(resolved.build_key) / "bin" / "python")
    pins = locked_versions(resolved.lock or "")
    assert installed(python) == {name: versions[0] for name, versions in pins.items()}
    assert ensure_local_python(resolved, ws.cache_dir) == python  # cache hit: no second build
    assert len(builds(ws)) == 1
    # The venv was built elsewhere and renamed into place: nothing in it points at the build folder.
    venv = Path(python).parent.parent
    for path in venv.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert b".tmp-" not in path.read_bytes(), path
    out = subprocess.run(
        [python, "-c", "import six, sys; print(six.__version__, sys.prefix)"], capture_output=True, text=True
    )
    assert out.stdout.split() == ["1.16.0", str(venv)]
    # Built with its bytecode, recorded under the final path: a run compiles nothing, and needs no right
    # to write __pycache__.
    [six] = venv.glob("lib/python*/site-packages/six.py")
    [cached] = six.parent.glob("__pycache__/six.*.pyc")
    assert marshal.loads(cached.read_bytes()[16:]).co_filename == str(six)


def test_a_second_build_installs_the_same_versions_from_the_stored_lock(tmp_path: Path) -> None:
    first_worker = make_workspace(tmp_path, cache="worker-1")
    Environment(name="unpinned", python=PythonSection(pip_requirements=["idna", "packaging"])).register(
        first_worker
    )
    first = resolve_environment(first_worker, "unpinned")
    first_versions = installed(ensure_local_python(first, first_worker.cache_dir))

    # Another worker (same registry, empty caches) later: it builds from the stored lock, not a new resolve.
    second_worker = make_workspace(tmp_path, cache="worker-2")
    second = resolve_environment(second_worker, "unpinned")
    assert second.lock == first.lock
    second_versions = installed(ensure_local_python(second, second_worker.cache_dir))
    assert second_versions == first_versions
    pins = locked_versions(first.lock or "")
    assert first_versions == {name: versions[0] for name, versions in pins.items()}
    assert builds(first_worker)[0]["build_key"] == builds(second_worker)[0]["build_key"]


def test_two_processes_needing_the_same_environment_build_it_once(ws: Workspace, tmp_path: Path) -> None:
    Environment(name="shared", python=PythonSection(pip_requirements=SMALL)).register(ws)
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                ws.database_url,
                ws.store_url,
                str(ws.cache_dir),
                "shared",
                str(go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(0.5)
    go.touch()
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    pythons = {out.strip() for out, _err in outputs}
    assert len(pythons) == 1
    assert len(builds(ws)) == 1
    assert "six" in installed(pythons.pop())


def test_a_build_killed_half_way_leaves_nothing_that_looks_complete(ws: Workspace, tmp_path: Path) -> None:
    Environment(name="killed", python=PythonSection(pip_requirements=[*SMALL, "packaging", "pip"])).register(
        ws
    )
    resolved = resolve_environment(ws, "killed")
    envs = ws.cache_dir / "envs"
    go = tmp_path / "go"
    go.touch()
    # One download and one install at a time: the build stays in progress long enough to be killed.
    env = {**os.environ, "UV_CONCURRENT_DOWNLOADS": "1", "UV_CONCURRENT_INSTALLS": "1"}
    builder = subprocess.Popen(
        [sys.executable, "-c", WORKER, ws.database_url, ws.store_url, str(ws.cache_dir), "killed", str(go)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(envs.glob(f".tmp-{resolved.build_key}-*/pyvenv.cfg")):
        assert time.monotonic() < deadline, "the build never started"
        assert builder.poll() is None, "the build finished before it could be killed"
        time.sleep(0.002)
    os.killpg(builder.pid, signal.SIGKILL)  # the builder and the uv it runs
    builder.wait()

    final = envs / str(resolved.build_key)
    assert not final.exists()
    assert builds(ws) == []

    python = ensure_local_python(resolved, ws.cache_dir)  # the next run builds it, cleanly
    assert (final / BUILD_RECORD).exists()
    assert list(envs.glob(f".tmp-{resolved.build_key}-*")) == []
    assert "packaging" in installed(python)
    assert len(builds(ws)) == 1


def test_an_existing_run_history_is_upgraded_to_hold_environments(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, inspect

    from airflow_amlrun.history import database

    url = f"sqlite:///{tmp_path}/old.db"
    config = Config()
    config.set_main_option("script_location", str(Path(database.__file__).with_name("migrations")))
    engine = create_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    engine.dispose()

    ws = Workspace(url, str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    Environment(name="after-upgrade", python=PythonSection(user_managed_dependencies=True)).register(ws)
    tables = set(inspect(ws.history.engine).get_table_names())
    assert {"amlrun_environments", "amlrun_environment_labels", "amlrun_runs"} <= tables
    assert Environment.get(ws, "after-upgrade").version == "1"
    ws.history.dispose()
