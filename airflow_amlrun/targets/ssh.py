"""The SSH target: any Airflow `ssh` connection is a remote machine runs execute on, detached from the session.

The worker reaches the host through `hooks.ssh.SSHHost` (the SSH provider's `SSHHook`, reconnecting while
the connection drops) and drives a small stdlib-only helper there (`ssh_remote.py`, copied to `<base>/lib/`
once per version, see `ssh_helper`), which does everything that would otherwise take many round trips:

* code: the host keeps a blob cache `<base>/blobs/<digest>`; one `prepare` command checks it, and when
  blobs are missing names them (only those are sent, over SFTP, then `prepare` is asked again); it copies
  blobs to paths in the run directory `<base>/runs/<run id>` (refusing paths that escape it) and builds
  the environment's virtualenv under `<base>/envs/<build key>` if it is not there yet;
* start: `launch` reads the command line and the variables (secrets among them) from its stdin and starts
  the run under the supervisor (`supervisor.py`, copied beside the helper), in a session and process group
  of its own, handing it that request through a pipe (never a file, never a command line). The supervisor
  enforces the run's max_run_duration_seconds on the host and records its exit code in
  `<run dir>/.amlrun/`: a dropped connection or a dead worker neither ends the run nor lets it overrun;
* follow: log and metric lines are read by byte offset, so a reconnect loses nothing; the exit code file
  decides the outcome. The run's process is named by pid, start time and boot id: nothing else is ever
  signalled. A run whose supervisor ended without an exit code (killed alone, or unable to write) is
  recorded Failed with the reason, and what it left running is ended by the helper (only processes that
  provably belong to it);
* collect: `pack` sends outputs/ and logs/ back as a tar stream, skipping (with a warning in the task log)
  any link that leads out of its folder.

A managed environment whose index URLs refer to `${VAR}` gets the values from the worker's environment,
sent in the helper's stdin request and handed only to the installer's process environment on the host;
the lock written there keeps the references.

Connection extras read besides the SSH provider's own and those of `hooks.ssh`: `amlrun_base_dir` (default
`~/.amlrun`, private to the login user: see `ssh_helper`) and `amlrun_python` (default `python3`).
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import time
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from airflow_amlrun.environment.lock import has_requirements
from airflow_amlrun.hooks.ssh import SSHHost
from airflow_amlrun.hooks.ssh import SSHTargetConfigurationError as SSHTargetConfigurationError
from airflow_amlrun.hooks.ssh import SSHTargetError as SSHTargetError
from airflow_amlrun.hooks.ssh import SSHTargetUnreachableError as SSHTargetUnreachableError
from airflow_amlrun.targets.base import Chunk, CodeSource, Collected, Job, TargetStatus
from airflow_amlrun.targets.common import (
    CONTROL_DIR,
    ENDED_BY,
    EVENTS,
    EXIT_CODE,
    PYLIB,
    READ_CAP,
    STD_LOG,
    TERM_GRACE_SECONDS,
    job_argv,
    job_environment,
    lines_from,
    python_path,
    recorded_status,
    stopped_by,
    supervisor_lost_reason,
    supervisor_request,
    unmark_file,
)
from airflow_amlrun.targets.files import extract_tar_stream
from airflow_amlrun.targets.handles import SSHHandle
from airflow_amlrun.targets.ssh_helper import RemoteHelper

if TYPE_CHECKING:
    from pathlib import Path

    from airflow_amlrun.config import Settings

log = logging.getLogger(__name__)

DEFAULT_BASE_DIR = "~/.amlrun"
DEFAULT_PYTHON = "python3"
# Building a virtualenv on the host may take long; it answers only once done.
BUILD_TIMEOUT = 1800.0
# How often a run without an exit code yet is checked for being alive (the exit code file is polled often).
LIVENESS_SECONDS = 2.0


class SSHTarget:
    """Runs on the host of an Airflow `ssh` connection, in a run directory under the connection's base dir."""

    kind = "ssh"
    handle_type = SSHHandle
    # Everything lives on the remote host, reached over SSH from any machine with the connection.
    followed_only_here = False

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        login: str | None,
        extras: dict[str, Any],
        settings: Settings,
    ) -> None:
        self.name = name
        self.host = host
        self.base_dir = str(extras.get("amlrun_base_dir") or DEFAULT_BASE_DIR)
        self.python = str(extras.get("amlrun_python") or DEFAULT_PYTHON)
        self.runs_dir = settings.local_runs_dir
        self.ssh = SSHHost(name, host=host, port=port, login=login, extras=extras)
        self.helper = RemoteHelper(self.ssh, base_dir=self.base_dir, python=self.python)
        self._pythons: dict[str, str] = {}
        self._blob_bytes_sent: dict[str, tuple[int, int]] = {}
        self._last_liveness: dict[str, float] = {}

    @classmethod
    def from_connection(cls, name: str, conn: Any, settings: Settings, cache_dir: Path) -> SSHTarget:
        """The target of the Airflow connection `name` (type `ssh`), as the registry builds it."""
        if not conn.host:
            raise SSHTargetConfigurationError(
                f"SSH connection {name!r} has no host; set the connection's host to the machine runs should "
                "execute on.",
                host="",
            )
        return cls(
            name,
            host=conn.host,
            port=int(conn.port or 22),
            login=conn.login,
            extras=dict(conn.extra_dejson or {}),
            settings=settings,
        )

    @property
    def where(self) -> str:
        return self.ssh.where

    # ------------------------------------------------------------------ the protocol

    def check(self, job: Job) -> None:
        """Connect and look at the host now, so an unreachable host, refused credentials or a missing
        interpreter fail before the run is recorded."""
        self.ssh.connect()
        self.helper.probe(self._base_python(job))
        self._credentials(job)

    def prepare(self, job: Job, code: CodeSource) -> None:
        base_python = self._base_python(job)
        version, platform = self.helper.probe(base_python)
        base = self.helper.base()
        files = {
            entry.path: (entry.digest, entry.size, entry.mode)
            for entry in code.snapshot.entries
            if entry.digest is not None
        }
        pylib = self.helper.run_context_blobs
        blobs: dict[str, int] = {digest: size for digest, size, _ in files.values()}
        blobs.update({digest: len(data) for digest, data in pylib.values()})
        entries: list[dict[str, Any]] = [
            {"path": e.path, "link": e.link}
            if e.link is not None
            else {"path": e.path, "digest": e.digest, "size": e.size, "mode": e.mode}
            for e in code.snapshot.entries
        ]
        entries += [
            {"path": path, "digest": digest, "size": len(data), "mode": 0o644}
            for path, (digest, data) in pylib.items()
        ]
        request: dict[str, Any] = {"entries": entries, "python": base_python, "blobs": blobs}
        environment = job.environment
        timeout = self.ssh.io_timeout
        if not environment.user_managed and environment.lock is not None:
            key = environment.build_key_for(python=version, platform=platform)
            request["environment"] = {
                "key": key,
                "lock": environment.lock,
                "python": base_python,
                "name": environment.name,
                "has_requirements": has_requirements(environment.lock),
                # Only for the installer's environment on the host: the lock keeps its ${VAR} references.
                "credentials": self._credentials(job),
            }
            timeout = BUILD_TIMEOUT
        # The host checks its blob cache first: code it already has costs no second round trip.
        ask = functools.partial(
            self.helper.call, "preparing the run directory", "prepare", job.run_id, request
        )
        answer = ask(timeout=timeout, run="not started")
        sent = missing = 0
        if "missing" in answer:
            sent, missing = self._send_code(job, code, blobs, answer)
            answer = ask(timeout=timeout, run="not started")
            if "missing" in answer:
                raise SSHTargetError(
                    f"Host {self.host} still lacks code blobs {', '.join(d[:12] for d in answer['missing'])} of "
                    f"run {job.run_id} in {base}/blobs after they were sent; check that nothing else removes "
                    "files there.",
                    host=self.host,
                )
        self._blob_bytes_sent[job.run_id] = (sent, missing)
        log.info(
            "Code for run %s on %s: sent %d of %d blobs (%d bytes); the host had the rest cached.",
            job.run_id,
            self.host,
            missing,
            len(blobs),
            sent,
        )
        self._pythons[job.run_id] = answer["python"]

    def _send_code(
        self, job: Job, code: CodeSource, blobs: dict[str, int], cache: dict[str, Any]
    ) -> tuple[int, int]:
        """Send the blobs the host's cache lacks, if its disk has room for them and the run directory;
        returns the bytes and the blobs sent."""
        missing: list[str] = cache["missing"]
        needed = sum(blobs[d] for d in missing) + sum(blobs.values())
        if needed > int(cache["free"]):
            raise SSHTargetError(
                f"Host {self.host} has {_mb(cache['free'])} free in {self.helper.base()}, but run {job.run_id} needs "
                f"about {_mb(needed)} there (new code blobs plus the run directory). Free space on the host, or "
                f"set the connection's extra amlrun_base_dir to a folder on a larger disk.",
                host=self.host,
            )
        pylib_bytes = dict(self.helper.run_context_blobs.values())
        sent = 0
        for digest in missing:
            data = pylib_bytes[digest] if digest in pylib_bytes else code.store.get_bytes(digest)
            self.ssh.retrying(
                f"sending code blob {digest[:12]}",
                _bind(self.helper.put_blob, digest, data),
                run="not started",
            )
            sent += len(data)
        return sent, len(missing)

    def submit(self, job: Job) -> SSHHandle:
        run_dir = f"{self.helper.base()}/runs/{job.run_id}"
        control = PurePosixPath(run_dir) / CONTROL_DIR
        python = self._pythons.get(job.run_id) or self._base_python(job)
        env = job_environment(job, run_dir=run_dir, events_file=str(control / EVENTS), python=python)
        env["PYTHONPATH"] = python_path(str(control / PYLIB), env.get("PYTHONPATH"))
        request = {
            **supervisor_request(job, job_argv(job, python), env),
            "supervisor": self.helper.lib_path("supervisor"),
        }
        process = self.helper.call("starting the run", "launch", job.run_id, request)
        sent, count = self._blob_bytes_sent.pop(job.run_id, (0, 0))
        return self._handle(job.run_id, run_dir, process, python, blob_bytes_sent=sent, blobs_sent=count)

    def wait(self, handle: SSHHandle, timeout: float) -> TargetStatus:
        deadline = time.monotonic() + timeout
        run_id = handle.run_id
        while True:
            code = self._exit_code(handle)
            if code is not None:
                self._last_liveness.pop(run_id, None)
                return self._outcome(handle, code)
            now = time.monotonic()
            if now - self._last_liveness.get(run_id, 0.0) >= LIVENESS_SECONDS:
                self._last_liveness[run_id] = now
                status = self.helper.call(
                    "checking the run", "status", run_id, {"process": _process(handle)}, handle=handle
                )
                if not status["alive"]:
                    code = self._exit_code(handle)
                    if code is not None:
                        return self._outcome(handle, code)
                    return self._supervisor_lost(handle, status)
            if now >= deadline:
                return TargetStatus(running=True)
            time.sleep(min(0.2, deadline - now))

    def _supervisor_lost(self, handle: SSHHandle, status: dict[str, Any]) -> TargetStatus:
        """The outcome of a run whose supervisor ended without recording an exit code; what the run left
        running on the host is ended first."""
        stopped = self._kill(self.helper, handle, "stopping what the run left running", run="ended")
        stop = stopped_by(self._ended_by(handle))
        if stop is not None:
            # Killed with the run as a stop it recorded ended them both: the stop explains the end.
            return TargetStatus(running=False, exit_code=None, stopped_by=stop)
        reason = supervisor_lost_reason(
            f"host {self.host}",
            f"{handle.run_dir}/{CONTROL_DIR}",
            control_exists=bool(status.get("control_exists", True)),
            leftovers=int(stopped.get("leftovers") or 0),
        )
        return TargetStatus(running=False, exit_code=None, reason=reason)

    def _kill(self, helper: RemoteHelper, handle: SSHHandle, doing: str, **how: Any) -> Any:
        """Have the host end the run's processes: a SIGTERM, then a SIGKILL after the grace period."""
        return helper.call(
            doing,
            "kill",
            handle.run_id,
            {"grace": TERM_GRACE_SECONDS, "process": _process(handle)},
            handle=handle,
            timeout=self.ssh.io_timeout + TERM_GRACE_SECONDS,
            **how,
        )

    def read_log(self, handle: SSHHandle, offset: int, final: bool = False) -> Chunk:
        return self._read_lines(handle, STD_LOG, offset, final)

    def read_events(self, handle: SSHHandle, offset: int, final: bool = False) -> Chunk:
        return self._read_lines(handle, EVENTS, offset, final)

    def cancel(self, handle: SSHHandle) -> bool:
        # Airflow's SIGTERM handler cancels in the thread it interrupts, which may be halfway through a write
        # on the shared connection, holding paramiko's send lock: the kill goes over a connection of its own.
        with self.helper.on_own_connection() as helper:
            answer = self._kill(helper, handle, "stopping the run")
            # The run had ended: on its own, or by this very stop, whose first answer was lost (the call is then
            # made again, and finds the run gone). Its supervisor's record tells the two apart.
            stopped = not isinstance(answer, dict) or bool(answer.get("killed"))
            if not stopped:
                stopped = stopped_by(helper.read_control(handle, ENDED_BY, 0, 4096)) is not None
        # The next wait looks at the process at once rather than at its next periodic check.
        self._last_liveness.pop(handle.run_id, None)
        return stopped

    def collect(self, handle: SSHHandle) -> Collected:
        dest = self.runs_dir / handle.run_id
        with tempfile.TemporaryFile() as spool:

            def pack() -> None:
                spool.seek(0)
                spool.truncate()
                self.helper.run(
                    "pack", handle.run_id, None, handle=handle, timeout=self.ssh.io_timeout, sink=spool
                )

            self.ssh.retrying("collecting outputs and logs", pack, run="ended")
            spool.seek(0)
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            extract_tar_stream(
                spool,
                dest,
                lambda name, why: log.warning(
                    "Run %s: skipped %s from %s: %s", handle.run_id, name, self.host, why
                ),
            )
        for folder in ("outputs", "logs"):
            (dest / folder).mkdir(exist_ok=True)
        unmark_file(dest / "logs" / STD_LOG)
        return Collected(
            outputs_dir=dest / "outputs",
            logs_dir=dest / "logs",
            extra={"blob_bytes_sent": handle.blob_bytes_sent},
        )

    def cleanup(self, handle: SSHHandle, *, remove_files: bool) -> None:
        if remove_files:
            self.helper.call(
                "removing the run directory", "remove", handle.run_id, handle=handle, run="ended"
            )
            shutil.rmtree(self.runs_dir / handle.run_id, ignore_errors=True)

    def attachable(self, handle: SSHHandle) -> str | None:
        # A run row is data: this connection follows only runs on the host, port and login it points at.
        recorded = (handle.host, int(handle.port), handle.user or None)
        here = (self.host, self.ssh.port, self.ssh.login or None)
        if recorded != here:
            return (
                f"it was started as {handle.user or ''}@{handle.host}:{handle.port}, and connection "
                f"{self.name!r} now points at {self.ssh.login or ''}@{self.host}:{self.ssh.port}"
            )
        if handle.base_dir != self.helper.base():
            return (
                f"it was started under {handle.base_dir} on {self.host}, and connection {self.name!r} now uses "
                f"{self.helper.base()} (its extra amlrun_base_dir)"
            )
        return None

    def gone(self, handle: SSHHandle) -> str | None:
        return None

    def find(self, job: Job) -> SSHHandle | None:
        status = self.helper.call("looking for an earlier run", "status", job.run_id, {})
        if not status["exists"] or status["process"] is None:
            return None
        return self._handle(job.run_id, status["run_dir"], status["process"], None)

    def detach(self, handle: SSHHandle) -> None:
        pass  # nothing is held open per run: each look reads the run's files afresh

    def discard(self, job: Job) -> None:
        return None  # a run that never started left no process; its run directory goes per [amlrun] cleanup

    def _handle(
        self,
        run_id: str,
        run_dir: str,
        process: dict[str, Any],
        python: str | None,
        *,
        blob_bytes_sent: int = 0,
        blobs_sent: int = 0,
    ) -> SSHHandle:
        """What the run row keeps to follow a remote run from any process (a retry re-attaching)."""
        return SSHHandle(
            host=self.host,
            port=self.ssh.port,
            user=self.ssh.login,
            run_id=run_id,
            base_dir=self.helper.base(),
            run_dir=run_dir,
            pid=process["pid"],
            start_time=process.get("start_time"),
            boot_id=process.get("boot_id"),
            pid_namespace=process.get("pid_namespace"),
            python=python,
            helper=self.helper.lib_path("helper"),
            helper_python=self.helper.helper_python,
            blob_bytes_sent=blob_bytes_sent,
            blobs_sent=blobs_sent,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "host": self.host,
            "port": self.ssh.port,
            "user": self.ssh.login,
            "base_dir": self.base_dir,
        }

    # ------------------------------------------------------------------ the host

    def _base_python(self, job: Job) -> str:
        """The interpreter on the host a job runs with (user-managed) or builds its virtualenv from."""
        python = job.environment.spec.python
        if python.interpreter_path:
            return python.interpreter_path
        if python.version:
            return f"python{python.version}"
        return self.python

    def _credentials(self, job: Job) -> dict[str, str]:
        """Values of the variables the job's lock refers to (index URLs, direct-URL requirements), which the
        host's installer needs; a missing one fails the run before anything is recorded."""
        environment = job.environment
        return environment.index_credentials(
            what=f"Building environment {environment.name!r} on SSH host {self.host}"
        )

    def _read_lines(self, handle: SSHHandle, name: str, offset: int, final: bool) -> Chunk:
        data = self.ssh.retrying(
            "reading the run's output", lambda: self.helper.read_control(handle, name, offset, READ_CAP)
        )
        return lines_from(data, offset, final)

    def _exit_code(self, handle: SSHHandle) -> int | None:
        data = self.ssh.retrying(
            "checking the run", lambda: self.helper.read_control(handle, EXIT_CODE, 0, 64)
        )
        try:
            return int(data.strip()) if data else None
        except ValueError:
            return None

    def _ended_by(self, handle: SSHHandle) -> bytes:
        """The supervisor's ENDED_BY record of an ended run (empty when it wrote none)."""
        data: bytes = self.ssh.retrying(
            "checking the run", lambda: self.helper.read_control(handle, ENDED_BY, 0, 4096), run="ended"
        )
        return data

    def _outcome(self, handle: SSHHandle, code: int) -> TargetStatus:
        return recorded_status(code, self._ended_by(handle), self.host, on=self.host)


def _bind(function: Any, *args: Any) -> Any:
    return lambda: function(*args)


def _process(handle: SSHHandle) -> dict[str, Any] | None:
    """The run's process as the handle names it, for the helper; None for a handle without a start time
    (recorded by an older version), which the helper then reads from the run directory."""
    if handle.start_time is None:
        return None
    return {
        "pid": handle.pid,
        "start_time": handle.start_time,
        "boot_id": handle.boot_id,
        "pid_namespace": handle.pid_namespace,
    }


def _mb(size: int | str) -> str:
    return f"{int(size) / 1_000_000:.1f} MB"
