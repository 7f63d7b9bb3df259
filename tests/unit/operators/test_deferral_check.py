"""Whether a triggerer of this Airflow shares this machine: looked up among this machine's processes.

A real triggerer is in tests/integration/test_deferrable.py; here processes only named like one, with this
session's AIRFLOW_HOME (a temporary folder of the suite's own, so that no other Airflow on the machine
counts) or another one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TITLE = 'exec -a "airflow triggerer" sleep 60'


@contextmanager
def process(*argv: str, airflow_home: str | None = None) -> Iterator[int]:
    env = {**os.environ, "AIRFLOW_HOME": airflow_home or os.environ["AIRFLOW_HOME"]}
    started = subprocess.Popen(list(argv), env=env)
    try:
        # Until the process runs what it was started for (its command line is no longer the launcher's).
        cmdline = Path(f"/proc/{started.pid}/cmdline")
        for _ in range(100):
            if cmdline.exists() and cmdline.read_bytes().split(b"\0")[0] not in (b"bash", b"unshare", b""):
                break
            time.sleep(0.02)
        yield started.pid
    finally:
        started.kill()
        started.wait()


def triggerer_shares_this_machine(proc: str = "/proc") -> str | None:
    """The operator's check. Its module imports Airflow: the tests import it, not their collection, as
    `make unit` keeps Airflow out of one of its two processes (tests/unit/conftest.py)."""
    from airflow_amlrun.operators.script_run import triggerer_shares_this_machine as check

    return check(proc)


def test_without_a_triggerer_of_this_airflow_nothing_is_deferred_here():
    found = triggerer_shares_this_machine()
    assert found is not None
    assert found == "no triggerer runs on this machine" or found.startswith("the triggerer seen here belongs")


@pytest.mark.parametrize(
    "argv",
    [
        ["bash", "-c", TITLE],  # retitled as Airflow retitles its processes
        # An interpreter running Airflow's entry point: `python /opt/venv/bin/airflow triggerer`.
        [sys.executable, "-c", "import time; time.sleep(60)", "/opt/venv/bin/airflow", "triggerer"],
    ],
)
def test_a_triggerer_of_this_airflow_in_this_namespace_is_found_and_its_end_noticed(argv):
    with process(*argv):
        assert triggerer_shares_this_machine() is None
    time.sleep(0.1)
    assert triggerer_shares_this_machine() is not None


def test_a_triggerer_of_another_airflow_does_not_count(tmp_path):
    with process("bash", "-c", TITLE, airflow_home=str(tmp_path)):
        found = triggerer_shares_this_machine()
    assert found is not None and f"another Airflow (AIRFLOW_HOME {tmp_path})" in found


def test_a_triggerer_in_another_mount_namespace_does_not_count():
    with process("unshare", "--mount", "bash", "-c", TITLE):
        found = triggerer_shares_this_machine()
    assert found is not None and "another process or mount namespace (a container)" in found


def named(title: str, *args: str) -> list[str]:
    """A process whose command line reads `title args...` (a Python that sleeps, renamed)."""
    return [
        "bash",
        "-c",
        f'exec -a {title} {sys.executable} -c "import time; time.sleep(60)" "$@"',
        "_",
        *args,
    ]


@pytest.mark.parametrize(
    "argv",
    [
        named("tail", "-f", "/var/log/airflow-triggerer.log"),
        named("journalctl", "-fu", "airflow-triggerer"),
        named("vim", "airflow_triggerer_notes.md"),
        named("systemctl", "restart", "airflow-triggerer"),
    ],
)
def test_processes_that_only_mention_a_triggerer_do_not_count(argv):
    with process(*argv) as pid:
        assert _alive(pid)  # the test would pass with a process that died at once
        assert triggerer_shares_this_machine() is not None


def test_a_machine_whose_processes_cannot_be_read_defers_nothing(tmp_path):
    found = triggerer_shares_this_machine(proc=str(tmp_path / "no-proc"))
    assert found is not None and found.startswith("this machine's processes cannot be looked at")


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return "\nState:\tZ" not in status and "\nState:\tX" not in status
