"""The supervisor's folder of a Docker run, ``/amlrun/lib`` in its container: made once per content, removed once
no run uses it.

It holds ``supervisor.py`` and ``pylib/`` (run_context, the stand-in package, the MLflow capture), and its name
is the hash of those files: ``<cache>/docker/lib-<digest>``. Every process, user and daemon using this cache
shares it. Who uses one:
- a ``bind`` run's container bind-mounts it read-only, for as long as the container exists and may run
  (created, running, paused, restarting): long after the process that started it is gone, as a retry or
  ``amlrun reconcile`` follows it. A folder removed under it takes run_context from a running script, and a
  created container no longer starts;
- an ``archive`` run copies it into its container before the container starts, and uses it no more.

Each version of those files makes a new folder; the others are removed once nothing uses them
(``remove_unused``, called once a run has started), which is known this way:
- a process holds a shared lock (``flock`` of ``<cache>/docker/lib.lock``, which every user may open to read)
  from choosing its folder (making it if missing) until its container has started, or has its copy
  (``lib_folder``). From then on the daemon knows. While another process holds the lock exclusively it waits, at
  most ``LOCK_WAIT_SECONDS``: a cleanup holds it for a moment only, but any user who may open the file may hold
  it for ever, and every run would wait on it. Then the run fails before any container starts, naming the lock
  file and how to find that process;
- under that lock it first records the daemon that will bind-mount the folder, and the TLS files to reach it
  with (``<cache>/docker/lib-daemons``, see ``docker_lib_record``): any daemon of this machine may, and only
  that daemon can tell which containers do;
- a cleanup asks every recorded daemon (and the run's own) for its live containers' bind mounts, all at once and
  holding no lock: no run waits on a daemon that is slow to answer. Then it takes the exclusive lock, or gives
  up at once (a process is choosing its folder: a later run cleans up), and renames the folders that none mounts
  aside (``.old-lib-<digest>-<random>``), which takes no time. From then on no container can mount them: Docker
  resolves a bind mount's path when the container starts, and every start happens under the shared lock. So it
  asks the daemons once more, and under the exclusive lock again removes each folder set aside whose name no
  live container mounts (one that started before it was set aside holds it still: it stays for a later
  cleanup);
- a daemon that does not answer keeps every folder (it may have a run using one), and is not asked again for a
  while (``docker_lib_record.Unanswered``): meanwhile cleanups keep everything, at no cost. After a few failures
  in a row the task log warns, naming the daemon and the line to remove if it is gone for good;
- containers that versions before this record started may mount a folder through a daemon nobody recorded (a
  second daemon of this machine). The record says when it began, and a folder made before that is kept until
  ``LEGACY_GRACE_SECONDS`` after it. A folder's time says when it was made, not when a run last mounted it (a
  version reuses its folder for every run), so the grace counts from the record's start.

A user who may not write this folder or the record (a cache another user, e.g. ``sudo amlrun``, made first) still
runs: it locks through a read-only descriptor, leaves its daemon unrecorded and removes nothing, saying so once.
A folder is renamed before it is removed, so that no process ever finds one half removed; only real folders named
as this module names them are considered, removing one follows no link (``shutil.rmtree``), and the cache's
files are opened without following links.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.targets import supervisor
from airflow_amlrun.targets.common import run_context_files, write_run_context_package
from airflow_amlrun.targets.docker_lib_record import (
    DAEMONS,
    SHARED_MODE,
    Unanswered,
    begin_record,
    daemon_of_line,
    owned_by,
    record_daemon,
    warn_once,
)

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_amlrun.hooks.docker_daemon import DockerDaemon

log = logging.getLogger(__name__)

FOLDER = "docker"
LOCK = "lib.lock"
# A version's folder; one being made (under the shared lock), or left half made by a process that died.
LIB_NAME = re.compile(r"lib-[0-9a-f]{16}")
HALF_MADE = re.compile(r"\.tmp-lib-[0-9a-f]{16}-[0-9a-f]{8}")
# One set aside by a cleanup, until no live container mounts the name it had (the group).
SET_ASIDE = re.compile(r"\.old-(lib-[0-9a-f]{16})-[0-9a-f]{8}")
# The states of a container that may still read its bind mounts (a created one reads them when it starts).
LIVE_STATES = ["created", "running", "paused", "restarting"]
# How long a daemon may take to say which of its containers mount what (each of the two calls).
DAEMON_TIMEOUT_SECONDS = 10
# How long a run waits for the shared lock while another process holds it exclusively. A cleanup holds it for as
# long as renaming or removing a few small folders takes; a process that holds it longer is stuck (or is not one
# of this package's), and every run of this cache would wait on it.
LOCK_WAIT_SECONDS = 300.0
# How often the shared lock is asked for again meanwhile, at most.
LOCK_POLL_SECONDS = 0.5
# How long a folder made before the record of daemons began is kept after it began: the runs that versions
# without the record started on a daemon nobody recorded have ended by then, unless one runs longer. No setting
# bounds a run's duration (max_run_duration_seconds is per run, and unset by default), and a folder is a few
# hundred kilobytes: a week costs nothing, and covers training runs of several days.
LEGACY_GRACE_SECONDS = 7 * 24 * 3600


def lib_sources() -> list[Path]:
    """The files the folder is made of: its name is their hash."""
    return [*run_context_files(), Path(supervisor.__file__)]


def lib_name() -> str:
    """The folder's name for this version of the package: ``lib-`` and the hash of what it holds."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in lib_sources())).hexdigest()[:16]
    return f"lib-{digest}"


