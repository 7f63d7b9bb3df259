"""What `amlrun` says when something a user can meet goes wrong outside the library (a path the system refuses,
a history database that is down, Ctrl-C, a reader that stopped reading): a line on stderr, no traceback, and
an exit status that is not 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.history import RunStatus
from tests.conftest import write_script

AMLRUN = str(Path(sys.executable).parent / "amlrun")


def amlrun(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AMLRUN, *argv], capture_output=True, text=True, env=os.environ.copy(), timeout=300)


def said(done: subprocess.CompletedProcess[str]) -> list[str]:
    """What the command wrote to stderr but the notes of a new embedded workspace."""
    return [line for line in done.stderr.splitlines() if line and not line.startswith("Created the embedded")]


def test_a_path_the_system_refuses_is_named_in_one_line(amlrun_home: Path, tmp_path: Path) -> None:
    write_script(tmp_path / "src", "train.py", "print('trained')\n")
    run = Experiment(Workspace.get(), "cli_errors").submit(
        ScriptRunConfig(tmp_path / "src", script="train.py")
    )
    run.wait_for_completion(show_output=False)
    (tmp_path / "a_file").write_text("not a folder")
    destination = tmp_path / "a_file" / "code"

    done = amlrun("snapshot", "restore", run.id, str(destination))

    assert done.returncode == 2, done.stdout + done.stderr
    assert said(done) == [f"error: Not a directory: {str(destination)!r}"], done.stderr


@pytest.mark.parametrize(
    ("database_url", "shown"),
    [
        (
            "postgresql://amlrun:hunter2-secret@127.0.0.1:1/runs",
            "postgresql+psycopg://amlrun:***@127.0.0.1:1/runs",
        ),
        (
            "postgresql://amlrun@127.0.0.1:1/runs?password=hunter2-secret",
            "postgresql+psycopg://amlrun@127.0.0.1:1/runs?password=***",
        ),
    ],
    ids=["password", "password_in_query"],
)
def test_a_history_database_that_is_down_is_named_in_one_line_its_password_masked(
    database_url: str, shown: str, amlrun_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on port 1 of this machine.
    monkeypatch.setenv(
        "AIRFLOW_CONN_AMLRUN_DEFAULT",
        json.dumps({"conn_type": "amlrun", "extra": {"database_url": database_url, "store_url": "/tmp"}}),
    )
    done = amlrun("runs", "list")

    assert done.returncode == 2, done.stdout + done.stderr
    [line] = said(done)
    assert line.startswith(f"error: the run history's database {shown} is not available ("), line
    assert "Check that it runs" in line
    assert "hunter2" not in done.stdout + done.stderr


def test_ctrl_c_stops_a_sweep_with_a_line_not_a_traceback(amlrun_home: Path, tmp_path: Path) -> None:
    write_script(
        tmp_path / "src", "train.py", "import time\nprint('training', flush=True)\ntime.sleep(120)\n"
    )
    (tmp_path / "sweep.yaml").write_text(
        "experiment: cli_errors\n"
        "run_config: {source_directory: src, script: train.py}\n"
        "hyperparameter_sampling: {type: grid, parameter_space: {--alpha: {choice: [1, 2]}}}\n"
        "primary_metric_name: loss\nprimary_metric_goal: minimize\nmax_total_runs: 2\nmax_concurrent_runs: 2\n"
    )
    sweep = subprocess.Popen(
        [AMLRUN, "sweep", str(tmp_path / "sweep.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Should it not end, SIGABRT has it print where each of its threads was (faulthandler).
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        # A shell starts a background job (`make test &`, a CI launcher) with SIGINT ignored, which Python then
        # keeps ignored: as a terminal would, deliver it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = Workspace.get().list_runs(experiment="cli_errors") if amlrun_home.exists() else []
            if sum(r.status is RunStatus.RUNNING and r.target == "local" for r in runs) == 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the sweep's two runs were not both running within 120 s: {runs}")
        sweep.send_signal(signal.SIGINT)
        try:
            _out, err = sweep.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            sweep.send_signal(signal.SIGABRT)
            _out, err = sweep.communicate(timeout=30)
            pytest.fail(f"amlrun sweep did not end within 120 s of Ctrl-C; where it was:\n{err[-6000:]}")
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()

    assert sweep.returncode == 130, err
    runs = Workspace.get().list_runs(experiment="cli_errors")
    assert sorted(str(r.status) for r in runs) == ["Canceled"] * 3
    [parent] = [r for r in runs if r.target == "hyperdrive"]
    lines = [line for line in err.splitlines() if line and not line.startswith("Created the embedded")]
    assert lines[-1:] == [
        f"error: interrupted (Ctrl-C): sweep {parent.id}: the runs it had going were asked to stop, and the sweep "
        "is recorded Canceled."
    ], err
    assert "Traceback" not in err, err


def test_a_sweep_whose_naming_fails_is_recorded_failed_saying_why_not_left_queued(
    amlrun_home: Path, tmp_path: Path
) -> None:
    import sqlite3

    write_script(tmp_path / "src", "train.py", "print('never started')\n")
    (tmp_path / "sweep.yaml").write_text(
        "experiment: cli_errors\n"
        "run_config: {source_directory: src, script: train.py, display_name: alpha sweep}\n"
        "hyperparameter_sampling: {type: grid, parameter_space: {--alpha: {choice: [1, 2]}}}\n"
        "primary_metric_name: loss\nprimary_metric_goal: minimize\nmax_total_runs: 2\n"
    )
    assert (
        Workspace.get().list_runs() == []
    )  # the embedded workspace, whose history then refuses to name a run
    with sqlite3.connect(amlrun_home / "history.db") as db:
        db.execute(
            "CREATE TRIGGER frozen_names BEFORE UPDATE OF display_name ON amlrun_runs "
            "BEGIN SELECT RAISE(ABORT, 'display names are frozen here'); END"
        )

    done = amlrun("sweep", str(tmp_path / "sweep.yaml"))

    assert done.returncode != 0 and "display names are frozen here" in done.stderr, done.stderr
    [parent] = Workspace.get().list_runs(experiment="cli_errors")
    assert parent.target == "hyperdrive" and parent.status is RunStatus.FAILED, (parent.status, parent.error)
    assert parent.error.startswith("The sweep failed: ") and "display names are frozen here" in parent.error
    assert parent.end is not None


def test_a_reader_that_stops_reading_ends_the_command_quietly(amlrun_home: Path, tmp_path: Path) -> None:
    write_script(tmp_path / "src", "train.py", "print('trained')\n")
    run = Experiment(Workspace.get(), "cli_errors").submit(
        ScriptRunConfig(tmp_path / "src", script="train.py")
    )
    run.wait_for_completion(show_output=False)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written: `amlrun runs logs RUN_ID | true`
    try:
        done = subprocess.run(
            [AMLRUN, "runs", "logs", run.id],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
    finally:
        os.close(write)

    assert done.returncode == 1
    assert said(done) == [], done.stderr


def test_an_error_of_the_system_that_names_no_file_names_the_command(amlrun_home: Path) -> None:
    # `amlrun runs list > listing.txt` on a full disk: writing its output fails, and the system names no file.
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [AMLRUN, "runs", "list"], stdout=full, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
        )

    assert done.returncode == 2
    assert said(done) == ["error: amlrun runs list failed: No space left on device (OSError)"], done.stderr


def _read_only(path: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """amlrun with path (a file or a folder) mounted read-only, in a mount namespace of its own."""
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(path), AMLRUN, *argv],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        cwd=cwd,
        timeout=300,
    )


def test_a_read_only_history_is_said_to_be_read_only_naming_the_file_and_the_fix(
    amlrun_home: Path, tmp_path: Path
) -> None:
    write_script(tmp_path / "src", "train.py", "print('trained')\n")
    (tmp_path / "run.yaml").write_text("experiment: cli_errors\nsource_directory: src\nscript: train.py\n")
    assert amlrun("runs", "list").returncode == 0  # the workspace, made and closed
    history = amlrun_home / "history.db"
    fix = (
        "Make the file and its folder writable for the user this runs as (uid 0), or point the workspace at a "
        "history it may write (the connection's database_url, or [amlrun] home for the embedded workspace)."
    )

    # Its folder read-only (a volume mounted so): SQLite cannot even open the file to read it.
    done = _read_only(amlrun_home, "runs", "list", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert said(done) == [
        f"error: The run history's SQLite file {history} cannot be opened: its folder {amlrun_home} is read-only "
        "to this process, and SQLite writes the file's -wal and -shm files there, even to read it (unable to "
        f"open database file). {fix}"
    ]

    # The file alone read-only: reading goes on, a run cannot be recorded.
    assert _read_only(history, "runs", "list", cwd=tmp_path).returncode == 0
    done = _read_only(history, "submit", "run.yaml", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert said(done)[-1] == (
        f"error: The run history's SQLite file {history} is read-only to this process, and nothing was written "
        f"(attempt to write a readonly database). {fix}"
    )
    assert Workspace.get().list_runs(experiment="cli_errors") == []


def test_a_history_url_that_asks_for_read_only_is_named_as_the_cause_not_the_file(
    amlrun_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_script(tmp_path / "src", "train.py", "print('trained')\n")
    (tmp_path / "run.yaml").write_text("experiment: cli_errors\nsource_directory: src\nscript: train.py\n")
    assert amlrun("runs", "list").returncode == 0  # the embedded workspace's history, made and closed
    history = amlrun_home / "history.db"
    url = f"sqlite:///file:{history}?mode=ro&uri=true"
    monkeypatch.setenv(
        "AIRFLOW_CONN_AMLRUN_DEFAULT",
        json.dumps(
            {"conn_type": "amlrun", "extra": {"database_url": url, "store_url": str(tmp_path / "store")}}
        ),
    )

    assert amlrun("runs", "list").returncode == 0  # reading goes on
    done = amlrun("submit", str(tmp_path / "run.yaml"))

    assert done.returncode == 2, done.stdout + done.stderr
    assert said(done)[-1] == (
        f"error: The run history's URL {url} opens its SQLite file {history} read-only (mode=ro), and nothing "
        "was written (attempt to write a readonly database). Recording runs needs a URL without mode=ro, such "
        f"as sqlite:///file:{history}?uri=true: give the workspace that one (the amlrun connection's "
        "database_url)."
    )
    assert "writable" not in done.stderr
    assert "Traceback" not in done.stderr
    assert Workspace.get().list_runs(experiment="cli_errors") == []

    # Asked for, the traceback comes before the same line (to report a fault of this program).
    monkeypatch.setenv("AMLRUN_DEBUG", "1")
    debugged = amlrun("submit", str(tmp_path / "run.yaml"))
    assert debugged.returncode == 2, debugged.stdout + debugged.stderr
    assert "Traceback (most recent call last):" in debugged.stderr
    assert "HistoryReadOnlyError" in debugged.stderr
    assert said(debugged)[-1] == said(done)[-1]


# What `amlrun` adds to a statement the history's database refused.
REFUSED_ADVICE = (
    "The database is up and answered, so trying again gets the same answer. A schema changed by hand (a table, "
    "column, index, constraint or trigger) is the usual cause: airflow-amlrun needs the schema its migrations made."
)


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "postgres_password_in_query"])
def test_a_run_the_history_refuses_is_said_in_one_line_naming_the_database_never_its_password(
    backend: str,
    amlrun_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if backend.startswith("postgres"):
        # With a password, which the server (trusting this machine's connections) does not ask for, and which
        # no line may show: in the URL's user part, or as its query's password= (libpq takes either).
        url = make_url(request.getfixturevalue("postgres_database")).set(drivername="postgresql+psycopg")
        if backend == "postgres":
            url = url.set(password="pg-s3cret")
            shown = url.render_as_string(hide_password=True)
        else:
            shown = url.render_as_string(hide_password=True) + "?password=***"
            url = url.update_query_dict({"password": "pg-s3cret"})
        database = url.render_as_string(hide_password=False)
        monkeypatch.setenv(
            "AIRFLOW_CONN_AMLRUN_DEFAULT",
            json.dumps(
                {
                    "conn_type": "amlrun",
                    "extra": {"database_url": database, "store_url": str(tmp_path / "store")},
                }
            ),
        )
    else:
        database = shown = f"sqlite:///{amlrun_home / 'history.db'}"
    write_script(tmp_path / "src", "train.py", "print('trained')\n")
    (tmp_path / "first.yaml").write_text("experiment: cli_errors\nsource_directory: src\nscript: train.py\n")
    (tmp_path / "second.yaml").write_text(
        "experiment: refused_runs\nsource_directory: src\nscript: train.py\n"
    )
    assert amlrun("submit", "--wait", str(tmp_path / "first.yaml")).returncode == 0
    # A constraint added to the history by hand: one run per compute target.
    engine = create_engine(database)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE UNIQUE INDEX one_run_per_target ON amlrun_runs (target)")
    engine.dispose()

    done = amlrun("submit", str(tmp_path / "second.yaml"))

    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    line = said(done)[-1]
    assert line.startswith(
        f"error: the run history's database {shown} refused an INSERT into amlrun_runs: "
    ), line
    assert (
        "one_run_per_target"
        if backend.startswith("postgres")
        else "UNIQUE constraint failed: amlrun_runs.target"
    ) in line
    assert line.endswith(f"(IntegrityError). {REFUSED_ADVICE}"), line
    assert "pg-s3cret" not in done.stdout + done.stderr
    # Nothing of the refused run was recorded: no run, no experiment.
    runs = json.loads(amlrun("runs", "list", "--json").stdout)
    assert [(r["experiment"], r["status"]) for r in runs] == [("cli_errors", "Completed")]
    assert "refused_runs" not in amlrun("experiments", "--json").stdout


@pytest.mark.parametrize(
    ("damage", "refused"),
    [
        (
            "ALTER TABLE amlrun_runs DROP COLUMN description",
            "a SELECT from amlrun_runs: no such column: amlrun_runs.description (OperationalError)",
        ),
        # The schema ahead of what its version says: migrating it again adds a column it has.
        (
            "UPDATE amlrun_alembic_version SET version_num = '0007'",
            "an ALTER TABLE of amlrun_runs: duplicate column name: display_name (OperationalError)",
        ),
    ],
)
def test_a_damaged_history_schema_is_said_in_one_line_not_called_away(
    damage: str, refused: str, amlrun_home: Path
) -> None:
    import sqlite3

    assert amlrun("runs", "list").returncode == 0  # the embedded workspace's history, made and closed
    with sqlite3.connect(amlrun_home / "history.db") as db:
        db.execute(damage)

    done = amlrun("runs", "list")

    assert done.returncode == 2, done.stdout + done.stderr
    assert said(done) == [
        f"error: the run history's database sqlite:///{amlrun_home / 'history.db'} refused {refused}. "
        f"{REFUSED_ADVICE}"
    ], done.stderr


def test_a_run_whose_name_the_history_refuses_is_stopped_not_left_running(
    amlrun_home: Path, tmp_path: Path
) -> None:
    import sqlite3

    write_script(
        tmp_path / "src", "train.py", "import time\nprint('training', flush=True)\ntime.sleep(120)\n"
    )
    (tmp_path / "run.yaml").write_text(
        "experiment: cli_errors\nsource_directory: src\nscript: train.py\ndisplay_name: weekly\n"
    )
    assert amlrun("runs", "list").returncode == 0  # the embedded workspace's history, made and closed
    with sqlite3.connect(amlrun_home / "history.db") as db:
        db.execute(
            "CREATE TRIGGER frozen_names BEFORE UPDATE OF display_name ON amlrun_runs "
            "BEGIN SELECT RAISE(ABORT, 'display names are frozen here'); END"
        )

    done = amlrun("submit", str(tmp_path / "run.yaml"))

    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert said(done)[-1].startswith(
        f"error: the run history's database sqlite:///{amlrun_home / 'history.db'} refused an UPDATE of "
        "amlrun_runs: display names are frozen here (IntegrityError). "
    ), done.stderr
    [run] = Workspace.get().list_runs(experiment="cli_errors")
    assert run.status is RunStatus.CANCELED, (run.status, run.error)
    assert run.error == (
        "Canceled: naming it as its run file says failed: display names are frozen here (IntegrityError)."
    )
    assert run.end is not None


def test_a_history_a_newer_version_migrated_is_said_in_one_line_naming_its_revision(
    amlrun_home: Path,
) -> None:
    import sqlite3

    assert amlrun("runs", "list").returncode == 0  # the embedded workspace's history, made and closed
    history = amlrun_home / "history.db"
    with sqlite3.connect(history) as db:
        db.execute("UPDATE amlrun_alembic_version SET version_num = '0099'")

    done = amlrun("runs", "list")

    assert done.returncode == 2, done.stdout + done.stderr
    assert said(done) == [
        f"error: The run history at sqlite:///{history} has schema revision '0099', which this version of "
        "airflow-amlrun does not know (its newest is '0008'): a newer airflow-amlrun migrated it (or its table "
        "amlrun_alembic_version was changed by hand). Nothing was changed. Use the newer airflow-amlrun wherever "
        "this history is used, or point the workspace at another history."
    ], done.stderr
    with sqlite3.connect(history) as db:
        assert db.execute("SELECT version_num FROM amlrun_alembic_version").fetchall() == [("0099",)]
