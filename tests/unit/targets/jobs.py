"""A job as a target receives it, for the tests of what targets do with one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow_amlrun.environment import Environment, ResolvedEnvironment
from airflow_amlrun.targets.base import Job


def a_job(environment: Environment | None = None, **changes: Any) -> Job:
    """A job of `train.py` with no arguments or variables in a user-managed environment, with `changes`."""
    values: dict[str, Any] = {
        "run_id": "exp_1_cafe",
        "experiment": "exp",
        "source_directory": Path("."),
        "script": "train.py",
        "command": None,
        "arguments": [],
        "environment": ResolvedEnvironment(
            spec=environment or Environment(),
            name="e",
            version=None,
            lock=None,
            build_key=None,
            user_managed=True,
        ),
        "environment_variables": {},
        "max_run_duration_seconds": None,
    }
    values.update(changes)
    return Job(**values)
