"""Metric points in the history: stored with each metric's summary and min/max pyramid kept current, and read
back whole, as the latest values, or as a chart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, Table, bindparam, insert, select, tuple_, update

from airflow_amlrun.history.records import MetricPoint
from airflow_amlrun.history.series import (
    BUCKET_SIZES,
    READ_LIMIT,
    Bucket,
    Point,
    bucket_points,
    downsample,
    level_buckets,
    level_for,
)
from airflow_amlrun.history.tables import metric_buckets, metric_points, metric_summaries, runs

# Metric points looked up or written per statement (a database limits one statement's parameters).
_BATCH = 1000


@dataclass(frozen=True)
class Series:
    """One metric of a run as a chart draws it: x (the step, else the point's number) and value.

    :param points: how many finite points the metric has.
    :param sampled: whether these are a min/max selection of them rather than all of them.
    """

    name: str
    x: list[int]
    values: list[float]
    points: int
    sampled: bool


@dataclass(frozen=True)
class MetricSummary:
    """One metric of a run in brief: points stored (finite ones apart), the latest value and the extremes."""

    name: str
    count: int
    numeric_count: int
    last_step: int | None
    last: Any
    min: float | None
    max: float | None


def summary_of(row: Mapping[str, Any]) -> MetricSummary:
    """A metric's summary of its row's columns (by name)."""
    return MetricSummary(
        name=row["name"],
        count=row["count"],
        numeric_count=row["numeric_count"],
        last_step=row["last_step"],
        last=join_value(row["last_value"], row["last_value_json"]),
        min=row["min_value"],
        max=row["max_value"],
    )


def lock_run(connection: Connection, run_id: str) -> None:
    """Take the run row's write lock for the rest of the transaction: two writers of what they read of one run
    first (its metrics, its tags) take turns rather than one writing over the other's (PostgreSQL locks the row;
    SQLite the file, before this transaction read anything it could find changed: the driver begins the
    transaction at this first write, so a read before it holds no snapshot that could go stale)."""
    connection.execute(update(runs).where(runs.c.id == run_id).values(id=runs.c.id))


def store_points(connection: Connection, run_id: str, points: Sequence[MetricPoint], now: datetime) -> int:
    """Store the points whose seq is new to the run, with their metrics' summaries and pyramids; how many."""
    lock_run(connection, run_id)
    summaries = {
        row.name: row._asdict()
        for row in connection.execute(select(metric_summaries).where(metric_summaries.c.run_id == run_id))
    }
    newest = max((s["last_seq"] for s in summaries.values()), default=-1)
    known: set[int] = set()
    if any(p.seq <= newest for p in points):
        for start in range(0, len(points), _BATCH):
            batch = [p.seq for p in points[start : start + _BATCH]]
            known.update(
                connection.scalars(
                    select(metric_points.c.seq).where(
                        metric_points.c.run_id == run_id, metric_points.c.seq.in_(batch)
                    )
                )
            )
    new: list[MetricPoint] = []
    for point in points:
        if point.seq not in known:
            known.add(point.seq)
            new.append(point)
    if not new:
        return 0
    rows = []
    by_name: dict[str, list[tuple[MetricPoint, float | None, str | None]]] = {}
    for point in new:
        number, as_json = split_value(point.value)
        rows.append(
            {
                "run_id": run_id,
                "name": point.name,
                "step": point.step,
                "value": number,
                "value_json": as_json,
                "logged_at": point.logged_at or now,
                "seq": point.seq,
            }
        )
        by_name.setdefault(point.name, []).append((point, number, as_json))
    for start in range(0, len(rows), _BATCH):
        connection.execute(insert(metric_points), rows[start : start + _BATCH])
    folded = [
        _summarize(connection, run_id, name, summaries.get(name), logged) for name, logged in by_name.items()
    ]
    # Each metric's summary in one statement of many rows, new ones apart from those that were there.
    fresh = [summary for summary in folded if summary["name"] not in summaries]
    if fresh:
        connection.execute(insert(metric_summaries), fresh)
    _update_rows(connection, metric_summaries, [s for s in folded if s["name"] in summaries])
    return len(new)


