"""The one place that reads and writes the run history: experiments, runs and metrics (the database itself, its
URL, engine and schema: :mod:`airflow_amlrun.history.database`)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Row, Select, func, insert, select, update

from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.history.database import display_url, migrate, normalize_database_url, open_engine
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
    lock_run,
    read_series,
    store_points,
    summary_of,
)
from airflow_amlrun.history.paging import RunSort
from airflow_amlrun.history.records import ExperimentRecord, MetricPoint, RunRecord, RunStatus, aware
from airflow_amlrun.history.tables import experiments, metric_points, metric_summaries, runs


class RunNotFoundError(AmlRunError, LookupError):
    """No run with the given id exists in this workspace's run history.

    The message names the id and the history. ``amlrun runs list`` shows the runs there; ``--conn-id`` (or the
    ``conn_id`` of ``Workspace.get``) picks the workspace the run was recorded in.
    """


def utcnow() -> datetime:
    return datetime.now(UTC)


class RunHistory:
    """Experiments, runs and metrics in a SQLAlchemy database, migrated with Alembic on first use."""

    def __init__(self, url: str) -> None:
        self.url = normalize_database_url(url)
        self.engine: Engine = open_engine(self.url)
        # Reads for the pages each run their statements on their own: no BEGIN and COMMIT round trips.
        self._reads = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.migrate()

    def migrate(self) -> None:
        """Bring the schema to the newest revision (once per database and process)."""
        migrate(self.engine, self.url)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection in a transaction, committed when the block ends (rolled back if it raises)."""
        with self.engine.begin() as connection:
            yield connection

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for reading only, each statement in a transaction of its own (fewer round trips)."""
        with self._reads.connect() as connection:
            yield connection

    def dispose(self) -> None:
        self.engine.dispose()

    # experiments

    def ensure_experiment(self, name: str) -> ExperimentRecord:
        with self.transaction() as connection:
            row = self._experiment_row(connection, name)
            return ExperimentRecord(name=row.name, created_at=aware(row.created_at) or utcnow())

    def _experiment_row(self, connection: Connection, name: str) -> Row[Any]:
        query = select(experiments).where(experiments.c.name == name)
        row = connection.execute(query).first()
        if row is not None:
            return row
        # Two tasks may create the same experiment at once: the loser of the race re-reads it. The experiment is
        # written in the caller's transaction, and is gone with it if that fails (a run the history refuses leaves
        # no empty experiment): SQLite and PostgreSQL insert it unless it is there, in one statement; elsewhere a
        # savepoint takes the race (on SQLite, its release would commit the experiment on its own).
        dialect = connection.dialect.name
        values = {"name": name, "created_at": utcnow()}
        if dialect in ("sqlite", "postgresql"):
            # Imported by the database in use: the other's dialect is a tenth of a second to import, in every task.
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                connection.execute(
                    sqlite_insert(experiments).values(values).on_conflict_do_nothing(index_elements=["name"])
                )
            else:
                from sqlalchemy.dialects.postgresql import insert as postgresql_insert

                connection.execute(
                    postgresql_insert(experiments)
                    .values(values)
                    .on_conflict_do_nothing(index_elements=["name"])
                )
            return connection.execute(query).one()
        try:
            with connection.begin_nested():
                connection.execute(insert(experiments).values(values))
        except Exception:
            row = connection.execute(query).first()
            if row is None:
                raise
            return row
        return connection.execute(query).one()

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
        with self.transaction() as connection:
            return [
                ExperimentRecord(
                    name=name, created_at=aware(created) or utcnow(), run_count=n, last_run_at=aware(last)
                )
                for name, created, n, last in experiment_activity(
                    connection, of_dags(dag_ids, runs_without_dag, hidden_dag_ids)
                )
            ]

    # runs

    def create_run(self, *, run_id: str, experiment: str, target: str, **fields: Any) -> RunRecord:
        """Record a new run in status Queued."""
        # The run's own id, experiment, status and creation time are this method's to write.
        unknown = sorted(set(fields) - (set(runs.c.keys()) - {"id", "experiment_id", "status", "created_at"}))
        if unknown:
            raise TypeError(f"{unknown[0]!r} is an invalid keyword argument for a run")
        with self.transaction() as connection:
            exp = self._experiment_row(connection, experiment)
            values = {
                "id": run_id,
                "experiment_id": exp.id,
                "status": RunStatus.QUEUED.value,
                "target": target,
                "created_at": utcnow(),
                "arguments": fields.pop("arguments", []),
                "tags": fields.pop("tags", {}),
                **fields,
            }
            connection.execute(insert(runs).values(values))
            # The record is of the values written, as given (the database's own reading of them may differ:
            # SQLite hands times back without their zone).
            return self._record(connection, {**dict.fromkeys(runs.c.keys()), **values}, exp.name)

    def update_run(
        self,
        run_id: str,
        *,
        add_tags: dict[str, str] | None = None,
        drop_tags: Collection[str] = (),
        **fields: Any,
    ) -> RunRecord:
        """Change fields of a run; a status given as RunStatus is stored by its value.

        Only the fields whose value changes are written, and nothing when none does (a read-only history then
        takes the call).

        :param add_tags: tags to set beside the run's others (in the same transaction that reads them).
        :param drop_tags: names of tags to remove, if the run has them (in that transaction too).
        """
        for key in fields:
            if key not in runs.c:
                raise AttributeError(f"runs have no field {key!r}")
        with self.transaction() as connection:
            current, values = self._run_as_updated(connection, run_id, fields, add_tags, drop_tags)
            if (add_tags or drop_tags) and "tags" in values and values["tags"] != current["tags"]:
                # The tags are written whole, from what was read: read again under the run's write lock, so that
                # another writer's tags, written meanwhile, are kept.
                lock_run(connection, run_id)
                current, values = self._run_as_updated(connection, run_id, fields, add_tags, drop_tags)
            changed = {k: v for k, v in values.items() if (v == current[k]) is not True}
            if changed:
                written = connection.execute(update(runs).where(runs.c.id == run_id).values(changed))
                if written.rowcount != 1:
                    raise self._not_found(run_id)  # deleted since it was read
            experiment = current.pop("experiment")
            return self._record(connection, {**current, **values}, experiment)

    def _run_as_updated(
        self,
        connection: Connection,
        run_id: str,
        fields: Mapping[str, Any],
        add_tags: Mapping[str, str] | None,
        drop_tags: Collection[str],
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The run's row as it is, and the values `update_run` gives it (its tags whole, when they change)."""
        row = connection.execute(_runs_named().where(runs.c.id == run_id)).first()
        if row is None:
            raise self._not_found(run_id)
        current = row._asdict()
        values = {k: (v.value if isinstance(v, RunStatus) else v) for k, v in fields.items()}
        tags = values.get("tags", current["tags"])
        if add_tags or any(name in (tags or {}) for name in drop_tags):
            kept = {k: v for k, v in (tags or {}).items() if k not in drop_tags}
            values["tags"] = {**kept, **(add_tags or {})}
        return current, values

    def run_detail(self, run_id: str) -> tuple[RunRecord, list[MetricSummary]]:
        """A run and each of its metrics in brief (points, latest, extremes, by name), in one statement."""
        summary = [c.label(f"summary_{c.key}") for c in metric_summaries.c]
        with self.reading() as connection:
            rows = connection.execute(
                _runs_named()
                .add_columns(*summary)
                .outerjoin(metric_summaries, metric_summaries.c.run_id == runs.c.id)
                .where(runs.c.id == run_id)
                .order_by(metric_summaries.c.name)
            ).all()
            if not rows:
                raise self._not_found(run_id)
            summaries = [
                summary_of({c.key: row._mapping[f"summary_{c.key}"] for c in metric_summaries.c})
                for row in rows
                if row.summary_name is not None
            ]
            latest = {s.name: s.last for s in summaries}
            first = rows[0]._asdict()
            return self._record(connection, first, first["experiment"], latest), summaries

    def get_run(self, run_id: str) -> RunRecord:
        with self.transaction() as connection:
            row = connection.execute(_runs_named().where(runs.c.id == run_id)).first()
            if row is None:
                raise self._not_found(run_id)
            return self._record(connection, row._mapping, row.experiment)

    def child_runs(self, parent_run_id: str) -> list[RunRecord]:
        """The runs of a sweep (their parent_run_id names it), oldest first."""
        with self.transaction() as connection:
            rows = connection.execute(
                _runs_named()
                .where(runs.c.parent_run_id == parent_run_id)
                .order_by(runs.c.created_at, runs.c.id)
            ).all()
            return self._records(connection, rows)

    def child_git_states(self, parent_run_id: str) -> list[tuple[str | None, dict[str, Any] | None]]:
        """The DAG and the git state of each run of a sweep, oldest first: what its page says its runs share,
        read without their records."""
        with self.reading() as connection:
            rows = connection.execute(
                select(runs.c.dag_id, runs.c.git)
                .where(runs.c.parent_run_id == parent_run_id)
                .order_by(runs.c.created_at, runs.c.id)
            )
            return [(dag_id, git) for dag_id, git in rows]

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
        with self.transaction() as connection:
            query = _runs_named()
            visible = of_dags(dag_ids, runs_without_dag, hidden_dag_ids)
            if visible is not None:
                query = query.where(visible)
            if experiment is not None:
                query = query.where(experiments.c.name == experiment)
            if status is not None:
                query = query.where(runs.c.status == RunStatus(status).value)
            for column, value in (
                (runs.c.dag_id, dag_id),
                (runs.c.task_id, task_id),
                (runs.c.airflow_run_id, airflow_run_id),
                (runs.c.map_index, map_index),
            ):
                if value is not None:
                    query = query.where(column == value)
            query = query.order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(limit)
            return self._records(connection, connection.execute(query).all())

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
        with self.transaction() as connection:
            query = (
                _runs_named()
                .where(
                    runs.c.dag_id == dag_id,
                    runs.c.task_id == task_id,
                    runs.c.airflow_run_id == airflow_run_id,
                    runs.c.map_index.is_(None) if map_index is None else runs.c.map_index == map_index,
                    runs.c.try_number.is_(None) if try_number is None else runs.c.try_number == try_number,
                    runs.c.parent_run_id.is_(None),
                )
                .order_by(runs.c.created_at.desc(), runs.c.id.desc())
            )
            return self._records(connection, connection.execute(query).all())

    def page_runs(
        self, where: RunFilter, sort: RunSort | None = None, *, limit: int = 100, cursor: str | None = None
    ) -> RunPage:
        """One page of the runs that pass `where`, sorted (newest first unless told), after `cursor`.

        :param cursor: the previous page's `next_cursor`; None for the first page.
        :raises BadListRequestError: the cursor is not one of this sort order's.
        """
        with self.reading() as connection:
            return page_runs(connection, where, sort or RunSort(), limit=limit, cursor=cursor)

    def unfinished_runs(self, *, heard_before: datetime | None = None, limit: int = 1000) -> list[RunRecord]:
        """Runs not yet Completed, Failed or Canceled, the longest unheard-of first.

        :param heard_before: only runs whose task last reported on them (heartbeat_at, else their start or
            creation) before this time.
        """
        last_heard = _last_heard()
        with self.transaction() as connection:
            query = _runs_named().where(_unfinished())
            if heard_before is not None:
                query = query.where(last_heard < heard_before)
            query = query.order_by(last_heard, runs.c.id).limit(limit)
            return self._records(connection, connection.execute(query).all())

    def finish_run(self, run_id: str, **fields: Any) -> bool:
        """Record a run's outcome (its final status and fields), unless another process recorded one already.

        One conditional statement: of two processes following the same run to its end (a retry and a
        reconcile), exactly one records it. True when this call did.
        """
        return self.update_unfinished_run(run_id, **fields)

    def update_unfinished_run(self, run_id: str, **fields: Any) -> bool:
        """Set fields of a run that has not ended, in one conditional statement; False (and nothing written)
        when it has ended, e.g. recorded by another process meanwhile."""
        values = {k: (v.value if isinstance(v, RunStatus) else v) for k, v in fields.items()}
        unknown = sorted(set(values) - set(runs.c.keys()))
        if unknown:
            raise AttributeError(f"runs have no field(s) {', '.join(unknown)}")
        with self.engine.begin() as connection:
            result = connection.execute(
                update(runs)
                .where(
                    runs.c.id == run_id,
                    runs.c.status.in_([s.value for s in RunStatus if not s.is_terminal]),
                )
                .values(**values)
            )
            return bool(result.rowcount == 1)

    def report_alive(self, run_id: str) -> None:
        """Set a run's heartbeat to now: a task follows it. One plain statement, cheap and safe from any thread."""
        with self.engine.begin() as connection:
            connection.execute(update(runs).where(runs.c.id == run_id).values(heartbeat_at=utcnow()))

    def claim_unheard_run(self, run_id: str, *, heard_before: datetime) -> bool:
        """Mark an unfinished run as reported on now, if nobody reported on it since heard_before.

        One statement, so of several processes settling orphaned runs at once, exactly one gets each run.
        """
        with self.transaction() as connection:
            result = connection.execute(
                update(runs)
                .where(runs.c.id == run_id, _unfinished(), _last_heard() < heard_before)
                .values(heartbeat_at=utcnow())
            )
            return bool(result.rowcount == 1)

    def _not_found(self, run_id: str) -> RunNotFoundError:
        return RunNotFoundError(f"No run {run_id!r} in the run history at {self.url_for_display}.")

    def _records(self, connection: Connection, rows: Sequence[Row[Any]]) -> list[RunRecord]:
        """Records of run rows read with their experiments' names (`_runs_named`), their latest metrics read in
        one query."""
        metrics = latest_values(connection, [row.id for row in rows])
        return [self._record(connection, row._mapping, row.experiment, metrics[row.id]) for row in rows]

    def _record(
        self,
        connection: Connection,
        row: Mapping[Any, Any],
        experiment: str,
        metrics: dict[str, Any] | None = None,
    ) -> RunRecord:
        """The record of a run's columns (by name)."""
        return RunRecord(
            id=row["id"],
            experiment=experiment or "",
            status=RunStatus(row["status"]),
            target=row["target"],
            script=row["script"],
            command=row["command"],
            arguments=list(row["arguments"] or []),
            environment=row["environment"],
            snapshot_id=row["snapshot_id"],
            git=row["git"],
            tags=dict(row["tags"] or {}),
            handle=row["handle"],
            outputs_uri=row["outputs_uri"],
            logs_uri=row["logs_uri"],
            error=row["error"],
            created_at=aware(row["created_at"]) or utcnow(),
            start=aware(row["start_time"]),
            end=aware(row["end_time"]),
            dag_id=row["dag_id"],
            task_id=row["task_id"],
            airflow_run_id=row["airflow_run_id"],
            map_index=row["map_index"],
            try_number=row["try_number"],
            heartbeat_at=aware(row["heartbeat_at"]),
            max_run_duration_seconds=row["max_run_duration_seconds"],
            config=row["config"],
            rerun_of=row["rerun_of"],
            parent_run_id=row["parent_run_id"],
            display_name=row["display_name"],
            description=row["description"],
            metrics=latest_values(connection, [row["id"]])[row["id"]] if metrics is None else metrics,
        )

    # metrics

    def add_metrics(self, run_id: str, points: Iterable[MetricPoint]) -> int:
        """Store metric points; a point whose seq is already stored is skipped. Returns how many were new.

        The run's latest values, and its metrics' summaries and min/max pyramids, are updated in the same
        transaction."""
        points = list(points)
        if not points:
            return 0
        with self.transaction() as connection:
            return store_points(connection, run_id, points, utcnow())

    def metric_series(
        self, run_id: str, names: Collection[str] | None = None, *, points: int = 2000
    ) -> list[Series]:
        """A run's metrics as charts of at most `points` points each, every slice's minimum and maximum kept.

        :param names: the metrics (None: all with a finite value).
        """
        with self.reading() as connection:
            return read_series(connection, [run_id], names, points)[run_id]

    def compare(
        self, run_ids: Collection[str], names: Collection[str] | None = None, *, points: int = 500
    ) -> tuple[list[RunListItem], dict[str, list[Series]]]:
        """Runs side by side, read together: each as the list shows it (its latest metrics of `names`, or all),
        in the order given (missing ones left out), and its metrics as charts: {run id: [series by name]}."""
        ids = list(dict.fromkeys(run_ids))
        with self.reading() as connection:
            latest: dict[str, dict[str, Any]] = {}
            series = read_series(connection, ids, names, points, latest)
            found = {item.id: item for item in list_items(connection, ids, latest)}
        return [found[i] for i in ids if i in found], series

    def get_metrics(self, run_id: str, name: str | None = None) -> list[MetricPoint]:
        """Every logged point of a run (or of one metric), in logging order."""
        with self.transaction() as connection:
            query = select(metric_points).where(metric_points.c.run_id == run_id)
            if name is not None:
                query = query.where(metric_points.c.name == name)
            return [
                MetricPoint(
                    name=m.name,
                    value=join_value(m.value, m.value_json),
                    seq=m.seq,
                    step=m.step,
                    logged_at=aware(m.logged_at),
                )
                for m in connection.execute(query.order_by(metric_points.c.seq))
            ]

    @property
    def url_for_display(self) -> str:
        return display_url(self.url)


def _runs_named() -> Select[Any]:
    """Every column of the runs, with their experiment's name as ``experiment``."""
    return select(runs, experiments.c.name.label("experiment")).select_from(
        runs.join(experiments, experiments.c.id == runs.c.experiment_id)
    )


def _unfinished() -> ColumnElement[bool]:
    return runs.c.status.in_([s.value for s in RunStatus if not s.is_terminal])


def _last_heard() -> ColumnElement[datetime]:
    return func.coalesce(runs.c.heartbeat_at, runs.c.start_time, runs.c.created_at)
