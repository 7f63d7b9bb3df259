"""Waiting for a child process (the local target for its run's supervisor, the supervisor for its job): it returns as
the child exits, reaped, or says it still runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from airflow_amlrun.targets.supervisor import wait_child


def child(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_child_that_exits_is_reaped_with_its_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[int] = []
    pidfd_open = os.pidfd_open

    def watched(pid: int, flags: int = 0) -> int:
        opened.append(pid)
        return pidfd_open(pid, flags)

    monkeypatch.setattr(os, "pidfd_open", watched)
    process = child("import sys; sys.exit(7)")
    assert wait_child(process, 30) is True
    assert process.returncode == 7
    # Through the child's pidfd, which this kernel has: woken as it exits.
    assert opened == [process.pid]


def test_a_wait_longer_than_poll_can_take_is_cut_to_what_it_can() -> None:
    process = child("import sys; sys.exit(3)")
    assert wait_child(process, 10**12) is True
    assert process.returncode == 3


def test_a_child_still_running_after_the_timeout_is_left_running() -> None:
    process = child("import time; time.sleep(30)")
    try:
        assert wait_child(process, 0.2) is False
        assert process.returncode is None
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_a_zero_timeout_only_looks() -> None:
    process = child("import time; time.sleep(30)")
    try:
        assert wait_child(process, 0) is False
    finally:
        process.kill()
    assert wait_child(process, 30) is True
    assert process.returncode == -9


def test_a_child_already_reaped_is_ended() -> None:
    process = child("pass")
    process.wait()
    assert wait_child(process, 5) is True


@pytest.mark.parametrize("timeout", [0.0, 0.2])
def test_without_pidfds_the_wait_falls_back_to_popen(monkeypatch: pytest.MonkeyPatch, timeout: float) -> None:
    # A kernel or sandbox without pidfd_open: the fallback gives the same answers.
    def refused(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr("os.pidfd_open", refused)
    process = child("import time; time.sleep(0.1)")
    assert wait_child(process, 30) is True
    assert process.returncode == 0
    running = child("import time; time.sleep(30)")
    try:
        assert wait_child(running, timeout) is False
    finally:
        running.kill()
        running.wait()
