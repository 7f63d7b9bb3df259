"""The SSH helper's own logic, run here as it runs on a host: the names it shares with the worker, and how it
tells the run's process from another one holding the same pid."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from airflow_amlrun.environment import build_venv
from airflow_amlrun.targets import common, ssh_remote, supervisor
from tests.unit.targets.jobs import a_job


def test_the_helper_names_the_run_directorys_files_as_the_worker_does() -> None:
    # The helper runs alone on the host and cannot import them: the values are written out twice.
    names = ("CONTROL_DIR", "STD_LOG", "EVENTS", "EXIT_CODE", "ENDED_BY", "PID", "RUN_FOLDERS")
    assert {n: getattr(ssh_remote, n) for n in names} == {n: getattr(common, n) for n in names}
    assert ssh_remote.LEADER_ENV == supervisor.LEADER_ENV
    # A virtualenv is complete, on the host as on the worker, once its build record is there.
    assert ssh_remote.BUILD_MARKER == build_venv.BUILD_RECORD


def test_the_helper_hands_the_supervisor_everything_a_target_asks_of_it() -> None:
    job = a_job(max_run_duration_seconds=60)
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


def test_without_proc_the_start_time_comes_from_ps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A host without /proc (BSD, macOS): the helper finds no PROC/self and asks `ps`.
    monkeypatch.setattr(ssh_remote, "PROC", str(tmp_path / "no-proc"))
    process = subprocess.Popen(["sleep", "300"])
    try:
        record = {
            "pid": process.pid,
            "start_time": ssh_remote.start_time(process.pid),
            "boot_id": ssh_remote.boot_id(),
        }
        assert str(record["start_time"]).startswith("lstart:")
        assert ssh_remote.start_time(process.pid) == record["start_time"]
        assert ssh_remote.alive(record, str(tmp_path))
        # The same pid started at another time is another process.
        assert not ssh_remote.alive(
            {**record, "start_time": "lstart:Thu Jan  1 00:00:00 1970"}, str(tmp_path)
        )
    finally:
        process.kill()
        process.wait()
    assert ssh_remote.start_time(process.pid) is None
    assert not ssh_remote.alive(record, str(tmp_path))


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


HELPER = ssh_remote.__file__


def _helper(
    command: str, base: Path, run_id: str, request: dict[str, object]
) -> subprocess.CompletedProcess[bytes]:
    """The helper as the worker runs it on a host, with a time limit: a helper that hangs fails the test."""
    return subprocess.run(
        [sys.executable, "-I", "-S", HELPER, command, str(base), run_id],
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=30,
    )


def test_a_fifo_or_a_link_among_the_control_files_hangs_nothing_and_is_not_read(tmp_path: Path) -> None:
    control = tmp_path / "runs" / "r1" / ssh_remote.CONTROL_DIR
    control.mkdir(parents=True)
    os.mkfifo(control / ssh_remote.EXIT_CODE)  # no writer: opening it for reading would block for good
    os.mkfifo(control / ssh_remote.STD_LOG)
    (tmp_path / "elsewhere").write_text("not the run's\n")
    (control / ssh_remote.EVENTS).symlink_to(tmp_path / "elsewhere")

    status = _helper("status", tmp_path, "r1", {})
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["exit_code"] is None
    for name, what in (
        (ssh_remote.STD_LOG, "is not a regular file"),
        (ssh_remote.EVENTS, "is a symbolic link"),
    ):
        read = _helper("read", tmp_path, "r1", {"name": name, "offset": 0})
        assert read.returncode == 0 and read.stdout == b""
        assert read.stderr.decode() == f"{ssh_remote.NOT_READ}{ssh_remote.CONTROL_DIR}/{name} {what}" + (
            " (a FIFO, socket, device or folder)\n" if name == ssh_remote.STD_LOG else "\n"
        )


def test_a_helper_warns_of_the_first_hundred_entries_it_leaves_out_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    root = tmp_path / "runs" / "r1"
    (root / "outputs").mkdir(parents=True)
    (root / "outputs" / "model.txt").write_text("weights")
    for i in range(150):
        (root / "outputs" / f"l{i:03}").symlink_to(f"/nonexistent/{i}")

    packed = _helper("pack", tmp_path, "r1", {})

    assert packed.returncode == 0, packed.stderr
    lines = packed.stderr.decode().splitlines()
    assert len(lines) == ssh_remote.MAX_WARNINGS + 1
    assert all("is a symlink to '/nonexistent/" in line for line in lines[:-1])
    assert lines[-1] == "... and 50 more warnings like these, not shown."
    with tarfile.open(fileobj=io.BytesIO(packed.stdout)) as tar:
        assert "outputs/model.txt" in tar.getnames()


def test_what_a_run_left_in_its_group_is_ended_only_if_it_names_the_runs_supervisor(tmp_path: Path) -> None:
    # A job that leaves two processes in its group: one with the job's environment, one that cleared it (and
    # so cannot be told from a stranger that took the group's id once the group had ended).
    job = (
        "import subprocess, time\n"
        "a = subprocess.Popen(['sleep', '300'])\n"
        "b = subprocess.Popen(['sleep', '301'], env={})\n"
        "open('left', 'w').write(f'{a.pid} {b.pid}')\n"
        "time.sleep(300)\n"
    )
    leader = subprocess.Popen(
        [sys.executable, "-I", "-S", supervisor.__file__, str(tmp_path)],
        stdin=subprocess.PIPE,
        cwd=tmp_path,
        start_new_session=True,
    )
    assert leader.stdin is not None
    leader.stdin.write(json.dumps({"argv": [sys.executable, "-c", job]}).encode())
    leader.stdin.close()
    record = {
        "pid": leader.pid,
        "start_time": ssh_remote.start_time(leader.pid),
        "boot_id": ssh_remote.boot_id(),
        "pid_namespace": ssh_remote.pid_namespace(),
    }
    deadline = time.monotonic() + 30
    while not (tmp_path / "left").exists() or len((tmp_path / "left").read_text().split()) < 2:
        assert time.monotonic() < deadline, "the job did not start its processes"
        time.sleep(0.02)
    marked, cleared = map(int, (tmp_path / "left").read_text().split())
    try:
        # While the supervisor runs, nothing is a leftover.
        assert ssh_remote.end_leftovers(record) == 0
        leader.kill()  # alone, as the out-of-memory killer would
        leader.wait()
        # The job itself dies with its supervisor (PR_SET_PDEATHSIG), a moment later: what it started stays.
        deadline = time.monotonic() + 10
        while set(ssh_remote.group_members(leader.pid)) - {marked, cleared} and time.monotonic() < deadline:
            time.sleep(0.02)

        assert ssh_remote.end_leftovers(record) == 1
        deadline = time.monotonic() + 10
        while ssh_remote.group_of(marked) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ssh_remote.group_of(marked) is None
        assert ssh_remote.group_of(cleared) == leader.pid  # not provably the run's: left alone
        # Nor on another boot, or in another pid namespace.
        assert ssh_remote.end_leftovers({**record, "boot_id": "another-boot"}) == 0
        assert ssh_remote.end_leftovers({**record, "pid_namespace": "pid:[1]"}) == 0
    finally:
        for pid in (marked, cleared):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
