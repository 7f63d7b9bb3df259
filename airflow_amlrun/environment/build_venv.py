"""Local builds: a virtualenv per build key, made once with uv from the lock, atomically, under a file lock.

How a build is made atomic: uv builds the virtualenv *relocatable* (``uv venv --relocatable``: activation
scripts and console-script launchers find their interpreter relative to themselves, and pyvenv.cfg names
only the base interpreter), in a temporary folder beside its final place; the lock is installed into it
with ``uv pip sync --require-hashes``; a record of the build is written last; then the folder is renamed
to ``<cache_dir>/envs/<build_key>``. A rename within one folder is atomic, so the key's folder either does
not exist or is complete: a build that dies half-way leaves only a ``.tmp-`` folder, which the next build
of that key removes. The installed packages are compiled to bytecode before the rename, each ``.pyc``
recording its file under the final path (``compileall -s <tmp> -p <final>``): every run imports them in a
fresh process, which should not compile them again, and may not be allowed to write ``__pycache__``. The
build key hashes the spec and lock only, never the folder's files, so bytecode changes no key. A file lock
per key makes two processes that need the same key build it once: the second waits, then finds the folder
there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from airflow_amlrun import progress
from airflow_amlrun.environment.credentials import hide
from airflow_amlrun.environment.errors import EnvironmentBuildError
from airflow_amlrun.environment.lock import (
    NEUTRAL_CWD,
    default_uv_cache,
    has_requirements,
    index_credentials,
    local_python_version,
    lock_python_version,
    uv_bin,
    uv_environment,
)
from airflow_amlrun.environment.spec import Environment
from airflow_amlrun.errors import ConfigurationError

log = logging.getLogger(__name__)

BUILD_RECORD = "amlrun-build.json"
BUILD_LOG = "builds.jsonl"
BUILD_TIMEOUT_SECONDS = 1800
_BIN = "Scripts" if os.name == "nt" else "bin"
_EXE = "python.exe" if os.name == "nt" else "python"


def local_platform() -> str:
    """This machine's platform as builds are keyed by it, e.g. ``cpython-linux-x86_64``."""
    return f"{sys.implementation.name}-{sysconfig.get_platform()}"


def python_tag(spec: Environment) -> str:
    """Which Python a local build of the spec uses, known without running anything: the requested
    version, else the requested interpreter, else the worker's version."""
    return spec.python.version or spec.python.interpreter_path or local_python_version()


