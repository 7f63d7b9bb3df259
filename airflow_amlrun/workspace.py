"""Workspace: where runs are recorded, a run-history database plus a store for snapshots and outputs."""

from __future__ import annotations

import logging
import re
import threading
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun.config import airflow_connection, load_settings, secret_name, url_secrets
from airflow_amlrun.errors import ConfigurationError, shown

if TYPE_CHECKING:
    from airflow_amlrun.history import ExperimentRecord, RunHistory, RunRecord, RunStatus
    from airflow_amlrun.snapshot import BlobStore, Snapshot

log = logging.getLogger(__name__)

_cache: dict[tuple[str, str], Workspace] = {}
_cache_lock = threading.Lock()

# What Airflow accepts as a connection id (airflow.models.connection.RE_SANITIZE_CONN_ID, 250 characters).
CONNECTION_ID = re.compile(r"[\w#!()\-.:/\\]{1,250}")
CONNECTION_ID_RULE = "letters, digits and _#!()-.:/\\, at most 250 characters"
EXTRAS = ("database_url", "store_url", "storage_options")


def check_connection_id(value: object, what: str) -> str | None:
    """The connection id, if Airflow could hold a connection of that id (None passes: the default)."""
    if value is not None and (not isinstance(value, str) or not CONNECTION_ID.fullmatch(value)):
        raise ConfigurationError(
            f"{what}={shown(value)} is not an Airflow connection id ({CONNECTION_ID_RULE}): name an existing "
            "connection of type 'amlrun', or leave it None for the default workspace."
        )
    return value


