"""Which database errors are the history being away or read-only (waited for) and which are a refused write
(reported).

The real refusals and outages run against PostgreSQL in tests/integration/test_history_outages.py.
"""

from __future__ import annotations

import importlib
import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.exc import DataError, OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from airflow_amlrun.history import HistoryUnavailableError, MetricPoint, RunBookkeeper, RunHistory, RunStatus
from airflow_amlrun.history.bookkeeping import FINAL_WRITE_SECONDS, is_transient

# The SQLAlchemy error, the driver and its error's class and message under it, and whether it is waited for.
DRIVER_ERRORS = [
    (OperationalError, "sqlite3", "OperationalError", "database is locked", True),
    (OperationalError, "psycopg", "AdminShutdown", "terminating connection", True),
    (OperationalError, "psycopg", "OperationalError", "connection failed: refused", True),
    (OperationalError, "psycopg", "DeadlockDetected", "deadlock detected", True),
    (OperationalError, "psycopg", "ReadOnlySqlTransaction", "read-only transaction", True),
    # Refusals: waiting would not change the answer.
    (DataError, "psycopg", "StringDataRightTruncation", "value too long", False),
    (OperationalError, "psycopg", "ProgramLimitExceeded", "index row size exceeds", False),
    (OperationalError, "sqlite3", "OperationalError", "no such table: amlrun_runs", False),
]


@pytest.mark.parametrize(
    ("wrapper", "driver", "name", "message", "transient"),
    [pytest.param(*case, id=f"{case[1]}.{case[2]}: {case[3]}") for case in DRIVER_ERRORS],
)
def test_only_a_history_that_is_away_is_waited_for(
    wrapper: type[Exception], driver: str, name: str, message: str, transient: bool
) -> None:
    # The driver's error is built as the test runs: importing psycopg as the tests are collected would cost each
    # process of the unit tests about 0.1 s.
    module = importlib.import_module(driver)
    error: type[Exception] = getattr(getattr(module, "errors", module), name)
    assert is_transient(wrapper("UPDATE", {}, error(message))) is transient


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (PoolTimeoutError("QueuePool limit of size 5 overflow 10 reached"), True),
        (StatementError("not JSON serializable", "UPDATE", {}, TypeError("Object of type object")), False),
    ],
    ids=["pool-timeout", "not-serializable"],
)
def test_a_full_pool_is_waited_for_and_a_value_no_database_takes_is_not(
    error: Exception, transient: bool
) -> None:
    assert is_transient(error) is transient


def test_a_statement_sqlite_refuses_is_not_waited_for_but_a_locked_file_is(tmp_path: Path) -> None:
    # Both are OperationalErrors; SQLite's own code tells the schema's refusal from a file another process holds.
    first = sqlite3.connect(tmp_path / "history.db", isolation_level=None)
    first.execute("CREATE TABLE amlrun_runs (display_name TEXT)")
    with pytest.raises(sqlite3.OperationalError, match="duplicate column name") as refused:
        first.execute("ALTER TABLE amlrun_runs ADD COLUMN display_name TEXT")
    first.execute("BEGIN IMMEDIATE")
    second = sqlite3.connect(tmp_path / "history.db", isolation_level=None, timeout=0)
    with pytest.raises(sqlite3.OperationalError, match="database is locked") as locked:
        second.execute("BEGIN IMMEDIATE")
    first.close()
    second.close()

    assert is_transient(OperationalError("ALTER TABLE", {}, refused.value)) is False
    assert is_transient(OperationalError("BEGIN IMMEDIATE", {}, locked.value)) is True


def test_a_history_turned_read_only_during_a_run_keeps_its_points_and_says_so_at_the_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The file turns read-only while the run goes on (a file system remounted read-only after an I/O error):
    # the same file, whose every connection SQLite keeps from writing (as it does a read-only file, with the same
    # error). Tests run as root, whom a file's mode does not stop; a URL with mode=ro would be the URL's doing.
    path = tmp_path / "history.db"
    writable = RunHistory(f"sqlite:///{path}")
    writable.create_run(run_id="r1", experiment="read_only", target="local")
    read_only = RunHistory(f"sqlite:///{path}")
    read_only.dispose()  # the connection it opened to check the schema: every one from now on is kept so
    event.listen(
        read_only.engine, "connect", lambda connection, _: connection.execute("PRAGMA query_only=ON")
    )
    now = [0.0]
    book = RunBookkeeper(
        read_only, "r1", clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    caplog.set_level(logging.WARNING, logger="airflow_amlrun.history.bookkeeping")

    book.update(status=RunStatus.RUNNING)
    book.add_metrics([MetricPoint("loss", 1.0 / (seq + 1), seq=seq, step=seq) for seq in range(3)])

    assert book.backlog == 3  # kept, not dropped
    assert "refused" not in caplog.text
    assert (
        f"takes no writes: The run history's SQLite file {path} is read-only to this process" in caplog.text
    )
    assert "kept and written once the history is writable again" in caplog.text
    with pytest.raises(HistoryUnavailableError) as caught:
        book.finish(status=RunStatus.COMPLETED, end_time=datetime.now(UTC))
    message = str(caught.value)
    assert (
        f"did not accept its outcome (Completed) for {FINAL_WRITE_SECONDS:.0f} s (it is read-only)" in message
    )
    assert f"The run history's SQLite file {path} is read-only to this process" in message
    assert "Make the file and its folder writable for the user this runs as" in message
    assert "Check that the history database is up" not in message
    assert writable.get_run("r1").status is RunStatus.QUEUED  # left as it was, for a retry
    assert writable.get_metrics("r1") == []

    # Writable again (remounted): everything kept is written, and the outcome with it.
    book.history = writable
    record = book.finish(status=RunStatus.COMPLETED, end_time=datetime.now(UTC))
    assert record.status is RunStatus.COMPLETED
    assert [p.value for p in writable.get_metrics("r1", "loss")] == [1.0, 0.5, 1.0 / 3]
