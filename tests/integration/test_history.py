"""The run history on SQLite and on the PostgreSQL server: schema, runs, metrics, concurrency."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from airflow_amlrun.history import MetricPoint, RunHistory, RunNotFoundError, RunStatus, database
from airflow_amlrun.history.database import SCHEMA_HEAD


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/history.db"
    return str(request.getfixturevalue("postgres_database"))


def test_schema_head_constant_matches_the_newest_migration():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(Path(database.__file__).with_name("migrations")))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_HEAD


def test_a_history_migrated_to_the_newest_revision_has_exactly_the_tables_the_code_declares(database_url):
    # The tables are declared twice: by the migrations, which make every database, and by the SQLAlchemy tables
    # the code reads and writes. Alembic compares a migrated database with the latter: names, columns, types,
    # nullability, indexes, unique and foreign-key constraints.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from airflow_amlrun.history.tables import metadata

    history = RunHistory(database_url)
    with history.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": "amlrun_alembic_version", "compare_type": True}
        )
        differences = compare_metadata(context, metadata)
    if database_url.startswith("sqlite"):
        # Migration 0003 leaves SQLite's INTEGER step as it is: SQLite's INTEGER holds 64 bits already.
        differences = [
            d
            for d in differences
            if not (
                isinstance(d, list) and d[0][0] == "modify_type" and d[0][2:4] == ("amlrun_metrics", "step")
            )
        ]
    assert differences == []


def test_a_history_of_an_older_revision_is_upgraded_with_its_runs_kept(database_url, monkeypatch):
    from alembic import command
    from alembic.config import Config

    history = RunHistory(database_url)
    history.create_run(run_id="before", experiment="old", target="local")
    history.add_metrics("before", [MetricPoint("loss", 0.5, seq=0), MetricPoint("loss", 0.25, seq=1)])
    config = Config()
    config.set_main_option("script_location", str(Path(database.__file__).with_name("migrations")))
    with history.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0003")
    history.dispose()
    assert database.current_revision(history.engine) == "0003"

    monkeypatch.setattr(database, "_migrated", set())  # as a new process would find it
    upgraded = RunHistory(database_url)
    assert database.current_revision(upgraded.engine) == SCHEMA_HEAD
    assert [r.id for r in upgraded.list_runs(experiment="old")] == ["before"]
    # Its metrics too: no downgrade or upgrade rebuilt the runs table (SQLite would cascade the rebuild's drop).
    assert [p.value for p in upgraded.get_metrics("before")] == [0.5, 0.25]
    assert upgraded.get_run("before").metrics == {"loss": 0.25}
    upgraded.report_alive("before")  # a column the newest revision added
    assert upgraded.get_run("before").heartbeat_at is not None


def test_a_run_keeps_its_fields_metrics_and_last_values(database_url):
    history = RunHistory(database_url)
    history.create_run(
        run_id="r1",
        experiment="exp_a",
        target="local",
        arguments=["--alpha", "0.5"],
        dag_id="d",
        task_id="t",
        airflow_run_id="manual_1",
        map_index=2,
        try_number=1,
    )
    history.update_run("r1", status=RunStatus.RUNNING)
    points = [
        MetricPoint("loss", 1.0, seq=0, step=0),
        MetricPoint("loss", 0.5, seq=1, step=1),
        MetricPoint("note", "converged", seq=2),
        MetricPoint("diverged", math.inf, seq=3),
    ]
    assert history.add_metrics("r1", points) == 4
    assert history.add_metrics("r1", points[:2]) == 0  # re-reading the same events adds nothing

    run = history.get_run("r1")
    assert run.status is RunStatus.RUNNING
    assert run.metrics == {"loss": 0.5, "note": "converged", "diverged": math.inf}
    assert (run.dag_id, run.task_id, run.airflow_run_id, run.map_index, run.try_number) == (
        "d",
        "t",
        "manual_1",
        2,
        1,
    )
    assert [p.value for p in history.get_metrics("r1", "loss")] == [1.0, 0.5]
    assert [e.run_count for e in history.list_experiments()] == [1]
    assert [
        r.id for r in history.list_runs(dag_id="d", task_id="t", airflow_run_id="manual_1", map_index=2)
    ] == ["r1"]
    history.dispose()


def test_unknown_run_id_names_it(database_url):
    with pytest.raises(RunNotFoundError, match="No run 'missing'"):
        RunHistory(database_url).get_run("missing")


def test_listing_the_runs_a_reader_may_see_filters_before_the_limit(database_url):
    # Newest first: five runs of DAG b, then two of DAG a, then one from plain Python.
    history = RunHistory(database_url)
    history.create_run(run_id="plain", experiment="notebook", target="local")
    for i in range(2):
        history.create_run(run_id=f"a{i}", experiment="shared", target="local", dag_id="a")
    for i in range(5):
        history.create_run(run_id=f"b{i}", experiment="shared", target="local", dag_id="b")

    def first_two(dag_ids: set[str], runs_without_dag: bool) -> list[str]:
        return [r.id for r in history.list_runs(limit=2, dag_ids=dag_ids, runs_without_dag=runs_without_dag)]

    assert first_two({"a"}, runs_without_dag=False) == ["a1", "a0"]
    assert first_two(set(), runs_without_dag=True) == ["plain"]
    assert first_two(set(), runs_without_dag=False) == []
    assert [r.id for r in history.list_runs(dag_ids={"a"})] == ["a1", "a0", "plain"]
    assert len(history.list_runs(runs_without_dag=False)) == 7
    assert len(history.list_runs()) == 8

    def counts(dag_ids: set[str] | None = None, runs_without_dag: bool = True) -> dict[str, int]:
        listed = history.list_experiments(dag_ids=dag_ids, runs_without_dag=runs_without_dag)
        return {e.name: e.run_count for e in listed}

    assert counts() == {"notebook": 1, "shared": 7}
    assert counts({"a"}, runs_without_dag=False) == {"shared": 2}
    assert counts(set(), runs_without_dag=True) == {"notebook": 1}
    assert counts(set(), runs_without_dag=False) == {}
    history.dispose()


def _create_runs(url: str, worker: int) -> None:
    history = RunHistory(url)
    for i in range(5):
        history.create_run(run_id=f"w{worker}_{i}", experiment="shared", target="local")
    history.dispose()


def _open_new_history(url: str, barrier) -> None:
    barrier.wait(60)
    history = RunHistory(url)
    history.create_run(
        run_id=f"first_{multiprocessing.current_process().name}", experiment="new", target="local"
    )
    history.dispose()


def _exit_codes_at_once(context, count: int, target, argument: str) -> list[int | None]:  # type: ignore[no-untyped-def]
    """The exit codes of `count` processes of `context` running target(argument, barrier), which they all wait
    at before they go on together."""
    barrier = context.Barrier(count)
    processes = [context.Process(target=target, args=(argument, barrier)) for _ in range(count)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    return [process.exitcode for process in processes]


def _open_sqlite(path: str, barrier) -> None:  # type: ignore[no-untyped-def]
    # As the history's engine opens each connection (its exit code says whether it could).
    connection = sqlite3.connect(path, timeout=0, isolation_level=None)
    barrier.wait(60)
    try:
        database._sqlite_pragmas(connection, None)
    finally:
        connection.close()


def test_processes_opening_a_new_sqlite_file_at_once_all_find_it_in_wal_mode(tmp_path):
    # The switch of a new file to WAL takes its exclusive lock; SQLite refuses it at once ("database is locked",
    # without its busy timeout) to one of several connections opening the file together. Before the switch
    # looked again, 8 of 240 such opens failed, in 30 rounds of 8 processes.
    context = multiprocessing.get_context("fork")
    for round in range(20):
        path = str(tmp_path / f"history{round}.db")
        assert _exit_codes_at_once(context, 8, _open_sqlite, path) == [0] * 8
        with contextlib.closing(sqlite3.connect(path)) as connection:
            assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_processes_opening_a_new_database_at_once_all_find_it_migrated(database_url):
    # Twenty task processes may be the first to open a new workspace's history at the same moment: each
    # must find the schema whole, none may fail on a table another is creating.
    context = multiprocessing.get_context("spawn")
    assert _exit_codes_at_once(context, 6, _open_new_history, database_url) == [0] * 6
    history = RunHistory(database_url)
    assert database.current_revision(history.engine) == SCHEMA_HEAD
    with history.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM amlrun_alembic_version").scalar() == 1
    assert len(history.list_runs(experiment="new")) == 6


def test_a_history_in_memory_is_migrated_where_it_is_used():
    history = RunHistory("sqlite://")
    history.create_run(run_id="in_memory", experiment="memory", target="local")
    assert [r.id for r in history.list_runs(experiment="memory")] == ["in_memory"]
    another = RunHistory("sqlite://")  # a database of its own, migrated too
    assert another.list_runs(experiment="memory") == []


def test_processes_creating_runs_in_one_experiment_at_once_all_succeed(database_url):
    RunHistory(database_url).dispose()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_create_runs, args=(database_url, n)) for n in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    history = RunHistory(database_url)
    assert len(history.list_runs(experiment="shared")) == 20
    assert [e.name for e in history.list_experiments()] == ["shared"]


@pytest.mark.parametrize("held_at", [1, 2])
def test_two_writers_of_one_runs_tags_at_once_lose_neither_tag(database_url, held_at):
    # The tags are read, then written whole. One writer is held just after its first read of the run (before it takes
    # the run's lock), or after its second (under the lock), until the other has written its tag or, if the other
    # must wait for that lock, for two seconds: a writer that wrote without reading under the lock would put back
    # the tags as they were before the other's.
    from sqlalchemy import event

    history = RunHistory(database_url)
    history.create_run(run_id="r1", experiment="tags", target="local", tags={"kept": "1"})
    held, held_has_read, other_done = threading.local(), threading.Event(), threading.Event()
    waits: list[bool] = []
    failed: list[BaseException] = []

    @event.listens_for(history.engine, "after_cursor_execute")
    def hold_after_reading_the_run(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if getattr(held, "reads", None) is not None and statement.lstrip().upper().startswith("SELECT"):
            held.reads += 1
            if held.reads == held_at:
                held_has_read.set()
                waits.append(other_done.wait(2))

    def held_writer() -> None:
        held.reads = 0
        try:
            history.update_run("r1", add_tags={"held": "1"})
        except BaseException as err:
            failed.append(err)

    writer = threading.Thread(target=held_writer)
    writer.start()
    assert held_has_read.wait(30)
    history.update_run("r1", add_tags={"other": "1"})
    other_done.set()
    writer.join(30)

    assert not writer.is_alive() and failed == []
    # Held before it took the lock, the writer waited for the other's write; held under it, the other waited.
    assert waits == [held_at == 1]
    assert history.get_run("r1").tags == {"kept": "1", "held": "1", "other": "1"}


def test_a_change_of_nothing_takes_no_lock_and_writes_nothing(tmp_path):
    # A read-only history takes a call that changes nothing, tags to drop the run does not have among them.
    path = tmp_path / "history.db"
    RunHistory(f"sqlite:///{path}").create_run(
        run_id="r1", experiment="tags", target="local", tags={"kept": "1"}
    )
    read_only = RunHistory(f"sqlite:///file:{path}?mode=ro&uri=true")

    assert read_only.update_run("r1", drop_tags=["absent"]).tags == {"kept": "1"}
    assert read_only.update_run("r1", add_tags={"kept": "1"}, drop_tags=["absent"]).tags == {"kept": "1"}
