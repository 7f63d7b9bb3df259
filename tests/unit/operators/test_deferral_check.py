"""Whether a triggerer shares this machine: looked up among this machine's processes.

A real triggerer is in tests/integration/test_deferrable.py; here processes only named like one. What the
answer is beforehand depends on the machine (a developer may run Airflow beside the suite): each test
compares with it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from airflow_amlrun.operators.script_run import triggerer_shares_this_machine

ANOTHER_FILESYSTEM = "the triggerer seen here runs in another filesystem (a container)"


@contextmanager
def named_triggerer(*prefix: str) -> Iterator[None]:
    # `exec -a` names the process as Airflow's triggerer names itself on its command line.
    process = subprocess.Popen([*prefix, "bash", "-c", 'exec -a "airflow triggerer" sleep 60'])
    try:
        time.sleep(0.3)
        yield
    finally:
        process.kill()
        process.wait()


def settled(expected: str | None) -> str | None:
    found = triggerer_shares_this_machine()
    for _ in range(50):
        if found == expected:
            break
        time.sleep(0.1)
        found = triggerer_shares_this_machine()
    return found


def test_a_triggerer_process_in_this_filesystem_is_found_and_its_end_noticed():
    before = triggerer_shares_this_machine()
    assert before in (None, "no triggerer runs on this machine", ANOTHER_FILESYSTEM)

    with named_triggerer():
        assert settled(None) is None

    assert settled(before) == before


def test_a_triggerer_in_another_mount_namespace_does_not_count():
    before = triggerer_shares_this_machine()

    with named_triggerer("unshare", "--mount"):
        expected = None if before is None else ANOTHER_FILESYSTEM
        assert settled(expected) == expected
