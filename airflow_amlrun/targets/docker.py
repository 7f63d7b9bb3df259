"""The Docker target: the run directory in a container of the environment's image, on a local or remote daemon.

``compute_target="docker"`` is the daemon the docker CLI would use (``DOCKER_HOST``, else the local socket),
with run options from the worker's ``AMLRUN_DOCKER_<OPTION>`` variables; a connection of type
``amlrun_docker`` names any other daemon, with the options in its extras (see ``DockerOptions``).

On the worker, a run has a folder of its own under the runs folder (``<runs>/<run id>/``) holding:
- ``run/``: the container's ``/amlrun/run``, its working directory: the code (materialized from the
  snapshot), ``outputs/``, ``logs/`` and ``.amlrun/`` (the events file, the supervisor's control files);
- ``std_log.txt`` (and with ``archive`` transfer ``events.jsonl``): the container's log (and events), spooled
  by the worker; ``outputs/`` and ``logs/`` once collected.
Only ``run/`` is ever shown to the container.

How ``run/`` gets into its container and back (``transfer``):
- ``bind``: the daemon sees the worker's files (a local socket, the worker not itself in a container):
  ``run/`` is bind-mounted, copying nothing; the worker reads the events file there while the run goes on,
  and takes ``outputs/`` and ``logs/`` out of it once the container ended.
- ``archive``: any other daemon (remote, or local to a worker that runs in a container of its own, as with
  docker-compose): ``run/`` goes in as one tar (``put_archive``) before the container starts; a thread
  copies the events file by offset while the run goes on (the image's Python, run with ``exec``, prints what
  is new: n bytes of metrics cost O(n)), and ``outputs/`` and ``logs/`` come back with ``get_archive``.
- ``auto`` (the default): ``bind`` for a daemon on a unix socket that sees the runs folder (checked once per
  process and daemon, with a probe file and a container that is created but never started), else
  ``archive``.

Nothing a container does can make the worker read, write or upload another file of its machine: the
worker's own files are not in ``run/``, the worker writes nothing there once the container started, and
what it reads or collects from there is opened without following links and must be a regular file (see
``docker_files``); whatever is left out is named in the task log.

The container runs ``supervisor.py`` (``airflow_amlrun.targets.supervisor``) with the image's Python, under
an init process (``docker run --init``): the supervisor starts the script (or command), stops it at
``max_run_duration_seconds`` even when no task follows the run, and passes a ``docker stop`` on to the
script. Its request (the command line, the secret variables) is written to the container's stdin, which is
closed after it: ``docker inspect`` of the container shows no secret value. So a ``command=`` run, like a
script, needs Python 3.7 or newer in the image (``python3``, or the environment's
``python.interpreter_path``). The supervisor and ``airflow_amlrun.run_context`` sit in a read-only folder
(``/amlrun/lib``; ``archive``: copied), and run_context is on PYTHONPATH: any image with a Python runs a
script that logs metrics, with nothing installed into it. The worker keeps that folder in its cache, one per
version of those files, and removes the other versions' once no container uses them (``docker_lib``).

The container runs as the worker's uid:gid (unless the ``user`` option says otherwise), so that everything it
writes in ``run/`` is the worker's to collect and remove; a worker that runs as root runs it as the image's
user unless that is root, else as nobody (65534:65534), and hands ``run/`` over to that user. Whoever it runs
as, the container lacks the capabilities MKNOD, SETUID, SETGID and FSETID and runs with no-new-privileges,
``<runs>/<run id>`` may be entered by the worker's user only (0700), and the worker removes device nodes,
FIFOs and sockets from ``run/`` and clears its setuid and setgid bits when it collects the run and before it
leaves the folder behind (``[amlrun] cleanup``): nothing a container does in its bind-mounted folder gives
anyone on the worker's machine a device or a privilege.

Its log (``docker logs --follow``, the same for every daemon) is spooled by a thread and read by offset; the
stream ends when the container does, which is also how ``wait`` learns the run ended. A process that
re-attaches (a retry) follows the stream again from its start, so offsets mean the same in every process.

The container is named ``amlrun-<run id>`` (a second start of the same run cannot happen: the name is taken)
and labelled with the run id, which is how a retry whose handle was lost finds it (``find``; a container that
was created but never started is no run to follow, and is removed only by a retry, or a reconcile, that
recorded the run lost: ``discard``). It is removed once the run's outcome is recorded (``cleanup``), unless
``auto_remove`` is false: until then a retry finds it, and its exit code, to record the same outcome.

A daemon that stops answering while a run goes on is waited for (``UNREACHABLE_GRACE_SECONDS``), then the
waiting task gives up with ``DockerDaemonLostError``: the run, untouched, is left unfinished in the history
for a retry to re-attach to, or for ``amlrun reconcile`` to settle. A daemon that answers again within that
time was restarted, or out of reach: with live-restore its containers ran on, and the container is followed
again (its log from its start, so offsets mean what they meant); without, it stopped them as it stopped, and
the run ends Failed saying so. The Docker API tells neither when a daemon started nor what stopped a container
(a ``docker stop`` and a daemon going down leave the same state), so this is told from what the waiting
process saw: the daemon stopped answering while the container ran, and answers again, without live-restore,
with the container ended since (``docker_state.stopped_with_daemon``). A process that did not see it (a retry, reconcile)
records the container's exit as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun.environment.build_image import EnvironmentImage, check_image, ensure_image, image_recipe
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.hooks.docker_daemon import DockerDaemon, DockerDaemonLostError
from airflow_amlrun.targets import supervisor
from airflow_amlrun.targets.base import Chunk, CodeSource, Collected, Job, TargetStatus
from airflow_amlrun.targets.common import (
    CONTROL_DIR,
    EVENTS,
    READ_CAP,
    STD_LOG,
    add_run_folders,
    job_argv,
    job_environment,
    lines_from,
    new_run_dir,
    python_path,
    read_lines,
    remove_run_dir,
    stopped_for_limit,
    unmarked,
)
from airflow_amlrun.targets.docker_files import (
    defuse,
    hand_over,
    keep_only_inside,
    replace_with_copy,
    take_folder,
)
from airflow_amlrun.targets.docker_lib import lib_folder, remove_unused
from airflow_amlrun.targets.docker_options import DockerOptions as DockerOptions
from airflow_amlrun.targets.docker_state import live, outcome, stopped_with_daemon, utc_text
from airflow_amlrun.targets.docker_transfer import (
    LABEL_MANAGED_BY,
    LIB_DIR,
    PYLIB_DIR,
    RUN_DIR,
    SUPERVISOR,
    EventsFollower,
    LogFollower,
    daemon_sees,
    fetch_file,
    fetch_folder,
    run_dir_archive,
    send_and_close,
    user_ids,
)
from airflow_amlrun.targets.files import UnsafeFileError, read_beneath
from airflow_amlrun.targets.handles import DockerHandle

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_amlrun.config import Settings

log = logging.getLogger(__name__)

# In the worker's folder of a run: the container's run folder, and the spools of its log and events beside it.
WORK = "run"
LOG_SPOOL = STD_LOG
EVENTS_SPOOL = EVENTS
# How long letting go of a run (another process follows it on) waits for its log and events copies to stop.
DETACH_WAIT_SECONDS = 10.0
LABEL_RUN_ID = "amlrun.run_id"
LABEL_EXPERIMENT = "amlrun.experiment"
LABEL_TRANSFER = "amlrun.transfer"
# How long a stopped container's script gets to exit on SIGTERM before it is killed.
TERM_GRACE_SECONDS = 5
# How long a final read waits for the log stream of an ended container to close.
FINAL_LOG_WAIT_SECONDS = 10.0
# How long a final read waits for the events of an ended container to arrive (archive).
FINAL_EVENTS_WAIT_SECONDS = 120.0
# How long a run's daemon may not answer before the waiting task gives up on it (the run goes on there).
UNREACHABLE_GRACE_SECONDS = 120.0
# Largest control file (ended_by) read.
CONTROL_CAP = 1 << 16


class DockerTarget:
    """Runs in a container of the environment's image, on the local Docker daemon or a remote one."""

    kind = "docker"
    handle_type = DockerHandle

    def __init__(self, name: str, daemon: DockerDaemon, settings: Settings, cache_dir: Path) -> None:
        self.name = name
        self.daemon = daemon
        where = daemon.source if daemon.source.startswith("connection") else "AMLRUN_DOCKER_* variables"
        self.where = where
        self.options = DockerOptions.from_mapping(daemon.options, where=where)
        self.runs_dir = settings.local_runs_dir
        self.cache_dir = Path(cache_dir)
        self._transfer: str | None = None
        self._images: dict[str, EnvironmentImage] = {}
        self._followers: dict[str, LogFollower] = {}
        self._events: dict[str, EventsFollower] = {}
        self._warned: set[tuple[str, str]] = set()
        self._unreachable: dict[str, float] = {}
        # When the daemon of each followed container stopped answering (epoch seconds), kept until it answers
        # that the container runs: a container that ended meanwhile may have been stopped by its daemon.
        self._went_away: dict[str, float] = {}
        self._owners: dict[tuple[str, str], tuple[int, int]] = {}
        # Containers whose run folder was defused after they ended (nothing changes there any more).
        self._defused: set[str] = set()
        # Re-entrant: Airflow's SIGTERM handler runs on_kill (cancel) in the thread it interrupts, which may
        # hold this lock at that moment (a look at the run's followers).
        self._lock = threading.RLock()

    @classmethod
    def from_connection(cls, name: str, conn: Any, settings: Settings, cache_dir: Path) -> DockerTarget:
        """The target of an ``amlrun_docker`` connection, or with ``conn=None`` the worker's own daemon."""
        if conn is None:
            daemon = DockerDaemon.from_environment()
        else:
            daemon = DockerDaemon.from_connection(name, conn.host, conn.extra_dejson)
        return cls(name, daemon, settings, cache_dir)

    @cached_property
    def client(self) -> APIClient:
        return self.daemon.connect()

    @cached_property
    def daemon_id(self) -> str | None:
        """The daemon's own id (``docker info``), which tells one daemon from another behind the same URL."""
        return str(self.client.info().get("ID") or "") or None

    # the protocol

    def check(self, job: Job) -> None:
        client = self.client  # an unreachable daemon fails here, before the run is recorded
        check_image(
            client,
            job.environment,
            default_image=self.options.default_image,
            default_image_base=self.options.default_image_base,
            daemon=self.daemon.base_url,
            lock_dir=self.cache_dir / "docker-builds",
            output=lambda line: log.info("%s", line),
        )
        # A forced bind mount the daemon cannot make fails here too (when the daemon has any image to probe
        # with; one that has none decides once the run's image is built).
        recipe = image_recipe(job.environment, default_image=self.options.default_image)
        self.transfer(recipe.reference, recipe.base_image)

    def prepare(self, job: Job, code: CodeSource) -> None:
        run_dir = self.run_dir(job.run_id)
        # Only the worker's user may enter: whatever a container leaves in run/, while it runs or after, is
        # out of reach of the machine's other users (the container reaches run/ through its bind mount).
        new_run_dir(run_dir, private=True)
        work = run_dir / WORK
        work.mkdir()
        code.materialize(work)
        add_run_folders(work)
        image = self._images[job.run_id] = self._image(job)
        if self.transfer(image.reference) == "bind":
            self._hand_over(work, image, self.options.run_user(image.user))

    def submit(self, job: Job) -> DockerHandle:
        from docker.types import Mount

        client = self.client
        image = self._images.pop(job.run_id, None) or self._image(job)
        transfer = self.transfer(image.reference)
        assert transfer is not None
        user = self.options.run_user(image.user)
        work = self.run_dir(job.run_id) / WORK
        # Secret values go to the supervisor through stdin only: the container's configuration (docker
        # inspect) holds the other variables.
        env = job_environment(
            replace(job, secret_environment_variables={}),
            run_dir=RUN_DIR,
            events_file=f"{RUN_DIR}/{CONTROL_DIR}/{EVENTS}",
            python=image.python,
        )
        env["PYTHONPATH"] = python_path(PYLIB_DIR, image.env.get("PYTHONPATH"))
        request = {
            "argv": job_argv(job, image.python),
            "env": dict(job.secret_environment_variables),
            "max_seconds": job.max_run_duration_seconds,
            "grace_seconds": TERM_GRACE_SECONDS,
            # docker stop signals the init process, which passes it on to the supervisor alone.
            "forward_signals": True,
        }
        name = container_name(job.run_id)
        bind = transfer == "bind"
        # The supervisor's folder is kept from any cleanup until the container has started (bind: a cleanup relies
        # on no container starting outside this block) or has its copy (archive); the daemon is recorded as one
        # whose containers may mount it.
        with lib_folder(self.cache_dir, bind_daemon=self.daemon if bind else None) as lib:
            mounts = []
            if bind:
                mounts = [
                    Mount(RUN_DIR, str(work), type="bind"),
                    Mount(LIB_DIR, str(lib), type="bind", read_only=True),
                ]
            log.info("Starting container %s of image %s on %s", name, image.reference, self.daemon.base_url)
            container = client.create_container(
                image.reference,
                command=[image.python, SUPERVISOR, f"{RUN_DIR}/{CONTROL_DIR}"],
                name=name,
                labels={
                    LABEL_RUN_ID: job.run_id,
                    LABEL_EXPERIMENT: job.experiment,
                    LABEL_MANAGED_BY: "airflow-amlrun",
                    LABEL_TRANSFER: transfer,
                },
                environment=env,
                working_dir=RUN_DIR,
                user=user,
                # Open stdin, closed after the first attach ends: the one the request is written to.
                stdin_open=True,
                detach=False,
                host_config=client.create_host_config(mounts=mounts or None, **self.options.host_config()),
            )
            container_id = str(container["Id"])
            try:
                if not bind:
                    with run_dir_archive(work, lib, owner=self._owner(image, user)) as archive:
                        client.put_archive(container_id, "/", archive)
                stdin = client.attach_socket(container_id, params={"stdin": 1, "stream": 1})
                try:
                    client.start(container_id)
                    send_and_close(stdin, json.dumps(request).encode())
                finally:
                    with contextlib.suppress(OSError):
                        stdin.close()
            except BaseException:
                with contextlib.suppress(Exception):
                    client.remove_container(container_id, force=True)
                raise
        self._remove_unused_libs(lib)
        return replace(
            self._handle(container_id, name, job.run_id, image.reference, transfer, image.python, user),
            image_id=image.image_id,
            image_build_key=image.build_key,
        )

    def wait(self, handle: DockerHandle, timeout: float) -> TargetStatus:
        """Wait at most ``timeout`` seconds for the container's log stream to end, then ask the daemon how the
        container is; a ``timeout`` of 0 (or less) is a poll: the daemon is asked at once, even while the log
        stream goes on (a follower that has just started has not read the stream of an ended container yet).

        A daemon that does not answer is waited for, from one call to the next, up to
        ``UNREACHABLE_GRACE_SECONDS`` (a poll does not wait), then ``DockerDaemonLostError`` says so; meanwhile
        every call asks it, so that its first answer tells whether the container ran on (and is followed
        again) or ended, and why.
        """
        key = handle.container_id
        # A poll starts no follower: the process polling (reconcile) may never follow this run, and a retry
        # that does must be the only one writing its log spool.
        with self._lock:
            follower = self._followers.get(key)
        if timeout > 0:
            follower = self._follower(handle)
            if key not in self._unreachable and not follower.done.wait(timeout):
                return TargetStatus(running=True)
        from requests.exceptions import RequestException

        try:
            state = self._state(handle)
        except RequestException as err:
            # The daemon restarting or a network blip must not end a run that goes on without us.
            first = key not in self._unreachable
            since = self._unreachable.setdefault(key, time.monotonic())
            if timeout <= 0 or time.monotonic() - since > UNREACHABLE_GRACE_SECONDS:
                raise self._lost(handle, err, time.monotonic() - since) from None
            if first:
                self._went_away.setdefault(key, time.time())
                log.warning(
                    "The Docker daemon at %s does not answer (%s): waiting up to %.0f s for it to answer again "
                    "about container %s, which goes on there unless the daemon stopped it",
                    self.daemon.base_url,
                    str(err).split("\n")[0],
                    UNREACHABLE_GRACE_SECONDS,
                    handle.container,
                )
            # The log stream is followed again once the daemon answers: a follower started meanwhile would
            # only empty the spool, for nothing.
            time.sleep(min(timeout, 1.0))
            return TargetStatus(running=True)
        if key in self._unreachable:
            log.info(
                "The Docker daemon at %s answers again, after %.0f s; container %s %s",
                self.daemon.base_url,
                time.monotonic() - self._unreachable.pop(key),
                handle.container,
                "runs on: following it again" if live(state or {}) else "is no longer running",
            )
            # Its events (archive) were read through the daemon too: read them again, from their start.
            self._restart_events_follower(handle)
        if state is None:
            return TargetStatus(
                running=False,
                exit_code=None,
                reason=f"its container {handle.container} was removed from {self.daemon.base_url} before it "
                "was collected",
            )
        if live(state):
            self._went_away.pop(key, None)
            if follower is not None and follower.done.is_set():
                # The stream ended while the container runs on (a dropped connection, a restarted daemon):
                # follow it again, from its start, so offsets stay what they were.
                time.sleep(min(max(timeout, 0.0), 0.1))
                self._restart_follower(handle)
            return TargetStatus(running=True)
        if follower is not None and follower.error is not None:
            # Its log stream was cut before the container ended (e.g. its daemon went away and, restarting,
            # stopped it): the final read takes the log again, from its start.
            self._restart_follower(handle)
        status = outcome(state, self.options, timed_out=self._ended_by_limit(handle))
        if (
            key in self._went_away
            and status.exit_code != 0
            and not (status.timed_out or state.get("OOMKilled"))
        ):
            stopped = self._stopped_by_restart(handle, state, self._went_away[key])
            if stopped is not None:
                return replace(status, reason=stopped)
        if (
            status.exit_code == supervisor.CANNOT_START
            and self._control_file(handle, supervisor.EXIT_CODE) is None
        ):
            # The supervisor did not even start (it records its exit code, even when the job cannot start).
            return replace(
                status,
                reason=f"the image {handle.image!r} could not run {handle.python!r} (exit code 127, which says "
                "it has no such interpreter): the Docker target starts every run (a script or a command) under a "
                "small Python supervisor that enforces its time limit and records how it ended, which needs "
                "Python 3.7 or newer in the image. Use an image with Python, or name its interpreter in the "
                "environment's python.interpreter_path",
            )
        return status

    def read_log(self, handle: DockerHandle, offset: int, final: bool = False) -> Chunk:
        follower = self._follower(handle)
        if final:
            follower.done.wait(FINAL_LOG_WAIT_SECONDS)
        return read_lines(follower.path, offset, final)

    def read_events(self, handle: DockerHandle, offset: int, final: bool = False) -> Chunk:
        if handle.transfer == "bind":
            try:
                data = read_beneath(Path(handle.run_dir) / WORK, f"{CONTROL_DIR}/{EVENTS}", offset, READ_CAP)
            except UnsafeFileError as err:
                self._warn_once(handle, f"{err}: the metrics and tags written there are not read")
                return Chunk([], offset)
            return lines_from(data or b"", offset, final)
        follower = self._events_follower(handle)
        if final:
            final = follower.finish(FINAL_EVENTS_WAIT_SECONDS)
        if follower.skipped:
            self._warn_once(handle, f"{follower.skipped}: the metrics and tags written there are not read")
        return read_lines(follower.path, offset, final)

    def cancel(self, handle: DockerHandle) -> None:
        from docker.errors import NotFound

        log.info("Stopping container %s", handle.container)
        with contextlib.suppress(NotFound):
            self.client.stop(handle.container_id, timeout=TERM_GRACE_SECONDS)

    def collect(self, handle: DockerHandle) -> Collected:
        run_dir = Path(handle.run_dir)
        follower = self._follower(handle)
        follower.done.wait(FINAL_LOG_WAIT_SECONDS)
        state = self._state(handle)
        ended = state is None or not live(state)
        left_out: list[str] = []
        if handle.transfer == "bind" and ended:
            left_out += self._defuse(handle, ended=True)
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
            left_out += fetch_folder(self.client, handle.container_id, f"{RUN_DIR}/{folder}", dest)
        for line in left_out:
            log.warning("Container %s: %s", handle.container, line)
        if follower.path.is_file():
            replace_with_copy(follower.path, run_dir / "logs" / STD_LOG, unmarked)
        # The container stays until the outcome is recorded (cleanup): a retry that finds the row unfinished
        # must still find the ended container, and its exit code, to record the same outcome.
        return Collected(
            outputs_dir=run_dir / "outputs",
            logs_dir=run_dir / "logs",
            extra={"container": handle.container, "image": handle.image},
        )

    def cleanup(self, handle: DockerHandle, *, remove_files: bool) -> None:
        from docker.errors import NotFound

        self._forget(handle)
        if self.options.auto_remove:
            with contextlib.suppress(NotFound):
                self.client.remove_container(handle.container_id, force=True)
        if remove_files:
            remove_run_dir(handle.run_dir, self.runs_dir)
        elif handle.transfer == "bind":
            # Left behind (for a look at a failed run): with nothing in it that gives a device or a privilege.
            for line in self._defuse(handle, ended=self.options.auto_remove):
                log.warning("Container %s: %s", handle.container, line)

    @property
    def followed_only_here(self) -> bool:
        # A daemon on this machine's socket, or run directories bound from this machine's disk.
        remote = self.daemon.base_url.startswith(("tcp://", "ssh://", "http://", "https://"))
        return not remote or self._transfer != "archive"

    def attachable(self, handle: DockerHandle) -> str | None:
        if handle.legacy:
            return "it was started by an earlier version of airflow-amlrun, whose Docker runs a retry cannot follow"
        folder = Path(handle.run_dir)
        if not folder.is_absolute() or folder.resolve().parent != self.runs_dir.resolve():
            # A row names the folder; only one of this worker's runs folder is written, read or uploaded.
            return f"its recorded run folder {handle.run_dir} is not in this worker's runs folder {self.runs_dir}"
        if handle.transfer == "bind" and not (Path(handle.run_dir) / WORK).is_dir():
            return self._missing_folder(handle)
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        try:
            here = self.daemon_id
        except (DockerException, RequestException):
            return None  # the daemon does not answer now; waiting on the run tells more
        if handle.daemon_id and here and handle.daemon_id != here:
            return (
                f"its container runs on the Docker daemon {handle.daemon_id}, and {self.daemon.base_url} "
                f"here is another one ({here})"
            )
        return None

    def gone(self, handle: DockerHandle) -> str | None:
        if handle.transfer != "bind" or (Path(handle.run_dir) / WORK).is_dir():
            return None
        if handle.host not in (None, _host()):
            return None  # on another worker: for a reconcile there
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        try:
            state = self._state(handle)
        except (DockerException, RequestException):
            return None
        if state is not None and live(state):
            return None  # it runs on, without its folder: nothing to settle yet
        return self._missing_folder(handle)

    def find(self, job: Job) -> DockerHandle | None:
        from docker.errors import NotFound

        found = self.client.containers(all=True, filters={"label": f"{LABEL_RUN_ID}={job.run_id}"})
        for container in found:
            if container.get("State") == "created":
                # Never started: its task died between creating and starting it, or is between the two calls
                # right now (it has no handle yet). Either way there is no run to follow; the container is left
                # as it is (removing it here could pull it from under a live task: reconcile asks this even
                # with --dry-run), for whoever records the run lost to discard.
                log.info(
                    "Container %s of run %s was created but never started: not followed",
                    str(container["Id"])[:12],
                    job.run_id,
                )
                continue
            try:
                config = self.client.inspect_container(container["Id"])["Config"]
            except NotFound:
                continue
            labels = config.get("Labels") or {}
            if labels.get(LABEL_TRANSFER) not in ("bind", "archive"):
                continue  # started by an earlier version: not followed (see attachable)
            name = str((container.get("Names") or [container_name(job.run_id)])[0]).lstrip("/")
            return self._handle(
                str(container["Id"]),
                name,
                job.run_id,
                str(container.get("Image")),
                str(labels[LABEL_TRANSFER]),
                str((config.get("Cmd") or ["python3"])[0]),
                config.get("User") or None,
            )
        return None

    def discard(self, job: Job) -> None:
        from docker.errors import NotFound

        found = self.client.containers(
            all=True, filters={"label": f"{LABEL_RUN_ID}={job.run_id}", "status": "created"}
        )
        for container in found:
            with contextlib.suppress(NotFound):
                self.client.remove_container(container["Id"], force=True)
            log.info(
                "Removed container %s of run %s, which was created but never started",
                str(container["Id"])[:12],
                job.run_id,
            )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "daemon": self.daemon.base_url}

    # helpers

    def run_dir(self, run_id: str) -> Path:
        """The worker's folder of a run (its ``run/`` is the container's run folder)."""
        return self.runs_dir.resolve() / run_id

    def transfer(self, *probe_images: str | None) -> str | None:
        """How runs reach this daemon (``bind`` or ``archive``); None when it cannot be told yet (``auto`` or
        ``bind`` on a daemon with none of the images to probe with, nor any other)."""
        if self._transfer is not None:
            return self._transfer
        wanted = self.options.transfer
        if wanted == "archive" or (wanted == "auto" and not self.daemon.local):
            self._transfer = "archive"
            return self._transfer
        sees = daemon_sees(self.client, self.daemon.base_url, self.runs_dir.resolve(), probe_images)
        if sees is None:
            return None
        if not sees and wanted == "bind":
            raise ConfigurationError(
                f"Docker option transfer = 'bind' ({self.where}), but the Docker daemon at {self.daemon.base_url} "
                f"does not see this worker's runs folder {self.runs_dir.resolve()}: a file written there is not "
                "in a container that bind-mounts it. The worker probably runs in a container of its own (e.g. "
                "docker-compose with the host's socket mounted). Set transfer to 'archive' (or 'auto'), or "
                "mount the runs folder at the same path on the daemon's host."
            )
        self._transfer = "bind" if sees else "archive"
        if not sees:
            log.info(
                "The Docker daemon at %s does not see the runs folder %s: runs are copied into their containers",
                self.daemon.base_url,
                self.runs_dir.resolve(),
            )
        return self._transfer

    def _owner(self, image: EnvironmentImage, user: str) -> tuple[int, int]:
        """The uid and gid of the container user ``user`` in ``image`` (its own /etc/passwd says, for a name)."""
        key = (image.image_id, user)
        if key not in self._owners:
            where = (
                f"Docker option user ({self.where})"
                if self.options.user
                else f"the USER of {image.reference}"
            )
            self._owners[key] = user_ids(self.client, image.image_id, user, where=where)
        return self._owners[key]

    def _hand_over(self, work: Path, image: EnvironmentImage, user: str) -> None:
        """Make the run folder, bind-mounted into a container that runs as ``user``, writable by that user."""
        uid, gid = self._owner(image, user)
        if uid == os.getuid():
            return
        if os.getuid() == 0:
            hand_over(work, uid, gid)
            return
        # A worker that is not root cannot give its files to another user: the folders the script writes in
        # are made writable by every user instead. That opens them to no one else: they lie in <runs>/<run id>,
        # which only the worker's user may enter (0700), while the container reaches them through its mount.
        for folder in (work, work / "outputs", work / "logs", work / CONTROL_DIR):
            folder.chmod(0o777)

    def _defuse(self, handle: DockerHandle, *, ended: bool) -> list[str]:
        """Rid a bind-mounted run folder of devices, FIFOs, sockets, setuid and setgid bits; returns what was
        done, one line each. Once its container is known to have ended, once per process is enough."""
        key = str(handle.container_id)
        if key in self._defused:
            return []
        done = defuse(Path(handle.run_dir) / WORK, what=WORK)
        if ended:
            self._defused.add(key)
        return done

    def _missing_folder(self, handle: DockerHandle) -> str:
        """Why a bind-mounted run's folder is not here: on another worker, or removed (and by whom, if known)."""
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        run_dir, here = handle.run_dir, _host()
        if handle.host not in (None, here):
            return (
                f"its run folder {run_dir}, bind-mounted into its container, is on worker {handle.host!r}, not on "
                f"this one ({here!r}): a run on a daemon that shares its worker's files is followed from that "
                "worker only"
            )
        state: dict[str, Any] | bool | None
        try:
            state = self._state(handle)
        except (DockerException, RequestException):
            state = False  # not known
        container = f"its container {handle.container}"
        if state is None:
            return (
                f"its run folder {run_dir} is gone from this worker, and {container} from {self.daemon.base_url}: "
                "the run was already collected, and both removed, by another process that followed it to its end "
                "(a retry of its task, or amlrun reconcile), or removed by hand"
            )
        if isinstance(state, dict) and not live(state):
            return (
                f"its run folder {run_dir} is gone from this worker while {container} ended "
                f"({state.get('Status')}, exit code {state.get('ExitCode')}) and is kept: the run was already "
                "collected, and its folder removed, by another process that followed it to its end (a retry of "
                "its task, or amlrun reconcile), or the folder was removed by hand"
            )
        if isinstance(state, dict):
            return f"its run folder {run_dir} was removed from this worker while {container} still runs"
        return (
            f"its run folder {run_dir}, bind-mounted into its container, is not on this worker, and the Docker "
            f"daemon at {self.daemon.base_url} does not answer to tell more"
        )

    def _stopped_by_restart(
        self, handle: DockerHandle, state: dict[str, Any], went_away: float
    ) -> str | None:
        """Why the container ended, if its daemon stopped it by going down while this process followed it (see
        ``docker_state.stopped_with_daemon``); None if it ended otherwise, or the daemon does not say."""
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        try:
            info = self.client.info()
        except (DockerException, RequestException):
            return None
        ended = stopped_with_daemon(state, info, went_away=went_away, now=time.time())
        if ended is None:
            return None
        return (
            f"its container {handle.container} was stopped by the Docker daemon at {self.daemon.base_url} "
            f"({self.daemon.source}), which restarted while the run went on: the daemon stopped answering at "
            f"{utc_text(went_away)} and, when it answered again, the container had ended (at {utc_text(ended)}, exit "
            f"code {state.get('ExitCode')}); a daemon that runs without live-restore stops its containers when "
            "it stops. Run the task again; to keep runs going through a restart of the daemon, start dockerd "
            'with --live-restore (or set "live-restore": true in its /etc/docker/daemon.json)'
        )

    def _lost(self, handle: DockerHandle, err: BaseException, waited: float) -> DockerDaemonLostError:
        waiting = f"It has not answered for {waited:.0f} s. " if waited >= 1 else ""
        return DockerDaemonLostError(
            f"{self.daemon.unreachable_message(err)} {waiting}The run's container {handle.container} is left as "
            "it is there, and the run unfinished: a retry of this task re-attaches to the container once the "
            "daemon answers (or records how it ended meanwhile), and amlrun reconcile settles it if no retry comes.",
            base_url=self.daemon.base_url,
        )

    def _image(self, job: Job) -> EnvironmentImage:
        return ensure_image(
            self.client,
            job.environment,
            default_image=self.options.default_image,
            default_image_base=self.options.default_image_base,
            daemon=self.daemon.base_url,
            lock_dir=self.cache_dir / "docker-builds",
            output=lambda line: log.info("%s", line),
        )

    def _handle(
        self,
        container_id: str,
        name: str,
        run_id: str,
        image: str,
        transfer: str,
        python: str,
        user: str | None,
    ) -> DockerHandle:
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        daemon_id = None
        with contextlib.suppress(DockerException, RequestException):
            daemon_id = self.daemon_id
        return DockerHandle(
            container_id=container_id,
            container=name,
            daemon=self.daemon.base_url,
            daemon_id=daemon_id,
            image=image,
            run_dir=str(self.run_dir(run_id)),
            transfer=transfer,
            python=python,
            user=user,
            host=_host(),
        )

    def _remove_unused_libs(self, keep: Path) -> None:
        """Remove the supervisor's folders of other versions that no run uses any more (see ``docker_lib``)."""
        clients = {self.daemon.base_url: self.client} if self.daemon.local else {}
        try:
            remove_unused(self.cache_dir, keep=keep, clients=clients)
        except Exception:  # housekeeping never fails a run, which has started by now
            log.warning("Could not remove the supervisor's folders of other versions", exc_info=True)

    def _state(self, handle: DockerHandle) -> dict[str, Any] | None:
        from docker.errors import NotFound

        try:
            return dict(self.client.inspect_container(handle.container_id)["State"])
        except NotFound:
            return None

    def _ended_by_limit(self, handle: DockerHandle) -> bool:
        """Whether the supervisor in the container stopped the run for its time limit."""
        return stopped_for_limit(self._control_file(handle, supervisor.ENDED_BY))

    def _control_file(self, handle: DockerHandle, name: str) -> bytes | None:
        relative = f"{CONTROL_DIR}/{name}"
        if handle.transfer == "bind":
            try:
                return read_beneath(Path(handle.run_dir) / WORK, relative, limit=CONTROL_CAP)
            except UnsafeFileError as err:
                self._warn_once(handle, f"{err}: it was not read")
                return None
        return fetch_file(self.client, handle.container_id, f"{RUN_DIR}/{relative}", CONTROL_CAP)

    def _warn_once(self, handle: DockerHandle, message: str) -> None:
        key = (str(handle.container_id), message)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("Container %s: %s", handle.container, message)

    def _events_follower(self, handle: DockerHandle) -> EventsFollower:
        with self._lock:
            follower = self._events.get(handle.container_id)
            if follower is None:
                spool = Path(handle.run_dir) / EVENTS_SPOOL
                follower = EventsFollower(self.daemon, self.client.api_version, handle, spool)
                self._events[handle.container_id] = follower
            return follower

    def _follower(self, handle: DockerHandle) -> LogFollower:
        with self._lock:
            follower = self._followers.get(handle.container_id)
            if follower is None:
                # Beside the container's run folder, never in it: the container cannot plant anything there.
                spool = Path(handle.run_dir) / LOG_SPOOL
                follower = LogFollower(self.daemon, self.client.api_version, handle, spool)
                self._followers[handle.container_id] = follower
            return follower

    def _restart_follower(self, handle: DockerHandle) -> None:
        with self._lock:
            self._followers.pop(handle.container_id, None)
        self._follower(handle)

    def detach(self, handle: DockerHandle) -> None:
        with self._lock:
            followers = [
                self._followers.pop(handle.container_id, None),
                self._events.pop(handle.container_id, None),
            ]
        self._went_away.pop(handle.container_id, None)
        for follower in followers:
            if follower is not None and not follower.stop(DETACH_WAIT_SECONDS):
                log.warning("Container %s: its log or events copy did not stop in time", handle.container)

    def _restart_events_follower(self, handle: DockerHandle) -> None:
        """Read a container's events again from their start (into the same spool, so offsets stay what they
        were), if a follower read them and gave up (its daemon did not answer)."""
        with self._lock:
            follower = self._events.get(handle.container_id)
            if follower is None or not follower.done.is_set():
                return
            del self._events[handle.container_id]
        self._events_follower(handle)

    def _forget(self, handle: DockerHandle) -> None:
        with self._lock:
            self._followers.pop(handle.container_id, None)
            self._events.pop(handle.container_id, None)
        self._went_away.pop(handle.container_id, None)


def _host() -> str:
    return os.uname().nodename


def container_name(run_id: str) -> str:
    """The container's name: one per run, so the same run cannot be started twice on a daemon."""
    return "amlrun-" + re.sub(r"[^A-Za-z0-9_.-]", "-", run_id)
