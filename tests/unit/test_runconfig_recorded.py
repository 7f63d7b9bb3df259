"""What a run records of its config is enough to submit it again: every field but the secrets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from airflow_amlrun.environment import Environment, ResolvedEnvironment
from airflow_amlrun.rerun import SECRET_NAMES, recorded_config
from airflow_amlrun.runconfig import ScriptRunConfig


def test_every_field_but_the_secrets_survives_the_recorded_config(tmp_path: Path) -> None:
    values = {
        "source_directory": str(tmp_path),
        "script": "train.py",
        "arguments": ["--alpha", "0.5"],
        "compute_target": "docker",
        "environment": "curated:3",
        "max_run_duration_seconds": 90.0,
        "environment_variables": {"MODE": "full"},
        "snapshot_max_size_mb": 12.5,
        "snapshot_max_files": 300,
        "framework": "pyspark",
    }
    config = ScriptRunConfig(**values, secret_environment_variables={"TOKEN": "value"})  # type: ignore[arg-type]
    resolved = ResolvedEnvironment(
        spec=Environment(name="curated"),
        name="curated",
        version="3",
        lock=None,
        build_key=None,
        user_managed=True,
    )
    recorded = recorded_config(config, resolved)
    assert recorded.pop(SECRET_NAMES) == ["TOKEN"]
    again = ScriptRunConfig.from_dict(recorded)
    # A field added to ScriptRunConfig without a place in its dict form would be lost by every re-run.
    for field in dataclasses.fields(ScriptRunConfig):
        if field.name == "secret_environment_variables":
            assert getattr(again, field.name) == {}
            continue
        if field.name == "command":  # exclusive with script: its own config below
            continue
        assert field.name in values, f"the test does not cover the field {field.name!r}"
        assert getattr(again, field.name) == values[field.name], field.name


def test_a_command_survives_the_recorded_config(tmp_path: Path) -> None:
    config = ScriptRunConfig(str(tmp_path), command=["python", "-c", "print(1)"])
    resolved = ResolvedEnvironment(
        spec=Environment(),
        name="amlrun-user-managed",
        version=None,
        lock=None,
        build_key=None,
        user_managed=True,
    )
    assert ScriptRunConfig.from_dict(recorded_config(config, resolved)).command == [
        "python",
        "-c",
        "print(1)",
    ]
