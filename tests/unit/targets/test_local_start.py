"""The local target's start: a run it started is found by its id (for a start interrupted before its handle
came back), and a start interrupted before the run is known by its id leaves no supervisor behind."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun.config import load_settings
from airflow_amlrun.targets.base import Job
from airflow_amlrun.targets.common import add_run_folders, new_run_dir
from airflow_amlrun.targets.handles import LocalHandle
from airflow_amlrun.targets.local import LocalTarget
from tests.unit.targets.jobs import a_job

WRITES_THEN_WAITS = "import time\nopen('ran', 'w').close()\ntime.sleep(60)\n"


def _prepared(tmp_path: Path) -> tuple[LocalTarget, Job]:
    target = LocalTarget(replace(load_settings(), local_runs_dir=tmp_path / "runs"), tmp_path / "cache")
    job = a_job(source_directory=tmp_path)
    run_dir = target.run_dir(job)
    new_run_dir(run_dir)
    (run_dir / "train.py").write_text(WRITES_THEN_WAITS)
    add_run_folders(run_dir)
    return target, job


def test_a_run_the_target_started_is_found_by_its_id_and_stops(tmp_path: Path) -> None:
    target, job = _prepared(tmp_path)
    handle = target.submit(job)
    try:
        # What a start whose answer was lost looks for: this target's own child, by the run's id.
        assert target.find(job) == handle
        # Another target (a retry's process) cannot trust a process found by a run id: none.
        assert LocalTarget(load_settings(), tmp_path / "cache").find(job) is None
    finally:
        assert target.cancel(handle)
    assert not target.wait(handle, 10).running


def test_a_start_interrupted_before_the_run_is_known_leaves_no_supervisor_waiting(tmp_path: Path) -> None:
    target, job = _prepared(tmp_path)
    spawned: list[int] = []

    def interrupted(**fields: Any) -> LocalHandle:
        spawned.append(fields["pid"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        target.start_supervised(job, [sys.executable, "train.py"], sys.executable, interrupted)

    [pid] = spawned
    # Ended and reaped, not waiting for a request that never comes; and the script never ran.
    assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"
    assert target.find(job) is None
    time.sleep(0.2)
    assert not (target.run_dir(job) / "ran").exists()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
