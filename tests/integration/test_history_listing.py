"""The run list at scale on SQLite and PostgreSQL: filters, sort by column and by metric, cursor paging, the
latest metric values kept as runs log, charts from the min/max pyramid, and the upgrade of an older history."""

from __future__ import annotations

import base64
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from airflow_amlrun.history import MetricPoint, RunHistory, RunStatus
from airflow_amlrun.history.database import SCHEMA_HEAD
from airflow_amlrun.history.listing import MetricRange, RunFilter
from airflow_amlrun.history.paging import BadListRequestError, RunSort
from airflow_amlrun.history.tables import runs


@pytest.fixture(params=["sqlite", "postgres"])
def history(request: pytest.FixtureRequest, tmp_path: Path):
    url = (
        f"sqlite:///{tmp_path}/history.db"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_database")
    )
    opened = RunHistory(url)
    yield opened
    opened.dispose()


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _run(history: RunHistory, run_id: str, minute: int, **fields) -> None:
    metrics = fields.pop("metrics", {})
    status = fields.pop("status", None)
    history.create_run(run_id=run_id, target=fields.pop("target", "local"), **{"experiment": "exp", **fields})
    with history.transaction() as connection:
        connection.execute(
            update(runs).where(runs.c.id == run_id).values(created_at=T0 + timedelta(minutes=minute))
        )
    if status is not None:
        history.update_run(run_id, status=status)
    seq = 0
    for name, values in metrics.items():
        points = [MetricPoint(name, v, seq=seq + i, step=i) for i, v in enumerate(values)]
        history.add_metrics(run_id, points)
        seq += len(points)


def _ids(
    history: RunHistory, where: RunFilter | None = None, sort: str = "-created_at", limit: int = 100
) -> list[str]:
    return [r.id for r in history.page_runs(where or RunFilter(), RunSort.parse(sort), limit=limit).runs]


def _every_page(history: RunHistory, sort: str, limit: int, where: RunFilter | None = None) -> list[str]:
    seen, cursor = [], None
    while True:
        page = history.page_runs(where or RunFilter(), RunSort.parse(sort), limit=limit, cursor=cursor)
        seen += [r.id for r in page.runs]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


def test_runs_are_filtered_by_each_field_the_list_offers(history):
    _run(
        history,
        "a",
        1,
        experiment="churn",
        target="local",
        dag_id="d1",
        tags={"team": "fraud"},
        metrics={"acc": [0.5, 0.7]},
    )
    _run(
        history,
        "b",
        2,
        experiment="churn",
        target="docker",
        dag_id="d2",
        status=RunStatus.FAILED,
        metrics={"acc": [0.9]},
    )
    _run(history, "c", 3, experiment="vision", target="local", tags={"team": "ads"}, metrics={"loss": [3.0]})

    assert _ids(history, RunFilter(experiment="churn")) == ["b", "a"]
    assert _ids(history, RunFilter(experiment="nobody")) == []
    assert _ids(history, RunFilter(statuses=("Failed",))) == ["b"]
    assert _ids(history, RunFilter(statuses=("Queued", "Failed"))) == ["c", "b", "a"]
    assert _ids(history, RunFilter(target="local")) == ["c", "a"]
    assert _ids(history, RunFilter(dag_id="d2")) == ["b"]
    assert _ids(history, RunFilter(tags=(("team", "fraud"),))) == ["a"]
    # The latest value counts, not any earlier one: a's accuracy is 0.7 now.
    assert _ids(history, RunFilter(metrics=(MetricRange("acc", 0.6, 0.8),))) == ["a"]
    assert _ids(history, RunFilter(metrics=(MetricRange("acc", low=0.6),))) == ["b", "a"]
    assert _ids(history, RunFilter(metrics=(MetricRange("acc"),))) == ["b", "a"]
    assert _ids(history, RunFilter(created_after=T0 + timedelta(minutes=2))) == ["c", "b"]
    assert _ids(history, RunFilter(created_before=T0 + timedelta(minutes=2))) == ["a"]
    assert _ids(history, RunFilter(dag_ids={"d1"}, runs_without_dag=False)) == ["a"]
    assert _ids(history, RunFilter(dag_ids=set(), runs_without_dag=True)) == ["c"]


