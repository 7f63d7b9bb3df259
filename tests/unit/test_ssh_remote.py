"""The SSH helper's own logic, run here as it runs on a host: the names it shares with the worker, and how it
tells the run's process from another one holding the same pid."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from airflow_amlrun.environment import Environment, ResolvedEnvironment
from airflow_amlrun.targets import common, ssh, ssh_remote
from airflow_amlrun.targets.base import Job


def test_the_helper_names_the_run_directorys_files_as_the_worker_does() -> None:
    # The helper runs alone on the host and cannot import them: the values are written out twice.
    names = ("CONTROL_DIR", "STD_LOG", "EVENTS", "EXIT_CODE", "ENDED_BY", "PID")
    assert {n: getattr(ssh_remote, n) for n in names} == {n: getattr(common, n) for n in names}
    assert ssh_remote.REFUSED == ssh.REFUSED


def test_the_helper_hands_the_supervisor_everything_a_target_asks_of_it() -> None:
    job = Job(
        run_id="r1",
        experiment="e",
        source_directory=Path("."),
        script="train.py",
        command=None,
        arguments=[],
        environment=ResolvedEnvironment(
            spec=Environment(), name="e", version=None, lock=None, build_key=None, user_managed=True
        ),
        environment_variables={},
        max_run_duration_seconds=60,
    )
    request = common.supervisor_request(job, ["python3", "train.py"], {"A": "1"})
    assert set(request) <= set(ssh_remote.SUPERVISOR_REQUEST)


def test_a_process_is_named_by_its_pid_and_start_time(tmp_path: Path) -> None:
    process = subprocess.Popen(["sleep", "300"], cwd=tmp_path)
    started = ssh_remote.start_time(process.pid)
    # A start time counts clock ticks (1/100 s): the other process must start in a later one, as a process
    # given a reused pid always does (pids wrap around far more slowly).
    other = subprocess.Popen(["sleep", "300"], cwd=tmp_path)
    while ssh_remote.start_time(other.pid) == started:
        other.kill()
        other.wait()
        other = subprocess.Popen(["sleep", "300"], cwd=tmp_path)
    try:
        record = {
            "pid": process.pid,
            "start_time": ssh_remote.start_time(process.pid),
            "boot_id": ssh_remote.boot_id(),
        }
        assert record["start_time"] is not None and record["boot_id"]
        assert ssh_remote.alive(record, str(tmp_path))
        # Another process given the same pid later has another start time: it is not the run.
        assert not ssh_remote.alive({**record, "pid": other.pid}, str(tmp_path))
        # Nor is the same pid on another boot.
        assert not ssh_remote.alive({**record, "boot_id": "another-boot"}, str(tmp_path))
    finally:
        process.kill()
        process.wait()
        other.kill()
        other.wait()
    assert ssh_remote.start_time(process.pid) is None
    assert not ssh_remote.alive(record, str(tmp_path))


def test_a_zombie_is_not_alive(tmp_path: Path) -> None:
    process = subprocess.Popen(["true"], cwd=tmp_path)
    record = {
        "pid": process.pid,
        "start_time": ssh_remote.start_time(process.pid),
        "boot_id": ssh_remote.boot_id(),
    }
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped
    try:
        assert not ssh_remote.alive(record, str(tmp_path))
        assert ssh_remote.ps_start_time(process.pid) is None
    finally:
        process.wait()


def test_without_proc_the_start_time_comes_from_ps() -> None:
    process = subprocess.Popen(["sleep", "300"])
    try:
        first = ssh_remote.ps_start_time(process.pid)
        assert first is not None and first.startswith("lstart:")
        assert ssh_remote.ps_start_time(process.pid) == first
    finally:
        process.kill()
        process.wait()
    assert ssh_remote.ps_start_time(process.pid) is None


def test_a_pid_file_of_an_older_helper_is_followed_only_while_the_process_works_in_the_run_directory(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    (root / ssh_remote.CONTROL_DIR).mkdir(parents=True)
    elsewhere = subprocess.Popen(["sleep", "300"], cwd=tmp_path)
    inside = subprocess.Popen(["sleep", "300"], cwd=root)
    try:
        pid_file = root / ssh_remote.CONTROL_DIR / ssh_remote.PID
        pid_file.write_text(str(inside.pid))  # an older helper wrote the bare pid
        record = ssh_remote.read_pid(str(root))
        assert record == {"pid": inside.pid}
        assert ssh_remote.alive(record, str(root))
        pid_file.write_text(json.dumps(elsewhere.pid))
        assert not ssh_remote.alive(ssh_remote.read_pid(str(root)) or {}, str(root))
    finally:
        for process in (elsewhere, inside):
            process.kill()
            process.wait()
