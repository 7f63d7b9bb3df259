"""The [amlrun] settings, as two fresh processes read them: a plain script that never loads Airflow and one that
does (a task). How each source is read, and what is refused, is in tests/unit/test_config_sources.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SHOW_SETTINGS = """
import json, sys
{preamble}
from airflow_amlrun.config import load_settings
from airflow_amlrun.workspace import Workspace
s = load_settings()
ws = Workspace.get()
print(json.dumps({{"home": str(s.home), "files": s.snapshot_max_files, "cleanup": s.cleanup,
    "poll": s.poll_interval_seconds, "workspace": ws.name, "store": ws.store_url,
    "airflow_loaded": "airflow" in sys.modules}}))
"""


def test_a_plain_script_and_an_airflow_process_read_the_same_settings(tmp_path: Path) -> None:
    airflow_home = tmp_path / "airflow"
    airflow_home.mkdir()
    (airflow_home / "airflow.cfg").write_text(
        textwrap.dedent(
            f"""
            [core]
            load_examples = False
            [amlrun]
            home = {airflow_home / "ws"}
            snapshot_max_files = 33
            """
        )
    )
    # Only this AIRFLOW_HOME's airflow.cfg and the two variables below: none of what this process was given.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(
            (
                "AIRFLOW__AMLRUN__",
                "AIRFLOW__SECRETS__",
                "AIRFLOW__WORKERS__",
                "AIRFLOW_CONN_",
                "AIRFLOW_CONFIG",
            )
        )
    }
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__AMLRUN__CLEANUP": "always",
            "AIRFLOW__AMLRUN__POLL_INTERVAL_SECONDS": "0.5",
        }
    )

    def start(preamble: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", SHOW_SETTINGS.format(preamble=preamble)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def shown(process: subprocess.Popen[str]) -> dict[str, object]:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        return dict(json.loads(out.strip().splitlines()[-1]))

    # Both at once: the one that loads Airflow takes seconds.
    plain_process, inside_process = start(""), start("import airflow.configuration")
    try:
        plain, inside = shown(plain_process), shown(inside_process)
    finally:
        for process in (plain_process, inside_process):  # the other one, when one failed
            process.kill()
            process.wait()
    assert plain.pop("airflow_loaded") is False
    assert inside.pop("airflow_loaded") is True
    assert (
        plain
        == inside
        == {
            "home": str(airflow_home / "ws"),
            "files": 33,
            "cleanup": "always",
            "poll": 0.5,
            "workspace": "embedded",
            "store": str(airflow_home / "ws" / "store"),
        }
    )
