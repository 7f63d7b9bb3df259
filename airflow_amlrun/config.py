"""Settings of the `[amlrun]` section of Airflow's configuration, with the defaults a user wants.

Inside Airflow (a task, ``dag.test``, a scheduler: any process that has loaded Airflow) the options are read
through Airflow's configuration, with everything it supports. A plain Python process that has not loaded
Airflow reads the same two sources Airflow would, ``AIRFLOW__AMLRUN__*`` variables and the ``[amlrun]``
section of ``airflow.cfg``, itself: importing Airflow boots its settings, logging and secrets masker, about a
second of CPU that a script submitting one run should not pay, and that masks nothing outside a task.
"""

from __future__ import annotations

import configparser
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from airflow_amlrun.errors import ConfigurationError

SECTION = "amlrun"

OptionType = Literal["string", "integer", "float", "boolean"]


@dataclass(frozen=True)
class Option:
    """One `[amlrun]` option: its default as written in airflow.cfg, its type, and what it is for."""

    default: str
    type: OptionType
    description: str


# get_provider_info publishes this same table as the provider's config section.
OPTIONS: dict[str, Option] = {
    "workspace_conn_id": Option(
        "amlrun_default",
        "string",
        "Connection (type amlrun) naming the run-history database and the store. When it does not "
        "exist, the embedded workspace under $AIRFLOW_HOME/amlrun is used.",
    ),
    "home": Option(
        "",
        "string",
        "Folder of the embedded workspace (history.db and store/). Empty means $AIRFLOW_HOME/amlrun.",
    ),
    "local_runs_dir": Option(
        "",
        "string",
        "Folder in which the local target makes run directories. Empty means <home>/runs.",
    ),
    "cleanup": Option(
        "on_success",
        "string",
        "When to delete a run directory after its outputs are collected: never, on_success or always.",
    ),
    "snapshot_max_size_mb": Option("300", "float", "Largest total size of a code snapshot, in MB."),
    "snapshot_max_files": Option("2000", "integer", "Largest number of files in a code snapshot."),
    "poll_interval_seconds": Option(
        "0.1", "float", "How often a waiting task polls its run for status, log and metrics."
    ),
    "docker_default_image": Option(
        "amlrun-base:py3.11",
        "string",
        "Image of a Docker run whose environment names none (a user-managed environment without docker.base_image).",
    ),
    "docker_default_image_base": Option(
        "python:3.11-slim",
        "string",
        "Public Python image from which a Docker daemon that lacks the default image (an amlrun-base image) "
        "builds it on first use, pulling it if needed. Empty: never build it.",
    ),
    "reconcile_after_seconds": Option(
        "600",
        "float",
        "A run whose task has not reported on it for this long (its worker died, and no retry re-attached) "
        "is settled by `amlrun reconcile`, which every task also runs when it starts: recorded as it ended "
        "on its target, or stopped and recorded Failed once past its max_run_duration_seconds.",
    ),
}

CLEANUP_CHOICES = ("never", "on_success", "always")


def airflow_loaded() -> bool:
    """Whether this process has loaded Airflow (a task, ``dag.test``, a scheduler, a script that imported
    it): Airflow's own configuration and connections are then asked, as it has paid for them already."""
    return "airflow.configuration" in sys.modules


def _env_name(section: str, key: str) -> str:
    return f"AIRFLOW__{section.upper()}__{key.upper()}"


def _expand(value: str) -> str:
    # As Airflow does for a value from the environment or airflow.cfg: $VARS and ~, until nothing changes.
    while True:
        expanded = os.path.expanduser(os.path.expandvars(value))
        if expanded == value:
            return expanded
        value = expanded


def airflow_config_file() -> Path:
    """The airflow.cfg Airflow reads: ``$AIRFLOW_CONFIG``, else ``$AIRFLOW_HOME/airflow.cfg``."""
    named = os.environ.get("AIRFLOW_CONFIG")
    return Path(_expand(named)) if named is not None else Path(airflow_home()) / "airflow.cfg"


def _unreadable_config(path: Path, err: Exception) -> Exception:
    return ConfigurationError(
        f"Cannot read the Airflow configuration {path} for its [amlrun] settings: {err}. Airflow refuses such a "
        "file too: fix it, or point AIRFLOW_CONFIG (or AIRFLOW_HOME) at the airflow.cfg the tasks use."
    )


@functools.lru_cache(maxsize=1)
def _parsed_config_file(path: Path, mtime_ns: int, size: int) -> configparser.ConfigParser:
    # Keyed by the file's time and size, so an edited airflow.cfg is read again.
    parser = configparser.ConfigParser(strict=False)
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except (configparser.Error, OSError, UnicodeDecodeError) as err:
        # Taking the defaults instead would send this process's runs to another history than the tasks'.
        raise _unreadable_config(path, err) from None
    return parser


