"""The run history's database itself: its URL (as given, as shown), its engine with SQLite's settings and errors,
and its schema, migrated with Alembic once per database and process.

What is stored, and how it is read, is :mod:`airflow_amlrun.history.repository`'s business.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.pool import NullPool

from airflow_amlrun.config import secret_name, url_secrets
from airflow_amlrun.errors import AmlRunError, ConfigurationError

_MIGRATIONS = Path(__file__).with_name("migrations")
# The newest migration's revision; a test checks it against Alembic's head. Knowing it lets a process
# that finds the schema current skip loading Alembic at all (a task process opens the history once).
SCHEMA_HEAD = "0008"
# How long an SQLite connection waits for the file's lock held by another (several tasks write one file).
SQLITE_BUSY_SECONDS = 30.0
_migrated: set[str] = set()
_migrate_lock = threading.Lock()
# SQLite's codes for a write refused because the file, its folder, or its -wal or -shm file is read-only to
# this process. Not SQLITE_READONLY_DBMOVED: the file was renamed or replaced under the open connection, which
# making it writable would not cure (that connection is dropped instead: the next opens the file now there).
_SQLITE_READ_ONLY = frozenset(
    {
        "SQLITE_READONLY",
        "SQLITE_READONLY_CANTINIT",
        "SQLITE_READONLY_CANTLOCK",
        "SQLITE_READONLY_DIRECTORY",
        "SQLITE_READONLY_RECOVERY",
        "SQLITE_READONLY_ROLLBACK",
    }
)


class HistoryReadOnlyError(AmlRunError):
    """The run history is an SQLite file this process may read but not write: nothing was written.

    The message names the file and why: its mode or owner, a read-only mount, a folder SQLite cannot write its
    ``-wal`` and ``-shm`` files in, or the history's URL itself asking for read-only access (``mode=ro`` in an
    SQLite URI such as ``sqlite:///file:/data/history.db?mode=ro&uri=true``). The fix is to make the file and
    its folder writable for the user the task or command runs as, or, for a URL with ``mode=ro``, to give the
    workspace a URL without it (the amlrun connection's ``database_url``). While a run goes on, its writes are
    kept and written once the file is writable again.

    :param path: the history's file.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


def normalize_database_url(url: str) -> str:
    """Accept the URL forms users paste (postgres://, postgresql://) and pick the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def display_url(url: str | URL) -> str:
    """A database URL as messages show it: its password, and the value of any query key naming a secret
    (``?password=``), as ``***``."""
    parsed = make_url(normalize_database_url(url) if isinstance(url, str) else url)
    if parsed.get_backend_name() == "sqlite" and parsed.password is None:
        # As it is written: SQLAlchemy quotes the colon of an SQLite URI (sqlite:///file%3A/data/history.db).
        shown = unquote(parsed.render_as_string(hide_password=False))
    else:
        shown = parsed.render_as_string(hide_password=True)
    raw = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    try:
        written = urlsplit(raw)
        password = written.password
    except ValueError:
        password = None
    if password is not None and unquote(password) != parsed.password:
        # Read otherwise by SQLAlchemy than by the URL's own syntax (a password holding an unquoted @, of which
        # SQLAlchemy takes the part before it): shown as written, with the password as the syntax has it masked.
        host = written.netloc.rpartition("@")[2]
        shown = urlunsplit(written._replace(netloc=f"{written.username or ''}:***@{host}"))
    base, mark, query = shown.partition("?")
    if mark:
        pairs = [pair.partition("=") for pair in query.split("&")]
        shown = (
            base + "?" + "&".join(k + eq + ("***" if secret_name(unquote(k)) else v) for k, eq, v in pairs)
        )
    # Whatever else shows a secret the URL carries (in a path, a host): masked all the same.
    for secret in url_secrets(raw):
        shown = shown.replace(secret, "***")
    return shown


def open_engine(url: str) -> Engine:
    """The engine of the database at ``url`` (normalized): an SQLite file's folder is made, and its connections
    get the settings and the read-only errors below."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and (path := _sqlite_file(parsed)) is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "handle_error", _sqlite_read_only)
    return engine


def migrate(engine: Engine, url: str) -> None:
    """Bring the schema of the database at ``url`` (``engine``'s) to the newest revision, once per database and
    process."""
    # Every in-memory SQLite database is a new one, whatever its URL.
    shared = engine.url.database not in (None, "", ":memory:")
    with _migrate_lock:
        if shared and url in _migrated:
            return
        if current_revision(engine) == SCHEMA_HEAD:
            _migrated.add(url)
            return
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        # Alembic narrates every step at INFO; a task log needs none of it.
        alembic_log = logging.getLogger("alembic")
        level = alembic_log.level
        alembic_log.setLevel(logging.WARNING)
        try:
            # Many processes may open a new database at once. One transaction holds a lock that
            # other migrators wait on, looks at the revision again under it, and migrates: the
            # others then find the schema whole, and a migration that fails leaves none of itself.
            with _migration_transaction(engine) as connection:
                revision = _revision(connection)
                if revision != SCHEMA_HEAD:
                    _check_known(config, revision, url)
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
        finally:
            alembic_log.setLevel(level)
        _migrated.add(url)


def current_revision(engine: Engine) -> str | None:
    """The schema revision of ``engine``'s database; None before its first migration."""
    with engine.connect() as connection:
        return _revision(connection)


def _check_known(config: Any, revision: str | None, url: str) -> None:
    """Refuse a schema revision none of this version's migrations made: Alembic would only say it cannot locate
    it."""
    from alembic.script import ScriptDirectory

    if revision is None or revision in {
        s.revision for s in ScriptDirectory.from_config(config).walk_revisions()
    }:
        return
    raise ConfigurationError(
        f"The run history at {display_url(url)} has schema revision {revision!r}, which this version of "
        f"airflow-amlrun does not know (its newest is {SCHEMA_HEAD!r}): a newer airflow-amlrun migrated it (or "
        "its table amlrun_alembic_version was changed by hand). Nothing was changed. Use the newer "
        "airflow-amlrun wherever this history is used, or point the workspace at another history."
    )


def _revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table("amlrun_alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM amlrun_alembic_version")).scalar()


