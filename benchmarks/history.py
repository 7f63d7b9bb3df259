"""The run history's JSON API at 100,000 runs: list pages, run detail, a 1M-point chart, a 100-run comparison.

Loads, into a temporary database of its own (dropped at the end), 100,000 runs in 10 experiments, each with 5
parameters (its arguments), 3 tags and 3 metrics of 3 steps each, plus one run whose metric has 1,000,000
points. The runs are bulk-loaded (COPY on PostgreSQL) with their metric summaries, as the history keeps them;
the 1M-point metric is stored through the history's own ingest (`RunHistory.add_metrics`, in the bookkeeper's
batches), which builds its min/max pyramid.

Then each request is made through the plugin's FastAPI app (`plugin.api.create_app`, in-process with
Starlette's TestClient), the route, query and JSON response included. Only Airflow's sign-in is left out: the
user is a reader allowed every DAG, so the visibility condition is still part of each list query. Beside each
figure is the plain SQL query of the same rows through the database driver, timed in the same run, and their
ratio. The latencies are absolute (they are what a user waits for), the targets set by issue 11 against MLflow
on this machine: every list p95 <= 50 ms, detail p95 <= 15 ms, the 1M-point chart p95 <= 300 ms, the 100-run
comparison p95 <= 100 ms.

Prints one JSON object per database.

    python benchmarks/history.py [--backends postgres,sqlite] [--runs 100000] [--points 1000000] [--requests 200]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import secrets
import statistics
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PG_DSN = os.environ.get("AMLRUN_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
EXPERIMENTS = 10
STATUSES = ["Completed"] * 16 + ["Failed"] * 3 + ["Running"]
TARGETS = ["local", "docker", "ssh_vm"]
METRICS = ("accuracy", "loss", "f1")
STEPS = 3
BIG_RUN = "run_big_metric"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
PAGE = 100
DEEP_PAGE = 50


def _run_rows(count: int) -> Iterator[tuple[Any, ...]]:
    """(run row, its metric rows, its summaries) for each bulk-loaded run, deterministic."""
    rng = random.Random(11)
    for i in range(count):
        run_id = f"run_{i:06d}"
        exp = i % EXPERIMENTS
        created = T0 + timedelta(seconds=30 * i)
        arguments = [
            "--lr", f"{rng.choice([0.1, 0.01, 0.001])}",
            "--batch", str(rng.choice([32, 64, 128])),
            "--depth", str(rng.randint(2, 12)),
            "--dropout", f"{rng.random():.2f}",
            "--optimizer", rng.choice(["adam", "sgd"]),
        ]  # fmt: skip
        tags = {
            "team": rng.choice(["fraud", "ads", "search"]),
            "dataset": f"v{rng.randint(1, 5)}",
            "seed": str(i),
        }
        run = (
            run_id, exp + 1, STATUSES[i % len(STATUSES)], TARGETS[i % len(TARGETS)], "train.py",
            json.dumps(arguments), json.dumps(tags), created, created + timedelta(seconds=2),
            created + timedelta(seconds=20), f"train_exp_{exp}", "train", f"manual_{i}",
        )  # fmt: skip
        points = []
        summaries = []
        seq = 0
        for name in METRICS:
            values = [rng.random() for _ in range(STEPS)]
            for step, value in enumerate(values):
                points.append((run_id, name, step, value, created, seq))
                seq += 1
            summaries.append(
                (run_id, name, STEPS, STEPS, seq - 1, STEPS - 1, values[-1], min(values), max(values))
            )
        yield run, points, summaries


RUN_COLUMNS = (
    "id, experiment_id, status, target, script, arguments, tags, created_at, start_time, end_time, dag_id, "
    "task_id, airflow_run_id"
)
METRIC_COLUMNS = "run_id, name, step, value, logged_at, seq"
SUMMARY_COLUMNS = "run_id, name, count, numeric_count, last_seq, last_step, last_value, min_value, max_value"


def _load_postgres(url: str, count: int) -> None:
    import psycopg

    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for table, columns, index in (
            ("amlrun_runs", RUN_COLUMNS, 0),
            ("amlrun_metrics", METRIC_COLUMNS, 1),
            ("amlrun_metric_summaries", SUMMARY_COLUMNS, 2),
        ):
            with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for rows in _run_rows(count):
                    if index == 0:
                        copy.write_row(rows[0])
                    else:
                        for row in rows[index]:
                            copy.write_row(row)
    # What autovacuum does soon after a bulk load: statistics, and the visibility map index-only scans use.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def _load_sqlite(path: str, count: int) -> None:
    import sqlite3

    conn = sqlite3.connect(path)
    with conn:
        for rows in _chunks(_run_rows(count), 10_000):
            conn.executemany(
                f"INSERT INTO amlrun_runs ({RUN_COLUMNS}) VALUES ({_marks(RUN_COLUMNS)})",
                _sqlite(r[0] for r in rows),
            )
            conn.executemany(
                f"INSERT INTO amlrun_metrics ({METRIC_COLUMNS}) VALUES ({_marks(METRIC_COLUMNS)})",
                _sqlite(p for r in rows for p in r[1]),
            )
            conn.executemany(
                f"INSERT INTO amlrun_metric_summaries ({SUMMARY_COLUMNS}) VALUES ({_marks(SUMMARY_COLUMNS)})",
                (s for r in rows for s in r[2]),
            )
    conn.execute("ANALYZE")
    conn.close()


def _sqlite(rows: Iterator[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    # Stored as SQLAlchemy stores a DateTime on SQLite: ISO text without the zone.
    for row in rows:
        yield tuple(v.replace(tzinfo=None).isoformat(sep=" ") if isinstance(v, datetime) else v for v in row)


def _marks(columns: str) -> str:
    return ", ".join("?" for _ in columns.split(","))


def _chunks(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextmanager
def _database(backend: str) -> Iterator[str]:
    """A new, empty database, dropped (or deleted) at the end."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="amlrun-bench-") as folder:
            yield f"sqlite:///{folder}/history.db"
        return
    import psycopg

    name = f"amlrun_bench_{secrets.token_hex(4)}"
    admin = psycopg.connect(f"{PG_DSN}/postgres", autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_DSN}/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