def test_runs_sort_by_a_column_or_a_metric_with_runs_lacking_it_last(history):
    _run(history, "r1", 1, target="ssh", metrics={"acc": [0.3]})
    _run(history, "r2", 2, target="docker", metrics={"acc": [0.9]})
    _run(history, "r3", 3, target="local")
    _run(history, "r4", 4, target="docker", metrics={"acc": [0.6]})

    history.update_run("r1", start_time=T0 + timedelta(hours=2))
    history.update_run("r4", start_time=T0 + timedelta(hours=3))
    assert _ids(history, sort="start_time") == ["r1", "r4", "r2", "r3"]
    assert _ids(history, sort="-start_time") == ["r4", "r1", "r3", "r2"]
    assert _ids(history, sort="-created_at") == ["r4", "r3", "r2", "r1"]
    assert _ids(history, sort="created_at") == ["r1", "r2", "r3", "r4"]
    assert _ids(history, sort="target") == ["r2", "r4", "r3", "r1"]
    assert _ids(history, sort="metrics.acc") == ["r1", "r4", "r2", "r3"]
    assert _ids(history, sort="-metrics.acc") == ["r2", "r4", "r1", "r3"]
    # Paged two at a time, every order gives the same runs as one page.
    for sort in (
        "created_at",
        "-target",
        "metrics.acc",
        "-metrics.acc",
        "start_time",
        "-start_time",
        "experiment",
    ):
        assert _every_page(history, sort, 1) == _ids(history, sort=sort), sort
    page = history.page_runs(RunFilter(), RunSort.parse("-metrics.acc"), limit=2)
    assert [r.metrics for r in page.runs] == [{"acc": 0.9}, {"acc": 0.6}]


def test_paging_by_cursor_neither_repeats_nor_skips_runs_added_meanwhile(history):
    for i in range(7):
        _run(history, f"old{i}", i)
    # Two runs created in the same instant: the id orders them.
    _run(history, "twin_a", 3)
    first = history.page_runs(RunFilter(), RunSort(), limit=3)
    for i in range(3):
        _run(history, f"new{i}", 100 + i)
    rest = _every_page_from(history, first.next_cursor, limit=3)
    assert [r.id for r in first.runs] + rest == [
        "old6",
        "old5",
        "old4",
        "twin_a",
        "old3",
        "old2",
        "old1",
        "old0",
    ]
    assert _every_page(history, "-created_at", 4, RunFilter(experiment="exp"))[:3] == ["new2", "new1", "new0"]


def _every_page_from(history: RunHistory, cursor: str | None, limit: int) -> list[str]:
    seen = []
    while cursor is not None:
        page = history.page_runs(RunFilter(), RunSort(), limit=limit, cursor=cursor)
        seen += [r.id for r in page.runs]
        cursor = page.next_cursor
    return seen


def test_a_cursor_of_another_order_or_a_damaged_one_is_refused_with_the_fix(history):
    _run(history, "r1", 1)
    _run(history, "r2", 2)
    cursor = history.page_runs(RunFilter(), RunSort(), limit=1).next_cursor
    with pytest.raises(BadListRequestError, match="sorted by '-created_at', not 'target'"):
        history.page_runs(RunFilter(), RunSort.parse("target"), limit=1, cursor=cursor)
    with pytest.raises(BadListRequestError, match="not one this server gave out"):
        history.page_runs(RunFilter(), RunSort(), limit=1, cursor="garbage!")