# Any constant key will do: the advisory lock only serializes this project's migrations of one database.
_PG_MIGRATION_LOCK = 0x616D6C72756E  # "amlrun"


@contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the database's migration lock until it ends."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            yield connection
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or database in (None, "", ":memory:"):
        # A database of this process alone (in memory) has no one to wait for, and a second engine would
        # open another one.
        with engine.begin() as connection:
            yield connection
        return
    # Python's sqlite3 module commits before each CREATE or ALTER of its own accord, which would let a
    # second process see half a schema. Driving the transaction by hand keeps DDL inside it, and
    # BEGIN IMMEDIATE takes the file's write lock at once (waiting out the busy timeout for it).
    locked = create_engine(engine.url, poolclass=NullPool)
    event.listen(locked, "connect", _sqlite_manual_transactions)
    event.listen(locked, "handle_error", _sqlite_read_only)

    @event.listens_for(locked, "begin")
    def _begin_immediate(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    try:
        with locked.begin() as connection:
            yield connection
    finally:
        locked.dispose()


def _sqlite_manual_transactions(dbapi_connection: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_connection, record)
    dbapi_connection.isolation_level = None


def _sqlite_read_only(context: ExceptionContext) -> None:
    """Raise SQLite's refusal to write a file, or to open one in a folder, that is read-only here as the error
    that says so: its own words ("attempt to write a readonly database", "unable to open database file") name
    neither the file nor what to do."""
    code = getattr(context.original_exception, "sqlite_errorname", "")
    if code == "SQLITE_READONLY_DBMOVED":
        # The pool would hand the same connection, to the file that is gone, to every retry: let it go.
        context.is_disconnect = True
        return
    url = context.engine.url if context.engine is not None else None
    path = _sqlite_file(url) if url is not None else None
    if url is None or not path or not isinstance(code, str):
        return
    folder = os.path.dirname(os.path.abspath(path))
    if code in _SQLITE_READ_ONLY and _sqlite_read_only_uri(url):
        # The URL asks for it: making the file writable would change nothing.
        raise HistoryReadOnlyError(
            f"The run history's URL {display_url(url)} opens its SQLite file {path} read-only (mode=ro), and "
            f"nothing was written ({context.original_exception}). Recording runs needs a URL without mode=ro, "
            f"such as {display_url(url.difference_update_query(['mode']))}: give the workspace that one (the "
            "amlrun connection's database_url).",
            path=path,
        ) from context.original_exception
    if code in _SQLITE_READ_ONLY:
        what = f"The run history's SQLite file {path} is read-only to this process, and nothing was written"
    elif code.startswith("SQLITE_CANTOPEN") and os.path.exists(path) and not os.access(folder, os.W_OK):
        what = (
            f"The run history's SQLite file {path} cannot be opened: its folder {folder} is read-only to this "
            "process, and SQLite writes the file's -wal and -shm files there, even to read it"
        )
    else:
        return
    raise HistoryReadOnlyError(
        f"{what} ({context.original_exception}). Make the file and its folder writable for the user this runs "
        f"as (uid {os.geteuid()}), or point the workspace at a history it may write (the connection's "
        "database_url, or [amlrun] home for the embedded workspace).",
        path=path,
    ) from context.original_exception


def _sqlite_read_only_uri(url: URL) -> bool:
    """Whether an SQLite URL opens its file read-only by its own request (``mode=ro`` in a URI)."""
    return url.query.get("uri") in ("true", "1") and url.query.get("mode") == "ro"


def _sqlite_file(url: URL) -> str | None:
    """The file of an SQLite URL, also when given as a URI (``sqlite:///file:/data/history.db?mode=ro&uri=true``);
    None for an in-memory database."""
    database = url.database
    if not database or database == ":memory:":
        return None
    if url.query.get("uri") in ("true", "1") and database.startswith("file:"):
        return unquote(urlsplit(database).path) or None
    return database


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Several tasks write one SQLite file at once: WAL lets readers run beside a writer, and the
    # busy timeout makes a writer wait for the lock instead of failing.
    # The busy timeout comes first: switching a new file to WAL takes its lock, which a process opening it
    # at the same moment may hold.
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """Put the SQLite file in WAL mode, which the file keeps: only a new file needs the switch.

    The switch takes the file's exclusive lock. When several processes open a new file at once, SQLite answers
    one of them "database is locked" at once, without waiting its busy timeout (waiting could deadlock with
    another connection's lock): that one looks again, for as long as the busy timeout, and finds the file
    switched by another, or switches it."""
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