@contextlib.contextmanager
def lib_folder(cache_dir: Path, *, bind_daemon: DockerDaemon | None) -> Iterator[Path]:
    """This version's folder (made if missing), kept from any cleanup until the block ends: create and start the
    container (``bind``), or copy the folder into it (``archive``), in the block. Raises ConfigurationError, naming
    the lock file, when another process holds the lock exclusively for longer than ``LOCK_WAIT_SECONDS``.

    :param cache_dir: the workspace's cache folder.
    :param bind_daemon: the daemon whose container will bind-mount the folder, None for a copy.
    """
    root = _root(cache_dir)
    with _locked(root, fcntl.LOCK_SH, wait=LOCK_WAIT_SECONDS) as locked:
        if not locked:
            raise _held_by_another(root / LOCK)
        record_daemon(root, bind_daemon)
        yield _made(root / lib_name())


def remove_unused(cache_dir: Path, *, keep: Path, clients: Mapping[str, APIClient]) -> list[str]:
    """Remove the folders of other versions (and any left half made) that no live container mounts; returns the
    names removed. Removes nothing while another process holds its folder (``lib_folder``), while a daemon that
    may have a run mounting one does not answer, or when this user may not write the cache.

    :param cache_dir: the workspace's cache folder.
    :param keep: the folder of the run that just started.
    :param clients: clients of daemons by URL (the run's own, if it is on this machine): asked instead of the
        recorded daemons of the same URL.
    """
    root = _root(cache_dir)
    if not _candidates(root, keep.name):
        return []  # the common case, at the cost of listing one small folder
    since_ns = _may_clean(root)
    if since_ns is None:
        return []
    removed = []
    with _asked_then_locked(root, clients) as mounted:
        if mounted is None:
            return []
        # No process is choosing or making a folder now, nor starting a container: no daemon is asked here.
        for name in _candidates(root, keep.name):
            folder = root / name
            if HALF_MADE.fullmatch(name):
                removed += _removed(folder, name)
            elif not LIB_NAME.fullmatch(name):
                continue
            elif _mounts(mounted, folder):
                log.debug("The supervisor's folder %s is kept: a container mounts it", folder)
            elif _made_before_the_record(folder, since_ns):
                log.debug(
                    "The supervisor's folder %s is kept until %s: it was made before the Docker daemons whose "
                    "containers mount folders here were recorded, and an older version's container may use it",
                    folder,
                    _utc(since_ns / 10**9 + LEGACY_GRACE_SECONDS),
                )
            else:
                os.rename(folder, root / f".old-{name}-{uuid.uuid4().hex[:8]}")
    return removed + _remove_set_aside(root, keep.name, clients)


def _remove_set_aside(root: Path, keep: str, clients: Mapping[str, APIClient]) -> list[str]:
    """Remove the folders set aside whose name no live container mounts, asking the daemons now that they are
    set aside; returns the names they had."""
    aside = [name for name in _candidates(root, keep) if SET_ASIDE.fullmatch(name)]
    if not aside:
        return []
    removed = []
    with _asked_then_locked(root, clients) as mounted:
        if mounted is None:
            return []
        for name in aside:
            folder = root / name
            match = SET_ASIDE.fullmatch(name)
            assert match is not None
            if _mounts(mounted, root / match.group(1)):
                log.debug("The supervisor's folder %s is kept: a container mounts it", root / match.group(1))
            elif folder.is_dir():  # else another cleanup removed it meanwhile
                removed += _removed(folder, match.group(1))
    for name in removed:
        log.info("Removed the supervisor's folder %s of another version: no run uses it", root / name)
    return removed


