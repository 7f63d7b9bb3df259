"""What a container's state says of a Docker run (targets/docker_state): how it ended, whether it may still write,
and whether its daemon stopped it by going down."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from airflow_amlrun.targets.docker_options import DockerOptions
from airflow_amlrun.targets.docker_state import (
    DAEMON_STOP_SLACK_SECONDS,
    docker_time,
    live,
    outcome,
    stopped_with_daemon,
)


@pytest.fixture
def no_options() -> DockerOptions:
    """The target's options when none is set (made in the tests that use them: DockerOptions imports the Docker
    SDK, which every process of `make unit` would import as it collects this module)."""
    return DockerOptions.from_mapping({}, where="test")


def rfc3339(seconds: float) -> str:
    """A time as the Docker API writes it: nanoseconds, Z."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"Running": True, "Status": "running"}, True),
        ({"Running": False, "Status": "paused"}, True),
        ({"Running": False, "Status": "restarting"}, True),
        ({"Running": False, "Status": "exited"}, False),
        ({"Running": False, "Status": "created"}, False),
        ({}, False),
    ],
)
def test_a_container_may_still_write_while_it_runs_is_paused_or_restarts(
    state: dict[str, object], expected: bool
) -> None:
    assert live(state) is expected


def test_docker_times_are_read_to_the_microsecond_and_the_year_one_is_none() -> None:
    assert (
        docker_time("2026-11-29T06:00:00.123456789Z")
        == datetime(2026, 11, 29, 6, 0, 0, 123456, UTC).timestamp()
    )
    assert docker_time("0001-01-01T00:00:00Z") is None  # a container that never ended
    assert docker_time("yesterday") is None
    assert docker_time(None) is None


def test_an_oom_kill_names_the_limit_and_the_fix(no_options: DockerOptions) -> None:
    limited = DockerOptions.from_mapping({"mem_limit": "1g"}, where="test")
    ended = outcome({"ExitCode": 137, "OOMKilled": True}, limited)
    assert (ended.running, ended.exit_code) == (False, 137)
    assert (
        ended.reason is not None
        and "OOMKilled) with mem_limit=1g; raise the target's mem_limit" in ended.reason
    )
    unlimited = outcome({"ExitCode": 137, "OOMKilled": True}, no_options)
    assert unlimited.reason is not None and "no mem_limit (the host ran out)" in unlimited.reason


def test_a_container_that_could_not_run_says_why_and_an_exit_keeps_its_code(
    no_options: DockerOptions,
) -> None:
    failed = outcome({"ExitCode": 127, "Error": "exec: python: not found"}, no_options, timed_out=False)
    assert failed.reason == "the container could not run the script: exec: python: not found"
    assert outcome({"ExitCode": 0}, no_options).exit_code == 0
    killed = outcome({"ExitCode": 143}, no_options, timed_out=True)
    assert (killed.exit_code, killed.reason, killed.timed_out) == (143, "killed by signal SIGTERM", True)


def test_a_container_that_ended_after_its_daemon_went_away_was_stopped_by_it() -> None:
    went_away, now = 1_800_000_000.0, 1_800_000_100.0
    info = {"LiveRestoreEnabled": False, "SystemTime": rfc3339(now)}
    # Ended after, or a moment before, the daemon stopped answering: the daemon stopped it.
    for ended in (went_away + 5, went_away - DAEMON_STOP_SLACK_SECONDS + 1):
        found = stopped_with_daemon({"FinishedAt": rfc3339(ended)}, info, went_away=went_away, now=now)
        assert found == pytest.approx(ended, abs=1e-3)
    # Ended well before: of its own.
    earlier = {"FinishedAt": rfc3339(went_away - DAEMON_STOP_SLACK_SECONDS - 1)}
    assert stopped_with_daemon(earlier, info, went_away=went_away, now=now) is None
    # A daemon with live-restore stops nothing as it restarts; a container that never ended was not stopped.
    late = {"FinishedAt": rfc3339(went_away + 5)}
    assert (
        stopped_with_daemon(late, {**info, "LiveRestoreEnabled": True}, went_away=went_away, now=now) is None
    )
    assert (
        stopped_with_daemon({"FinishedAt": "0001-01-01T00:00:00Z"}, info, went_away=went_away, now=now)
        is None
    )


def test_the_daemons_clock_is_taken_out_of_the_containers_end() -> None:
    # The daemon's clock runs 60 s ahead of this machine's: its FinishedAt is read on this machine's clock.
    went_away, now, skew = 1_800_000_000.0, 1_800_000_100.0, 60.0
    info = {"SystemTime": rfc3339(now + skew)}
    ended_here = went_away + 5
    found = stopped_with_daemon(
        {"FinishedAt": rfc3339(ended_here + skew)}, info, went_away=went_away, now=now
    )
    assert found == pytest.approx(ended_here, abs=1e-3)
    # Read without the skew, a container that ended 70 s before the daemon went away would look stopped by it.
    before = went_away - 70
    assert (
        stopped_with_daemon({"FinishedAt": rfc3339(before + skew)}, info, went_away=went_away, now=now)
        is None
    )
