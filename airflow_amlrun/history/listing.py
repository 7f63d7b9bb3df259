"""The run list at scale: runs filtered, sorted by a column or a metric, and paged by cursor, in one query.

Each page reads its runs' listed columns and, in a second query, their latest metric values from the metric
summaries: no per-row query, no offset to skip.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, exists, false, func, null, or_, select, tuple_

from airflow_amlrun.history.metricstore import latest_values
from airflow_amlrun.history.paging import RunSort, decode_cursor, encode_cursor
from airflow_amlrun.history.records import RunStatus, aware
from airflow_amlrun.history.tables import experiments, metric_summaries, runs


@dataclass(frozen=True)
class MetricRange:
    """Runs whose latest value of `name` lies within [low, high] (either bound may be open)."""

    name: str
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class RunFilter:
    """Which runs a list shows; every field given narrows it.

    :param dag_ids: only runs of these DAGs (None: of any DAG); with `runs_without_dag`, what a reader may see.
    :param runs_without_dag: whether runs recorded outside any DAG are included.
    :param hidden_dag_ids: with `dag_ids` None, the DAGs whose runs are left out.
    :param tags: runs carrying each of these tags with this value.
    :param created_after: runs created at or after this time; `created_before`, before it.
    """

    experiment: str | None = None
    statuses: tuple[str, ...] = ()
    target: str | None = None
    dag_id: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    metrics: tuple[MetricRange, ...] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    dag_ids: Collection[str] | None = None
    runs_without_dag: bool = True
    hidden_dag_ids: Collection[str] = ()


@dataclass(frozen=True)
class RunListItem:
    """A run as the list shows it: what identifies and describes it, its parameters and latest metrics."""

    id: str
    experiment: str
    status: RunStatus
    target: str
    created_at: datetime
    start: datetime | None
    end: datetime | None
    dag_id: str | None
    task_id: str | None
    airflow_run_id: str | None
    map_index: int | None
    arguments: list[Any]
    tags: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPage:
    """One page of runs, and the cursor of the next one (None: this is the last)."""

    runs: list[RunListItem]
    next_cursor: str | None


def of_dags(
    dag_ids: Collection[str] | None, runs_without_dag: bool, hidden_dag_ids: Collection[str] = ()
) -> ColumnElement[bool] | None:
    """The condition on a run row for "of one of these DAGs (None: of any but the hidden ones), or of none if
    allowed"; None when all pass."""
    if dag_ids is None and runs_without_dag and not hidden_dag_ids:
        return None
    if dag_ids is not None:
        of_dag = runs.c.dag_id.in_(sorted(dag_ids))
    elif hidden_dag_ids:
        of_dag = runs.c.dag_id.not_in(sorted(hidden_dag_ids))
    else:
        of_dag = runs.c.dag_id.is_not(None)
    return or_(of_dag, runs.c.dag_id.is_(None)) if runs_without_dag else of_dag


def page_runs(
    connection: Connection, where: RunFilter, sort: RunSort, *, limit: int, cursor: str | None = None
) -> RunPage:
    """One page of the runs that pass `where`, in `sort` order, after `cursor` (the previous page's next).

    Runs with a value for the sort key come first, those without it last. They are read by two queries, the
    second only once the first runs out: each walks an index in the key's order ((key, id), or the metric
    summaries' (name, value, run)) and stops after a page, where one query sorting the runs without a value
    last would sort every run.
    """
    at = decode_cursor(sort, cursor) if cursor is not None else None
    rows: list[Any] = []
    if at is None or at.value is not None:
        query, key, run_id = _with_key(_filtered(where), sort)
        if at is not None:
            pair, start = tuple_(key, run_id), tuple_(at.value, at.run_id)
            query = query.where(pair < start if sort.descending else pair > start)
        order = (key.desc(), run_id.desc()) if sort.descending else (key.asc(), run_id.asc())
        rows = list(connection.execute(query.add_columns(key).order_by(*order).limit(limit + 1)))
    if len(rows) <= limit and sort.nullable:
        query = _filtered(where).where(_lacks_key(sort))
        if at is not None and at.value is None:
            query = query.where(runs.c.id < at.run_id if sort.descending else runs.c.id > at.run_id)
        order_id = runs.c.id.desc() if sort.descending else runs.c.id.asc()
        rows += connection.execute(query.add_columns(null()).order_by(order_id).limit(limit + 1 - len(rows)))
    more = len(rows) > limit
    rows = rows[:limit]
    items = _items(rows, latest_values(connection, [row[0] for row in rows]))
    next_cursor = encode_cursor(sort, rows[-1][-1], rows[-1][0]) if more else None
    return RunPage(runs=items, next_cursor=next_cursor)