def build_key(spec: Environment, lock: str | None, *, python: str, platform: str) -> str:
    """The hash naming a build of a spec: canonical spec (no name, no version) + lock + Python + platform.

    Two environments that differ only in name or version share their builds.

    :param spec: the environment.
    :param lock: its lock text.
    :param python: the Python the build runs (``"3.11"``, or an interpreter path).
    :param platform: the platform built for, e.g. ``cpython-linux-x86_64`` or ``linux/amd64``.
    """
    payload = json.dumps(
        {"spec": spec.canonical(), "lock": lock, "python": python, "platform": platform},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def local_build_key(spec: Environment, lock: str | None) -> str:
    """The build key of the spec's virtualenv on this machine."""
    return build_key(spec, lock, python=python_tag(spec), platform=local_platform())


def venv_dir(cache_dir: str | os.PathLike[str], key: str) -> Path:
    return Path(cache_dir) / "envs" / key


def venv_python(cache_dir: str | os.PathLike[str], key: str) -> str:
    """The interpreter of a build, whether or not it exists yet."""
    return os.path.join(cache_dir, "envs", key, _BIN, _EXE)


def build_venv(
    spec: Environment,
    lock: str,
    key: str,
    cache_dir: str | os.PathLike[str],
    *,
    uv_cache_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Make the virtualenv of a build key if it is not there yet; returns its interpreter.

    :param spec: the environment (managed).
    :param lock: its lock; every build of a version installs exactly this.
    :param key: the build key (``local_build_key``).
    :param cache_dir: the workspace's cache folder; builds go to ``<cache_dir>/envs/<key>``.
    :param uv_cache_dir: uv's package cache; defaults to ``$UV_CACHE_DIR`` or ``<cache_dir>/uv``.
    """
    from filelock import FileLock, Timeout

    python = venv_python(cache_dir, key)
    if os.path.exists(python):
        return python
    envs = Path(cache_dir).absolute() / "envs"
    envs.mkdir(parents=True, exist_ok=True)
    uv_cache = Path(uv_cache_dir).absolute() if uv_cache_dir else default_uv_cache(cache_dir)
    try:
        with FileLock(str(envs / f".{key}.lock"), timeout=BUILD_TIMEOUT_SECONDS):
            if os.path.exists(python):
                return python  # another process built it while this one waited
            _clear_leftovers(envs, key)
            started = time.monotonic()
            with progress.step(f"Building environment {spec.name} version {spec.version} (virtualenv)"):
                _build(spec, lock, key, envs, uv_cache)
            log.info(
                "Built environment %r version %s (build %s) in %.1f s",
                spec.name,
                spec.version,
                key[:12],
                time.monotonic() - started,
            )
    except Timeout:
        raise EnvironmentBuildError(
            f"Waited {BUILD_TIMEOUT_SECONDS} s for another process building environment {spec.name!r} "
            f"(build {key[:12]}) in {envs}. If no build is running, delete {envs / ('.' + key + '.lock')}.",
            build_key=key,
            output="",
        ) from None
    return python


def _clear_leftovers(envs: Path, key: str) -> None:
    # Holding the key's lock, any temporary folder of this key belongs to a builder that died.
    for leftover in envs.glob(f".tmp-{key}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    final = envs / key
    if final.exists():
        # There but not usable (its base interpreter was removed): move it out of the way, then delete.
        trash = envs / f".trash-{key}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _build(spec: Environment, lock: str, key: str, envs: Path, uv_cache: Path) -> None:
    started = time.monotonic()
    base = _base_interpreter(spec)
    floor = lock_python_version(lock)
    requested = spec.python.version or (None if spec.python.interpreter_path else local_python_version())
    if floor and requested and _version_tuple(requested) < _version_tuple(floor):
        raise ConfigurationError(
            f"Environment {spec.name!r} was locked for Python >= {floor}, but this build uses Python "
            f"{requested}. Set python.version to {floor!r} (with that Python on the worker), or register the "
            "environment again from a worker running the Python you want."
        )
    credentials = (
        index_credentials(spec, what=f"Building environment {spec.name!r} version {spec.version}")
        if has_requirements(lock)
        else {}
    )
    tmp = envs / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    uv_cache.mkdir(parents=True, exist_ok=True)
    # The lock names its indexes with ${VAR} references; uv expands them from this environment.
    env = uv_environment(uv_cache, credentials)
    try:
        _run(
            [uv_bin(), "venv", "--relocatable", "--no-project", "--quiet", "--python", base, str(tmp)],
            spec=spec,
            key=key,
            env=env,
            cwd=Path(NEUTRAL_CWD),
            step="creating the virtualenv",
            hidden=credentials.values(),
        )
        lock_file = tmp / "amlrun-lock.txt"
        lock_file.write_text(lock)
        if has_requirements(lock):
            _run(
                [
                    uv_bin(),
                    "pip",
                    "sync",
                    "--require-hashes",
                    "--python",
                    str(tmp / _BIN / _EXE),
                    "--quiet",
                    str(lock_file),
                ],
                spec=spec,
                key=key,
                env=env,
                cwd=Path(NEUTRAL_CWD),
                step="installing the lock",
                hidden=credentials.values(),
            )
        _compile_bytecode(tmp, envs / key)
        record = {
            "build_key": key,
            "name": spec.name,
            "version": spec.version,
            "python": python_tag(spec),
            "platform": local_platform(),
            "built_at": datetime.now(UTC).isoformat(),
            "seconds": round(time.monotonic() - started, 3),
            "pid": os.getpid(),
        }
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2))
        os.rename(tmp, envs / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(envs / BUILD_LOG, "a") as log:
        log.write(json.dumps(record) + "\n")


def _compile_bytecode(tmp: Path, final: Path) -> None:
    # compileall exits non-zero when any file does not compile (some packages ship templates or tests
    # written for another Python); the rest is compiled all the same, and a missing .pyc costs only time.
    # -I -S: compileall is the standard library's; no .pth line of the installed packages and no variable of
    # the worker's (PYTHONPATH) takes part in it.
    command = [str(tmp / _BIN / _EXE), "-I", "-S", "-m", "compileall", "-q", "-j", "0"]
    command += ["-s", str(tmp), "-p", str(final), str(tmp / ("Lib" if os.name == "nt" else "lib"))]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=NEUTRAL_CWD,
            timeout=BUILD_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning(
            "Compiling the bytecode of environment %s took over %s s and was stopped; its runs compile what "
            "they import themselves.",
            final.name,
            BUILD_TIMEOUT_SECONDS,
        )
        return
    if done.returncode != 0:
        log.debug("Some files of environment %s did not compile: %s", final.name, done.stdout[-2000:])


def _base_interpreter(spec: Environment) -> str:
    if spec.python.interpreter_path:
        return spec.local_interpreter()
    if spec.python.version and spec.python.version != local_python_version():
        return spec.python.version  # uv looks for that version on the worker (PATH, pyenv, uv-managed)
    # In a virtualenv, build from the interpreter it was made from, so the build does not depend on it.
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def _run(
    command: list[str],
    *,
    spec: Environment,
    key: str,
    env: dict[str, str],
    cwd: Path,
    step: str,
    hidden: Iterable[str] = (),
) -> None:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=cwd, timeout=BUILD_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired as err:
        raise EnvironmentBuildError(
            f"Building environment {spec.name!r} (build {key[:12]}): {step} took longer than "
            f"{BUILD_TIMEOUT_SECONDS} s. Check that the package index is reachable.",
            build_key=key,
            output=hide(str(err.stdout or ""), hidden),
        ) from None
    if result.returncode != 0:
        # uv hides a URL's password when it shows the URL, but not a token in its query.
        output = hide((result.stderr + result.stdout).strip(), hidden)
        hint = ""
        if "interpreter" in output.lower() and spec.python.version:
            hint = (
                f" Install Python {spec.python.version} on the worker, or change python.version "
                f"(this worker runs {local_python_version()})."
            )
        raise EnvironmentBuildError(
            f"Building environment {spec.name!r} version {spec.version} (build {key[:12]}) failed while "
            f"{step}:\n{output}{hint}",
            build_key=key,
            output=output,
        )


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])