def _root(cache_dir: Path) -> Path:
    # Resolved: a container's mount names the real path, and the daemon reports it as given.
    root = Path(cache_dir) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


@contextlib.contextmanager
def _asked_then_locked(root: Path, clients: Mapping[str, APIClient]) -> Iterator[set[str] | None]:
    """What the live containers of the daemons bind-mount (``_mounted``), asked holding no lock (no run waits on a
    daemon slow to answer), then the exclusive lock taken without waiting and held until the block ends. None,
    holding nothing, if a daemon did not answer or another process holds the lock: nothing is removed now."""
    mounted = _mounted(root, clients)
    if mounted is None:
        yield None
        return
    with _locked(root, fcntl.LOCK_EX) as locked:
        yield mounted if locked else None


@contextlib.contextmanager
def _locked(root: Path, how: int, *, wait: float = 0.0) -> Iterator[bool]:
    """Hold the lock of the cache's folders (``LOCK_SH`` or ``LOCK_EX``); False if another process holds it, and
    still does after ``wait`` seconds (none: it is asked once). It is held as long as the file is open: a process that
    dies lets go. The file is open to read, all ``flock`` needs: every user may, whoever made it."""
    path = root / LOCK
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, SHARED_MODE)
        except FileExistsError:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        else:
            os.fchmod(fd, SHARED_MODE)  # whatever this process's umask: other users lock it too
    except PermissionError as err:
        raise _not_this_users(root, path, err) from None
    try:
        yield _flock(fd, how, wait)
    finally:
        os.close(fd)


def _flock(fd: int, how: int, wait: float) -> bool:
    """Take the lock ``how`` of an open file without blocking, asking again for up to ``wait`` seconds while
    another process holds it; whether it was taken. (A blocking ``flock`` would wait for as long as any process
    that may open the file holds it.)"""
    deadline = time.monotonic() + wait
    pause = 0.01
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, LOCK_POLL_SECONDS)
        else:
            return True


def _held_by_another(path: Path) -> ConfigurationError:
    holders = ", ".join(f"process {pid} ({_command_of(pid)})" for pid in exclusive_holders(path))
    who = f"{holders} held it exclusively" if holders else "another process held it exclusively"
    find = (
        "Wait for it to end, or stop it if it is stuck"
        if holders
        else f"Find it with `lslocks -o PID,TYPE,MODE,PATH | grep {path}` (the WRITE lock; run as root to see every "
        "user's) and wait for it to end, or stop it if it is stuck"
    )
    return ConfigurationError(
        f"The Docker target waited {LOCK_WAIT_SECONDS:g} s for the shared lock {path}, of the workspace's cache of "
        f"the supervisor's folders, and {who} all that time: no container was started. A cleanup of this package "
        f"holds it for a moment only, so that process is stuck, or is not one of this package's. {find}; then run "
        "the task again."
    )


def exclusive_holders(path: Path) -> list[int]:
    """The processes that hold an exclusive flock of ``path``, as /proc/locks tells (none where it cannot).

    A line of it reads ``1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF`` (a waiter's has ``->`` after the
    number); the file is named by its device's major and minor numbers and its inode.
    """
    try:
        stat = path.stat()
        with open("/proc/locks") as locks:
            lines = locks.readlines()
    except OSError:
        return []
    file = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    holders = []
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and fields[5] == file:
            with contextlib.suppress(ValueError):
                holders.append(int(fields[4]))
    return holders


