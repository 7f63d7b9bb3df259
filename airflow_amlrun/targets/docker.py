"""The Docker target: the run directory in a container of the environment's image, on a local or remote daemon.

``compute_target="docker"`` is the daemon the docker CLI would use (``DOCKER_HOST``, else the local socket),
with run options from the worker's ``AMLRUN_DOCKER_<OPTION>`` variables; a connection of type
``amlrun_docker`` names any other daemon, with the options in its extras (see ``DockerOptions``).

How a run gets into its container and back:
- code: the snapshot is materialized under the runs folder on the worker, as for the local target. A local
  daemon (a unix socket) bind-mounts that folder as the container's working directory, copying nothing. A
  remote daemon gets it as one tar (``put_archive``) into the created container before it starts; outputs/
  and logs/ come back with ``get_archive`` when the run is collected.
- ``airflow_amlrun.run_context``: a folder holding only that module is mounted read-only (remote: copied)
  at /amlrun/pylib and put on PYTHONPATH, so any image with a Python runs a script that logs metrics; nothing
  is installed into the image.
- log: the container's own log stream (``docker logs --follow``), which works the same for every daemon,
  is spooled by a thread into ``.amlrun/std_log.txt`` of the local run folder and read from there by offset.
  The stream ends when the container does, which is also how ``wait`` learns the run ended. A process that
  re-attaches (a retry) follows the stream again from its start, so offsets mean the same in every process.
- metrics: the script's events file, read from the bind-mounted folder (remote: fetched with
  ``get_archive``, at most once a second while the run goes on).

The container is named ``amlrun-<run id>`` (a second start of the same run cannot happen: the name is taken)
and labelled with the run id, which is how a retry whose handle was lost finds it (``find``). It runs under
an init process (``docker run --init``) so that stopping it (cancel, max duration) reaches the script.
It is removed once its outputs are collected, unless ``auto_remove`` is false.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from airflow_amlrun import run_context
from airflow_amlrun.config import load_settings, parse_flag
from airflow_amlrun.environment.build_image import (
    DEFAULT_IMAGE,
    DEFAULT_IMAGE_BASE,
    EnvironmentImage,
    check_image,
    ensure_image,
)
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.hooks.docker import DockerDaemon, DockerDaemonUnreachableError
from airflow_amlrun.targets.base import Chunk, CodeSource, Collected, Job, TargetStatus
from airflow_amlrun.targets.common import (
    CONTROL_DIR,
    EVENTS,
    READ_CAP,
    STD_LOG,
    job_argv,
    job_environment,
    lines_from,
    read_lines,
    write_run_context_package,
)

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_amlrun.config import Settings
    from airflow_amlrun.workspace import Workspace

log = logging.getLogger(__name__)

# Where the run lives inside its container.
RUN_DIR = "/amlrun/run"
PYLIB_DIR = "/amlrun/pylib"
LABEL_RUN_ID = "amlrun.run_id"
LABEL_EXPERIMENT = "amlrun.experiment"
LABEL_MANAGED_BY = "amlrun.managed-by"
# How long a stopped container's script gets to exit on SIGTERM before it is killed.
TERM_GRACE_SECONDS = 5
# How long a final read waits for the log stream of an ended container to close.
FINAL_LOG_WAIT_SECONDS = 10.0
# How often a running run's events file is fetched from a remote daemon.
REMOTE_EVENTS_INTERVAL_SECONDS = 1.0
# How long a run's daemon may not answer before the waiting task gives up on it (the run goes on there).
UNREACHABLE_GRACE_SECONDS = 120.0


@dataclass(frozen=True)
class DockerOptions:
    """How the target runs containers; extras of an ``amlrun_docker`` connection, or for
    ``compute_target="docker"`` the worker's ``AMLRUN_DOCKER_<OPTION>`` variables (e.g.
    ``AMLRUN_DOCKER_MEM_LIMIT=8g``).

    :param cpus: CPUs the container may use, e.g. ``1.5`` (``docker run --cpus``).
    :param mem_limit: memory limit, e.g. ``"512m"``, ``"8g"``; a script going over it is killed, and the
        run fails saying so.
    :param shm_size: size of /dev/shm, e.g. ``"1g"`` (PyTorch data loaders want more than the 64m default).
    :param gpus: GPUs, as ``docker run --gpus`` takes them: ``"all"``, a count (``2``), or device ids
        (``"device=0,1"``); needs the NVIDIA container toolkit on the daemon's host.
    :param network_mode: the container's network, e.g. ``"host"``, ``"none"``, or a network name; default
        the daemon's.
    :param user: user (``"1000:1000"`` or a name) the script runs as; default the image's.
    :param auto_remove: remove the container once its outputs are collected (default true); false keeps it
        for ``docker inspect`` / ``docker logs``.
    :param default_image: image of a run whose environment names none (default ``[amlrun]
        docker_default_image``, else ``amlrun-base:py3.11``).
    :param default_image_base: public Python image from which a daemon that lacks the default image (an
        ``amlrun-base`` image) builds it on first use (default ``[amlrun] docker_default_image_base``, else
        ``python:3.11-slim``).

    Privileged containers are not offered.
    """

    cpus: float | None = None
    mem_limit: str | None = None
    shm_size: str | None = None
    gpus: str | None = None
    network_mode: str | None = None
    user: str | None = None
    auto_remove: bool = True
    default_image: str = DEFAULT_IMAGE
    default_image_base: str = DEFAULT_IMAGE_BASE

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, where: str) -> DockerOptions:
        """Options from connection extras or variables, checked; errors name the option and where it is set.

        :param values: option name -> value (strings from variables, JSON values from extras).
        :param where: where the values come from, for messages.
        """
        from docker.errors import DockerException
        from docker.utils import parse_bytes

        known = {f.name for f in fields(cls)}
        if "privileged" in values:
            raise ConfigurationError(
                f"{where}: 'privileged' is not supported: a training script never needs the host's devices and "
                "kernel. Remove it; use 'gpus' for GPUs and 'shm_size' for shared memory."
            )
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown Docker option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}."
            )
        settings = load_settings()
        parsed: dict[str, Any] = {
            "default_image": settings.docker_default_image,
            "default_image_base": settings.docker_default_image_base,
        }
        for name, value in values.items():
            if value is None or value == "":
                continue
            if name == "cpus":
                try:
                    parsed[name] = float(value)
                except (TypeError, ValueError):
                    raise ConfigurationError(
                        f"{where}: cpus = {value!r} is not a number; write e.g. 2 or 1.5."
                    ) from None
                if parsed[name] <= 0:
                    raise ConfigurationError(f"{where}: cpus = {value!r} must be more than 0.")
            elif name in ("mem_limit", "shm_size"):
                try:
                    parse_bytes(str(value))
                except DockerException:
                    raise ConfigurationError(
                        f"{where}: {name} = {value!r} is not a size; write e.g. '512m' or '8g'."
                    ) from None
                parsed[name] = str(value)
            elif name == "auto_remove":
                parsed[name] = parse_flag(value, f"{where}: auto_remove")
            else:
                parsed[name] = str(value)
        options = cls(**parsed)
        options.device_requests()  # a bad gpus value fails here, before any run
        return options

    def device_requests(self) -> list[Any] | None:
        """The GPU request of ``gpus``, as ``docker run --gpus`` makes it."""
        if not self.gpus:
            return None
        from docker.types import DeviceRequest

        text = self.gpus.strip()
        if text == "all":
            return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if text.isdigit():
            return [DeviceRequest(count=int(text), capabilities=[["gpu"]])]
        if text.startswith("device="):
            ids = [d.strip() for d in text[len("device=") :].split(",") if d.strip()]
            return [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
        raise ConfigurationError(
            f"Docker option gpus = {self.gpus!r} is not understood; write 'all', a count such as 2, or "
            "'device=0,1'."
        )

    def host_config(self) -> dict[str, Any]:
        """The options as ``create_host_config`` arguments."""
        config: dict[str, Any] = {
            "init": True,
            "privileged": False,
            "device_requests": self.device_requests(),
            "network_mode": self.network_mode,
            "mem_limit": self.mem_limit,
            "shm_size": self.shm_size,
        }
        if self.cpus is not None:
            config["nano_cpus"] = int(self.cpus * 1e9)
        return {k: v for k, v in config.items() if v is not None}


class DockerTarget:
    """Runs in a container of the environment's image, on the local Docker daemon or a remote one."""

    kind = "docker"

    def __init__(self, name: str, daemon: DockerDaemon, settings: Settings, cache_dir: Path) -> None:
        self.name = name
        self.daemon = daemon
        where = daemon.source if daemon.source.startswith("connection") else "AMLRUN_DOCKER_* variables"
        self.options = DockerOptions.from_mapping(daemon.options, where=where)
        self.runs_dir = settings.local_runs_dir
        self.cache_dir = Path(cache_dir)
        self._images: dict[str, EnvironmentImage] = {}
        self._followers: dict[str, _LogFollower] = {}
        self._events: dict[str, tuple[float, bytes]] = {}
        self._unreachable: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_connection(cls, name: str, conn: Any, settings: Settings, workspace: Workspace) -> DockerTarget:
        """The target of an ``amlrun_docker`` connection, or with ``conn=None`` the worker's own daemon."""
        if conn is None:
            daemon = DockerDaemon.from_environment()
        else:
            daemon = DockerDaemon.from_connection(name, conn.host, conn.extra_dejson)
        return cls(name, daemon, settings, workspace.cache_dir)

    @cached_property
    def client(self) -> APIClient:
        return self.daemon.connect()

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

    def prepare(self, job: Job, code: CodeSource) -> None:
        run_dir = self.run_dir(job.run_id)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        code.materialize(run_dir)
        for folder in ("outputs", "logs", CONTROL_DIR):
            (run_dir / folder).mkdir(exist_ok=True)
            if self.options.user:
                # The script may run as a user that does not own the folder the worker made.
                (run_dir / folder).chmod(0o777)
        self._images[job.run_id] = self._image(job)

    def submit(self, job: Job) -> dict[str, Any]:
        client = self.client
        image = self._images.pop(job.run_id, None) or self._image(job)
        run_dir = self.run_dir(job.run_id)
        env = job_environment(job, run_dir=RUN_DIR, events_file=f"{RUN_DIR}/{CONTROL_DIR}/{EVENTS}")
        env["PYTHONPATH"] = ":".join(filter(None, [PYLIB_DIR, image.env.get("PYTHONPATH")]))
        binds: dict[str, dict[str, str]] = {}
        if self.daemon.local:
            binds[str(run_dir.absolute())] = {"bind": RUN_DIR, "mode": "rw"}
            binds[str(self._pylib())] = {"bind": PYLIB_DIR, "mode": "ro"}
        name = container_name(job.run_id)
        log.info("Starting container %s of image %s on %s", name, image.reference, self.daemon.base_url)
        container = client.create_container(
            image.reference,
            command=job_argv(job, image.python),
            name=name,
            labels={
                LABEL_RUN_ID: job.run_id,
                LABEL_EXPERIMENT: job.experiment,
                LABEL_MANAGED_BY: "airflow-amlrun",
            },
            environment=env,
            working_dir=RUN_DIR,
            user=self.options.user,
            detach=True,
            host_config=client.create_host_config(binds=binds or None, **self.options.host_config()),
        )
        container_id = str(container["Id"])
        try:
            if not self.daemon.local:
                with _run_dir_archive(run_dir, self._pylib(), writable=bool(self.options.user)) as archive:
                    client.put_archive(container_id, "/", archive)
            client.start(container_id)
        except BaseException:
            with contextlib.suppress(Exception):
                client.remove_container(container_id, force=True)
            raise
        return self._handle(container_id, name, job.run_id, image.reference)

    def wait(self, handle: dict[str, Any], timeout: float) -> TargetStatus:
        follower = self._follower(handle)
        if not follower.done.wait(timeout):
            return TargetStatus(running=True)
        from requests.exceptions import RequestException

        key = handle["container_id"]
        try:
            state = self._state(handle)
        except RequestException as err:
            # The daemon restarting or a network blip must not end a run that goes on without us.
            since = self._unreachable.setdefault(key, time.monotonic())
            if time.monotonic() - since > UNREACHABLE_GRACE_SECONDS:
                raise DockerDaemonUnreachableError(
                    self.daemon.unreachable_message(err), base_url=self.daemon.base_url
                ) from None
            log.warning(
                "The Docker daemon at %s does not answer (%s); still waiting", self.daemon.base_url, err
            )
            time.sleep(min(timeout, 1.0))
            self._restart_follower(handle)
            return TargetStatus(running=True)
        self._unreachable.pop(key, None)
        if state is None:
            return TargetStatus(
                running=False,
                exit_code=None,
                reason=f"its container {handle['container']} was removed from {self.daemon.base_url} before it "
                "was collected",
            )
        if state.get("Running") or state.get("Status") in ("restarting", "paused"):
            # The stream ended while the container runs on (a dropped connection, a restarted daemon):
            # follow it again, from its start, so offsets stay what they were.
            time.sleep(min(timeout, 0.1))
            self._restart_follower(handle)
            return TargetStatus(running=True)
        return _outcome(state, self.options)

    def read_log(self, handle: dict[str, Any], offset: int, final: bool = False) -> Chunk:
        follower = self._follower(handle)
        if final:
            follower.done.wait(FINAL_LOG_WAIT_SECONDS)
        return read_lines(follower.path, offset, final)

    def read_events(self, handle: dict[str, Any], offset: int, final: bool = False) -> Chunk:
        if handle["local"]:
            return read_lines(Path(handle["run_dir"]) / CONTROL_DIR / EVENTS, offset, final)
        # A remote file is fetched whole: now and then while the run goes on, once more at the end.
        key = handle["container_id"]
        fetched_at, data = self._events.get(key, (0.0, b""))
        stale = time.monotonic() - fetched_at >= REMOTE_EVENTS_INTERVAL_SECONDS
        if (final and fetched_at >= 0) or (not final and stale):
            data = self._fetch_file(handle, f"{RUN_DIR}/{CONTROL_DIR}/{EVENTS}") or b""
            # A negative time marks the final fetch, so the reads that drain it do not fetch again.
            self._events[key] = (-1.0 if final else time.monotonic(), data)
        return lines_from(data[offset : offset + READ_CAP], offset, final)

    def cancel(self, handle: dict[str, Any]) -> None:
        from docker.errors import NotFound

        log.info("Stopping container %s", handle["container"])
        with contextlib.suppress(NotFound):
            self.client.stop(handle["container_id"], timeout=TERM_GRACE_SECONDS)

    def collect(self, handle: dict[str, Any]) -> Collected:
        from docker.errors import NotFound

        run_dir = Path(handle["run_dir"])
        follower = self._follower(handle)
        follower.done.wait(FINAL_LOG_WAIT_SECONDS)
        if not handle["local"]:
            for folder in ("outputs", "logs"):
                self._fetch_dir(handle, folder, run_dir)
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(follower.path, logs / STD_LOG)
        if self.options.auto_remove:
            self._forget(handle)
            with contextlib.suppress(NotFound):
                self.client.remove_container(handle["container_id"], force=True)
        return Collected(
            outputs_dir=run_dir / "outputs",
            logs_dir=logs,
            extra={"container": handle["container"], "image": handle["image"]},
        )

    def cleanup(self, handle: dict[str, Any]) -> None:
        from docker.errors import NotFound

        self._forget(handle)
        if self.options.auto_remove:
            with contextlib.suppress(NotFound):
                self.client.remove_container(handle["container_id"], force=True)
        shutil.rmtree(handle["run_dir"], ignore_errors=True)

    def attachable(self, handle: dict[str, Any]) -> str | None:
        return None

    def find(self, job: Job) -> dict[str, Any] | None:
        found = self.client.containers(all=True, filters={"label": f"{LABEL_RUN_ID}={job.run_id}"})
        for container in found:
            if container.get("State") == "created":
                # The worker died between creating and starting it: it never ran, and its files may be
                # incomplete. Gone, the run counts as lost and is submitted anew.
                self.client.remove_container(container["Id"], force=True)
                continue
            name = str((container.get("Names") or [container_name(job.run_id)])[0]).lstrip("/")
            return self._handle(str(container["Id"]), name, job.run_id, str(container.get("Image")))
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "daemon": self.daemon.base_url}

    # helpers

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

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

    def _handle(self, container_id: str, name: str, run_id: str, image: str) -> dict[str, Any]:
        return {
            "container_id": container_id,
            "container": name,
            "daemon": self.daemon.base_url,
            "image": image,
            "run_dir": str(self.run_dir(run_id).absolute()),
            "local": self.daemon.local,
        }

    def _pylib(self) -> Path:
        """A folder holding only ``airflow_amlrun/run_context.py``, one per version of that file."""
        digest = hashlib.sha256(Path(run_context.__file__).read_bytes()).hexdigest()[:16]
        dest = self.cache_dir / "docker" / f"pylib-{digest}"
        if not dest.is_dir():
            tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
            write_run_context_package(tmp)
            for path in [tmp, *tmp.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            try:
                os.rename(tmp, dest)
            except OSError:  # another process made it first
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _state(self, handle: dict[str, Any]) -> dict[str, Any] | None:
        from docker.errors import NotFound

        try:
            return dict(self.client.inspect_container(handle["container_id"])["State"])
        except NotFound:
            return None

    def _follower(self, handle: dict[str, Any]) -> _LogFollower:
        with self._lock:
            follower = self._followers.get(handle["container_id"])
            if follower is None:
                follower = _LogFollower(self.daemon, self.client.api_version, handle)
                self._followers[handle["container_id"]] = follower
            return follower

    def _restart_follower(self, handle: dict[str, Any]) -> None:
        with self._lock:
            self._followers.pop(handle["container_id"], None)
        self._follower(handle)

    def _forget(self, handle: dict[str, Any]) -> None:
        with self._lock:
            self._followers.pop(handle["container_id"], None)
            self._events.pop(handle["container_id"], None)

    def _fetch_file(self, handle: dict[str, Any], path: str) -> bytes | None:
        """One file of the container (running or not), None when it is not there."""
        from docker.errors import NotFound

        try:
            stream, _ = self.client.get_archive(handle["container_id"], path)
        except NotFound:
            return None
        with _spooled(stream) as spool, tarfile.open(fileobj=spool) as tar:
            member = tar.next()
            extracted = tar.extractfile(member) if member is not None else None
            return extracted.read() if extracted is not None else None

    def _fetch_dir(self, handle: dict[str, Any], folder: str, run_dir: Path) -> None:
        """Replace run_dir/folder with the container's copy of it."""
        from docker.errors import NotFound

        try:
            stream, _ = self.client.get_archive(handle["container_id"], f"{RUN_DIR}/{folder}")
        except NotFound:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir / folder, ignore_errors=True)
        with _spooled(stream) as spool, tarfile.open(fileobj=spool) as tar:
            tar.extractall(run_dir, filter="data")


