"""Runs left behind by a worker that died (conftest.worker_dies_mid_run): what their target does alone, and
retries of their task in worker processes of their own.

Shared by the tests of every target that follows a run from outside the task that started it.
"""

from __future__ import annotations

import json
import os
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
