"""The supervisor's folder of a Docker run, ``/amlrun/lib`` in its container: made once per content, removed once
no run uses it.

It holds ``supervisor.py`` and ``pylib/`` (run_context, the stand-in package, the MLflow capture), and its name
is the hash of those files: ``<cache>/docker/lib-<digest>``. Every process and every daemon using this cache
shares it. Who uses one:
- a ``bind`` run's container bind-mounts it read-only, for as long as the container exists and may run
  (created, running, paused, restarting): long after the process that started it is gone, as a retry or
  ``amlrun reconcile`` follows it. A folder removed under it takes run_context from a running script, and a
  created container no longer starts;
- an ``archive`` run copies it into its container before the container starts, and uses it no more.

Each version of those files makes a new folder; the others are removed once nothing uses them
(``remove_unused``, called once a run has started), which is known this way:
- a process holds a shared lock (``flock`` of ``<cache>/docker/lib.lock``) from choosing its folder (making it
  if missing) until its container exists, or has its copy (``lib_folder``). From then on the daemon knows;
- under that lock it first records the daemon that will bind-mount the folder (``<cache>/docker/lib-daemons``,
  one URL a line): any daemon of this machine may, and only that daemon can tell which containers do;
- a cleanup takes the exclusive lock, or gives up at once (another process is choosing its folder: a later run
  cleans up), asks every recorded daemon for its live containers' bind mounts, and removes each folder other
  than its own that none mounts. A daemon that does not answer keeps them all: it may have a run using one.
A folder is renamed aside before it is removed, so that no process ever finds one half removed; only real
folders named as this module names them are considered, and removing one follows no link (``shutil.rmtree``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_amlrun.hooks.docker_daemon import DockerDaemon, DockerDaemonUnreachableError
from airflow_amlrun.targets import supervisor
from airflow_amlrun.targets.common import run_context_files, write_run_context_package

if TYPE_CHECKING:
    from docker import APIClient

log = logging.getLogger(__name__)

FOLDER = "docker"
LOCK = "lib.lock"
DAEMONS = "lib-daemons"
# A folder of one version; one being made, or set aside to be removed.
LIB_NAME = re.compile(r"lib-[0-9a-f]{16}")
SET_ASIDE = re.compile(r"\.tmp-lib-[0-9a-f]{16}-[0-9a-f]{8}")
# The states of a container that may still read its bind mounts (a created one reads them when it starts).
LIVE_STATES = ["created", "running", "paused", "restarting"]
# How long a recorded daemon may take to say which of its containers mount what.
DAEMON_TIMEOUT_SECONDS = 10


def lib_sources() -> list[Path]:
    """The files the folder is made of: its name is their hash."""
    return [*run_context_files(), Path(supervisor.__file__)]


def lib_name() -> str:
    """The folder's name for this version of the package: ``lib-`` and the hash of what it holds."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in lib_sources())).hexdigest()[:16]
    return f"lib-{digest}"


@contextlib.contextmanager
def lib_folder(cache_dir: Path, *, bind_daemon: str | None) -> Iterator[Path]:
    """This version's folder (made if missing), kept from any cleanup until the block ends: create the
    container (``bind``), or copy the folder into it (``archive``), in the block.

    :param cache_dir: the workspace's cache folder.
    :param bind_daemon: the URL of the daemon whose container will bind-mount the folder, None for a copy.
    """
    root = _root(cache_dir)
    with _locked(root, fcntl.LOCK_SH):
        if bind_daemon is not None:
            _record_daemon(root / DAEMONS, bind_daemon)
        yield _made(root / lib_name())


