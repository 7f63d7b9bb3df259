"""Locking: an environment's requirements resolved once into exact versions and hashes, with uv.

The lock is a universal requirements file (``uv pip compile --universal --generate-hashes``): one text,
with environment markers where versions differ, that installs on every platform and every Python from the
environment's version up. That is what lets the same stored lock serve the local virtualenv, a Docker
image and a Spark archive, each installing it with ``uv pip sync`` or ``pip install --require-hashes -r``.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_amlrun.environment.credentials import credential_values, hide
from airflow_amlrun.environment.errors import LockResolutionError
from airflow_amlrun.errors import ConfigurationError

if TYPE_CHECKING:
    from airflow_amlrun.environment.spec import Environment

_HEADER = "# Locked by airflow-amlrun with {resolver}: universal, Python >= {python}."
_HEADER_PATTERN = re.compile(r"^# Locked by airflow-amlrun with .*Python >= (\d+\.\d+)\.", re.MULTILINE)
_PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", re.MULTILINE)
# A line of a lock that installs something: neither a comment, an option, nor a continuation (--hash, # via).
_REQUIREMENT_LINE = re.compile(r"^[A-Za-z0-9]", re.MULTILINE)
RESOLVE_TIMEOUT_SECONDS = 900
# uv reads pyproject.toml and uv.toml from its working directory and the folders above it; whatever
# project the worker happens to run in is not the environment's, so uv runs from the root.
NEUTRAL_CWD = os.path.abspath(os.sep)


@functools.cache
def uv_bin() -> str:
    """Path of the uv binary shipped by the ``uv`` package."""
    from uv import find_uv_bin

    return str(find_uv_bin())


@functools.cache
def uv_version() -> str:
    """``uv 0.x.y``: recorded in each lock's header, so a lock says what resolved it."""
    from importlib.metadata import version

    return f"uv {version('uv')}"


def default_uv_cache(cache_dir: str | os.PathLike[str]) -> Path:
    """uv's package cache: ``$UV_CACHE_DIR`` when the deployment sets one, else beside the builds, so uv can
    hardlink files into them (same file system) instead of copying."""
    return Path(os.environ.get("UV_CACHE_DIR") or Path(cache_dir) / "uv").absolute()


