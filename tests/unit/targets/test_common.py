"""What every target reads the same way: how a run ended, from its exit status."""

from __future__ import annotations

import signal

from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.targets.common import exit_status, python_path, time_limit_status


def test_a_run_killed_by_a_signal_is_said_so_with_its_host() -> None:
    on_worker = exit_status(128 + signal.SIGKILL)
    on_host = exit_status(128 + signal.SIGTERM, on="gpu-box")

    assert (on_worker.exit_code, on_worker.reason) == (137, "killed by signal SIGKILL")
    assert (on_host.exit_code, on_host.reason) == (143, "killed by signal SIGTERM on gpu-box")


@given(st.integers(min_value=-1, max_value=128) | st.none())
def test_an_exit_status_of_the_script_itself_gives_no_reason(code: int | None) -> None:
    status = exit_status(code, timed_out=True)

    assert (status.running, status.exit_code, status.reason, status.timed_out) == (False, code, None, True)


def test_an_exit_status_past_every_named_signal_is_kept_without_a_reason() -> None:
    # A real-time signal has a number but no name of its own: the status is kept as it is.
    unnamed = next(n for n in range(1, 127) if n not in {s.value for s in signal.Signals})

    status = exit_status(128 + unnamed, on="gpu-box")

    assert (status.exit_code, status.reason) == (128 + unnamed, None)


def test_a_run_stopped_for_its_time_limit_says_where() -> None:
    status = time_limit_status(143, "the worker")

    assert status.timed_out and status.exit_code == 143
    assert status.reason == "stopped on the worker for exceeding max_run_duration_seconds"


def test_run_context_comes_first_on_the_python_path() -> None:
    assert python_path("/amlrun/pylib", None) == "/amlrun/pylib"
    assert python_path("/amlrun/pylib", "") == "/amlrun/pylib"
    assert python_path("/amlrun/pylib", "/opt/lib:/usr/lib") == "/amlrun/pylib:/opt/lib:/usr/lib"