@pytest.mark.parametrize(
    ("sort", "crafted"),
    [
        ("status", ["status", {"a": 1}, "r1"]),
        ("-target", ["-target", ["local"], "r1"]),
        ("-metrics.loss", ["-metrics.loss", 10**400, "r1"]),
        ("-metrics.loss", ["-metrics.loss", True, "r1"]),
        ("-created_at", ["-created_at", 5, "r1"]),
        ("status", ["status", "Queued\u0000", "r1"]),
        ("status", ["status", "Queued", "r1\u0000"]),
        ("status", ["status", "Queued", 7]),
        ("status", {"sort": "status"}),
    ],
)
def test_a_crafted_cursor_is_refused_before_any_query(history, sort, crafted):
    # A cursor is the client's to send: a value of another type, too large, or with a NUL character would
    # otherwise fail in the database driver.
    _run(history, "r1", 1, metrics={"loss": [0.5]})
    raw = json.dumps(crafted).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(BadListRequestError, match=f"The cursor '{cursor[:80]}' is (damaged|not one)"):
        history.page_runs(RunFilter(), RunSort.parse(sort), limit=1, cursor=cursor)


def test_the_latest_values_follow_the_points_as_a_run_logs_them(history):
    _run(history, "r", 1)
    history.add_metrics(
        "r", [MetricPoint("loss", 2.0, seq=0, step=0), MetricPoint("note", "warming up", seq=1)]
    )
    assert history.get_run("r").metrics == {"loss": 2.0, "note": "warming up"}
    history.add_metrics(
        "r", [MetricPoint("loss", 1.0, seq=2, step=1), MetricPoint("loss", math.nan, seq=3, step=2)]
    )
    # A point re-read from the log adds nothing, and does not become the latest.
    history.add_metrics("r", [MetricPoint("loss", 9.0, seq=0, step=0)])
    assert history.get_run("r").metrics["note"] == "warming up"
    assert math.isnan(history.get_run("r").metrics["loss"])
    listed = history.page_runs(RunFilter(), RunSort(), limit=1).runs[0]
    assert math.isnan(listed.metrics["loss"]) and listed.metrics["note"] == "warming up"
    (chart,) = history.metric_series("r", ["loss"])
    assert (chart.x, chart.values, chart.points, chart.sampled) == ([0, 1], [2.0, 1.0], 2, False)


def test_a_long_series_is_charted_from_its_pyramid_with_its_spikes(history):
    _run(history, "long", 1)
    count = 20_000
    values = [math.sin(i / 50) for i in range(count)]
    values[12_345], values[777] = 50.0, -50.0
    # Stored in uneven writes, as a run's log arrives.
    for start, end in ((0, 100), (100, 5_000), (5_000, 5_001), (5_001, count)):
        history.add_metrics(
            "long", [MetricPoint("wave", values[i], seq=i, step=3 * i) for i in range(start, end)]
        )
    (chart,) = history.metric_series("long", points=500)
    assert chart.points == count and chart.sampled and len(chart.values) <= 500
    assert max(chart.values) == 50.0 and chart.x[chart.values.index(50.0)] == 3 * 12_345
    assert min(chart.values) == -50.0 and chart.x[chart.values.index(-50.0)] == 3 * 777
    assert chart.x == sorted(chart.x)


def test_an_older_history_is_upgraded_with_its_metrics_summarized(history, monkeypatch):
    from alembic import command
    from alembic.config import Config

    from airflow_amlrun.history import database

    _run(history, "kept", 1, metrics={"acc": [0.1, 0.4, 0.2]})
    history.add_metrics("kept", [MetricPoint("wave", float(i % 7), seq=100 + i) for i in range(6000)])
    before = history.metric_series("kept", points=300)
    config = Config()
    config.set_main_option("script_location", str(Path(database.__file__).with_name("migrations")))
    with history.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0004")
    assert database.current_revision(history.engine) == "0004"

    monkeypatch.setattr(database, "_migrated", set())  # as a new process would find it
    upgraded = RunHistory(history.url)
    assert database.current_revision(upgraded.engine) == SCHEMA_HEAD
    assert upgraded.get_run("kept").metrics == {"acc": 0.2, "wave": float(5999 % 7)}
    assert _ids(upgraded, RunFilter(metrics=(MetricRange("acc", 0.15, 0.25),))) == ["kept"]
    assert upgraded.metric_series("kept", points=300) == before
    upgraded.dispose()
