"""airflow-amlrun: submit tracked, reproducible training runs to compute targets from Apache Airflow.

Importing the package is cheap: the public names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Workspace": "airflow_amlrun.workspace",
    "Experiment": "airflow_amlrun.experiment",
    "ScriptRunConfig": "airflow_amlrun.runconfig",
    "Environment": "airflow_amlrun.environment",
    "ScriptRunOperator": "airflow_amlrun.operators.script_run",
    "RunStatus": "airflow_amlrun.history",
    "Run": "airflow_amlrun.recorded_run",
    "Estimator": "airflow_amlrun.estimator",
    "SKLearn": "airflow_amlrun.estimator",
    "PyTorch": "airflow_amlrun.estimator",
    "TensorFlow": "airflow_amlrun.estimator",
}

__all__ = [
    "Environment",
    "Estimator",
    "Experiment",
    "PyTorch",
    "Run",
    "RunStatus",
    "SKLearn",
    "ScriptRunConfig",
    "ScriptRunOperator",
    "TensorFlow",
    "Workspace",
]

if TYPE_CHECKING:
    from airflow_amlrun.environment import Environment
    from airflow_amlrun.estimator import Estimator, PyTorch, SKLearn, TensorFlow
    from airflow_amlrun.experiment import Experiment
    from airflow_amlrun.history import RunStatus
    from airflow_amlrun.operators.script_run import ScriptRunOperator
    from airflow_amlrun.recorded_run import Run
    from airflow_amlrun.runconfig import ScriptRunConfig
    from airflow_amlrun.workspace import Workspace


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'airflow_amlrun' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
