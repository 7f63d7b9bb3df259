"""The Airflow the browser tests open: one `AirflowCluster` (api-server, scheduler, dag-processor, triggerer on
loopback), the repository's example DAG (train_local) run twice with its code changed in between, and a DAG
whose run keeps going until the test lets it end.

Two users sign in: admin, and ann, a viewer who may read the live DAG only (the auth manager of
tests/integration/dag_access_auth_manager.py answers by DAG id).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from airflow_amlrun.history import RunStatus
from tests.conftest import REPO
from tests.integration.airflow_cluster import ADMIN, AirflowCluster

EXAMPLE_DAG = "train_local"
LIVE_DAG = "amlrun_ui_live"
PASSWORDS = {ADMIN[0]: ADMIN[1], "ann": "ann-pw"}

_LIVE_SCRIPT = """\
import pathlib
import sys
import time

from airflow_amlrun.run_context import Run

run = Run.get_context()
gate = pathlib.Path(sys.argv[1])
print("epoch 0: waiting for more data", flush=True)
for step in range(4):
    run.log("progress", step / 3, step=step)
deadline = time.monotonic() + 240
while not gate.exists() and time.monotonic() < deadline:
    time.sleep(0.1)
print("epoch 1: the data arrived", flush=True)
"""

_LIVE_DAG = """
from airflow.sdk import DAG

from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG("DAG_ID", schedule=None):
    ScriptRunOperator(
        task_id="train",
        experiment="live_training",
        config=ScriptRunConfig(source_directory="live_training", script="train.py", compute_target="local"),
        arguments=["GATE"],
    )
"""


@dataclass
class UiCluster:
    """The cluster, its runs' ids, and where the live run's gate is."""

    cluster: AirflowCluster
    gate: Path
    runs: dict[str, str] = field(default_factory=dict)
    dag_runs: dict[str, str] = field(default_factory=dict)
    _tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.cluster.url

    def token(self, user: str) -> str:
        if user not in self._tokens:
            answer = httpx.post(
                f"{self.url}/auth/token", json={"username": user, "password": PASSWORDS[user]}, timeout=30
            )
            answer.raise_for_status()
            self._tokens[user] = answer.json()["access_token"]
        return self._tokens[user]


def ui_cluster(home: Path) -> AirflowCluster:
    """A cluster (not started) whose API server knows both users and asks the auth manager by DAG id."""
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    return AirflowCluster(
        env={
            "AIRFLOW__CORE__AUTH_MANAGER": "tests.integration.dag_access_auth_manager.DagAccessAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN[0]}:admin,ann:viewer",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AMLRUN_TEST_DAG_ACCESS": json.dumps({"ann": [LIVE_DAG]}),
            "PYTHONPATH": str(REPO),
        }
    )


def run_examples(cluster: AirflowCluster, home: Path) -> UiCluster:
    """The example DAG run twice (alpha 0.5, then 2.0 on code with one fold less, changed once the first run's
    snapshot was taken), and the live DAG started beside them; returns once the two example runs ended and
    the live run is running."""
    shutil.copy(REPO / "dags" / f"{EXAMPLE_DAG}.py", cluster.dags)
    shutil.copytree(REPO / "dags" / "train_diabetes", cluster.dags / "train_diabetes")
    gate = home / "gate"
    (cluster.dags / "live_training").mkdir()
    (cluster.dags / "live_training" / "train.py").write_text(_LIVE_SCRIPT)
    cluster.write_dag(_LIVE_DAG.replace("GATE", str(gate)), LIVE_DAG)
    cluster.wait_for_dag(EXAMPLE_DAG)
    ui = UiCluster(cluster=cluster, gate=gate)

    history = cluster.history()
    ui.dag_runs["live"] = cluster.trigger(LIVE_DAG)
    ui.dag_runs["first"] = cluster.trigger(EXAMPLE_DAG, {"alpha": 0.5})
    # A run is recorded once its code's snapshot is taken: from then on, the code may change.
    deadline = time.monotonic() + 180
    while not history.list_runs(dag_id=EXAMPLE_DAG, airflow_run_id=ui.dag_runs["first"]):
        assert time.monotonic() < deadline, "the example DAG's first run was not recorded within 180 s"
        time.sleep(0.2)
    # The second run's code differs: what the diff page shows.
    script = cluster.dags / "train_diabetes" / "train.py"
    script.write_text(
        script.read_text().replace('"--folds", type=int, default=5', '"--folds", type=int, default=4')
    )
    ui.dag_runs["second"] = cluster.trigger(EXAMPLE_DAG, {"alpha": 2.0})
    for name in ("first", "second"):
        assert cluster.wait_for_dag_run(EXAMPLE_DAG, ui.dag_runs[name]) == "success"
    for name in ("first", "second"):
        (run,) = history.list_runs(dag_id=EXAMPLE_DAG, airflow_run_id=ui.dag_runs[name])
        ui.runs[name] = run.id
    deadline = time.monotonic() + 120
    while True:
        live = history.list_runs(dag_id=LIVE_DAG, airflow_run_id=ui.dag_runs["live"])
        if live and live[0].status == RunStatus.RUNNING:
            ui.runs["live"] = live[0].id
            return ui
        assert time.monotonic() < deadline, f"the live run did not start within 120 s: {live}"
        time.sleep(0.2)
