"""Run handles travel through the run row as JSON: what a target wrote, and what older versions wrote, loads
and is written back as it was."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.targets.handles import DockerHandle, LocalHandle, SparkHandle, SSHHandle

SSH_ROW: dict[str, Any] = {
    "host": "10.0.0.5",
    "port": 22,
    "user": "train",
    "run_id": "r1",
    "base_dir": "/home/train/.amlrun",
    "run_dir": "/home/train/.amlrun/runs/r1",
    "pid": 4242,
    "start_time": "ticks:53980",
    "boot_id": "b7c1",
    "pid_namespace": "pid:[4026531836]",
    "python": "/home/train/.amlrun/envs/k/bin/python",
    "helper": "/home/train/.amlrun/lib/amlrun-remote-0123456789abcdef.py",
    "helper_python": "python3",
    "blob_bytes_sent": 1200,
    "blobs_sent": 3,
}
LOCAL_ROW: dict[str, Any] = {
    "pid": 31337,
    "start_time": 990012,
    "host": "worker-1",
    "boot_id": "b7c1",
    "pid_namespace": "pid:[4026531836]",
    "run_dir": "/var/amlrun/runs/r1",
    "std_log": "/var/amlrun/runs/r1/.amlrun/std_log.txt",
    "events": "/var/amlrun/runs/r1/.amlrun/events.jsonl",
    "exit_code": "/var/amlrun/runs/r1/.amlrun/exit_code",
    "ended_by": "/var/amlrun/runs/r1/.amlrun/ended_by",
    "python": "/usr/bin/python3",
}
DOCKER_ROW: dict[str, Any] = {
    "container_id": "f00d",
    "container": "amlrun-r1",
    "daemon": "unix:///var/run/docker.sock",
    "daemon_id": "ABCD:EFGH",
    "image": "python:3.12-slim",
    "run_dir": "/var/amlrun/docker-runs/r1",
    "transfer": "bind",
    "python": "python3",
    "user": "1000:1000",
    "host": "worker-1",
}
SPARK_ROW: dict[str, Any] = {
    **LOCAL_ROW,
    "master": "spark://10.0.0.7:7077",
    "deploy_mode": "client",
    "archive_build_key": "3f2a",
}
ROWS = [
    (SSHHandle, SSH_ROW),
    (LocalHandle, LOCAL_ROW),
    (DockerHandle, DOCKER_ROW),
    (SparkHandle, SPARK_ROW),
]


@pytest.mark.parametrize(("kind", "row"), ROWS)
def test_a_handle_is_written_to_the_run_row_key_for_key_in_the_same_order(
    kind: Any, row: dict[str, Any]
) -> None:
    handle = kind.from_json(row)

    assert json.dumps(handle.to_json()) == json.dumps(row)
    assert kind.from_json(json.loads(json.dumps(handle.to_json()))) == handle


# The keys every handle of a kind has; an older row may lack any other.
REQUIRED = {
    "host",
    "port",
    "user",
    "run_id",
    "base_dir",
    "run_dir",
    "pid",
    "container_id",
    "container",
    "master",
}
# Made once: a strategy made anew in every example costs Hypothesis more than the example.
DROPPED = {kind: st.sets(st.sampled_from(sorted(set(row) - REQUIRED))) for kind, row in ROWS}
BESIDES = st.dictionaries(st.sampled_from(["script_pid", "log_spool", "version"]), st.integers())


@pytest.mark.parametrize(("kind", "row"), ROWS)
@given(data=st.data())
def test_an_older_row_with_keys_missing_or_besides_is_written_back_as_it_was(
    kind: Any, row: dict[str, Any], data: st.DataObject
) -> None:
    dropped = data.draw(DROPPED[kind])
    besides = data.draw(BESIDES)
    older = {**{k: v for k, v in row.items() if k not in dropped}, **besides}

    assert kind.from_json(older).to_json() == older


def test_a_local_handle_from_before_start_times_is_told_apart_from_one_without_a_start_time() -> None:
    legacy = {k: LOCAL_ROW[k] for k in ("pid", "run_dir", "std_log", "events", "exit_code", "python")}

    assert LocalHandle.from_json(legacy).legacy
    assert not LocalHandle.from_json(LOCAL_ROW).legacy
    assert not LocalHandle.from_json({**LOCAL_ROW, "start_time": None}).legacy


def test_a_docker_handle_from_before_transfers_were_recorded_is_one_a_retry_cannot_follow() -> None:
    older = {k: v for k, v in DOCKER_ROW.items() if k not in ("transfer", "user", "host")}

    assert DockerHandle.from_json(older).legacy
    assert not DockerHandle.from_json(DOCKER_ROW).legacy
    assert DockerHandle.from_json(older).transfer is None


def test_a_row_that_lacks_what_every_handle_has_is_refused_saying_what_it_lacks() -> None:
    with pytest.raises(ValueError, match="The run row's handle lacks pid, which every SSHHandle has: "):
        SSHHandle.from_json({k: v for k, v in SSH_ROW.items() if k != "pid"})
