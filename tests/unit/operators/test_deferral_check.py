"""Whether a triggerer shares this machine: looked up among this machine's processes.

The real triggerer case is in tests/integration/test_deferrable.py; here a process only named like one.
"""

from __future__ import annotations

import subprocess
import time

from airflow_amlrun.operators.script_run import triggerer_shares_this_machine


def test_without_a_triggerer_process_the_answer_says_so():
    assert triggerer_shares_this_machine() == "no triggerer runs on this machine"


def test_a_process_running_airflow_triggerer_here_is_found():
    # `exec -a` names the process as `airflow triggerer` would be on its command line.
    process = subprocess.Popen(["bash", "-c", "exec -a airflow sleep 30 triggerer"])
    try:
        for _ in range(100):
            found = triggerer_shares_this_machine()
            if found is None:
                break
            time.sleep(0.05)
        assert found is None
    finally:
        process.kill()
        process.wait()
    assert triggerer_shares_this_machine() is not None
