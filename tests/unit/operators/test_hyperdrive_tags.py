"""HyperDriveOperator checks its sweep's tags as ScriptRunOperator checks a run's: when the DAG is parsed, where they
are known then."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.hyperdrive import HyperDriveConfig, RandomParameterSampling, uniform
from airflow_amlrun.runconfig import ScriptRunConfig


def config(tmp_path: Path) -> HyperDriveConfig:
    return HyperDriveConfig(
        ScriptRunConfig(tmp_path, script="train.py"),
        RandomParameterSampling({"--alpha": uniform(0, 1)}),
        "loss",
        "minimize",
        4,
    )


def test_a_tag_in_the_providers_own_names_is_refused_when_the_dag_is_parsed(tmp_path: Path) -> None:
    # Imported here, not when the module is collected: see AIRFLOW_TESTS in tests/unit/conftest.py.
    from airflow_amlrun.operators.hyperdrive import HyperDriveOperator

    with pytest.raises(
        ConfigurationError,
        match=r"HyperDriveOperator 'tune': tags has the name 'amlrun\.settled_by', which starts with 'amlrun\.'",
    ):
        HyperDriveOperator(task_id="tune", config=config(tmp_path), tags={"amlrun.settled_by": "reconcile"})
    # A templated value is checked once rendered, as the task runs.
    HyperDriveOperator(task_id="tune", config=config(tmp_path), tags={"team": "{{ params.team }}"})