def _summarize(
    connection: Connection,
    run_id: str,
    name: str,
    stored: dict[str, Any] | None,
    logged: list[tuple[MetricPoint, float | None, str | None]],
) -> dict[str, Any]:
    """Fold one metric's new points into its pyramid and into its summary row (``stored``'s columns, None for a
    metric new to the run): the summary's columns to write."""
    summary = stored or {
        "run_id": run_id,
        "name": name,
        "count": 0,
        "numeric_count": 0,
        "last_seq": -1,
        "last_step": None,
        "last_value": None,
        "last_value_json": None,
        "min_value": None,
        "max_value": None,
    }
    first_number = summary["numeric_count"]
    finite: list[Point] = []
    for point, number, _ in logged:
        if number is not None:
            finite.append(
                Point(first_number + len(finite), _x(point.step, first_number + len(finite)), number)
            )
    last, last_number, last_json = max(logged, key=lambda entry: entry[0].seq)
    if last.seq > summary["last_seq"]:
        summary["last_seq"] = last.seq
        summary["last_step"] = last.step
        summary["last_value"] = last_number
        summary["last_value_json"] = last_json
    summary["count"] += len(logged)
    summary["numeric_count"] += len(finite)
    if finite:
        low = min(p.value for p in finite)
        high = max(p.value for p in finite)
        summary["min_value"] = low if summary["min_value"] is None else min(summary["min_value"], low)
        summary["max_value"] = high if summary["max_value"] is None else max(summary["max_value"], high)
    if summary["numeric_count"] <= READ_LIMIT:
        return summary  # a chart reads so few points themselves: no pyramid yet
    if first_number <= READ_LIMIT:
        # The metric outgrows reading its points: its pyramid starts with the points stored before these.
        finite = _stored_points(connection, run_id, name, first_number) + finite
    _add_to_pyramid(connection, run_id, name, finite)
    return summary


def _stored_points(connection: Connection, run_id: str, name: str, count: int) -> list[Point]:
    """The first `count` finite points stored of a metric, numbered in the order they were stored."""
    rows = connection.execute(
        select(metric_points.c.step, metric_points.c.value)
        .where(
            metric_points.c.run_id == run_id,
            metric_points.c.name == name,
            metric_points.c.value.is_not(None),
        )
        .order_by(metric_points.c.id)
        .limit(count)
    )
    return [Point(number, _x(step, number), value or 0.0) for number, (step, value) in enumerate(rows)]