def uv_environment(uv_cache_dir: Path, credentials: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment for uv: its cache, no downloads of Python builds (no network for them), and
    the variables the index URLs refer to.

    :param uv_cache_dir: uv's cache.
    :param credentials: values of the ``${VAR}`` references in index URLs (from ``index_credentials``).
        They reach uv only through its environment, which other users cannot read, never through its
        command line (``/proc/<pid>/cmdline`` is readable by everyone on the machine).
    """
    env = dict(os.environ)
    env.update(credentials or {})
    env.update(
        {
            "UV_CACHE_DIR": str(uv_cache_dir),
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_NO_PROGRESS": "1",
        }
    )
    # A virtualenv active in the worker must not become the target of uv commands.
    env.pop("VIRTUAL_ENV", None)
    env.pop("CONDA_PREFIX", None)
    return env


def local_python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def interpreter_version(interpreter: str) -> str:
    """``"3.11"`` of an interpreter, by asking it (only when locking; building and resolving never do)."""
    try:
        out = subprocess.run(
            [interpreter, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        raise ConfigurationError(
            f"python.interpreter_path {interpreter!r} could not be run ({err}). Point it at a Python "
            "interpreter on the worker, or set python.version instead."
        ) from None
    return out


def lock_python_floor(spec: Environment) -> str:
    """The lowest Python a lock serves: the spec's version, else its interpreter's, else the worker's."""
    if spec.python.version:
        return spec.python.version
    if spec.python.interpreter_path:
        return interpreter_version(spec.local_interpreter())
    return local_python_version()


def lock_python_version(lock: str) -> str | None:
    """The Python version a lock was resolved from, as its header records it."""
    found = _HEADER_PATTERN.search(lock)
    return found.group(1) if found else None


def locked_versions(lock: str) -> dict[str, list[str]]:
    """Each package of a lock with the version(s) it pins (more than one where markers fork by platform)."""
    pins: dict[str, list[str]] = {}
    for name, version in _PINNED.findall(lock):
        versions = pins.setdefault(_normalize(name), [])
        if version not in versions:
            versions.append(version)
    return pins


def has_requirements(lock: str) -> bool:
    """Whether a lock installs anything: a pinned ``name==version`` or a direct-URL ``name @ url`` line."""
    return _REQUIREMENT_LINE.search(lock) is not None


def index_credentials(spec: Environment, *, what: str) -> dict[str, str]:
    """The values of the variables the environment's index URLs and direct-URL requirements refer to, from
    this process's environment.

    :param spec: the environment.
    :param what: what needs them, for the message of a missing one (``"Resolving environment 'x'"``).
    :raises ConfigurationError: a referenced variable is not set; naming it and where to set it.
    """
    return credential_values(spec.python.credential_variables(), what=what)


def resolve_lock(spec: Environment, *, uv_cache_dir: Path) -> str | None:
    """Resolve a managed environment's requirements into a lock; None for a user-managed environment.

    :param spec: the environment.
    :param uv_cache_dir: uv's cache (package metadata and wheels), shared with builds.
    """
    if spec.user_managed:
        return None
    python = lock_python_floor(spec)
    lines = [_HEADER.format(resolver=uv_version(), python=python)]
    lines.append("# Install with `uv pip sync --require-hashes` or `pip install --require-hashes -r`.")
    # Index options go into the lock itself so that pip and uv installing it look where the resolver did.
    # They keep their ${VAR} references: the installer expands them from its own environment.
    index_options = spec.python.index_options()
    lines += index_options
    if not spec.python.pip_requirements:
        return "\n".join(lines) + "\n"
    credentials = index_credentials(spec, what=f"Resolving environment {spec.name!r}")
    command = [
        uv_bin(),
        "pip",
        "compile",
        "-",
        "--universal",
        "--generate-hashes",
        "--python-version",
        python,
        "--no-header",
        "--quiet",
    ]
    uv_cache_dir = uv_cache_dir.absolute()
    uv_cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(
            command,
            # The index options travel in the input, like in the lock, and uv expands their ${VAR}s.
            input="\n".join([*index_options, *spec.python.pip_requirements]) + "\n",
            capture_output=True,
            text=True,
            cwd=NEUTRAL_CWD,
            env=uv_environment(uv_cache_dir, credentials),
            timeout=RESOLVE_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise LockResolutionError(
            f"Environment {spec.name!r}: resolving {', '.join(spec.python.pip_requirements)} took longer "
            f"than {RESOLVE_TIMEOUT_SECONDS} s. Check that the package index is reachable, then register "
            "again.",
            requirements=spec.python.pip_requirements,
            resolver_output="",
        ) from None
    if result.returncode != 0:
        # uv hides a URL's password when it shows the URL, but not a token in its query.
        output = hide((result.stderr or result.stdout).strip(), credentials.values())
        named = _requirements_named_in(spec.python.pip_requirements, output)
        raise LockResolutionError(
            f"Environment {spec.name!r}: the requirement(s) {', '.join(map(repr, named))} cannot be resolved "
            f"for Python >= {python}. The resolver says:\n{output}\n"
            "Fix the name or relax the version constraint, check that the package index has it, then "
            "register the environment again.",
            requirements=named,
            resolver_output=output,
        )
    return "\n".join(lines) + "\n" + result.stdout.lstrip("\n")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements_named_in(requirements: list[str], output: str) -> list[str]:
    from packaging.requirements import Requirement

    text = _normalize(output)
    named = [
        r
        for r in requirements
        if re.search(rf"(?<![a-z0-9-]){re.escape(_normalize(Requirement(r).name))}(?![a-z0-9])", text)
    ]
    return named or list(requirements)
