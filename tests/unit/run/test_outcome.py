"""How an ended run is recorded (run.outcome): a stop told apart from a run that ended on its own, and what explains an end first."""

from __future__ import annotations

import signal

import pytest

from airflow_amlrun.history import RunStatus
from airflow_amlrun.run.outcome import Asked, ended_as_stopped, outcome, stopped_on_target
from airflow_amlrun.targets.base import TargetStatus
from airflow_amlrun.targets.common import exit_status


@pytest.mark.parametrize(
    "exit_code",
    [None, 128 + signal.SIGTERM, 128 + signal.SIGKILL, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL],
)
def test_a_stops_signal_or_no_status_is_taken_for_the_stop(exit_code: int | None) -> None:
    # As the targets report it (a code past 128 is named "killed by signal ...").
    assert ended_as_stopped(exit_status(exit_code))


@pytest.mark.parametrize("exit_code", [0, 1, 3, 127, 128, 128 + signal.SIGSEGV, -signal.SIGSEGV, 255])
def test_an_exit_of_its_own_or_another_signal_is_not(exit_code: int) -> None:
    # A script that failed (or crashed) by itself is recorded as it ended, even if a stop had been asked.
    assert not ended_as_stopped(exit_status(exit_code))


@pytest.mark.parametrize(
    "reason",
    [
        "the container ran out of memory and was killed (OOMKilled) with mem_limit=1g; raise the target's mem_limit",
        "the container could not run the script: exec format error",
    ],
)
def test_a_cause_the_target_names_is_not_taken_for_the_stop(reason: str) -> None:
    # A container killed for its memory exits 137, as a stop's SIGKILL does: its own cause is what is recorded.
    assert not ended_as_stopped(TargetStatus(running=False, exit_code=137, reason=reason))


def test_no_exit_status_is_taken_for_the_stop_whatever_the_target_says_of_it() -> None:
    # The supervisor stopped with the run records no exit code, and the target says so: the stop did that.
    said = "the run's supervisor on worker 'vm' ended without recording the run's exit code"
    assert ended_as_stopped(TargetStatus(running=False, exit_code=None, reason=said))


def test_a_stop_asked_while_followed_records_canceled_with_why() -> None:
    ended = exit_status(128 + signal.SIGTERM)
    assert outcome(ended, Asked(cancel_requested=True, stop_requested="Canceled: the sweep's policy.")) == (
        RunStatus.CANCELED,
        "Canceled: the sweep's policy.",
    )
    # Without a reason recorded, the follower says what it knows.
    assert outcome(ended, Asked(cancel_requested=True)) == (
        RunStatus.CANCELED,
        "Canceled while running (the task was killed).",
    )


def test_the_followers_own_stop_wins_over_the_exit() -> None:
    # The script handled the stop and exited 0.
    asked = Asked(stop_reason="Stopped by the Airflow task's execution_timeout.")
    assert outcome(exit_status(0, stopped_by="SIGTERM"), asked) == (
        RunStatus.FAILED,
        "Stopped by the Airflow task's execution_timeout.",
    )


@pytest.mark.parametrize(
    "asked",
    [
        Asked(cancel_requested=True, stop_requested="Canceled: the sweep's policy."),
        Asked(stop_reason="Stopped by the Airflow task's execution_timeout."),
        Asked(timed_out=True, max_run_duration_seconds=30),
        Asked(stop_requested="Canceled: stopped from the CLI."),
    ],
)
def test_a_run_that_exited_0_before_any_stop_reached_it_completed(asked: Asked) -> None:
    # Its supervisor saw no stop: the stop came after the script had ended on its own.
    assert outcome(exit_status(0), asked) == (RunStatus.COMPLETED, None)


@pytest.mark.parametrize("by_target", [True, False])
def test_a_run_past_its_duration_fails_naming_the_limit(by_target: bool) -> None:
    ended = TargetStatus(running=False, exit_code=-signal.SIGKILL, timed_out=by_target)
    status, error = outcome(ended, Asked(timed_out=not by_target, max_run_duration_seconds=30))
    assert status is RunStatus.FAILED
    assert error == "Exceeded max_run_duration_seconds=30; the run was stopped."


def test_a_stop_asked_before_that_ended_it_records_canceled() -> None:
    # The stop's signal reached the run although asking for it seemed to fail (a connection dropped).
    asked = Asked(stop_requested="Canceled: stopped from the CLI.")
    assert outcome(exit_status(128 + signal.SIGTERM), asked) == (
        RunStatus.CANCELED,
        "Canceled: stopped from the CLI.",
    )
    # A run that exited on its own meanwhile is recorded as it ended.
    assert outcome(exit_status(0), asked) == (RunStatus.COMPLETED, None)
    assert outcome(exit_status(2), asked) == (RunStatus.FAILED, "The script failed (exit code 2).")


def test_an_exit_of_its_own_is_recorded_as_it_ended() -> None:
    assert outcome(exit_status(0), Asked()) == (RunStatus.COMPLETED, None)
    assert outcome(TargetStatus(running=False, exit_code=3, reason="the script raised"), Asked()) == (
        RunStatus.FAILED,
        "The script failed (the script raised).",
    )
    assert outcome(TargetStatus(running=False, exit_code=None, reason="the host rebooted"), Asked()) == (
        RunStatus.FAILED,
        "The run ended without an exit code: the host rebooted.",
    )
    assert outcome(TargetStatus(running=False, exit_code=None), Asked()) == (
        RunStatus.FAILED,
        "The run ended without an exit code: nothing recorded how it ended.",
    )


@pytest.mark.parametrize("exit_code", [0, 1, 128 + signal.SIGTERM, 128 + signal.SIGKILL])
def test_a_stop_its_supervisor_saw_reach_the_run_records_it_canceled_however_it_exited(
    exit_code: int,
) -> None:
    # A script may handle the stop and exit 0 (a checkpoint saved): it was stopped all the same.
    ended = exit_status(exit_code, stopped_by="SIGTERM")
    assert stopped_on_target(ended)
    status, error = outcome(ended, Asked())
    assert status is RunStatus.CANCELED
    assert error is not None and "a stop (SIGTERM) reached the run on its target" in error
    # Why, when it was recorded.
    assert outcome(ended, Asked(stop_requested="Canceled: stopped from the CLI.")) == (
        RunStatus.CANCELED,
        "Canceled: stopped from the CLI.",
    )


def test_a_cause_the_target_names_wins_over_a_stop_its_supervisor_saw() -> None:
    # A daemon going down stops its containers (the supervisor sees the stop); the target names the daemon.
    restarted = (
        "its container c was stopped by the Docker daemon at unix:///var/run/docker.sock, which restarted"
    )
    ended = TargetStatus(running=False, exit_code=143, reason=restarted, stopped_by="SIGTERM")
    assert not stopped_on_target(ended)
    assert outcome(ended, Asked()) == (RunStatus.FAILED, f"The script failed ({restarted}).")


def test_the_followers_own_reasons_win_over_a_stop_its_supervisor_saw() -> None:
    ended = exit_status(128 + signal.SIGTERM, stopped_by="SIGTERM")
    assert outcome(ended, Asked(stop_reason="Stopped by the Airflow task's execution_timeout.")) == (
        RunStatus.FAILED,
        "Stopped by the Airflow task's execution_timeout.",
    )
    assert outcome(ended, Asked(timed_out=True, max_run_duration_seconds=30)) == (
        RunStatus.FAILED,
        "Exceeded max_run_duration_seconds=30; the run was stopped.",
    )