def _add_to_pyramid(connection: Connection, run_id: str, name: str, finite: list[Point]) -> None:
    added = level_buckets(finite)
    # Only the bucket each level was filling can hold points already: the new points come after them all.
    first = finite[0].number
    partial = {(level, first // size) for level, size in enumerate(BUCKET_SIZES)}
    of_metric = (metric_buckets.c.run_id == run_id, metric_buckets.c.name == name)
    stored = {
        (row.level, row.bucket): _bucket(row)
        for row in connection.execute(
            select(metric_buckets).where(
                *of_metric, tuple_(metric_buckets.c.level, metric_buckets.c.bucket).in_(sorted(partial))
            )
        )
    }
    fresh = []
    grown = []
    for (level, index), bucket in added.items():
        held = stored.get((level, index))
        if held is not None:
            joined = held.then(bucket)
            grown.append(
                {
                    "run_id": run_id,
                    "name": name,
                    "level": level,
                    "bucket": index,
                    "count": joined.count,
                    "min_x": joined.min_x,
                    "min_value": joined.min_value,
                    "max_x": joined.max_x,
                    "max_value": joined.max_value,
                    "min_first": joined.min_first,
                }
            )
            continue
        fresh.append(
            {
                "run_id": run_id,
                "name": name,
                "level": level,
                "bucket": index,
                "count": bucket.count,
                "min_x": bucket.min_x,
                "min_value": bucket.min_value,
                "max_x": bucket.max_x,
                "max_value": bucket.max_value,
                "min_first": bucket.min_first,
            }
        )
    _update_rows(connection, metric_buckets, grown)
    for start in range(0, len(fresh), _BATCH):
        connection.execute(insert(metric_buckets), fresh[start : start + _BATCH])


def _update_rows(connection: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Update many rows of `table` in one statement: each row names its primary key and the columns it sets,
    every row the same columns. The statement's parameters are named b_*: SQLAlchemy refuses a parameter
    named as a column the statement sets."""
    if not rows:
        return
    keys = [column.key for column in table.primary_key]
    connection.execute(
        update(table)
        .where(*(table.c[key] == bindparam(f"b_{key}") for key in keys))
        .values({key: bindparam(f"b_{key}") for key in rows[0] if key not in keys}),
        [{f"b_{key}": value for key, value in row.items()} for row in rows],
    )


def _bucket(row: Row[Any]) -> Bucket:
    # By key: a row's attribute `count` is the tuple's method.
    b = row._mapping
    return Bucket(b["count"], b["min_x"], b["min_value"], b["max_x"], b["max_value"], b["min_first"])


def _x(step: int | None, number: int) -> int:
    return number if step is None else step


def latest_values(connection: Connection, run_ids: Collection[str]) -> dict[str, dict[str, Any]]:
    """Each run's metrics' latest values: {run id: {metric: value}}, metrics by name."""
    found: dict[str, dict[str, Any]] = {run_id: {} for run_id in run_ids}
    ids = sorted(run_ids)
    for start in range(0, len(ids), _BATCH):
        rows = connection.execute(
            select(
                metric_summaries.c.run_id,
                metric_summaries.c.name,
                metric_summaries.c.last_value,
                metric_summaries.c.last_value_json,
            )
            .where(metric_summaries.c.run_id.in_(ids[start : start + _BATCH]))
            .order_by(metric_summaries.c.run_id, metric_summaries.c.name)
        )
        for run_id, name, value, as_json in rows:
            found[run_id][name] = join_value(value, as_json)
    return found


def read_series(
    connection: Connection,
    run_ids: Collection[str],
    names: Collection[str] | None,
    points: int,
    latest: dict[str, dict[str, Any]] | None = None,
) -> dict[str, list[Series]]:
    """Metrics of runs as charts of at most `points` points each, keeping every slice's minimum and maximum:
    {run id: [series by name]}. Short series of all the runs are read in one query, long ones from their
    pyramids.

    :param names: the metrics (None: every metric of the runs with a finite point).
    :param latest: filled with each run's metrics' latest values (of `names`), read in the same query.
    """
    ids = sorted(run_ids)
    counts: list[tuple[str, str, int]] = []
    for start in range(0, len(ids), _BATCH):
        query = select(
            metric_summaries.c.run_id,
            metric_summaries.c.name,
            metric_summaries.c.numeric_count,
            metric_summaries.c.last_value,
            metric_summaries.c.last_value_json,
        ).where(metric_summaries.c.run_id.in_(ids[start : start + _BATCH]))
        if names is not None:
            query = query.where(metric_summaries.c.name.in_(sorted(names)))
        for run_id, name, count, value, as_json in connection.execute(query):
            if latest is not None:
                latest.setdefault(run_id, {})[name] = join_value(value, as_json)
            if count:
                counts.append((run_id, name, int(count)))
    short = {(r, n) for r, n, c in counts if level_for(c) is None}
    raw = _raw_points(connection, short)
    found: dict[str, list[Series]] = {run_id: [] for run_id in ids}
    for run_id, name, count in sorted(counts):
        level = level_for(count)
        if level is None:
            xs, values = raw.get((run_id, name), ([], []))
        else:
            xs, values = bucket_points(_level(connection, run_id, name, level))
        sampled = level is not None or len(values) > points
        xs, values = downsample(xs, values, points)
        found[run_id].append(Series(name=name, x=xs, values=values, points=count, sampled=sampled))
    return found


def _level(connection: Connection, run_id: str, name: str, level: int) -> list[Bucket]:
    rows = connection.execute(
        select(
            metric_buckets.c.count,
            metric_buckets.c.min_x,
            metric_buckets.c.min_value,
            metric_buckets.c.max_x,
            metric_buckets.c.max_value,
            metric_buckets.c.min_first,
        )
        .where(
            metric_buckets.c.run_id == run_id, metric_buckets.c.name == name, metric_buckets.c.level == level
        )
        .order_by(metric_buckets.c.bucket)
    )
    return [Bucket(*row) for row in rows]


def _raw_points(
    connection: Connection, pairs: Collection[tuple[str, str]]
) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """The finite points of these (run, metric) pairs, each in logging order: {pair: (x, values)}."""
    found: dict[tuple[str, str], tuple[list[int], list[float]]] = {pair: ([], []) for pair in pairs}
    if not pairs:
        return found
    ids = sorted({r for r, _ in pairs})
    names = sorted({n for _, n in pairs})
    for start in range(0, len(ids), _BATCH):
        rows = connection.execute(
            select(metric_points.c.run_id, metric_points.c.name, metric_points.c.step, metric_points.c.value)
            .where(
                metric_points.c.run_id.in_(ids[start : start + _BATCH]),
                metric_points.c.name.in_(names),
                metric_points.c.value.is_not(None),
            )
            .order_by(metric_points.c.run_id, metric_points.c.name, metric_points.c.seq)
        )
        for run_id, name, step, value in rows:
            series = found.get((run_id, name))
            if series is not None and value is not None:
                series[0].append(_x(step, len(series[1])))
                series[1].append(value)
    return found


def split_value(value: Any) -> tuple[float | None, str | None]:
    """A logged value as the history stores it: a finite number, else its JSON text."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, json.dumps(value)
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a float's range keeps every digit as JSON text
        return None, json.dumps(value)
    # NaN and infinities do not survive every database: keep them as JSON text.
    if math.isfinite(number):
        return number, None
    return None, json.dumps(number)


def join_value(number: float | None, as_json: str | None) -> Any:
    if as_json is not None:
        return json.loads(as_json)
    return number