def _file_option(section: str, key: str) -> str | None:
    path = airflow_config_file()
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None  # no airflow.cfg yet: Airflow writes one with its defaults on first use
    except OSError as err:
        raise _unreadable_config(path, err) from None
    try:
        value = _parsed_config_file(path, stat.st_mtime_ns, stat.st_size).get(section, key, fallback=None)
    except configparser.Error as err:  # an interpolation that does not resolve
        raise _unreadable_config(path, err) from None
    return None if value is None else _expand(value)


def _option(name: str) -> str:
    default = OPTIONS[name].default
    value = os.environ.get(_env_name(SECTION, name))
    if value is not None:
        return value
    if airflow_loaded():
        from airflow.configuration import conf

        return str(conf.get(SECTION, name, fallback=default))
    value = _file_option(SECTION, name)
    return default if value is None else value


def _typed(name: str) -> float:
    text = _option(name)
    kind = OPTIONS[name].type
    try:
        return int(text) if kind == "integer" else float(text)
    except ValueError:
        raise ConfigurationError(
            f"[amlrun] {name} = {text!r} is not {'an integer' if kind == 'integer' else 'a number'}; set it "
            f"in airflow.cfg or {_env_name(SECTION, name)} (default {OPTIONS[name].default})."
        ) from None


def connection_may_be_defined(conn_id: str) -> bool:
    """Whether asking Airflow for a connection could find one, in a process that has not loaded Airflow.

    Outside a task, Airflow looks a connection up in an ``AIRFLOW_CONN_<ID>`` variable and in a secrets
    backend configured in ``[workers] secrets_backend`` or ``[secrets] backend`` (the metadata database is
    asked only by Airflow's servers). When none of these can hold it, the answer is known to be no.
    """
    if airflow_loaded() or os.environ.get("_AIRFLOW_PROCESS_CONTEXT") == "server":
        return True
    if f"AIRFLOW_CONN_{conn_id.upper()}" in os.environ:
        return True
    for section, key in (("workers", "secrets_backend"), ("secrets", "backend")):
        variable = _env_name(section, key)
        if any(os.environ.get(variable + suffix) for suffix in ("", "_CMD", "_SECRET")):
            return True
        if _file_option(section, key):
            return True
    return False


def airflow_connection(conn_id: str) -> tuple[str | None, dict[str, Any]] | None:
    """The type and extras of the Airflow connection with this id; None when there is none.

    Airflow is loaded only when the connection may exist (``connection_may_be_defined``).
    """
    if not connection_may_be_defined(conn_id):
        return None
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    return conn.conn_type, conn.extra_dejson


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
        raise ConfigurationError(
            f"[amlrun] cleanup = {cleanup!r} is not one of {', '.join(CLEANUP_CHOICES)}; "
            "set it in airflow.cfg or AIRFLOW__AMLRUN__CLEANUP."
        )
    reconcile_after = _typed("reconcile_after_seconds")
    if not reconcile_after > 0:
        raise ConfigurationError(
            f"[amlrun] reconcile_after_seconds = {reconcile_after:g} must be more than 0 seconds; set it in "
            "airflow.cfg or AIRFLOW__AMLRUN__RECONCILE_AFTER_SECONDS (default 600)."
        )
    return Settings(
        workspace_conn_id=_option("workspace_conn_id"),
        home=home,
        local_runs_dir=Path(_option("local_runs_dir") or home / "runs").expanduser(),
        cleanup=cleanup,
        snapshot_max_bytes=int(_typed("snapshot_max_size_mb") * 1_000_000),
        snapshot_max_files=int(_typed("snapshot_max_files")),
        poll_interval_seconds=_typed("poll_interval_seconds"),
        docker_default_image=_option("docker_default_image") or OPTIONS["docker_default_image"].default,
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
    raise ConfigurationError(f"{where} = {value!r} is not a boolean; write true or false.")


# What a name must contain for its value to be taken for a secret: an option, an extra, a URL's query key.
SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token", "key", "credential")


def secret_name(name: str) -> bool:
    """Whether a value under this name (a storage option, a URL's query key such as ``?password=``) is a secret."""
    return any(word in name.lower() for word in SECRET_WORDS)


def url_secrets(url: str) -> list[str]:
    """The secrets a URL carries, as written and decoded: its password (everything between the scheme's ``//``
    and the last ``@`` after the first ``:``) and the values of its query keys that name a secret."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    found = [password, unquote(password)] if password else []
    for key, value in parse_qsl(parts.query, keep_blank_values=False):
        if secret_name(key):
            found.append(value)
    raw_query = [pair.partition("=") for pair in parts.query.split("&")]
    found += [value for key, _, value in raw_query if value and secret_name(unquote(key))]
    return sorted(set(found), key=lambda secret: (-len(secret), secret))
