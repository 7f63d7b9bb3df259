"""The one place that turns a compute_target name into a target."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from airflow_amlrun.config import Settings
from airflow_amlrun.errors import UnknownComputeTargetError
from airflow_amlrun.targets.base import ComputeTarget
from airflow_amlrun.targets.local import LocalTarget

BUILT_IN = ("local", "docker")

# Airflow connection type -> the target class for it ("module:Class"), imported only when used. Each class
# offers `from_connection(name, conn, settings, cache_dir)`; `conn` is None for the built-in "docker".
CONNECTION_KINDS: dict[str, str] = {
    "amlrun_docker": "airflow_amlrun.targets.docker:DockerTarget",
    "ssh": "airflow_amlrun.targets.ssh:SSHTarget",
    "spark": "airflow_amlrun.targets.spark:SparkTarget",
}


def resolve_target(name: str, settings: Settings, cache_dir: Path) -> ComputeTarget[Any]:
    """`"local"`, `"docker"` (the local Docker daemon), or the id of an Airflow connection of a target kind.

    :param cache_dir: the workspace's cache folder, where a target keeps what it builds (environments).
    """
    if name == "local":
        return LocalTarget(settings, cache_dir)
    if name == "docker":
        return _target_class("amlrun_docker").from_connection(name, None, settings, cache_dir)  # type: ignore[no-any-return]
    conn = _connection(name)
    if conn is None:
        raise UnknownComputeTargetError(
            f"Unknown compute target {name!r}: it is not one of {', '.join(map(repr, BUILT_IN))} and no Airflow "
            f"connection has that id. Use compute_target='local', or create the connection {name!r} "
            f"(of type {' or '.join(map(repr, CONNECTION_KINDS))}) and name it here."
        )
    if conn.conn_type not in CONNECTION_KINDS:
        raise UnknownComputeTargetError(
            f"Compute target {name!r} is an Airflow connection of type {conn.conn_type!r}, which is not a compute "
            f"target kind; use a connection of type {' or '.join(map(repr, CONNECTION_KINDS))}, or "
            "compute_target='local'."
        )
    return _target_class(conn.conn_type).from_connection(name, conn, settings, cache_dir)  # type: ignore[no-any-return]


def _target_class(conn_type: str) -> Any:
    module, _, cls = CONNECTION_KINDS[conn_type].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as err:
        raise UnknownComputeTargetError(
            f"Compute targets of kind {conn_type!r} need {err.name!r}, which is not installed; install "
            "airflow-amlrun with the matching extra (e.g. pip install 'airflow-amlrun[docker]')."
        ) from err


def _connection(conn_id: str) -> Any:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
