"""Which database errors are the history being away (waited for) and which are a refused write (reported).

The real refusals and outages run against PostgreSQL in tests/integration/test_history_outages.py.
"""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from sqlalchemy.exc import DataError, OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from airflow_amlrun.history.bookkeeping import is_transient


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked")), True),
        (OperationalError("UPDATE", {}, psycopg.errors.AdminShutdown("terminating connection")), True),
        (OperationalError("UPDATE", {}, psycopg.OperationalError("connection failed: refused")), True),
        (OperationalError("UPDATE", {}, psycopg.errors.DeadlockDetected("deadlock detected")), True),
        (
            OperationalError("UPDATE", {}, psycopg.errors.ReadOnlySqlTransaction("read-only transaction")),
            True,
        ),
        (PoolTimeoutError("QueuePool limit of size 5 overflow 10 reached"), True),
        # Refusals: waiting would not change the answer.
        (DataError("UPDATE", {}, psycopg.errors.StringDataRightTruncation("value too long")), False),
        (
            OperationalError("UPDATE", {}, psycopg.errors.ProgramLimitExceeded("index row size exceeds")),
            False,
        ),
        (OperationalError("UPDATE", {}, sqlite3.OperationalError("no such table: amlrun_runs")), False),
        (StatementError("not JSON serializable", "UPDATE", {}, TypeError("Object of type object")), False),
    ],
    ids=lambda value: type(getattr(value, "orig", value)).__name__ if not isinstance(value, bool) else "",
)
def test_only_a_history_that_is_away_is_waited_for(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient
