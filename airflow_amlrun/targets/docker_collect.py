"""What a Docker run leaves behind, as the worker reads it: the supervisor's control files (how it ended the run),
the events file of a bind-mounted run, ``outputs/`` and ``logs/`` once the container ended, and why a bind-mounted
run's folder is not there.

Nothing a container does can make the worker read, write or upload another file of its machine: the worker's own
files are not in ``run/``, the worker writes nothing there once the container started, and what it reads or
collects from there is opened without following links and must be a regular file (see ``docker_files``); whatever
is left out is named in the task log. The worker also removes device nodes, FIFOs and sockets from ``run/`` and
clears its setuid and setgid bits when it collects the run and before it leaves the folder behind (``[amlrun]
cleanup``): nothing a container does in its bind-mounted folder gives anyone on the worker's machine a device or a
privilege.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun.targets.base import Chunk
from airflow_amlrun.targets.common import CONTROL_DIR, EVENTS, READ_CAP, lines_from
from airflow_amlrun.targets.docker_files import defuse, keep_only_inside, take_folder
from airflow_amlrun.targets.docker_state import live
from airflow_amlrun.targets.docker_transfer import RUN_DIR, WORK, fetch_file, fetch_folder
from airflow_amlrun.targets.files import UnsafeFileError, read_beneath

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_amlrun.targets.handles import DockerHandle

log = logging.getLogger(__name__)

# Largest control file (ended_by) read.
CONTROL_CAP = 1 << 16


class RunFiles:
    """The files of the runs this process follows, read or taken where their transfer leaves them: in the
    worker's run folder (``bind``) or in the container (``archive``, through the daemon).

    :param client: the target's client (which connects when first asked).
    """

    def __init__(self, client: Callable[[], APIClient]) -> None:
        self._client = client
        self._warned: set[tuple[str, str]] = set()
        # Containers whose run folder was defused after they ended (nothing changes there any more).
        self._defused: set[str] = set()

    def control_file(self, handle: DockerHandle, name: str) -> bytes | None:
        """A control file the supervisor wrote (``.amlrun/<name>``); None if there is none, or it is unsafe to
        read (said once in the task log)."""
        relative = f"{CONTROL_DIR}/{name}"
        if handle.transfer == "bind":
            try:
                return read_beneath(Path(handle.run_dir) / WORK, relative, limit=CONTROL_CAP)
            except UnsafeFileError as err:
                self.warn_once(handle, f"{err}: it was not read")
                return None
        return fetch_file(self._client(), handle.container_id, f"{RUN_DIR}/{relative}", CONTROL_CAP)

    def bound_events(self, handle: DockerHandle, offset: int, final: bool) -> Chunk:
        """The lines of a bind-mounted run's events file from ``offset`` on, read in its run folder."""
        try:
            data = read_beneath(Path(handle.run_dir) / WORK, f"{CONTROL_DIR}/{EVENTS}", offset, READ_CAP)
        except UnsafeFileError as err:
            self.warn_once(handle, f"{err}: the metrics and tags written there are not read")
            return Chunk([], offset)
        return lines_from(data or b"", offset, final)

    def take_outputs(self, handle: DockerHandle, *, ended: bool) -> list[str]:
        """Take ``outputs/`` and ``logs/`` of the run into its worker's folder; returns what was left out, one line
        each. A bind-mounted run's are taken out of its folder once its container ended, else they are copied
        through the daemon."""
        run_dir = Path(handle.run_dir)
        left_out: list[str] = []
        if handle.transfer == "bind" and ended:
            left_out += self.defuse(handle, ended=True)
        for folder in ("outputs", "logs"):
            source, dest = run_dir / WORK / folder, run_dir / folder
            if handle.transfer == "bind" and ended:
                # The container ended: nothing changes in its folder any more, so what is there can be taken
                # as it is (one rename), and checked once.
                if dest.exists() and not os.path.lexists(source):
                    continue  # taken by an earlier collect of this run
                shutil.rmtree(dest, ignore_errors=True)
                try:
                    left_out += take_folder(source, dest, what=folder)
                except OSError as err:  # e.g. a folder of another user, that only the daemon can read
                    log.info("Copying %s of %s through the daemon (%s)", folder, handle.container, err)
                else:
                    left_out += keep_only_inside(dest, what=folder)
                    continue
            shutil.rmtree(dest, ignore_errors=True)
            left_out += fetch_folder(self._client(), handle.container_id, f"{RUN_DIR}/{folder}", dest)
        return left_out

    def defuse(self, handle: DockerHandle, *, ended: bool) -> list[str]:
        """Rid a bind-mounted run folder of devices, FIFOs, sockets, setuid and setgid bits; returns what was
        done, one line each. Once its container is known to have ended, once per process is enough."""
        key = str(handle.container_id)
        if key in self._defused:
            return []
        done = defuse(Path(handle.run_dir) / WORK, what=WORK)
        if ended:
            self._defused.add(key)
        return done

    def warn_once(self, handle: DockerHandle, message: str) -> None:
        key = (str(handle.container_id), message)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("Container %s: %s", handle.container, message)


def on_another_worker(handle: DockerHandle, here: str) -> str:
    """Why a bind-mounted run's folder is not on this worker (``here``): it is on the worker that started it."""
    return (
        f"its run folder {handle.run_dir}, bind-mounted into its container, is on worker {handle.host!r}, not on "
        f"this one ({here!r}): a run on a daemon that shares its worker's files is followed from that worker only"
    )


def missing_folder(handle: DockerHandle, state: dict[str, Any] | None, *, known: bool, daemon: str) -> str:
    """Why a bind-mounted run's folder, on this worker, is gone: removed, and by whom, as the container's
    ``state`` on the daemon at ``daemon`` tells (None: no such container), if ``known`` (the daemon answered)."""
    run_dir = handle.run_dir
    container = f"its container {handle.container}"
    if not known:
        return (
            f"its run folder {run_dir}, bind-mounted into its container, is not on this worker, and the Docker "
            f"daemon at {daemon} does not answer to tell more"
        )
    if state is None:
        return (
            f"its run folder {run_dir} is gone from this worker, and {container} from {daemon}: "
            "the run was already collected, and both removed, by another process that followed it to its end "
            "(a retry of its task, or amlrun reconcile), or removed by hand"
        )
    if not live(state):
        return (
            f"its run folder {run_dir} is gone from this worker while {container} ended "
            f"({state.get('Status')}, exit code {state.get('ExitCode')}) and is kept: the run was already "
            "collected, and its folder removed, by another process that followed it to its end (a retry of "
            "its task, or amlrun reconcile), or the folder was removed by hand"
        )
    return f"its run folder {run_dir} was removed from this worker while {container} still runs"
