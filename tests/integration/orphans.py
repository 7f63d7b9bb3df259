"""Runs left behind by a worker that died (conftest.worker_dies_mid_run): what their target does alone, and
retries of their task in worker processes of their own.

Shared by the tests of every target that follows a run from outside the task that started it.
"""

from __future__ import annotations

import contextlib
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

# Try 1 of task retrain.train as Airflow's task runner runs it: the operator holds the run from the moment it is
# recorded, and SIGTERM calls its on_kill. The target's preparing is made slow (after the target's own), as an
# environment build is: in a child process of the task (uv), or in the task's own (a Docker build over the API).
_PREPARED_SLOWLY = """
import os, signal, subprocess, sys, time
from pathlib import Path
from airflow_amlrun import Experiment, ScriptRunConfig, ScriptRunOperator, Workspace
from airflow_amlrun.submission import AirflowTask

source, target, build, cue = sys.argv[1:5]
task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=1)
config = ScriptRunConfig(source, script="train.py", compute_target=target)
operator = ScriptRunOperator(task_id="train", config=config)
signal.signal(signal.SIGTERM, lambda *_: operator.on_kill())

def hold(run):
    operator._hold(run)
    prepare = run.target.prepare

    def prepared_slowly(*args):
        prepare(*args)
        if build == "in_a_child_process":
            # The cue once the child runs: the stop then reaches it too.
            subprocess.run(["sh", "-c", 'touch "$1"; exec sleep 60', "sh", cue], check=True)
        else:
            Path(cue).touch()
            time.sleep(60)

    run.target.prepare = prepared_slowly

Experiment(Workspace.get(), "reattach").submit(config, airflow_task=task, on_created=hold).wait_for_completion()
"""


def task_killed_as_its_run_is_prepared(source: Path, target: str, build: str) -> Any:
    """Try 1 of task retrain.train submits `source`'s train.py to `target` in a worker process of a process group
    of its own, as Airflow's task runner runs a task; as the target prepares the run (slowly, `build`
    "in_a_child_process" or "in_the_task_process"), the group gets SIGTERM, as Airflow stops a task, and SIGKILL
    once the worker ended (a build in a child process ends with the stop) or, with the preparing going on in the
    task's process, once the stop is noted on the run's row (Airflow's SIGKILL would come 5 s later). Returns
    the run as the history holds it afterwards."""
    import tempfile

    from airflow_amlrun import Workspace
    from airflow_amlrun.run.state import STOP_REQUESTED_TAG

    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryFile() as said:
        cue = Path(folder) / "preparing"
        worker = subprocess.Popen(
            [sys.executable, "-c", _PREPARED_SLOWLY, str(source), target, build, str(cue)],
            env=os.environ.copy(),
            stderr=said,
            start_new_session=True,
        )
        noted = False
        try:
            wait_for_file(cue)
            os.killpg(worker.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while worker.poll() is None and time.monotonic() < deadline:
                [run] = Workspace.get().list_runs()
                noted = STOP_REQUESTED_TAG in run.tags
                if build == "in_the_task_process" and noted:
                    break
                time.sleep(0.05)
            ended_on_its_own = worker.poll() is not None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        said.seek(0)
        what = said.read().decode("utf-8", "replace")[-4000:]
    if build == "in_a_child_process":
        assert ended_on_its_own, f"the worker went on after its stop ended its build; it said:\n{what}"
    else:
        assert noted, f"the stop was not noted on the run's row within 30 s; the worker said:\n{what}"
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