class _LogFollower:
    """Copies a container's log stream into a local file, from its start, until the container ends."""

    def __init__(self, daemon: DockerDaemon, api_version: str, handle: dict[str, Any]) -> None:
        self.path = Path(handle["run_dir"]) / CONTROL_DIR / STD_LOG
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._daemon = daemon
        self._api_version = api_version
        self._container_id = str(handle["container_id"])
        threading.Thread(target=self._follow, name=f"amlrun-log-{handle['container']}", daemon=True).start()

    def _follow(self) -> None:
        try:
            # No timeout: a script may print nothing for hours. Its own client: streams hold a connection.
            client = self._daemon.connect(timeout=None, version=self._api_version)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "wb") as out:
                    for data in client.logs(
                        self._container_id, stdout=True, stderr=True, stream=True, follow=True
                    ):
                        out.write(data)
                        out.flush()
            finally:
                client.close()
        except Exception as err:  # the waiter sees the stream end, and asks the daemon what happened
            self.error = err
            log.debug("Log stream of container %s ended: %s", self._container_id[:12], err)
        finally:
            self.done.set()


def container_name(run_id: str) -> str:
    """The container's name: one per run, so the same run cannot be started twice on a daemon."""
    return "amlrun-" + re.sub(r"[^A-Za-z0-9_.-]", "-", run_id)