def _with_key(query: Select[Any], sort: RunSort) -> tuple[Select[Any], Any, Any]:
    """The query narrowed to runs with a value for the sort key, the key, and the run id to order by."""
    if sort.metric is not None:
        summary = metric_summaries.alias()
        query = query.join(summary, and_(summary.c.run_id == runs.c.id, summary.c.name == sort.metric)).where(
            summary.c.last_value.is_not(None)
        )
        return query, summary.c.last_value, summary.c.run_id
    key = experiments.c.name if sort.column == "experiment" else runs.c[sort.column or "created_at"]
    if sort.nullable:
        query = query.where(key.is_not(None))
    return query, key, runs.c.id


def _lacks_key(sort: RunSort) -> ColumnElement[bool]:
    if sort.metric is None:
        return runs.c[sort.column or ""].is_(None)
    return ~exists().where(
        metric_summaries.c.run_id == runs.c.id,
        metric_summaries.c.name == sort.metric,
        metric_summaries.c.last_value.is_not(None),
    )


def list_items(
    connection: Connection, run_ids: Collection[str], metrics: dict[str, dict[str, Any]]
) -> list[RunListItem]:
    """The runs of these ids as the list shows them, with the metrics given (by run id)."""
    ids = sorted(run_ids)
    rows: list[Any] = []
    for start in range(0, len(ids), 1000):
        rows += connection.execute(
            _filtered(RunFilter()).where(runs.c.id.in_(ids[start : start + 1000]))
        ).all()
    return _items(rows, metrics)


# What the list shows of a run, in the order `_items` reads it.
_LISTED: tuple[Any, ...] = (
    runs.c.id,
    experiments.c.name,
    runs.c.status,
    runs.c.target,
    runs.c.created_at,
    runs.c.start_time,
    runs.c.end_time,
    runs.c.dag_id,
    runs.c.task_id,
    runs.c.airflow_run_id,
    runs.c.map_index,
    runs.c.arguments,
    runs.c.tags,
)


def _items(rows: Sequence[Any], metrics: dict[str, dict[str, Any]]) -> list[RunListItem]:
    return [
        RunListItem(
            id=row[0],
            experiment=row[1],
            status=RunStatus(row[2]),
            target=row[3],
            created_at=aware(row[4]) or row[4],
            start=aware(row[5]),
            end=aware(row[6]),
            dag_id=row[7],
            task_id=row[8],
            airflow_run_id=row[9],
            map_index=row[10],
            arguments=list(row[11] or []),
            tags=dict(row[12] or {}),
            metrics=metrics.get(row[0], {}),
        )
        for row in rows
    ]


def _filtered(where: RunFilter) -> Select[Any]:
    query = select(*_LISTED).select_from(runs.join(experiments, experiments.c.id == runs.c.experiment_id))
    visible = of_dags(where.dag_ids, where.runs_without_dag, where.hidden_dag_ids)
    if visible is not None:
        query = query.where(visible)
    if where.experiment is not None:
        # The experiment's id is looked up once, and the condition is on the runs' own column.
        query = query.where(
            runs.c.experiment_id
            == select(experiments.c.id).where(experiments.c.name == where.experiment).scalar_subquery()
        )
    if where.statuses:
        query = query.where(runs.c.status.in_([RunStatus(s).value for s in where.statuses]))
    for column, value in ((runs.c.target, where.target), (runs.c.dag_id, where.dag_id)):
        if value is not None:
            query = query.where(column == value)
    for name, value in where.tags:
        # PostgreSQL has no statistics on a JSON field and guesses that 1 run in 200 matches, which makes it
        # sort every run of the other filters instead of walking the index of the list's order; behind
        # COALESCE it guesses 1 in 2, and stops after a page's worth of matches.
        query = query.where(func.coalesce(runs.c.tags[name].as_string() == value, false()))
    for metric in where.metrics:
        summary = metric_summaries.alias()
        query = query.join(summary, and_(summary.c.run_id == runs.c.id, summary.c.name == metric.name))
        if metric.low is not None:
            query = query.where(summary.c.last_value >= metric.low)
        if metric.high is not None:
            query = query.where(summary.c.last_value <= metric.high)
        if metric.low is None and metric.high is None:
            query = query.where(summary.c.last_value.is_not(None))
    if where.created_after is not None:
        query = query.where(runs.c.created_at >= where.created_after)
    if where.created_before is not None:
        query = query.where(runs.c.created_at < where.created_before)
    return query


def experiment_activity(
    connection: Connection, visible: ColumnElement[bool] | None
) -> list[tuple[str, datetime, int, Any]]:
    """Each experiment with runs the condition lets through: name, created, run count, last run's creation."""
    counts = select(runs.c.experiment_id, func.count().label("n"), func.max(runs.c.created_at).label("last"))
    if visible is not None:
        counts = counts.where(visible)
    counted = counts.group_by(runs.c.experiment_id).subquery()
    rows = connection.execute(
        select(experiments.c.name, experiments.c.created_at, func.coalesce(counted.c.n, 0), counted.c.last)
        .join(counted, counted.c.experiment_id == experiments.c.id, isouter=visible is None)
        .order_by(experiments.c.name)
    ).all()
    return [(name, created, int(n), last) for name, created, n, last in rows]
