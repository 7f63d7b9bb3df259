"""Settings of the `[amlrun]` section of Airflow's configuration, with the defaults a user wants."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SECTION = "amlrun"

# name -> (default, description); get_provider_info publishes the same table as the config section.
OPTIONS: dict[str, tuple[str, str]] = {
    "workspace_conn_id": (
        "amlrun_default",
        "Connection (type amlrun) naming the run-history database and the store. When it does not "
        "exist, the embedded workspace under $AIRFLOW_HOME/amlrun is used.",
    ),
    "home": (
        "",
        "Folder of the embedded workspace (history.db and store/). Empty means $AIRFLOW_HOME/amlrun.",
    ),
    "local_runs_dir": (
        "",
        "Folder in which the local target makes run directories. Empty means <home>/runs.",
    ),
    "cleanup": (
        "on_success",
        "When to delete a run directory after its outputs are collected: never, on_success or always.",
    ),
    "snapshot_max_size_mb": ("300", "Largest total size of a code snapshot, in MB."),
    "snapshot_max_files": ("2000", "Largest number of files in a code snapshot."),
    "poll_interval_seconds": ("0.1", "How often a waiting task polls its run for status, log and metrics."),
    "docker_default_image": (
        "amlrun-base:py3.11",
        "Image of a Docker run whose environment names none (a user-managed environment without docker.base_image).",
    ),
    "docker_default_image_base": (
        "python:3.11-slim",
        "Public Python image from which a Docker daemon that lacks the default image (an amlrun-base image) "
        "builds it on first use, pulling it if needed. Empty: never build it.",
    ),
    "reconcile_after_seconds": (
        "600",
        "A run whose task has not reported on it for this long (its worker died, and no retry re-attached) "
        "is settled by `amlrun reconcile`, which every task also runs when it starts: recorded as it ended "
        "on its target, or stopped and recorded Failed once past its max_run_duration_seconds.",
    ),
}

CLEANUP_CHOICES = ("never", "on_success", "always")


def _option(name: str) -> str:
    value = os.environ.get(f"AIRFLOW__{SECTION.upper()}__{name.upper()}")
    if value is not None:
        return value
    try:
        from airflow.configuration import conf
    except ImportError:  # pragma: no cover - airflow is a dependency; kept for stripped-down images
        return OPTIONS[name][0]
    return str(conf.get(SECTION, name, fallback=OPTIONS[name][0]))


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow").expanduser()


@dataclass(frozen=True)
class Settings:
    """The `[amlrun]` options, read once and typed."""

    workspace_conn_id: str
    home: Path
    local_runs_dir: Path
    cleanup: str
    snapshot_max_bytes: int
    snapshot_max_files: int
    poll_interval_seconds: float
    docker_default_image: str
    docker_default_image_base: str
    reconcile_after_seconds: float


def load_settings() -> Settings:
    home = Path(_option("home") or airflow_home() / "amlrun").expanduser()
    cleanup = _option("cleanup")
    if cleanup not in CLEANUP_CHOICES:
        from airflow_amlrun.errors import ConfigurationError

        raise ConfigurationError(
            f"[amlrun] cleanup = {cleanup!r} is not one of {', '.join(CLEANUP_CHOICES)}; "
            "set it in airflow.cfg or AIRFLOW__AMLRUN__CLEANUP."
        )
    reconcile_after = float(_option("reconcile_after_seconds"))
    if not reconcile_after > 0:
        from airflow_amlrun.errors import ConfigurationError

        raise ConfigurationError(
            f"[amlrun] reconcile_after_seconds = {reconcile_after:g} must be more than 0 seconds; set it in "
            "airflow.cfg or AIRFLOW__AMLRUN__RECONCILE_AFTER_SECONDS (default 600)."
        )
    return Settings(
        workspace_conn_id=_option("workspace_conn_id"),
        home=home,
        local_runs_dir=Path(_option("local_runs_dir") or home / "runs").expanduser(),
        cleanup=cleanup,
        snapshot_max_bytes=int(float(_option("snapshot_max_size_mb")) * 1_000_000),
        snapshot_max_files=int(_option("snapshot_max_files")),
        poll_interval_seconds=float(_option("poll_interval_seconds")),
        docker_default_image=_option("docker_default_image") or OPTIONS["docker_default_image"][0],
        docker_default_image_base=_option("docker_default_image_base"),
        reconcile_after_seconds=reconcile_after,
    )


def parse_flag(value: object, where: str) -> bool:
    """A yes/no setting as users write it (true/false, yes/no, on/off, 1/0, empty for no)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    from airflow_amlrun.errors import ConfigurationError

    raise ConfigurationError(f"{where} = {value!r} is not a boolean; write true or false.")
