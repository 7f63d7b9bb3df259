"""What one process hands to the next that takes a sweep over: pure data, through JSON (a trigger's kwargs, an
event's payload) and back (the deferred sweep itself: tests/integration/test_hyperdrive_trigger.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.history import RunStatus
from airflow_amlrun.hyperdrive.takeover import (
    STOP_RETRY_MAX_SECONDS,
    STOP_RETRY_SECONDS,
    SweepEnding,
    SweepState,
    Unstopped,
    interrupts,
)
from airflow_amlrun.run import FollowState
from tests.unit.strategies import RUN_IDS, unstopped_runs

states = st.builds(
    SweepState,
    children=st.dictionaries(RUN_IDS, st.builds(FollowState, log_offset=st.integers(0, 2**53)), max_size=3),
    looked_at=st.dictionaries(RUN_IDS, st.integers(0, 10**6), max_size=3),
    unstopped=unstopped_runs(max_size=3),
)


@given(state=states)
def test_a_handed_over_sweep_keeps_the_runs_whose_stop_failed_and_why(state: SweepState) -> None:
    again = SweepState.from_json(json.loads(json.dumps(state.to_json())))

    assert again == state
    assert again.unstopped == state.unstopped


def test_a_state_handed_over_by_an_earlier_version_loads_with_no_run_left_to_stop() -> None:
    earlier = {"children": {"tuning_1_deadbeef": {"log_offset": 42}}, "looked_at": {"tuning_1_deadbeef": 3}}

    state = SweepState.from_json(earlier)

    assert state.unstopped == {}
    assert (state.children["tuning_1_deadbeef"].log_offset, state.looked_at) == (42, {"tuning_1_deadbeef": 3})


def test_each_failed_stop_of_a_run_waits_twice_as_long_for_the_next_up_to_five_minutes() -> None:
    now = 1_000_000.0
    retries, last = [], None
    for _ in range(9):
        last = Unstopped.failed("Canceled by BanditPolicy at report 3", last, now)
        retries.append(last.again_at - now)

    assert retries == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]
    assert (retries[0], retries[-1]) == (STOP_RETRY_SECONDS, STOP_RETRY_MAX_SECONDS)
    assert (last.reason, last.failures) == ("Canceled by BanditPolicy at report 3", 9)


def test_a_run_handed_over_with_its_reason_alone_is_stopped_again_at_once() -> None:
    state = SweepState.from_json({"unstopped": {"tuning_1_deadbeef": "Canceled by BanditPolicy at report 3"}})

    assert state.unstopped == {"tuning_1_deadbeef": Unstopped("Canceled by BanditPolicy at report 3", 0.0, 1)}


def test_a_stop_failing_for_days_still_waits_five_minutes_between_tries() -> None:
    # Thousands of failures (about three days at the cap): the wait stays at the cap, and nothing overflows.
    earlier = Unstopped("Canceled by BanditPolicy at report 3", 0.0, failures=5000)

    again = Unstopped.failed(earlier.reason, earlier, 1_000_000.0)

    assert (again.again_at - 1_000_000.0, again.failures) == (STOP_RETRY_MAX_SECONDS, 5001)


def made(error: BaseException | str) -> BaseException:
    """The error of a test: the one given, or Airflow's exception of that name, imported as the test runs rather
    than when the module is collected (see AIRFLOW_TESTS in tests/unit/conftest.py)."""
    if isinstance(error, BaseException):
        return error
    from airflow.sdk import exceptions

    instance: BaseException = getattr(exceptions, error)()
    return instance


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (
            OSError("the target did not answer"),
            RunStatus.FAILED,
            "The sweep failed: the target did not answer",
        ),
        ("AirflowTaskTimeout", RunStatus.FAILED, "Stopped by the Airflow task's execution_timeout."),
        (KeyboardInterrupt(), RunStatus.CANCELED, "Canceled: the sweep was interrupted (KeyboardInterrupt)."),
        (
            "AirflowTaskTerminated",
            RunStatus.CANCELED,
            "Canceled: the sweep was interrupted (AirflowTaskTerminated).",
        ),
    ],
)
def test_an_error_fails_the_sweep_and_an_interruption_cancels_it(
    error: BaseException | str, status: RunStatus, reason: str
) -> None:
    ending = SweepEnding.of(made(error))

    assert (ending.status, ending.reason) == (status, reason)
    # Its stopped runs say why: the interruption, or that the sweep's failure canceled them.
    assert ending.run_reason == (reason if status is RunStatus.CANCELED else f"Canceled: {reason}")


@pytest.mark.parametrize(
    ("error", "interruption"),
    [
        (OSError("the target did not answer"), False),
        (ValueError("a bad value"), False),
        ("AirflowTaskTimeout", True),
        ("AirflowTaskTerminated", True),
        (KeyboardInterrupt(), True),
        (SystemExit(1), True),
    ],
)
def test_a_failure_may_be_left_for_a_retry_while_an_interruption_always_ends_the_sweep(
    error: BaseException | str, interruption: bool
) -> None:
    error = made(error)
    assert interrupts(error) is interruption
    # What the sweep is then recorded with, when it is ended: a failure names itself.
    assert SweepEnding.of(error).reason.startswith("The sweep failed: ") is not interruption
