"""Spark archives: a managed environment's build packed for ``spark-submit --archives env.tar.gz#env``, so
executors run the run's packages without anything installed on them.

The archive is the environment's local build (build_venv.py: the same lock, the same build key) as a
gzipped tar, made once per build key, atomically (a temporary name, then a rename) under a file lock, and kept
beside the builds in ``<cache_dir>/spark-archives/<key>.tar.gz``.

The build is a relocatable virtualenv, but a virtualenv is not a Python: its ``bin/python`` links to the
interpreter it was made from, by absolute path. An executor unpacking the archive runs that same path, so it
must exist on every node (`base_interpreter` names it; the Spark target checks it before submitting and says
it when an executor cannot start it). Shipping a relocatable Python itself is for later.
"""

from __future__ import annotations

import os
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from airflow_amlrun.environment.build_venv import BUILD_TIMEOUT_SECONDS, venv_dir
from airflow_amlrun.environment.errors import EnvironmentBuildError
from airflow_amlrun.environment.resolve import ResolvedEnvironment, ensure_local_python

ARCHIVES = "spark-archives"
# Compression trades build time for upload size; level 1 packs a virtualenv about as small, several times faster.
COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class SparkArchive:
    """A build's archive, and the interpreter path its ``bin/python`` needs on every node."""

    path: Path
    build_key: str
    interpreter: str


def archive_path(cache_dir: str | os.PathLike[str], key: str) -> Path:
    return Path(cache_dir) / ARCHIVES / f"{key}.tar.gz"


def ensure_spark_archive(resolved: ResolvedEnvironment, cache_dir: str | os.PathLike[str]) -> SparkArchive:
    """The archive of a managed environment's build, building the environment and packing it if needed (an
    existing archive costs one stat).

    :param resolved: from ``resolve_environment``; managed (a user-managed one ships nothing).
    :param cache_dir: the workspace's cache folder.
    """
    assert not resolved.user_managed and resolved.build_key is not None
    key = resolved.build_key
    ensure_local_python(resolved, cache_dir)
    venv = venv_dir(cache_dir, key)
    interpreter = base_interpreter(venv)
    path = archive_path(cache_dir, key)
    if path.exists():
        return SparkArchive(path, key, interpreter)
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path.parent / f".{key}.lock"), timeout=BUILD_TIMEOUT_SECONDS):
            if not path.exists():
                _pack(venv, path)
    except Timeout:
        raise EnvironmentBuildError(
            f"Waited {BUILD_TIMEOUT_SECONDS} s for another process packing environment {resolved.name!r} "
            f"(build {key[:12]}) into {path}. If none is running, delete {path.parent / ('.' + key + '.lock')}.",
            build_key=key,
            output="",
        ) from None
    return SparkArchive(path, key, interpreter)


def base_interpreter(venv: Path) -> str:
    """The interpreter outside the virtualenv that its ``bin/python`` leads to, as the links name it (the
    path every node must have)."""
    link = venv / "bin" / "python"
    for _ in range(40):
        if not link.is_symlink():
            return str(link)
        target = Path(os.readlink(link))
        if target.is_absolute() and not target.is_relative_to(venv):
            return str(target)
        link = link.parent / target
    return str(link)


def _pack(venv: Path, dest: Path) -> None:
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{dest.name}")
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=COMPRESS_LEVEL) as archive:
            # Its entries at the top: unpacked as `env`, the interpreter is env/bin/python.
            for entry in sorted(os.listdir(venv)):
                archive.add(venv / entry, arcname=entry)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
