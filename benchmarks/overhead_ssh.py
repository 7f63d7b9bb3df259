"""Overhead case for the SSH target (see overhead.py): ScriptRunOperator on an `ssh` connection beside the stock
SSHOperator running the same script, on the same host, in a directory prepared there once.

The host is sshd in a network namespace of its own (10.231.0.6 unless another session holds that subnet, user
`amlrun-bench-<pid>`), made here and removed by `teardown`; needs root. On teardown the blob bytes each amlrun run sent are printed to stderr as JSON:
after the warm-up run, unchanged code sends none.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.sshd_host import SshdHost, start_sshd_host

BASELINE = "SSHOperator running `python3 train.py <seconds>` in a directory prepared on the host"
CONN_ID = "overhead_ssh"

AMLRUN = """
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG("overhead_ssh_amlrun", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    ScriptRunOperator(
        task_id="train",
        experiment="overhead_ssh",
        config=ScriptRunConfig({source!r}, script="train.py", arguments=[{seconds!r}], compute_target={conn!r}),
    )
"""

BASELINE_DAG = """
import pendulum
from airflow.sdk import DAG
from airflow.providers.ssh.operators.ssh import SSHOperator

with DAG("overhead_ssh_baseline", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    SSHOperator(task_id="train", ssh_conn_id={conn!r}, command={command!r}, cmd_timeout=120)
"""

_host: SshdHost | None = None


def prepare(root: Path, source: Path, seconds: float) -> tuple[str, str]:
    from airflow_amlrun.targets.common import write_run_context_package

    global _host
    _host = start_sshd_host(user=f"amlrun-bench-{os.getpid()}", subnet=1, name="bench")
    host_key = " ".join((_host.workdir / "host_key.pub").read_text().split()[:2])
    # host_key rather than known_hosts: the stock SSHOperator's hook reads only that one.
    conn = json.loads(_host.connection(host_key=host_key))
    conn["extra"].pop("known_hosts")
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(conn)
    # The baseline's directory on the host: the script and the run_context it imports, copied once.
    prepared = _host.home / "baseline"
    prepared.mkdir(exist_ok=True)
    shutil.copyfile(source / "train.py", prepared / "train.py")
    write_run_context_package(prepared)
    shutil.chown(prepared, _host.user, _host.user)
    for path in prepared.rglob("*"):
        shutil.chown(path, _host.user, _host.user)
    return (
        AMLRUN.format(source=str(source), seconds=seconds, conn=CONN_ID),
        BASELINE_DAG.format(conn=CONN_ID, command=f"cd {prepared} && python3 train.py {seconds}"),
    )


def teardown() -> None:
    global _host
    try:
        from airflow_amlrun import Workspace

        runs: list[Any] = sorted(Workspace.get().list_runs(), key=lambda r: r.created_at)
        sent = [(r.handle or {}).get("blob_bytes_sent") for r in runs if r.target == CONN_ID]
        print(json.dumps({"target": "ssh", "blob_bytes_sent": sent}), file=sys.stderr, flush=True)
    finally:
        if _host is not None:
            _host.stop()
            _host = None