def _timed(
    api: Callable[[], Any], sql: Callable[[], Any], requests: int, warmup: int = 5
) -> tuple[list[float], list[float]]:
    """Times of `requests` calls of each, alternating, so that both meet the same load of the machine."""
    for _ in range(warmup):
        api()
        sql()
    api_times, sql_times = [], []
    for _ in range(requests):
        for call, times in ((api, api_times), (sql, sql_times)):
            began = time.perf_counter()
            call()
            times.append((time.perf_counter() - began) * 1000)
    return api_times, sql_times


def _p(times: list[float], q: float) -> float:
    return round(statistics.quantiles(times, n=100, method="inclusive")[int(q) - 1], 2)


def _client(database_url: str, store: str, dag_ids: list[str]) -> Any:
    """The plugin's app in-process, signed in as a reader of every DAG."""
    os.environ["AIRFLOW_CONN_AMLRUN_DEFAULT"] = json.dumps(
        {"conn_type": "amlrun", "extra": {"database_url": database_url, "store_url": store}}
    )
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.testclient import TestClient

    from airflow_amlrun.plugin import access
    from airflow_amlrun.plugin.api import create_app

    class EveryDag(access.Reader):
        def check(self, record: Any) -> None:
            return None

    from airflow_amlrun.plugin import runs_api

    runs_api._workspace = None  # the previous database's, looked up less than WORKSPACE_TTL_SECONDS ago
    app = create_app()
    # No lifespan: it would hand over the API server's auth manager, which sign-in replaced here.
    app.router.lifespan_context = _no_lifespan
    app.dependency_overrides[get_user] = lambda: None
    app.dependency_overrides[access._reader] = lambda: EveryDag(user=None, auth_manager=None, request=None)  # type: ignore[arg-type]
    # A user who reads some DAGs, not an admin: the list then filters on the DAG ids (an admin's has no DAG
    # condition at all, the cheaper query).
    app.dependency_overrides[access._visible_runs] = lambda: access.RunVisibility(frozenset(dag_ids), False)
    client = TestClient(app)
    # Entered once: every request then goes to the same event loop, as on a server.
    client.__enter__()
    return client


