"""Twenty tasks at once on one workspace, under a real scheduler (LocalExecutor, 24 slots): each snapshots
the same tree, runs in the same managed environment and logs 1,000 metric points. With the run history on
PostgreSQL and on SQLite: no row or point lost, no blob corrupt or left half-written, one environment build,
no "database is locked"."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from tests.conftest import write_script
from tests.integration.airflow_cluster import AirflowCluster

TASKS = 20
POINTS = 1000

SCRIPT = """
import sys
import tomli_w
from airflow_amlrun.run_context import Run
run = Run.get_context()
for step in range(POINTS):
    run.log("loss", 1.0 / (step + 1), step=step)
print("logged", POINTS, "points with tomli_w", tomli_w.dumps({"a": 1}).strip(), flush=True)
""".replace("POINTS", str(POINTS))

DAG = """
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import Environment, ScriptRunConfig, ScriptRunOperator
from airflow_amlrun.environment import PythonSection

env = Environment("concurrent", python=PythonSection(pip_requirements=["tomli-w==1.0.0"]))
with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    for n in range(TASKS):
        ScriptRunOperator(
            task_id=f"train_{n}",
            experiment="concurrent",
            config=ScriptRunConfig(SOURCE, script="train.py", environment=env),
            workspace_conn_id=CONN,
        )
"""


@pytest.fixture(scope="module")
def sqlite_workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("sqlite-workspace")
    return {"database_url": f"sqlite:///{folder / 'history.db'}", "store_url": str(folder / "store")}


@pytest.fixture(scope="module")
def cluster(sqlite_workspace: dict[str, str]) -> Iterator[AirflowCluster]:
    connection = json.dumps({"conn_type": "amlrun", "extra": sqlite_workspace})
    env = {
        "AIRFLOW__CORE__PARALLELISM": "24",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "24",
        "AIRFLOW_CONN_AMLRUN_SQLITE": connection,
    }
    # Twenty task processes on two cores answer their heartbeats late: a tight timeout would take live
    # tasks for dead ones (the cluster's default suits one or two tasks at a time).
    with AirflowCluster(env=env, heartbeat_timeout=180) as started:
        yield started


@pytest.fixture(scope="module")
def source(cluster: AirflowCluster) -> Path:
    folder = cluster.home / "src"
    write_script(folder, "train.py", SCRIPT)
    for n in range(50):
        (folder / "data" / f"part_{n}.csv").parent.mkdir(exist_ok=True)
        (folder / "data" / f"part_{n}.csv").write_text(f"{n},{n * n}\n" * 200)
    return folder


def assert_store_whole(store: Path) -> None:
    files = [p for p in store.rglob("*") if p.is_file()]
    assert files
    assert [p for p in files if p.name.startswith(".amlrun-tmp-")] == []
    for path in (store / "blobs").rglob("*"):
        if path.is_file():
            assert blake3.blake3(path.read_bytes()).hexdigest() == path.name, f"corrupt blob {path}"


@pytest.mark.parametrize("conn", ["amlrun_default", "amlrun_sqlite"])
def test_twenty_tasks_at_once_lose_nothing_and_build_once(
    cluster: AirflowCluster, source: Path, sqlite_workspace: dict[str, str], conn: str
) -> None:
    from airflow_amlrun.history import RunHistory

    dag_id = cluster.write_dag(
        DAG.replace("TASKS", str(TASKS)).replace("SOURCE", repr(str(source))).replace("CONN", repr(conn))
    )
    run_id = cluster.trigger(dag_id)

    state = cluster.wait_for_dag_run(dag_id, run_id, timeout=1200)

    logs = {f"train_{n}": cluster.task_log(dag_id, run_id, f"train_{n}") for n in range(TASKS)}
    failed = {
        t: ti.state for t, ti in cluster.task_instances(dag_id, run_id).items() if ti.state != "success"
    }
    assert state == "success", "\n".join(
        [
            f"tasks not successful: {failed}",
            *(f"----- {t}\n{logs[t][-6000:]}" for t in failed),
            cluster.component_logs(),
        ]
    )
    history = cluster.history() if conn == "amlrun_default" else RunHistory(sqlite_workspace["database_url"])
    runs = history.list_runs(dag_id=dag_id, limit=100)
    assert sorted(str(r.task_id) for r in runs) == sorted(logs)
    assert {str(r.status) for r in runs} == {"Completed"}
    assert len({r.snapshot_id for r in runs}) == 1
    for record in runs:
        points = history.get_metrics(record.id, "loss")
        assert [p.step for p in points] == list(range(POINTS)), record.id
        assert f"logged {POINTS} points with tomli_w a = 1" in logs[str(record.task_id)]
    for text in logs.values():
        assert "database is locked" not in text
    # One build, which every other task waited for and then used.
    # (The module's second DAG run, on the other workspace, finds that build made.)
    assert sum("Built environment 'concurrent'" in text for text in logs.values()) <= 1
    assert len({(r.environment or {}).get("build_key") for r in runs}) == 1
    envs = cluster.home / "amlrun" / "cache" / "envs"
    key = (runs[0].environment or {})["build_key"]
    assert sorted(p.name for p in envs.iterdir() if not p.name.startswith(".")) == sorted(
        [key, "builds.jsonl"]
    )
    assert len((envs / "builds.jsonl").read_text().splitlines()) == 1  # the build log: one line a build
    store = Path(sqlite_workspace["store_url"]) if conn == "amlrun_sqlite" else cluster.store
    assert_store_whole(store)
