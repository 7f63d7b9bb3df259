"""Metric points in the history: stored with each metric's summary and min/max pyramid kept current, and read
back whole, as the latest values, or as a chart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, insert, select, tuple_, update
from sqlalchemy.orm import Session

from airflow_amlrun.history.models import MetricBucketRow, MetricRow, MetricSummaryRow, RunRow
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


def summary_of(row: MetricSummaryRow) -> MetricSummary:
    return MetricSummary(
        name=row.name,
        count=row.count,
        numeric_count=row.numeric_count,
        last_step=row.last_step,
        last=join_value(row.last_value, row.last_value_json),
        min=row.min_value,
        max=row.max_value,
    )


def store_points(session: Session, run_id: str, points: Sequence[MetricPoint], now: datetime) -> int:
    """Store the points whose seq is new to the run, with their metrics' summaries and pyramids; how many."""
    # Taking the run row's write lock first makes two writers of one run's metrics take turns (PostgreSQL
    # locks the row; SQLite the file, before this transaction read anything it could find changed).
    runs = cast(Table, RunRow.__table__)
    session.execute(update(runs).where(runs.c.id == run_id).values(id=runs.c.id))
    summaries = {
        s.name: s for s in session.scalars(select(MetricSummaryRow).where(MetricSummaryRow.run_id == run_id))
    }
    newest = max((s.last_seq for s in summaries.values()), default=-1)
    known: set[int] = set()
    if any(p.seq <= newest for p in points):
        for start in range(0, len(points), _BATCH):
            batch = [p.seq for p in points[start : start + _BATCH]]
            known.update(
                session.scalars(
                    select(MetricRow.seq).where(MetricRow.run_id == run_id, MetricRow.seq.in_(batch))
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
        session.execute(insert(cast(Table, MetricRow.__table__)), rows[start : start + _BATCH])
    for name, logged in by_name.items():
        _summarize(session, run_id, name, summaries.get(name), logged)
    return len(new)


def _summarize(
    session: Session,
    run_id: str,
    name: str,
    summary: MetricSummaryRow | None,
    logged: list[tuple[MetricPoint, float | None, str | None]],
) -> None:
    """Fold one metric's new points into its summary row and its pyramid."""
    if summary is None:
        summary = MetricSummaryRow(run_id=run_id, name=name, count=0, numeric_count=0, last_seq=-1)
        session.add(summary)
    first_number = summary.numeric_count
    finite: list[Point] = []
    for point, number, _ in logged:
        if number is not None:
            finite.append(
                Point(first_number + len(finite), _x(point.step, first_number + len(finite)), number)
            )
    last, last_number, last_json = max(logged, key=lambda entry: entry[0].seq)
    if last.seq > summary.last_seq:
        summary.last_seq = last.seq
        summary.last_step = last.step
        summary.last_value = last_number
        summary.last_value_json = last_json
    summary.count += len(logged)
    summary.numeric_count += len(finite)
    if finite:
        low = min(p.value for p in finite)
        high = max(p.value for p in finite)
        summary.min_value = low if summary.min_value is None else min(summary.min_value, low)
        summary.max_value = high if summary.max_value is None else max(summary.max_value, high)
    if summary.numeric_count <= READ_LIMIT:
        return  # a chart reads so few points themselves: no pyramid yet
    if first_number <= READ_LIMIT:
        # The metric outgrows reading its points: its pyramid starts with the points stored before these.
        finite = _stored_points(session, run_id, name, first_number) + finite
    _add_to_pyramid(session, run_id, name, finite)


def _stored_points(session: Session, run_id: str, name: str, count: int) -> list[Point]:
    """The first `count` finite points stored of a metric, numbered in the order they were stored."""
    rows = session.execute(
        select(MetricRow.step, MetricRow.value)
        .where(MetricRow.run_id == run_id, MetricRow.name == name, MetricRow.value.is_not(None))
        .order_by(MetricRow.id)
        .limit(count)
    )
    return [Point(number, _x(step, number), value or 0.0) for number, (step, value) in enumerate(rows)]


def _add_to_pyramid(session: Session, run_id: str, name: str, finite: list[Point]) -> None:
    added = level_buckets(finite)
    # Only the bucket each level was filling can hold points already: the new points come after them all.
    first = finite[0].number
    partial = {(level, first // size) for level, size in enumerate(BUCKET_SIZES)}
    stored = {
        (row.level, row.bucket): row
        for row in session.scalars(
            select(MetricBucketRow).where(
                MetricBucketRow.run_id == run_id,
                MetricBucketRow.name == name,
                tuple_(MetricBucketRow.level, MetricBucketRow.bucket).in_(sorted(partial)),
            )
        )
    }
    fresh = []
    for (level, index), bucket in added.items():
        row = stored.get((level, index))
        if row is not None:
            joined = _bucket(row).then(bucket)
            row.count, row.min_x, row.min_value = joined.count, joined.min_x, joined.min_value
            row.max_x, row.max_value, row.min_first = joined.max_x, joined.max_value, joined.min_first
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
    for start in range(0, len(fresh), _BATCH):
        session.execute(insert(cast(Table, MetricBucketRow.__table__)), fresh[start : start + _BATCH])


def _bucket(row: MetricBucketRow) -> Bucket:
    return Bucket(row.count, row.min_x, row.min_value, row.max_x, row.max_value, row.min_first)


def _x(step: int | None, number: int) -> int:
    return number if step is None else step


def latest_values(session: Session, run_ids: Collection[str]) -> dict[str, dict[str, Any]]:
    """Each run's metrics' latest values: {run id: {metric: value}}, metrics by name."""
    found: dict[str, dict[str, Any]] = {run_id: {} for run_id in run_ids}
    ids = sorted(run_ids)
    for start in range(0, len(ids), _BATCH):
        rows = session.execute(
            select(
                MetricSummaryRow.run_id,
                MetricSummaryRow.name,
                MetricSummaryRow.last_value,
                MetricSummaryRow.last_value_json,
            )
            .where(MetricSummaryRow.run_id.in_(ids[start : start + _BATCH]))
            .order_by(MetricSummaryRow.run_id, MetricSummaryRow.name)
        )
        for run_id, name, value, as_json in rows:
            found[run_id][name] = join_value(value, as_json)
    return found


def read_series(
    session: Session,
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
            MetricSummaryRow.run_id,
            MetricSummaryRow.name,
            MetricSummaryRow.numeric_count,
            MetricSummaryRow.last_value,
            MetricSummaryRow.last_value_json,
        ).where(MetricSummaryRow.run_id.in_(ids[start : start + _BATCH]))
        if names is not None:
            query = query.where(MetricSummaryRow.name.in_(sorted(names)))
        for run_id, name, count, value, as_json in session.execute(query):
            if latest is not None:
                latest.setdefault(run_id, {})[name] = join_value(value, as_json)
            if count:
                counts.append((run_id, name, int(count)))
    short = {(r, n) for r, n, c in counts if level_for(c) is None}
    raw = _raw_points(session, short)
    found: dict[str, list[Series]] = {run_id: [] for run_id in ids}
    for run_id, name, count in sorted(counts):
        level = level_for(count)
        if level is None:
            xs, values = raw.get((run_id, name), ([], []))
        else:
            xs, values = bucket_points(_level(session, run_id, name, level))
        sampled = level is not None or len(values) > points
        xs, values = downsample(xs, values, points)
        found[run_id].append(Series(name=name, x=xs, values=values, points=count, sampled=sampled))
    return found


def _level(session: Session, run_id: str, name: str, level: int) -> list[Bucket]:
    rows = session.execute(
        select(
            MetricBucketRow.count,
            MetricBucketRow.min_x,
            MetricBucketRow.min_value,
            MetricBucketRow.max_x,
            MetricBucketRow.max_value,
            MetricBucketRow.min_first,
        )
        .where(MetricBucketRow.run_id == run_id, MetricBucketRow.name == name, MetricBucketRow.level == level)
        .order_by(MetricBucketRow.bucket)
    )
    return [Bucket(*row) for row in rows]


def _raw_points(
    session: Session, pairs: Collection[tuple[str, str]]
) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """The finite points of these (run, metric) pairs, each in logging order: {pair: (x, values)}."""
    found: dict[tuple[str, str], tuple[list[int], list[float]]] = {pair: ([], []) for pair in pairs}
    if not pairs:
        return found
    ids = sorted({r for r, _ in pairs})
    names = sorted({n for _, n in pairs})
    for start in range(0, len(ids), _BATCH):
        rows = session.execute(
            select(MetricRow.run_id, MetricRow.name, MetricRow.step, MetricRow.value)
            .where(
                MetricRow.run_id.in_(ids[start : start + _BATCH]),
                MetricRow.name.in_(names),
                MetricRow.value.is_not(None),
            )
            .order_by(MetricRow.run_id, MetricRow.name, MetricRow.seq)
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