def _outcome(state: dict[str, Any], options: DockerOptions) -> TargetStatus:
    code = state.get("ExitCode")
    exit_code = int(code) if isinstance(code, int) else None
    if state.get("OOMKilled"):
        limit = f"mem_limit={options.mem_limit}" if options.mem_limit else "no mem_limit (the host ran out)"
        return TargetStatus(
            running=False,
            exit_code=exit_code,
            reason=f"the container ran out of memory and was killed (OOMKilled) with {limit}; raise the "
            "target's mem_limit, or make the script use less memory",
        )
    if state.get("Error"):
        return TargetStatus(
            running=False,
            exit_code=exit_code,
            reason=f"the container could not run the script: {state['Error']}",
        )
    if exit_code is not None and exit_code > 128 and exit_code - 128 in signal.valid_signals():
        return TargetStatus(
            running=False,
            exit_code=exit_code,
            reason=f"killed by signal {signal.Signals(exit_code - 128).name}",
        )
    return TargetStatus(running=False, exit_code=exit_code)


@contextlib.contextmanager
def _run_dir_archive(run_dir: Path, pylib: Path, *, writable: bool) -> Any:
    """A tar of the run folder (as /amlrun/run) and the run_context folder (as /amlrun/pylib)."""

    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        top = info.name.split("/")
        if writable and info.isdir() and len(top) == 3 and top[2] in ("outputs", "logs", CONTROL_DIR):
            info.mode = 0o777
        return info

    with tempfile.TemporaryFile() as spool:
        with tarfile.open(fileobj=spool, mode="w") as tar:
            tar.add(run_dir, arcname=RUN_DIR.lstrip("/"), filter=owned_by_root)
            tar.add(pylib, arcname=PYLIB_DIR.lstrip("/"), filter=owned_by_root)
        spool.seek(0)
        yield spool


@contextlib.contextmanager
def _spooled(stream: Any) -> Any:
    """An archive stream from the daemon, in a temporary file (outputs may be larger than memory)."""
    spool: IO[bytes]
    with tempfile.TemporaryFile() as spool:
        for data in stream:
            spool.write(data)
        spool.seek(0)
        yield spool
