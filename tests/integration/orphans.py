"""Runs left behind by a worker that died (conftest.worker_dies_mid_run): what their target does alone, and
retries of their task in worker processes of their own.

Shared by the tests of every target that follows a run from outside the task that started it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

_RETRY = """
import json, sys
from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.submission import AirflowTask

source, target = sys.argv[1], sys.argv[2]
task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
config = ScriptRunConfig(source, script="train.py", compute_target=target)
run = Experiment(Workspace.get(), "reattach").submit(config, airflow_task=task)
record = run.wait_for_completion(show_output=False, raise_on_error=False)
print(json.dumps({"id": record.id, "status": str(record.status), "error": record.error}))
"""


# Try 1 of task retrain.train as Airflow's task runner runs it: it submits and follows its run, and SIGTERM
# calls the operator's on_kill, which stops the run and waits for it through the stop's grace period.
_FOLLOWS_AND_STOPS_ON_SIGTERM = """
import signal, sys
from airflow_amlrun import Experiment, ScriptRunConfig, ScriptRunOperator, Workspace
from airflow_amlrun.submission import AirflowTask

task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=1)
config = ScriptRunConfig(sys.argv[1], script="train.py", compute_target=sys.argv[2])
operator = ScriptRunOperator(task_id="train", config=config)
operator._run = Experiment(Workspace.get(), "reattach").submit(config, airflow_task=task)
signal.signal(signal.SIGTERM, lambda *_: operator.on_kill())
operator._run.wait_for_completion(show_output=False)
"""

# Try 1 of task retrain.train as Airflow's task runner runs it, killed as its run is prepared on its target: the
# operator holds the run from the moment it is recorded; SIGTERM (on_kill) comes while the target prepares it,
# and SIGKILL before the preparing ends (Airflow kills a task 5 s after its SIGTERM; an environment build takes
# longer).
_KILLED_OUTRIGHT_AS_ITS_RUN_IS_PREPARED = """
import os, signal, sys
from airflow_amlrun import Experiment, ScriptRunConfig, ScriptRunOperator, Workspace
from airflow_amlrun.submission import AirflowTask

task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=1)
config = ScriptRunConfig(sys.argv[1], script="train.py", compute_target=sys.argv[2])
operator = ScriptRunOperator(task_id="train", config=config)

def hold(run):
    operator._hold(run)
    prepare = run.target.prepare

    def prepared_until_killed(*args):
        prepare(*args)
        operator.on_kill()  # Airflow's SIGTERM handler, the preparing going on
        os.kill(os.getpid(), signal.SIGKILL)  # 5 s later

    run.target.prepare = prepared_until_killed

Experiment(Workspace.get(), "reattach").submit(config, airflow_task=task, on_created=hold)
"""


def task_killed_outright_as_its_run_is_prepared(source: Path, target: str) -> Any:
    """Try 1 of task retrain.train submits `source`'s train.py to `target` in a worker process, which is killed
    (on_kill) as the target prepares the run, then killed outright before the preparing ends. Returns the run as
    the history holds it afterwards."""
    from airflow_amlrun import Workspace

    worker = subprocess.run(
        [sys.executable, "-c", _KILLED_OUTRIGHT_AS_ITS_RUN_IS_PREPARED, str(source), target],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
    )
    assert worker.returncode == -signal.SIGKILL, worker.stderr[-4000:]
    [left] = Workspace.get().list_runs()
    return left


# A script that does not end when stopped: it notes each SIGTERM in a file "stops" and trains on.
OUTLIVES_STOPS = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: open("stops", "a").write("SIGTERM\\n"))
with open("pid.tmp", "w") as out:
    out.write(str(os.getpid()))
os.rename("pid.tmp", "pid")
while True:
    time.sleep(0.1)
"""


def task_killed_outright_as_it_stops_the_run(source: Path, target: Any) -> tuple[str, int]:
    """Try 1 of task retrain.train runs `source`'s OUTLIVES_STOPS on `target` (an integration conftest Target) in
    a worker process, is asked to stop (SIGTERM: its on_kill stops the run, and waits through the grace period),
    and is killed outright before the grace period ends, as Airflow kills a task 5 s after its SIGTERM. Returns
    the run's id and the script's pid (as its target sees it)."""
    from tests.conftest import wait_until_running

    worker = subprocess.Popen(
        [sys.executable, "-c", _FOLLOWS_AND_STOPS_ON_SIGTERM, str(source), target.name], env=os.environ.copy()
    )
    try:
        running = wait_until_running(also=lambda run: target.run_dir(run.id).joinpath("pid").exists())
        assert running is not None, "the run never started"
        pid = int(target.run_dir(running.id).joinpath("pid").read_text())
        worker.send_signal(signal.SIGTERM)
        wait_for_file(target.run_dir(running.id) / "stops")
    finally:
        worker.kill()
        worker.wait()
    return running.id, pid


def retry_in_process(
    source: Path, target: str = "local", *, prefix: tuple[str, ...] = (), timeout: float = 300
) -> dict[str, Any]:
    """Try 2 of task retrain.train (see conftest.worker_dies_mid_run) in a worker process of its own, started
    under `prefix` (another namespace, fewer capabilities); the run it recorded: id, status and error."""
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _RETRY, str(source), target],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def wait_for_file(path: Path, timeout: float = 60) -> str:
    """The text of a file once it exists; fails the test when nothing writes it within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} was not written within {timeout} s")
        time.sleep(0.05)
    return path.read_text()


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (on this machine: the SSH test host shares its pids)."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(proc.name))
    return members
