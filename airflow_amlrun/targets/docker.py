"""The Docker target: the run directory in a container of the environment's image, on a local or remote daemon.

``compute_target="docker"`` is the daemon the docker CLI would use (``DOCKER_HOST``, else the local socket),
with run options from the worker's ``AMLRUN_DOCKER_<OPTION>`` variables; a connection of type
``amlrun_docker`` names any other daemon, with the options in its extras (see ``DockerOptions``).

On the worker, a run has a folder of its own under the runs folder (``<runs>/<run id>/``) holding:
- ``run/``: the container's ``/amlrun/run``, its working directory: the code (materialized from the
  snapshot), ``outputs/``, ``logs/`` and ``.amlrun/`` (the events file, the supervisor's control files);
- ``std_log.txt`` (and with ``archive`` transfer ``events.jsonl``): the container's log (and events), spooled
  by the worker; ``outputs/`` and ``logs/`` once collected.
Only ``run/`` is ever shown to the container, and ``<runs>/<run id>`` may be entered by the worker's user only
(0700).

This module is the target's life cycle; what it decides with lives beside it:
- ``docker_spec``: what the container is made of (name, labels, environment, user, mounts, resources) and the
  request its supervisor reads on stdin;
- ``docker_start``: how ``run/`` and the supervisor's folder get into the container (``bind`` or ``archive``), and
  how it starts; ``docker_lib`` keeps the supervisor's folders, ``docker_transfer`` moves the files;
- ``docker_follow``: the copies of its log and events this process makes while it follows the run;
- ``docker_collect``: what the run left behind (control files, events, ``outputs/`` and ``logs/``), kept from
  giving the worker's machine a device or a privilege (``docker_files``);
- ``docker_state``: what the container's state and its daemon say of how it ended.

The container (``amlrun-<run id>``, labelled with the run id: ``docker_spec``) is removed once the run's outcome
is recorded (``cleanup``), unless ``auto_remove`` is false: until then a retry finds it (``find``), and its exit
code, to record the same outcome.

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
import math
import os
import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun.environment.build_image import check_image, ensure_image
from airflow_amlrun.environment.image_recipe import EnvironmentImage, image_recipe
from airflow_amlrun.hooks.docker_daemon import DockerDaemon
from airflow_amlrun.targets import supervisor
from airflow_amlrun.targets.base import Chunk, CodeSource, Collected, Job, TargetStatus
from airflow_amlrun.targets.common import (
    STD_LOG,
    TERM_GRACE_SECONDS,
    add_run_folders,
    job_argv,
    new_run_dir,
    read_lines,
    remove_run_dir,
    stopped_by,
    stopped_for_limit,
    supervisor_request,
    unmarked,
)
from airflow_amlrun.targets.docker_collect import RunFiles, missing_folder, on_another_worker
from airflow_amlrun.targets.docker_files import replace_with_copy
from airflow_amlrun.targets.docker_follow import Followers
from airflow_amlrun.targets.docker_lib import lib_folder
from airflow_amlrun.targets.docker_options import DockerOptions as DockerOptions

# Named here too, where they were before the container's spec had a module of its own.
from airflow_amlrun.targets.docker_spec import LABEL_RUN_ID as LABEL_RUN_ID
from airflow_amlrun.targets.docker_spec import LABEL_TRANSFER as LABEL_TRANSFER
from airflow_amlrun.targets.docker_spec import (
    RunContainer,
    container_spec,
    remove_never_started,
    started_container,
)
from airflow_amlrun.targets.docker_spec import container_name as container_name
from airflow_amlrun.targets.docker_start import (
    Owners,
    choose_transfer,
    open_to,
    remove_unused_libs,
    start_container,
)
from airflow_amlrun.targets.docker_state import live, no_interpreter_reason, outcome, stopped_by_restart
from airflow_amlrun.targets.docker_transfer import WORK
from airflow_amlrun.targets.handles import DockerHandle

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_amlrun.config import Settings

log = logging.getLogger(__name__)

# How long letting go of a run (another process follows it on) waits for its log and events copies to stop.
DETACH_WAIT_SECONDS = 10.0
# How long a final read waits for the log stream of an ended container to close.
FINAL_LOG_WAIT_SECONDS = 10.0
# How long a final read waits for the events of an ended container to arrive (archive).
FINAL_EVENTS_WAIT_SECONDS = 120.0
# How long a run's daemon may not answer before the waiting task gives up on it (the run goes on there).
UNREACHABLE_GRACE_SECONDS = 120.0


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
        self._followers = Followers(daemon, lambda: self.client.api_version)
        self._files = RunFiles(lambda: self.client)
        self._owners = Owners(lambda: self.client, option=self.where if self.options.user else None)
        self._unreachable: dict[str, float] = {}
        # When the daemon of each followed container stopped answering (epoch seconds), kept until it answers
        # that the container runs: a container that ended meanwhile may have been stopped by its daemon.
        self._went_away: dict[str, float] = {}

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
        check_image(client, job.environment, **self._image_options())
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
            open_to(work, self._owners.of(image, self.options.run_user(image.user)))

    def submit(self, job: Job) -> DockerHandle:
        client = self.client
        image = self._images.pop(job.run_id, None) or self._image(job)
        transfer = self.transfer(image.reference)
        assert transfer is not None
        user = self.options.run_user(image.user)
        work = self.run_dir(job.run_id) / WORK
        bind = transfer == "bind"
        # The supervisor's folder is kept from any cleanup until the container has started (bind: a cleanup relies
        # on no container starting outside this block) or has its copy (archive); the daemon is recorded as one
        # whose containers may mount it.
        with lib_folder(self.cache_dir, bind_daemon=self.daemon if bind else None) as lib:
            spec = container_spec(job, image, self.options, transfer=transfer, user=user, work=work, lib=lib)
            log.info(
                "Starting container %s of image %s on %s", spec.name, image.reference, self.daemon.base_url
            )
            container_id = start_container(
                client,
                spec,
                json.dumps(
                    supervisor_request(
                        job,
                        job_argv(job, image.python),
                        dict(job.secret_environment_variables),
                        in_container=True,
                    )
                ).encode(),
                copy_in=None if bind else (work, lib),
                owner=lambda: self._owners.of(image, user),
            )
        remove_unused_libs(
            self.cache_dir, keep=lib, clients={self.daemon.base_url: client} if self.daemon.local else {}
        )
        container = RunContainer(spec.name, image.reference, transfer, image.python, user)
        handle = self._handle(container_id, container, job.run_id)
        return replace(handle, image_id=image.image_id, image_build_key=image.build_key)

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
        follower = self._followers.log_if_any(handle)
        if timeout > 0:
            follower = self._followers.log(handle)
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
                raise self.daemon.lost(
                    err, container=handle.container, waited=time.monotonic() - since
                ) from None
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
            self._followers.restart_events(handle)
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
                self._followers.restart_log(handle)
            return TargetStatus(running=True)
        if follower is not None and follower.error is not None:
            # Its log stream was cut before the container ended (e.g. its daemon went away and, restarting,
            # stopped it): the final read takes the log again, from its start.
            self._followers.restart_log(handle)
        ended_by = self._files.control_file(handle, supervisor.ENDED_BY)
        status = outcome(
            state, self.options, timed_out=stopped_for_limit(ended_by), stopped_by=stopped_by(ended_by)
        )
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
            and self._files.control_file(handle, supervisor.EXIT_CODE) is None
        ):
            # The supervisor did not even start (it records its exit code, even when the job cannot start).
            return replace(status, reason=no_interpreter_reason(handle.image, handle.python))
        return status

    def read_log(self, handle: DockerHandle, offset: int, final: bool = False) -> Chunk:
        follower = self._followers.log(handle)
        if final:
            follower.done.wait(FINAL_LOG_WAIT_SECONDS)
        return read_lines(follower.path, offset, final)

    def read_events(self, handle: DockerHandle, offset: int, final: bool = False) -> Chunk:
        if handle.transfer == "bind":
            return self._files.bound_events(handle, offset, final)
        follower = self._followers.events(handle)
        if final:
            final = follower.finish(FINAL_EVENTS_WAIT_SECONDS)
        if follower.skipped:
            self._files.warn_once(
                handle, f"{follower.skipped}: the metrics and tags written there are not read"
            )
        return read_lines(follower.path, offset, final)

    def cancel(self, handle: DockerHandle) -> bool:
        from docker.errors import NotFound

        # Looked at first: the Engine answers a stop of an ended container as it does a stop of a running one.
        state = self._state(handle)
        if state is None or not live(state):
            return False
        log.info("Stopping container %s", handle.container)
        try:
            # The API takes whole seconds.
            self.client.stop(handle.container_id, timeout=math.ceil(TERM_GRACE_SECONDS))
        except NotFound:
            return False
        return True

    def collect(self, handle: DockerHandle) -> Collected:
        run_dir = Path(handle.run_dir)
        follower = self._followers.log(handle)
        follower.done.wait(FINAL_LOG_WAIT_SECONDS)
        state = self._state(handle)
        for line in self._files.take_outputs(handle, ended=state is None or not live(state)):
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
            for line in self._files.defuse(handle, ended=self.options.auto_remove):
                log.warning("Container %s: %s", handle.container, line)

    def detach(self, handle: DockerHandle) -> None:
        followers = self._forget(handle)
        for follower in followers:
            if not follower.stop(DETACH_WAIT_SECONDS):
                log.warning("Container %s: its log or events copy did not stop in time", handle.container)

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
        try:
            here = self.daemon_id
        except _daemon_errors():
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
        try:
            state = self._state(handle)
        except _daemon_errors():
            return None
        if state is not None and live(state):
            return None  # it runs on, without its folder: nothing to settle yet
        return self._missing_folder(handle)

    def find(self, job: Job) -> DockerHandle | None:
        found = started_container(self.client, job.run_id)
        return None if found is None else self._handle(*found, job.run_id)

    def discard(self, job: Job) -> None:
        remove_never_started(self.client, job.run_id)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "daemon": self.daemon.base_url}

    # helpers

    def run_dir(self, run_id: str) -> Path:
        """The worker's folder of a run (its ``run/`` is the container's run folder)."""
        return self.runs_dir.resolve() / run_id

    def transfer(self, *probe_images: str | None) -> str | None:
        """How runs reach this daemon (``bind`` or ``archive``); None when it cannot be told yet (``auto`` or
        ``bind`` on a daemon with none of the images to probe with, nor any other)."""
        if self._transfer is None:
            wanted = self.options.transfer
            self._transfer = choose_transfer(
                lambda: self.client, self.daemon, self.runs_dir, probe_images, wanted=wanted, where=self.where
            )
        return self._transfer

    def _missing_folder(self, handle: DockerHandle) -> str:
        """Why a bind-mounted run's folder is not here: on another worker, or removed (and by whom, if known)."""
        if handle.host not in (None, _host()):
            return on_another_worker(handle, _host())
        try:
            state, known = self._state(handle), True
        except _daemon_errors():
            state, known = None, False
        return missing_folder(handle, state, known=known, daemon=self.daemon.base_url)

    def _stopped_by_restart(
        self, handle: DockerHandle, state: dict[str, Any], went_away: float
    ) -> str | None:
        """Why the container ended, if its daemon stopped it by going down while this process followed it (see
        ``docker_state.stopped_with_daemon``); None if it ended otherwise, or the daemon does not say."""
        try:
            info = self.client.info()
        except _daemon_errors():
            return None
        daemon = f"{self.daemon.base_url} ({self.daemon.source})"
        return stopped_by_restart(
            handle.container, state, info, daemon=daemon, went_away=went_away, now=time.time()
        )

    def _image(self, job: Job) -> EnvironmentImage:
        return ensure_image(self.client, job.environment, **self._image_options())

    def _image_options(self) -> dict[str, Any]:
        """How the run's image is found or built on the daemon (``check_image``, ``ensure_image``)."""
        return {
            "default_image": self.options.default_image,
            "default_image_base": self.options.default_image_base,
            "daemon": self.daemon.base_url,
            "lock_dir": self.cache_dir / "docker-builds",
            "output": lambda line: log.info("%s", line),
        }

    def _handle(self, container_id: str, container: RunContainer, run_id: str) -> DockerHandle:
        daemon_id = None
        with contextlib.suppress(*_daemon_errors()):
            daemon_id = self.daemon_id
        run_dir = str(self.run_dir(run_id))
        return container.handle(
            container_id, daemon=self.daemon.base_url, daemon_id=daemon_id, run_dir=run_dir, host=_host()
        )

    def _state(self, handle: DockerHandle) -> dict[str, Any] | None:
        from docker.errors import NotFound

        try:
            return dict(self.client.inspect_container(handle.container_id)["State"])
        except NotFound:
            return None

    def _forget(self, handle: DockerHandle) -> list[Any]:
        self._went_away.pop(handle.container_id, None)
        return self._followers.forget(handle)


def _host() -> str:
    return os.uname().nodename


def _daemon_errors() -> tuple[type[BaseException], ...]:
    """What a call to a daemon that fails, or does not answer, raises."""
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    return (DockerException, RequestException)
