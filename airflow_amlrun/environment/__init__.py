"""Environments: the interpreter and packages a run executes with, versioned, locked and cached."""

from airflow_amlrun.environment.errors import (
    EnvironmentBuildError,
    EnvironmentNotFoundError,
    LockResolutionError,
)
from airflow_amlrun.environment.resolve import ResolvedEnvironment, ensure_local_python, resolve_environment
from airflow_amlrun.environment.sections import DockerSection, PythonSection, SparkSection
from airflow_amlrun.environment.spec import Environment

__all__ = [
    "DockerSection",
    "Environment",
    "EnvironmentBuildError",
    "EnvironmentNotFoundError",
    "LockResolutionError",
    "PythonSection",
    "ResolvedEnvironment",
    "SparkSection",
    "ensure_local_python",
    "resolve_environment",
]
