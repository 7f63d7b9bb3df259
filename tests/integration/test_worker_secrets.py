"""A run on the worker's machine does not inherit the worker's secrets: Airflow's connections and variables and
the settings that hold a secret stay out of the script's environment (whatever it prints lands in its log, which
the history stores); the rest of the worker's environment reaches it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.targets.common import worker_environment
from tests.conftest import write_script

SECRETS = {
    "AIRFLOW_CONN_WAREHOUSE": "postgresql://etl:hunter2@db/warehouse",
    "AIRFLOW_VAR_API_TOKEN": "tok-123",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:pw@db/airflow",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD": "cat /run/secrets/db",
    "AIRFLOW__CORE__FERNET_KEY": "fernet",
    "AIRFLOW__API__SECRET_KEY": "signing",
    "AIRFLOW__API_AUTH__JWT_SECRET": "jwt",
    "AIRFLOW__CELERY__BROKER_URL": "redis://:pw@redis:6379/0",
    "AIRFLOW__CELERY__RESULT_BACKEND_SECRET": "backend",
    "AIRFLOW__SMTP__SMTP_PASSWORD": "mail",
}
KEPT = {"AIRFLOW__CORE__DAGS_FOLDER": "/dags", "TEAM_SETTING": "kept"}

SCRIPT = """\
import json, os
os.makedirs("outputs", exist_ok=True)
with open("outputs/env.json", "w") as f:
    json.dump(sorted(os.environ), f)
print("\\n".join(f"{k}={v}" for k, v in sorted(os.environ.items())))
"""


def test_a_local_run_sees_none_of_the_workers_secrets(
    amlrun_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {**SECRETS, **KEPT}.items():
        monkeypatch.setenv(name, value)
    write_script(tmp_path / "src", "train.py", SCRIPT)
    run = Experiment(Workspace.get(), "worker_secrets").submit(
        ScriptRunConfig(tmp_path / "src", script="train.py")
    )
    lines: list[str] = []
    record = run.wait_for_completion(show_output=True, output=lines.append)
    assert str(record.status) == "Completed"
    run.download_file("outputs/env.json", str(tmp_path / "env.json"))
    seen = set(json.loads((tmp_path / "env.json").read_text()))
    assert not seen & set(SECRETS), seen & set(SECRETS)
    assert set(KEPT) <= seen
    log = "\n".join(lines)
    assert "TEAM_SETTING=kept" in log
    for value in SECRETS.values():
        assert value not in log


def test_only_secret_bearing_names_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**SECRETS, **KEPT}.items():
        monkeypatch.setenv(name, value)
    kept = worker_environment()
    assert not set(kept) & set(SECRETS)
    assert {k: kept[k] for k in KEPT} == KEPT
    assert "PATH" in kept
