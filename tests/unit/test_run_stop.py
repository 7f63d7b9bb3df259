"""How a run asked to stop is told apart from one that ended on its own (run._ended_as_stopped)."""

from __future__ import annotations

import signal

import pytest

from airflow_amlrun.run import _ended_as_stopped
from airflow_amlrun.targets.base import TargetStatus
from airflow_amlrun.targets.common import exit_status


@pytest.mark.parametrize(
    "exit_code",
    [None, 128 + signal.SIGTERM, 128 + signal.SIGKILL, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL],
)
def test_a_stops_signal_or_no_status_is_taken_for_the_stop(exit_code: int | None) -> None:
    # As the targets report it (a code past 128 is named "killed by signal ...").
    assert _ended_as_stopped(exit_status(exit_code))


@pytest.mark.parametrize("exit_code", [0, 1, 3, 127, 128, 128 + signal.SIGSEGV, -signal.SIGSEGV, 255])
def test_an_exit_of_its_own_or_another_signal_is_not(exit_code: int) -> None:
    # A script that failed (or crashed) by itself is recorded as it ended, even if a stop had been asked.
    assert not _ended_as_stopped(exit_status(exit_code))


@pytest.mark.parametrize(
    "reason",
    [
        "the container ran out of memory and was killed (OOMKilled) with mem_limit=1g; raise the target's mem_limit",
        "the container could not run the script: exec format error",
    ],
)
def test_a_cause_the_target_names_is_not_taken_for_the_stop(reason: str) -> None:
    # A container killed for its memory exits 137, as a stop's SIGKILL does: its own cause is what is recorded.
    assert not _ended_as_stopped(TargetStatus(running=False, exit_code=137, reason=reason))


def test_no_exit_status_is_taken_for_the_stop_whatever_the_target_says_of_it() -> None:
    # The supervisor stopped with the run records no exit code, and the target says so: the stop did that.
    said = "the run's supervisor on worker 'vm' ended without recording the run's exit code"
    assert _ended_as_stopped(TargetStatus(running=False, exit_code=None, reason=said))