class Workspace:
    """A run history (SQLAlchemy URL) and a store (local folder or fsspec URL), opened lazily.

    :param database_url: SQLAlchemy URL of the run history, e.g. ``sqlite:////srv/amlrun/history.db`` or
        ``postgresql://user@host/amlrun``.
    :param store_url: folder or fsspec URL (``s3://bucket/prefix``) for snapshots and outputs.
    :param storage_options: fsspec options of the store (endpoint, credentials).
    :param cache_dir: local folder for caches (stat cache, environment builds); defaults beside the
        embedded workspace.
    """

    def __init__(
        self,
        database_url: str,
        store_url: str,
        *,
        name: str = "default",
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.name = name
        self.database_url = database_url
        self.store_url = store_url
        self.storage_options = dict(storage_options or {})
        self.cache_dir = Path(cache_dir) if cache_dir else load_settings().home / "cache"

    @classmethod
    def get(cls, conn_id: str | None = None) -> Workspace:
        """The workspace of an Airflow connection (type amlrun), or the embedded default if it does not exist.

        :param conn_id: connection id; defaults to ``[amlrun] workspace_conn_id`` (``amlrun_default``).
        """
        check_connection_id(conn_id, "conn_id")
        settings = load_settings()
        conn_id = conn_id or settings.workspace_conn_id
        # Asking Airflow loads it (a second of CPU); a plain script where no connection can exist skips that.
        found = airflow_connection(conn_id)
        if found is not None:
            return cls.from_connection(conn_id, *found)
        if conn_id != settings.workspace_conn_id:
            raise ConfigurationError(
                f"No Airflow connection {conn_id!r} exists. Create one of type 'amlrun' (extras "
                "database_url and store_url), or omit conn_id to use the embedded workspace."
            )
        _make_embedded_home(settings.home, conn_id)
        return cls.cached(
            f"sqlite:///{settings.home / 'history.db'}", str(settings.home / "store"), name="embedded"
        )

    @classmethod
    def from_connection(cls, conn_id: str, conn_type: str | None, extras: dict[str, Any]) -> Workspace:
        """The workspace an `amlrun` connection describes: its extras ``database_url``, ``store_url`` and,
        optionally, ``storage_options``.

        :param conn_id: the connection's id, which names the workspace.
        :param conn_type: the connection's type; must be ``amlrun`` (or unset).
        :param extras: the connection's extras.
        """
        if conn_type not in (None, "", "amlrun"):
            raise ConfigurationError(
                f"Connection {conn_id!r} has type {conn_type!r}; a workspace connection must be of type 'amlrun'."
            )
        unknown = sorted(str(key) for key in extras if key not in EXTRAS)
        if unknown:
            raise ConfigurationError(
                f"Connection {conn_id!r} has unknown extra(s) {', '.join(map(shown, unknown))}: an amlrun "
                f"connection's extras are {', '.join(EXTRAS)}. Fix the spelling, or remove them."
            )
        missing = [key for key in ("database_url", "store_url") if not extras.get(key)]
        if missing:
            raise ConfigurationError(
                f"Connection {conn_id!r} lacks {' and '.join(missing)} in its extras: set database_url "
                "(e.g. postgresql://user@host/amlrun) and store_url (a folder or s3://bucket/prefix)."
            )
        database_url, store_url = extras["database_url"], extras["store_url"]
        for key, value in (("database_url", database_url), ("store_url", store_url)):
            if not isinstance(value, str) or "\0" in value:
                what = type(value).__name__ if not isinstance(value, str) else "text with a NUL byte"
                raise ConfigurationError(
                    f"Connection {conn_id!r}: extra {key} must be a URL string (e.g. "
                    f"{'postgresql://user@host/amlrun' if key == 'database_url' else 's3://bucket/amlrun'}), "
                    f"not {what}."
                )
        options = extras.get("storage_options") or {}
        if not isinstance(options, dict):
            raise ConfigurationError(f"Connection {conn_id!r}: storage_options must be a JSON object.")
        with _cache_lock:
            known = (database_url, store_url) in _cache
        if not known:
            # Checked once a process: the checks load SQLAlchemy's dialect and fsspec's file system class.
            _check_database_url(conn_id, database_url)
            _check_store_url(conn_id, store_url)
        return cls.cached(database_url, store_url, name=conn_id, storage_options=options)

    @classmethod
    def cached(cls, database_url: str, store_url: str, **kwargs: Any) -> Workspace:
        """One Workspace object per database and store in a process, so the schema is checked once."""
        with _cache_lock:
            key = (database_url, store_url)
            if key not in _cache:
                _cache[key] = cls(database_url, store_url, **kwargs)
            return _cache[key]

    def credentials(self) -> list[str]:
        """The secret values this workspace is opened with (the database URL's password, the store's keys and
        tokens), for a task to mask in its log."""
        found = url_secrets(self.database_url)
        found += [v for k, v in self.storage_options.items() if isinstance(v, str) and v and secret_name(k)]
        return sorted(set(found))

    @cached_property
    def history(self) -> RunHistory:
        # SQLAlchemy loads with the history, not with this module: a hook or DAG file naming a Workspace
        # does not pay for it.
        from airflow_amlrun.history import RunHistory

        return RunHistory(self.database_url)

    @cached_property
    def store(self) -> BlobStore:
        from airflow_amlrun.snapshot import BlobStore

        return BlobStore(self.store_url, storage_options=self.storage_options or None)

    def get_run(self, run_id: str) -> RunRecord:
        """The run with this id; its attributes are the run row's fields."""
        return self.history.get_run(run_id)

    def list_runs(
        self, experiment: str | None = None, status: str | RunStatus | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """Runs, newest first."""
        return self.history.list_runs(experiment=experiment, status=status, limit=limit)

    def list_experiments(self) -> list[ExperimentRecord]:
        return self.history.list_experiments()

    def restore_snapshot(self, run_or_snapshot_id: str, path: str | Path) -> Snapshot:
        """Write the code of a run (or a snapshot id) into an empty or new folder, verifying every file.

        :param run_or_snapshot_id: a run id, or the id of a snapshot in this workspace's store.
        :param path: destination folder; must be empty or not exist.
        """
        from airflow_amlrun.history import RunNotFoundError
        from airflow_amlrun.snapshot import restore_snapshot
        from airflow_amlrun.snapshot.manifest import is_digest

        snapshot_id = run_or_snapshot_id
        try:
            run = self.history.get_run(run_or_snapshot_id)
        except RunNotFoundError:
            # Only a well-formed digest can name a snapshot; anything else was meant as a run id.
            if not is_digest(run_or_snapshot_id) or not self.store.has_manifest(run_or_snapshot_id):
                raise RunNotFoundError(
                    f"No run or snapshot {run_or_snapshot_id!r} in the run history "
                    f"{self.history.url_for_display} or the store {self.store_url}. List the runs with "
                    "`amlrun runs list` (or Workspace.list_runs()) and give a run id, or a snapshot id "
                    "(64 hex characters) from a run's snapshot_id."
                ) from None
        else:
            if run.snapshot_id is None:
                children = self.history.child_runs(run.id)
                if not children:
                    raise ConfigurationError(f"Run {run.id} has no code snapshot (it was not started).")
                # A sweep's parent run runs no code: its runs, each started from a snapshot of its own, do.
                ids = ", ".join(child.id for child in children[:5]) + (" ..." if len(children) > 5 else "")
                best = run.tags.get("best_run_id")
                raise ConfigurationError(
                    f"Run {run.id} is a sweep: it runs no code of its own, so it has no snapshot. Each of its "
                    f"{len(children)} runs ({ids}) has one: restore one of them by its run id"
                    f"{f' (its best run is {best})' if best else ''}."
                )
            snapshot_id = run.snapshot_id
        return restore_snapshot(self.store, snapshot_id, path)

    def __repr__(self) -> str:
        return f"Workspace(name={self.name!r}, history={self.history.url_for_display!r}, store={self.store_url!r})"


def _make_embedded_home(home: Path, conn_id: str) -> None:
    """Make the embedded workspace's folder if it is new, saying where it is and how to choose another: a
    user who did not mean to use it learns it on the first run, not when the runs are missing elsewhere."""
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        home.mkdir()
    except FileExistsError:
        return
    except OSError as err:
        raise ConfigurationError(
            f"The embedded amlrun workspace folder {str(home)!r} cannot be made ({err.strerror or err}): set "
            "AIRFLOW_HOME (the workspace is $AIRFLOW_HOME/amlrun) or [amlrun] home (AIRFLOW__AMLRUN__HOME) "
            f"to a folder you may write, or create the Airflow connection {conn_id!r} of type 'amlrun'."
        ) from None
    log.info(
        "Created the embedded amlrun workspace in %s (run history and store), used because no Airflow "
        "connection %r exists. To use another, set AIRFLOW_HOME (the workspace is $AIRFLOW_HOME/amlrun) or "
        "[amlrun] home (AIRFLOW__AMLRUN__HOME), or create the connection %r of type 'amlrun' (extras "
        "database_url and store_url) for a shared workspace.",
        home,
        conn_id,
        conn_id,
    )


def _check_database_url(conn_id: str, url: str) -> None:
    """Refuse a database URL SQLAlchemy cannot open; a password in it is never shown."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from airflow_amlrun.history.database import normalize_database_url

    try:
        parsed = make_url(normalize_database_url(url))
    except ArgumentError:
        raise ConfigurationError(
            f"Connection {conn_id!r}: extra database_url is not a SQLAlchemy URL ({len(url)} characters, not "
            "shown: it may hold a password). Write it as postgresql://user:password@host/amlrun or "
            "sqlite:////srv/amlrun/history.db."
        ) from None
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigurationError(
            f"Connection {conn_id!r}: extra database_url {parsed.render_as_string(hide_password=True)!r} names "
            f"database {parsed.drivername!r}, which SQLAlchemy has no dialect for: use postgresql://... or "
            "sqlite:///..., or install that database's SQLAlchemy dialect."
        ) from None


def _check_store_url(conn_id: str, url: str) -> None:
    """Refuse a store no worker could use alike: a relative folder, or a URL scheme fsspec does not know."""
    if not url.strip():
        raise ConfigurationError(
            f"Connection {conn_id!r}: extra store_url is empty: give a folder (/srv/amlrun/store) or an fsspec "
            "URL (s3://bucket/amlrun)."
        )
    if "://" not in url or url.startswith("file://"):
        folder = url.removeprefix("file://")
        if not folder.startswith(("/", "~")):
            raise ConfigurationError(
                f"Connection {conn_id!r}: extra store_url {shown(url)} is a relative folder, which each process "
                "would take from its own current directory: give an absolute folder such as /srv/amlrun/store, "
                "or an fsspec URL such as s3://bucket/amlrun."
            )
        return
    import fsspec

    # A chained URL (simplecache::s3://bucket/amlrun) names one file system per link.
    protocol = ""
    try:
        for link in url.split("::"):
            protocol = link.split("://", 1)[0]
            fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as err:
        # A URL may carry a user and password before its host: they are not shown.
        displayed = shown(re.sub(r"://[^/@]*@", "://***@", url))
        raise ConfigurationError(
            f"Connection {conn_id!r}: extra store_url {displayed} uses {protocol!r}, which this worker cannot "
            f"open ({err}): use a folder, or an fsspec URL whose package is installed (s3:// needs s3fs)."
        ) from None