def _command_of(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "its command line cannot be read here"
    command = " ".join(word.decode(errors="replace") for word in words if word)
    return command[:200] or "no command line"


def _made(dest: Path) -> Path:
    """The folder, made in a temporary one renamed into place: it is there whole, or not at all."""
    if dest.is_dir():
        return dest
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        write_run_context_package(tmp / "pylib")
    except PermissionError as err:
        raise _not_this_users(dest.parent, dest, err) from None
    shutil.copyfile(supervisor.__file__, tmp / "supervisor.py")
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _not_this_users(root: Path, path: Path, err: OSError) -> ConfigurationError:
    uid = os.geteuid()
    return ConfigurationError(
        f"The Docker target cannot use {path}, in the workspace's cache of the supervisor's folders: "
        f"{err.strerror} for this user (uid {uid}); that folder{owned_by(root)} was made by a run as another user "
        f"(sudo?). Give it to the user that runs the tasks (sudo chown -R {uid} {root})."
    )


def _candidates(root: Path, keep: str) -> list[str]:
    """The names of the folders a cleanup may remove: real folders (no link) of other versions, half made or set
    aside."""
    patterns = (LIB_NAME, HALF_MADE, SET_ASIDE)
    with os.scandir(root) as entries:
        return sorted(
            entry.name
            for entry in entries
            if entry.name != keep
            and any(p.fullmatch(entry.name) for p in patterns)
            and entry.is_dir(follow_symlinks=False)
        )


def _may_clean(root: Path) -> int | None:
    """When the record of daemons began (ns since the epoch), begun now if there was none; None if this user
    may not write it or this folder, and so removes nothing (said once)."""
    try:
        since_ns = begin_record(root).since_ns
    except PermissionError:
        since_ns = None
    if since_ns is not None and os.access(root, os.W_OK | os.X_OK) and os.access(root / DAEMONS, os.W_OK):
        return since_ns
    uid = os.geteuid()
    warn_once(
        root,
        "clean",
        "The supervisor's folders of other versions in %s are not removed by this process: this user (uid %d) may "
        "not write that folder or %s%s. A run as another user (sudo?) made it. Runs go on; to have them removed, "
        "give the folder to the user that runs the tasks (sudo chown -R %d %s).",
        root,
        uid,
        root / DAEMONS,
        owned_by(root / DAEMONS),
        uid,
        root,
    )
    return None


def _mounted(root: Path, clients: Mapping[str, APIClient]) -> set[str] | None:
    """The real paths bind-mounted into the live containers of every daemon that may have a run mounting a
    folder here (the recorded ones, and ``clients``), all asked at once; None if one of them did not answer
    lately (it is not asked again yet) or does not answer now."""
    record = begin_record(root)
    asks: dict[str, Callable[[], set[str]]] = {
        line: functools.partial(_asked, line)
        for line in record.lines
        if line.partition(" ")[0] not in clients
    }
    asks.update({url: functools.partial(_live_bind_sources, client) for url, client in clients.items()})
    unanswered = Unanswered.read(root)
    if unanswered.waiting(asks):
        return None
    if not asks:
        return set()
    with ThreadPoolExecutor(max_workers=len(asks), thread_name_prefix="amlrun-lib") as pool:
        futures = {key: pool.submit(ask) for key, ask in asks.items()}
    mounted: set[str] = set()
    failed: dict[str, BaseException] = {}
    for key, future in futures.items():
        try:
            mounted |= future.result()
        except Exception as err:  # whatever went wrong, this daemon did not say what its containers mount
            failed[key] = err
    unanswered.update(root, answered=[key for key in asks if key not in failed], failed=failed)
    return None if failed else mounted


def _asked(line: str) -> set[str]:
    with daemon_of_line(line).connect(timeout=DAEMON_TIMEOUT_SECONDS) as client:
        return _live_bind_sources(client)


def _live_bind_sources(client: APIClient) -> set[str]:
    """The real paths of this machine bind-mounted into the containers of a daemon that may still read them."""
    containers = client.containers(all=True, filters={"status": LIVE_STATES})
    return {
        os.path.realpath(str(mount["Source"]))
        for container in containers
        for mount in container.get("Mounts") or []
        if mount.get("Type") == "bind" and mount.get("Source")
    }


def _mounts(mounted: set[str], folder: Path) -> bool:
    return any(source == str(folder) or source.startswith(f"{folder}{os.sep}") for source in mounted)


def _made_before_the_record(folder: Path, since_ns: int) -> bool:
    """Whether a folder was made before the record of daemons began, and that was less than the grace ago."""
    if time.time_ns() >= since_ns + LEGACY_GRACE_SECONDS * 10**9:
        return False
    try:
        return os.lstat(folder).st_mtime_ns < since_ns
    except FileNotFoundError:
        return False


def _removed(folder: Path, name: str) -> list[str]:
    """Remove a folder (following no link); returns ``[name]``, or nothing if it could not be removed."""
    try:
        shutil.rmtree(folder)
    except OSError as err:
        log.warning("Could not remove the supervisor's folder %s, which no run uses: %s", folder, err)
        return []
    return [name]


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))