def remove_unused(cache_dir: Path, *, keep: Path, clients: Mapping[str, APIClient]) -> list[str]:
    """Remove the folders of other versions (and any left set aside) that no live container mounts; returns the
    names removed. Does nothing while another process holds its folder (``lib_folder``).

    :param cache_dir: the workspace's cache folder.
    :param keep: the folder of the run that just started.
    :param clients: clients of daemons by URL (the run's own, if it is on this machine): asked as well as the
        recorded ones, which are reached with no TLS (a daemon that bind-mounts this machine's files listens on
        a unix socket).
    """
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    root = _root(cache_dir)
    if not _candidates(root, keep.name):
        return []  # the common case, at the cost of listing one small folder
    with _locked(root, fcntl.LOCK_EX | fcntl.LOCK_NB) as locked:
        if not locked:
            return []
        candidates = _candidates(root, keep.name)  # again: another process may have removed some meanwhile
        mounted: set[str] = set()
        for url in sorted({*_recorded_daemons(root / DAEMONS), *clients}):
            try:
                mounted |= _live_bind_sources(url, clients.get(url))
            except (DockerDaemonUnreachableError, DockerException, RequestException) as err:
                # One not reached at all: its error's advice (how to start a daemon) is not the point here.
                detail = (
                    "" if isinstance(err, DockerDaemonUnreachableError) else f" ({str(err).splitlines()[0]})"
                )
                log.info(
                    "The supervisor's folders of other versions in %s are kept: the Docker daemon at %s, whose "
                    "containers may use one, does not answer%s. If that daemon is gone for good, remove its line "
                    "from %s.",
                    root,
                    url,
                    detail,
                    root / DAEMONS,
                )
                return []
        removed = []
        for name in candidates:
            folder = str(root / name)
            if any(source == folder or source.startswith(folder + os.sep) for source in mounted):
                log.debug("The supervisor's folder %s is kept: a container mounts it", folder)
                continue
            try:
                _remove(root, name)
            except OSError as err:
                log.warning("Could not remove the supervisor's folder %s, which no run uses: %s", folder, err)
                continue
            removed.append(name)
            if LIB_NAME.fullmatch(name):
                log.info("Removed the supervisor's folder %s of another version: no run uses it", folder)
        return removed


def _root(cache_dir: Path) -> Path:
    # Resolved: a container's mount names the real path, and the daemon reports it as given.
    root = Path(cache_dir) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


@contextlib.contextmanager
def _locked(root: Path, how: int) -> Iterator[bool]:
    """Hold the lock of the cache's folders (``LOCK_SH`` or ``LOCK_EX``); with ``LOCK_NB``, False if another
    process holds it. It is held as long as the file is open: a process that dies lets go."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, how)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _made(dest: Path) -> Path:
    """The folder, made in a temporary one renamed into place: it is there whole, or not at all."""
    if dest.is_dir():
        return dest
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    write_run_context_package(tmp / "pylib")
    shutil.copyfile(supervisor.__file__, tmp / "supervisor.py")
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _candidates(root: Path, keep: str) -> list[str]:
    """The names of the folders a cleanup may remove: real folders (no link) of other versions, or set aside."""
    with os.scandir(root) as entries:
        return sorted(
            entry.name
            for entry in entries
            if entry.name != keep
            and (LIB_NAME.fullmatch(entry.name) or SET_ASIDE.fullmatch(entry.name))
            and entry.is_dir(follow_symlinks=False)
        )


def _remove(root: Path, name: str) -> None:
    """Rename a folder aside (one step: no process finds it half removed), then remove it."""
    aside = root / name
    if LIB_NAME.fullmatch(name):
        aside = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(root / name, aside)
    shutil.rmtree(aside)


def _record_daemon(path: Path, url: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "r+") as daemons:
        if url not in daemons.read().splitlines():
            daemons.write(url + "\n")  # one short write in append mode: concurrent ones do not mix


def _recorded_daemons(path: Path) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    with os.fdopen(fd) as daemons:
        return [line for line in daemons.read().splitlines() if line]


def _live_bind_sources(url: str, client: APIClient | None) -> set[str]:
    """The real paths of this machine bind-mounted into the containers of the daemon at ``url`` that may still
    read them; ``client`` is one of that daemon, or None to connect to it here."""
    if client is None:
        with DockerDaemon(base_url=url).connect(timeout=DAEMON_TIMEOUT_SECONDS) as own:
            return _live_bind_sources(url, own)
    containers = client.containers(all=True, filters={"status": LIVE_STATES})
    return {
        os.path.realpath(str(mount["Source"]))
        for container in containers
        for mount in container.get("Mounts") or []
        if mount.get("Type") == "bind" and mount.get("Source")
    }
