"""What a script writes to stderr stands out in the task log Airflow stores: a warning, where its stdout is
info, on every target and while a deferred task is followed by the triggerer (a real scheduler, worker
processes and triggerer write the log files the UI shows)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import dag_source, write_script
from tests.integration.airflow_cluster import AirflowCluster

SCRIPT = """\
import pathlib
import sys
import time
print("loading the data", flush=True)
if len(sys.argv) > 1:  # a gate the test opens once the task is deferred: what follows reaches the triggerer
    gate = pathlib.Path(sys.argv[1])
    deadline = time.monotonic() + 300
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
print("epoch 1 of 1", flush=True)
raise ValueError("the labels do not match the features")
"""


@pytest.fixture(scope="module")
def cluster(local_cluster: AirflowCluster) -> AirflowCluster:
    return local_cluster


@pytest.fixture(scope="module")
def source(cluster: AirflowCluster) -> Path:
    folder = cluster.home / "src"
    write_script(folder, "train.py", SCRIPT)
    return folder


@pytest.mark.parametrize(
    ("target", "deferrable"),
    [("local", False), ("docker", False), ("local", True)],
    ids=["local", "docker", "deferred"],
)
def test_a_scripts_traceback_is_logged_as_a_warning_and_its_output_as_info(
    cluster: AirflowCluster, source: Path, target: str, deferrable: bool
) -> None:
    gate = cluster.home / f"gate-{target}-{deferrable}"
    arguments = [str(gate)] if deferrable else None
    dag_id = cluster.write_dag(
        dag_source(source, target=target, arguments=arguments, options={"deferrable": deferrable})
    )
    run_id = cluster.trigger(dag_id)
    if deferrable:
        deadline = time.monotonic() + 300
        while cluster.task_instances(dag_id, run_id)["train"].state != "deferred":
            assert time.monotonic() < deadline, cluster.component_logs()
            time.sleep(0.2)
        gate.touch()

    assert cluster.wait_for_dag_run(dag_id, run_id) == "failed", cluster.component_logs()
    records = cluster.task_log_records(dag_id, run_id, "train")
    level = {str(r.get("event")): r.get("level") for r in records}
    assert level.get("loading the data") == "info", records
    assert level.get("epoch 1 of 1") == "info"
    assert level.get("Traceback (most recent call last):") == "warning"
    assert level.get("ValueError: the labels do not match the features") == "warning"
    if deferrable:
        assert any("the worker slot is freed" in str(r.get("event")) for r in records)
    # The run keeps its log as the script wrote it.
    (record,) = cluster.history().list_runs(dag_id=dag_id)
    kept = Path(record.logs_uri, "std_log.txt").read_text()
    assert kept.startswith("loading the data\nepoch 1 of 1\nTraceback (most recent call last):\n")
    assert kept.endswith("ValueError: the labels do not match the features\n")