@asynccontextmanager
async def _no_lifespan(app: Any) -> AsyncIterator[None]:
    yield


def _get(client: Any, path: str, params: Any = None) -> Any:
    answer = client.get(path, params=params)
    if answer.status_code != 200:
        raise SystemExit(f"GET {path} {params}: {answer.status_code} {answer.text[:500]}")
    return answer.json()


def bench(backend: str, runs: int, points: int, requests: int) -> dict[str, Any]:
    from airflow_amlrun.history import MetricPoint, RunHistory

    figures: dict[str, Any] = {"backend": backend, "runs": runs + 1, "points": points}
    with _database(backend) as url, tempfile.TemporaryDirectory(prefix="amlrun-bench-store-") as store:
        history = RunHistory(url)
        for exp in range(EXPERIMENTS):
            history.ensure_experiment(f"exp_{exp}")
        began = time.perf_counter()
        if backend == "postgres":
            _load_postgres(url, runs)
        else:
            _load_sqlite(url.removeprefix("sqlite:///"), runs)
        figures["load_runs_s"] = round(time.perf_counter() - began, 1)

        history.create_run(
            run_id=BIG_RUN, experiment="exp_0", target="local", dag_id="train_exp_0", task_id="train"
        )
        rng = random.Random(3)
        # Two spikes the chart must show.
        spikes = {points // 3: 1000.0, 2 * points // 3: -1000.0}
        began = time.perf_counter()
        batch = 5000  # the bookkeeper's points per write
        for start in range(0, points, batch):
            history.add_metrics(
                BIG_RUN,
                [
                    MetricPoint("loss", spikes.get(i, rng.gauss(0.0, 1.0)), seq=i, step=i, logged_at=T0)
                    for i in range(start, min(points, start + batch))
                ],
            )
        figures["ingest_1m_points_s"] = round(time.perf_counter() - began, 1)
        history.dispose()
        figures.update(_measure(backend, url, store, runs, requests))
    return figures


def _measure(backend: str, url: str, store: str, runs: int, requests: int) -> dict[str, Any]:
    from sqlalchemy import create_engine

    from airflow_amlrun.history.database import normalize_database_url

    client = _client(url, store, [f"train_exp_{e}" for e in range(EXPERIMENTS)])
    engine = create_engine(normalize_database_url(url))
    figures: dict[str, Any] = {}
    visible = "r.dag_id IN ({})".format(", ".join(f"'train_exp_{e}'" for e in range(EXPERIMENTS)))
    listed = (
        "SELECT r.id, e.name, r.status, r.target, r.created_at, r.start_time, r.end_time, r.dag_id, r.task_id, "
        "r.airflow_run_id, r.map_index, r.arguments, r.tags FROM amlrun_runs r JOIN amlrun_experiments e "
        "ON e.id = r.experiment_id WHERE {visible} {where} ORDER BY r.created_at DESC, r.id DESC LIMIT 100"
    )
    summaries = (
        "SELECT run_id, name, last_value, last_value_json FROM amlrun_metric_summaries WHERE run_id IN :ids"
    )

    def sql_page(where: str, params: dict[str, Any]) -> Callable[[], Any]:
        statement = listed.format(visible=visible, where=where)

        def run() -> Any:
            with _driver(engine) as cur:
                rows = _fetch(cur, statement, params)
                return rows, _fetch(cur, summaries.replace(":ids", _in(tuple(r[0] for r in rows))), {})

        return run

    cases: list[tuple[str, Callable[[], Any], Callable[[], Any], int]] = []
    cases.append(("list", lambda: _get(client, "/api/runs"), sql_page("", {}), requests))
    filtered = {"experiment": "exp_3", "status": "Completed", "tag": "team=fraud"}
    cases.append(
        (
            "filtered_list",
            lambda: _get(client, "/api/runs", filtered),
            sql_page(f"AND r.experiment_id = 4 AND r.status = 'Completed' AND {_tag_sql(backend)}", {}),
            requests,
        )
    )
    cursor = None
    last = None
    for _ in range(DEEP_PAGE - 1):
        page = _get(client, "/api/runs", {"cursor": cursor} if cursor else None)
        cursor, last = page["next_cursor"], page["runs"][-1]
    assert last is not None
    deep_page = _get(client, "/api/runs", {"cursor": cursor})
    when = last["created_at"]
    cases.append(
        (
            "deep_page",
            lambda: _get(client, "/api/runs", {"cursor": cursor}),
            sql_page(
                "AND (r.created_at, r.id) < (:c, :i)", {"c": _db_time(backend, when), "i": last["run_id"]}
            ),
            requests,
        )
    )
    detail_id = f"run_{runs // 2:06d}"
    cases.append(
        (
            "detail",
            lambda: _get(client, f"/api/runs/{detail_id}"),
            _sql_detail(engine, detail_id),
            requests,
        )
    )
    cases.append(
        (
            "chart_1m",
            lambda: _get(client, f"/api/runs/{BIG_RUN}/metrics", {"name": "loss", "points": 2000}),
            _sql_raw_series(engine),
            max(10, requests // 10),
        )
    )
    # Beyond the targets: the list sorted by a metric (best first) and by a column, and the experiments.
    by_metric = "SELECT run_id FROM amlrun_metric_summaries WHERE name = 'accuracy' ORDER BY last_value DESC, run_id DESC LIMIT 100"
    cases.append(
        (
            "metric_sorted_list",
            lambda: _get(client, "/api/runs", {"sort": "-metrics.accuracy"}),
            _sql_rows(engine, by_metric),
            requests // 2,
        )
    )
    by_target = f"SELECT r.id FROM amlrun_runs r WHERE {visible} ORDER BY r.target, r.id LIMIT 100"
    cases.append(
        (
            "column_sorted_list",
            lambda: _get(client, "/api/runs", {"sort": "target"}),
            _sql_rows(engine, by_target),
            requests // 2,
        )
    )
    counted = f"SELECT experiment_id, count(*), max(created_at) FROM amlrun_runs r WHERE {visible} GROUP BY experiment_id"
    cases.append(
        ("experiments", lambda: _get(client, "/api/experiments"), _sql_rows(engine, counted), requests // 4)
    )
    compared = [f"run_{i * (runs // 100):06d}" for i in range(100)]
    cases.append(
        (
            "compare_100",
            lambda: _get(client, "/api/compare", {"run_id": compared}),
            _sql_compare(engine, compared),
            requests,
        )
    )
    for name, api, sql, count in cases:
        gc.collect()
        api_times, sql_times = _timed(api, sql, count)
        figures[f"{name}_p50_ms"] = _p(api_times, 50)
        figures[f"{name}_p95_ms"] = _p(api_times, 95)
        figures[f"{name}_sql_p50_ms"] = _p(sql_times, 50)
        figures[f"{name}_sql_p95_ms"] = _p(sql_times, 95)
        figures[f"{name}_ratio_p95"] = round(figures[f"{name}_p95_ms"] / figures[f"{name}_sql_p95_ms"], 2)

    # What the answers hold: a full page at page 50, the chart's size and its spikes, 100 compared runs.
    chart = _get(client, f"/api/runs/{BIG_RUN}/metrics", {"name": "loss", "points": 2000})[0]
    figures["deep_page_runs"] = len(deep_page["runs"])
    figures["chart_points_returned"] = len(chart["values"])
    figures["chart_keeps_extremes"] = max(chart["values"]) >= 1000.0 and min(chart["values"]) <= -1000.0
    figures["filtered_list_runs"] = len(_get(client, "/api/runs", filtered)["runs"])
    figures["compare_runs_returned"] = len(_get(client, "/api/compare", {"run_id": compared})["runs"])
    figures["targets_met"] = {
        "list_p95_le_50ms": max(figures[f"{c}_p95_ms"] for c in ("list", "filtered_list", "deep_page")) <= 50,
        "detail_p95_le_15ms": figures["detail_p95_ms"] <= 15,
        "chart_1m_p95_le_300ms": figures["chart_1m_p95_ms"] <= 300,
        "compare_100_p95_le_100ms": figures["compare_100_p95_ms"] <= 100,
    }
    engine.dispose()
    return figures


@contextmanager
def _driver(engine: Any) -> Iterator[Any]:
    """A cursor of the database driver itself, on a pooled connection: the plain SQL baseline."""
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        yield cursor
        cursor.close()
        connection.commit()
    finally:
        connection.close()


def _fetch(cursor: Any, statement: str, params: dict[str, Any]) -> list[Any]:
    """Rows of a statement written with :name parameters, in the driver's own parameter style."""
    if params:
        style = "%({})s" if "psycopg" in type(cursor).__module__ else ":{}"
        for name in params:
            statement = statement.replace(f":{name}", style.format(name))
    cursor.execute(statement, params)
    return list(cursor.fetchall())


def _in(ids: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{i}'" for i in ids) + ")"


def _tag_sql(backend: str) -> str:
    if backend == "postgres":
        return "(r.tags ->> 'team') = 'fraud'"
    return "json_extract(r.tags, '$.team') = 'fraud'"


def _db_time(backend: str, iso: str) -> Any:
    value = datetime.fromisoformat(iso)
    return value if backend == "postgres" else value.replace(tzinfo=None).isoformat(sep=" ")


def _sql_rows(engine: Any, statement: str) -> Callable[[], Any]:
    def run() -> Any:
        with _driver(engine) as cur:
            return _fetch(cur, statement, {})

    return run


def _sql_detail(engine: Any, run_id: str) -> Callable[[], Any]:
    def run() -> Any:
        with _driver(engine) as cur:
            row = _fetch(
                cur,
                "SELECT r.*, e.name FROM amlrun_runs r JOIN amlrun_experiments e ON e.id = r.experiment_id "
                "WHERE r.id = :i",
                {"i": run_id},
            )
            return row, _fetch(cur, "SELECT * FROM amlrun_metric_summaries WHERE run_id = :i", {"i": run_id})

    return run


def _sql_raw_series(engine: Any) -> Callable[[], Any]:
    """The plain way to chart the metric: read its every point."""

    def run() -> Any:
        with _driver(engine) as cur:
            return _fetch(
                cur,
                "SELECT step, value FROM amlrun_metrics WHERE run_id = :r AND name = 'loss' ORDER BY seq",
                {"r": BIG_RUN},
            )

    return run


def _sql_compare(engine: Any, run_ids: list[str]) -> Callable[[], Any]:
    ids = _in(tuple(run_ids))

    def run() -> Any:
        with _driver(engine) as cur:
            rows = _fetch(cur, f"SELECT * FROM amlrun_runs WHERE id IN {ids}", {})
            points = _fetch(
                cur,
                f"SELECT run_id, name, step, value FROM amlrun_metrics WHERE run_id IN {ids} ORDER BY run_id, name, seq",
                {},
            )
            return rows, points

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="postgres,sqlite")
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="amlrun-bench-airflow-"))
    os.environ.setdefault("AIRFLOW__AMLRUN__HOME", str(Path(os.environ["AIRFLOW_HOME"]) / "amlrun"))
    for backend in args.backends.split(","):
        print(json.dumps(bench(backend, args.runs, args.points, args.requests)), flush=True)


if __name__ == "__main__":
    main()
