"""The one place that reads and writes the run history database."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Table,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from airflow_amlrun.config import secret_name, url_secrets
from airflow_amlrun.errors import AmlRunError, ConfigurationError
from airflow_amlrun.history.listing import (
    RunFilter,
    RunListItem,
    RunPage,
    experiment_activity,
    list_items,
    of_dags,
    page_runs,
)
from airflow_amlrun.history.metricstore import (
    MetricSummary,
    Series,
    join_value,
    latest_values,
    read_series,
    store_points,
    summary_of,
)
from airflow_amlrun.history.models import ExperimentRow, MetricRow, MetricSummaryRow, RunRow
from airflow_amlrun.history.paging import RunSort
from airflow_amlrun.history.records import ExperimentRecord, MetricPoint, RunRecord, RunStatus, aware

if TYPE_CHECKING:
    from alembic.config import Config

_MIGRATIONS = Path(__file__).with_name("migrations")
# The newest migration's revision; a test checks it against Alembic's head. Knowing it lets a process
# that finds the schema current skip loading Alembic at all (a task process opens the history once).
SCHEMA_HEAD = "0008"
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


class RunNotFoundError(AmlRunError, LookupError):
    """No run with the given id exists in this workspace's run history.

    The message names the id and the history. ``amlrun runs list`` shows the runs there; ``--conn-id`` (or the
    ``conn_id`` of ``Workspace.get``) picks the workspace the run was recorded in.
    """


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


def utcnow() -> datetime:
    return datetime.now(UTC)


class RunHistory:
    """Experiments, runs and metrics in a SQLAlchemy database, migrated with Alembic on first use."""

    def __init__(self, url: str) -> None:
        self.url = normalize_database_url(url)
        parsed = make_url(self.url)
        if parsed.get_backend_name() == "sqlite" and (path := _sqlite_file(parsed)) is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(self.url, pool_pre_ping=True)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "handle_error", _sqlite_read_only)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Reads for the pages each run their statements on their own: no BEGIN and COMMIT round trips.
        self._reads = sessionmaker(self.engine.execution_options(isolation_level="AUTOCOMMIT"))
        self.migrate()

    def migrate(self) -> None:
        """Bring the schema to the newest revision (once per database and process)."""
        # Every in-memory SQLite database is a new one, whatever its URL.
        shared = self.engine.url.database not in (None, "", ":memory:")
        with _migrate_lock:
            if shared and self.url in _migrated:
                return
            if self._current_revision() == SCHEMA_HEAD:
                _migrated.add(self.url)
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
                with _migration_transaction(self.engine) as connection:
                    revision = _revision(connection)
                    if revision != SCHEMA_HEAD:
                        self._check_known(config, revision)
                        config.attributes["connection"] = connection
                        command.upgrade(config, "head")
            finally:
                alembic_log.setLevel(level)
            _migrated.add(self.url)

    def _check_known(self, config: Config, revision: str | None) -> None:
        """Refuse a schema revision none of this version's migrations made: Alembic would only say it cannot
        locate it."""
        from alembic.script import ScriptDirectory

        if revision is None or revision in {
            s.revision for s in ScriptDirectory.from_config(config).walk_revisions()
        }:
            return
        raise ConfigurationError(
            f"The run history at {self.url_for_display} has schema revision {revision!r}, which this version of "
            f"airflow-amlrun does not know (its newest is {SCHEMA_HEAD!r}): a newer airflow-amlrun migrated it (or "
            "its table amlrun_alembic_version was changed by hand). Nothing was changed. Use the newer "
            "airflow-amlrun wherever this history is used, or point the workspace at another history."
        )

    def _current_revision(self) -> str | None:
        with self.engine.connect() as connection:
            return _revision(connection)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session for reading only, each statement in a transaction of its own (fewer round trips)."""
        with self._reads() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    # experiments

    def ensure_experiment(self, name: str) -> ExperimentRecord:
        with self.session() as session:
            row = self._experiment_row(session, name)
            return ExperimentRecord(name=row.name, created_at=aware(row.created_at) or utcnow())

    def _experiment_row(self, session: Session, name: str) -> ExperimentRow:
        query = select(ExperimentRow).where(ExperimentRow.name == name)
        row = session.scalar(query)
        if row is not None:
            return row
        # Two tasks may create the same experiment at once: the loser of the race re-reads it. The experiment is
        # written in the caller's transaction, and is gone with it if that fails (a run the history refuses leaves
        # no empty experiment): SQLite and PostgreSQL insert it unless it is there, in one statement; elsewhere a
        # savepoint takes the race (on SQLite, its release would commit the experiment on its own).
        dialect = session.get_bind().dialect.name
        if dialect in ("sqlite", "postgresql"):
            # Imported by the database in use: the other's dialect is a tenth of a second to import, in every task.
            values = {"name": name, "created_at": utcnow()}
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                session.execute(
                    sqlite_insert(ExperimentRow)
                    .values(values)
                    .on_conflict_do_nothing(index_elements=["name"])
                )
            else:
                from sqlalchemy.dialects.postgresql import insert as postgresql_insert

                session.execute(
                    postgresql_insert(ExperimentRow)
                    .values(values)
                    .on_conflict_do_nothing(index_elements=["name"])
                )
            return session.scalars(query).one()
        try:
            with session.begin_nested():
                row = ExperimentRow(name=name, created_at=utcnow())
                session.add(row)
        except Exception:
            row = session.scalar(query)
            if row is None:
                raise
        return row

    def list_experiments(
        self,
        *,
        dag_ids: Collection[str] | None = None,
        runs_without_dag: bool = True,
        hidden_dag_ids: Collection[str] = (),
    ) -> list[ExperimentRecord]:
        """Experiments by name, each with the number of its runs.

        :param dag_ids: count only runs of these DAGs (None: of any DAG but `hidden_dag_ids`).
        :param runs_without_dag: whether runs recorded outside any DAG count.
        When either narrows the runs, an experiment none of whose runs is left is not listed: its name
        alone may say more than the reader may know.
        """
        with self.session() as session:
            return [
                ExperimentRecord(
                    name=name, created_at=aware(created) or utcnow(), run_count=n, last_run_at=aware(last)
                )
                for name, created, n, last in experiment_activity(
                    session, of_dags(dag_ids, runs_without_dag, hidden_dag_ids)
                )
            ]

    # runs

    def create_run(self, *, run_id: str, experiment: str, target: str, **fields: Any) -> RunRecord:
        """Record a new run in status Queued."""
        with self.session() as session:
            exp = self._experiment_row(session, experiment)
            row = RunRow(
                id=run_id,
                experiment_id=exp.id,
                status=RunStatus.QUEUED.value,
                target=target,
                created_at=utcnow(),
                arguments=fields.pop("arguments", []),
                tags=fields.pop("tags", {}),
                **fields,
            )
            session.add(row)
            session.flush()
            return self._record(session, row, exp.name)

    def update_run(
        self,
        run_id: str,
        *,
        add_tags: dict[str, str] | None = None,
        drop_tags: Collection[str] = (),
        **fields: Any,
    ) -> RunRecord:
        """Change fields of a run; a status given as RunStatus is stored by its value.

        :param add_tags: tags to set beside the run's others (in the same transaction that reads them).
        :param drop_tags: names of tags to remove, if the run has them (in that transaction too).
        """
        with self.session() as session:
            row = self._run_row(session, run_id)
            for key, value in fields.items():
                if not hasattr(RunRow, key):
                    raise AttributeError(f"runs have no field {key!r}")
                setattr(row, key, value.value if isinstance(value, RunStatus) else value)
            if add_tags or any(name in (row.tags or {}) for name in drop_tags):
                kept = {k: v for k, v in (row.tags or {}).items() if k not in drop_tags}
                row.tags = {**kept, **(add_tags or {})}
            session.flush()
            return self._record(session, row)

    def run_detail(self, run_id: str) -> tuple[RunRecord, list[MetricSummary]]:
        """A run and each of its metrics in brief (points, latest, extremes, by name), in one statement."""
        with self.read_session() as session:
            rows = session.execute(
                select(RunRow, ExperimentRow.name, MetricSummaryRow)
                .join(ExperimentRow)
                .outerjoin(MetricSummaryRow, MetricSummaryRow.run_id == RunRow.id)
                .where(RunRow.id == run_id)
                .order_by(MetricSummaryRow.name)
            ).all()
            if not rows:
                raise self._not_found(run_id)
            summaries = [summary_of(row[2]) for row in rows if row[2] is not None]
            latest = {s.name: s.last for s in summaries}
            return self._record(session, rows[0][0], rows[0][1], latest), summaries

    def get_run(self, run_id: str) -> RunRecord:
        with self.session() as session:
            return self._record(session, self._run_row(session, run_id))

    def child_runs(self, parent_run_id: str) -> list[RunRecord]:
        """The runs of a sweep (their parent_run_id names it), oldest first."""
        with self.session() as session:
            rows = session.execute(
                select(RunRow, ExperimentRow.name)
                .join(ExperimentRow)
                .where(RunRow.parent_run_id == parent_run_id)
                .order_by(RunRow.created_at, RunRow.id)
            ).all()
            return self._records(session, rows)

    def list_runs(
        self,
        *,
        experiment: str | None = None,
        status: str | RunStatus | None = None,
        limit: int = 100,
        dag_id: str | None = None,
        task_id: str | None = None,
        airflow_run_id: str | None = None,
        map_index: int | None = None,
        dag_ids: Collection[str] | None = None,
        runs_without_dag: bool = True,
        hidden_dag_ids: Collection[str] = (),
    ) -> list[RunRecord]:
        """Runs, newest first, filtered by whatever is given.

        :param dag_ids: only runs of these DAGs (None: of any DAG); with `runs_without_dag`, what a reader
            may see. The filter is part of the query, so `limit` counts only the runs that pass it.
        :param runs_without_dag: whether runs recorded outside any DAG (from plain Python) are included.
        :param hidden_dag_ids: with `dag_ids` None, the DAGs whose runs are left out.
        """
        with self.session() as session:
            query = select(RunRow, ExperimentRow.name).join(ExperimentRow)
            visible = of_dags(dag_ids, runs_without_dag, hidden_dag_ids)
            if visible is not None:
                query = query.where(visible)
            if experiment is not None:
                query = query.where(ExperimentRow.name == experiment)
            if status is not None:
                query = query.where(RunRow.status == RunStatus(status).value)
            for column, value in (
                (RunRow.dag_id, dag_id),
                (RunRow.task_id, task_id),
                (RunRow.airflow_run_id, airflow_run_id),
                (RunRow.map_index, map_index),
            ):
                if value is not None:
                    query = query.where(column == value)
            query = query.order_by(RunRow.created_at.desc(), RunRow.id.desc()).limit(limit)
            return self._records(session, session.execute(query).all())

    def runs_of_task_try(
        self,
        *,
        dag_id: str,
        task_id: str,
        airflow_run_id: str,
        map_index: int | None,
        try_number: int | None,
    ) -> list[RunRecord]:
        """The runs one try of an Airflow task instance submitted or took over, newest first: its runs and sweeps,
        not a sweep's own runs (those name their sweep, and the sweep's try may be an earlier one).

        :param map_index: the task instance's map index; None for an unmapped task.
        :param try_number: the try, as recorded on the run (a retry that takes a run over records itself).
        """
        with self.session() as session:
            query = (
                select(RunRow, ExperimentRow.name)
                .join(ExperimentRow)
                .where(
                    RunRow.dag_id == dag_id,
                    RunRow.task_id == task_id,
                    RunRow.airflow_run_id == airflow_run_id,
                    RunRow.map_index.is_(None) if map_index is None else RunRow.map_index == map_index,
                    RunRow.try_number.is_(None) if try_number is None else RunRow.try_number == try_number,
                    RunRow.parent_run_id.is_(None),
                )
                .order_by(RunRow.created_at.desc(), RunRow.id.desc())
            )
            return self._records(session, session.execute(query).all())

    def page_runs(
        self, where: RunFilter, sort: RunSort | None = None, *, limit: int = 100, cursor: str | None = None
    ) -> RunPage:
        """One page of the runs that pass `where`, sorted (newest first unless told), after `cursor`.

        :param cursor: the previous page's `next_cursor`; None for the first page.
        :raises BadListRequestError: the cursor is not one of this sort order's.
        """
        with self.read_session() as session:
            return page_runs(session, where, sort or RunSort(), limit=limit, cursor=cursor)

    def unfinished_runs(self, *, heard_before: datetime | None = None, limit: int = 1000) -> list[RunRecord]:
        """Runs not yet Completed, Failed or Canceled, the longest unheard-of first.

        :param heard_before: only runs whose task last reported on them (heartbeat_at, else their start or
            creation) before this time.
        """
        last_heard = _last_heard()
        with self.session() as session:
            query = select(RunRow, ExperimentRow.name).join(ExperimentRow).where(_unfinished())
            if heard_before is not None:
                query = query.where(last_heard < heard_before)
            query = query.order_by(last_heard, RunRow.id).limit(limit)
            return self._records(session, session.execute(query).all())

    def finish_run(self, run_id: str, **fields: Any) -> bool:
        """Record a run's outcome (its final status and fields), unless another process recorded one already.

        One conditional statement: of two processes following the same run to its end (a retry and a
        reconcile), exactly one records it. True when this call did.
        """
        return self.update_unfinished_run(run_id, **fields)

    def update_unfinished_run(self, run_id: str, **fields: Any) -> bool:
        """Set fields of a run that has not ended, in one conditional statement; False (and nothing written)
        when it has ended, e.g. recorded by another process meanwhile."""
        table = cast(Table, RunRow.__table__)
        values = {k: (v.value if isinstance(v, RunStatus) else v) for k, v in fields.items()}
        unknown = sorted(set(values) - set(table.c.keys()))
        if unknown:
            raise AttributeError(f"runs have no field(s) {', '.join(unknown)}")
        with self.engine.begin() as connection:
            result = connection.execute(
                update(table)
                .where(
                    table.c.id == run_id,
                    table.c.status.in_([s.value for s in RunStatus if not s.is_terminal]),
                )
                .values(**values)
            )
            return bool(result.rowcount == 1)

    def report_alive(self, run_id: str) -> None:
        """Set a run's heartbeat to now: a task follows it. One plain statement, cheap and safe from any thread."""
        table = cast(Table, RunRow.__table__)
        with self.engine.begin() as connection:
            connection.execute(update(table).where(table.c.id == run_id).values(heartbeat_at=utcnow()))

    def claim_unheard_run(self, run_id: str, *, heard_before: datetime) -> bool:
        """Mark an unfinished run as reported on now, if nobody reported on it since heard_before.

        One statement, so of several processes settling orphaned runs at once, exactly one gets each run.
        """
        with self.session() as session:
            result = session.execute(
                update(RunRow)
                .where(RunRow.id == run_id, _unfinished(), _last_heard() < heard_before)
                .values(heartbeat_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            return bool(getattr(result, "rowcount", 0) == 1)

    def _run_row(self, session: Session, run_id: str) -> RunRow:
        row = session.get(RunRow, run_id)
        if row is None:
            raise self._not_found(run_id)
        return row

    def _not_found(self, run_id: str) -> RunNotFoundError:
        return RunNotFoundError(f"No run {run_id!r} in the run history at {self.url_for_display}.")

    def _records(self, session: Session, rows: Sequence[Row[RunRow, str]]) -> list[RunRecord]:
        """Records of run rows given with their experiments' names, their latest metrics read in one query."""
        metrics = latest_values(session, [row.id for row, _ in rows])
        return [self._record(session, row, name, metrics[row.id]) for row, name in rows]

    def _record(
        self,
        session: Session,
        row: RunRow,
        experiment: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> RunRecord:
        if experiment is None:
            experiment = session.scalar(
                select(ExperimentRow.name).where(ExperimentRow.id == row.experiment_id)
            )
        return RunRecord(
            id=row.id,
            experiment=experiment or "",
            status=RunStatus(row.status),
            target=row.target,
            script=row.script,
            command=row.command,
            arguments=list(row.arguments or []),
            environment=row.environment,
            snapshot_id=row.snapshot_id,
            git=row.git,
            tags=dict(row.tags or {}),
            handle=row.handle,
            outputs_uri=row.outputs_uri,
            logs_uri=row.logs_uri,
            error=row.error,
            created_at=aware(row.created_at) or utcnow(),
            start=aware(row.start_time),
            end=aware(row.end_time),
            dag_id=row.dag_id,
            task_id=row.task_id,
            airflow_run_id=row.airflow_run_id,
            map_index=row.map_index,
            try_number=row.try_number,
            heartbeat_at=aware(row.heartbeat_at),
            max_run_duration_seconds=row.max_run_duration_seconds,
            config=row.config,
            rerun_of=row.rerun_of,
            parent_run_id=row.parent_run_id,
            display_name=row.display_name,
            description=row.description,
            metrics=latest_values(session, [row.id])[row.id] if metrics is None else metrics,
        )

    # metrics

    def add_metrics(self, run_id: str, points: Iterable[MetricPoint]) -> int:
        """Store metric points; a point whose seq is already stored is skipped. Returns how many were new.

        The run's latest values, and its metrics' summaries and min/max pyramids, are updated in the same
        transaction."""
        points = list(points)
        if not points:
            return 0
        with self.session() as session:
            return store_points(session, run_id, points, utcnow())

    def metric_series(
        self, run_id: str, names: Collection[str] | None = None, *, points: int = 2000
    ) -> list[Series]:
        """A run's metrics as charts of at most `points` points each, every slice's minimum and maximum kept.

        :param names: the metrics (None: all with a finite value).
        """
        with self.read_session() as session:
            return read_series(session, [run_id], names, points)[run_id]

    def compare(
        self, run_ids: Collection[str], names: Collection[str] | None = None, *, points: int = 500
    ) -> tuple[list[RunListItem], dict[str, list[Series]]]:
        """Runs side by side, read together: each as the list shows it (its latest metrics of `names`, or all),
        in the order given (missing ones left out), and its metrics as charts: {run id: [series by name]}."""
        ids = list(dict.fromkeys(run_ids))
        with self.read_session() as session:
            latest: dict[str, dict[str, Any]] = {}
            series = read_series(session, ids, names, points, latest)
            found = {item.id: item for item in list_items(session, ids, latest)}
        return [found[i] for i in ids if i in found], series

    def get_metrics(self, run_id: str, name: str | None = None) -> list[MetricPoint]:
        """Every logged point of a run (or of one metric), in logging order."""
        with self.session() as session:
            query = select(MetricRow).where(MetricRow.run_id == run_id)
            if name is not None:
                query = query.where(MetricRow.name == name)
            return [
                MetricPoint(
                    name=m.name,
                    value=join_value(m.value, m.value_json),
                    seq=m.seq,
                    step=m.step,
                    logged_at=aware(m.logged_at),
                )
                for m in session.scalars(query.order_by(MetricRow.seq))
            ]

    @property
    def url_for_display(self) -> str:
        return display_url(self.url)


def _unfinished() -> ColumnElement[bool]:
    return RunRow.status.in_([s.value for s in RunStatus if not s.is_terminal])


def _last_heard() -> ColumnElement[datetime]:
    return func.coalesce(RunRow.heartbeat_at, RunRow.start_time, RunRow.created_at)


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
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
