"""What the run history says when SQLite refuses a write."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from airflow_amlrun.history import HistoryReadOnlyError, RunHistory
from airflow_amlrun.history.database import display_url


def test_a_history_file_replaced_under_its_connection_is_not_said_to_be_read_only_and_is_reopened(
    tmp_path: Path,
) -> None:
    # SQLite refuses a write to a file renamed or replaced since it was opened as SQLITE_READONLY_DBMOVED: making
    # the file writable, as the read-only error advises, would not help. It says so of a file in rollback-journal
    # mode (in WAL mode the write goes on), so the history's one connection is switched to it first.
    history = RunHistory(f"sqlite:///{tmp_path / 'history.db'}")
    with history.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode=DELETE").scalar() == "delete"
    history.create_run(run_id="r1", experiment="moved", target="local")
    (tmp_path / "history.db").rename(tmp_path / "moved.db")

    with pytest.raises(OperationalError) as caught:
        history.create_run(run_id="r2", experiment="moved", target="local")
    assert caught.value.orig.sqlite_errorname == "SQLITE_READONLY_DBMOVED"  # type: ignore[union-attr]
    # A copy put back at its path (as a restore from a backup does): the next write opens it, rather than ask the
    # file that is gone again and again.
    shutil.copy(tmp_path / "moved.db", tmp_path / "history.db")
    history.create_run(run_id="r2", experiment="moved", target="local")
    assert [r.id for r in RunHistory(f"sqlite:///{tmp_path / 'history.db'}").list_runs()] == ["r2", "r1"]


def test_a_history_whose_url_opens_it_read_only_names_the_url_and_one_that_writes(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    RunHistory(f"sqlite:///{path}").create_run(run_id="r1", experiment="read_only", target="local")
    url = f"sqlite:///file:{path}?mode=ro&uri=true"

    with pytest.raises(HistoryReadOnlyError) as caught:
        RunHistory(url).create_run(run_id="r2", experiment="read_only", target="local")

    message = str(caught.value)
    assert message.startswith(f"The run history's URL {url} opens its SQLite file {path} read-only (mode=ro)")
    assert "Make the file and its folder writable" not in message  # it is writable: the URL is the cause
    writable = f"sqlite:///file:{path}?uri=true"
    assert f"Recording runs needs a URL without mode=ro, such as {writable}:" in message
    RunHistory(writable).create_run(run_id="r2", experiment="read_only", target="local")
    assert [r.id for r in RunHistory(url).list_runs()] == ["r2", "r1"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://amlrun:pw-9x@db/amlrun", "postgresql+psycopg://amlrun:***@db/amlrun"),
        ("postgresql://amlrun:p%40ss@db/amlrun", "postgresql+psycopg://amlrun:***@db/amlrun"),
        # libpq also takes the password (and a key's) from the query.
        (
            "postgres://amlrun@db:5432/amlrun?password=pw-9x&sslmode=require&sslpassword=k3y",
            "postgresql+psycopg://amlrun@db:5432/amlrun?password=***&sslmode=require&sslpassword=***",
        ),
        # A password holding an unquoted @, which SQLAlchemy reads only up to it: none of it shows.
        ("postgresql://amlrun:pw@9x@db/amlrun", "postgresql://amlrun:***@db/amlrun"),
        (
            "sqlite:///file:/data/history.db?mode=ro&uri=true",
            "sqlite:///file:/data/history.db?mode=ro&uri=true",
        ),
    ],
)
def test_a_database_url_is_shown_without_its_secrets(url: str, shown: str) -> None:
    assert display_url(url) == shown


@pytest.mark.parametrize("field", ["id", "experiment_id", "status", "created_at", "no_such_field"])
def test_a_new_run_takes_no_field_that_is_not_a_runs_to_give(tmp_path: Path, field: str) -> None:
    # Its id, experiment, status (Queued) and creation time are the history's to write: a field among the others
    # would record the run in another experiment, or as ended before it began.
    history = RunHistory(f"sqlite:///{tmp_path / 'history.db'}")
    with pytest.raises(TypeError, match=f"'{field}' is an invalid keyword argument for a run"):
        history.create_run(run_id="r1", experiment="e", target="local", **{field: 1})
    assert history.list_runs() == []
