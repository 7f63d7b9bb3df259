"""The SSH target: any Airflow `ssh` connection is a remote machine runs execute on, detached from the session.

The worker talks to the host through the SSH provider's `SSHHook` (paramiko: connection, host key checks)
and SFTP. On the host a small stdlib-only helper (`ssh_remote.py`, copied to `<base>/lib/` once per
version) does everything that would otherwise take many round trips:

* code: the host keeps a blob cache `<base>/blobs/<digest>`; one `prepare` command checks it, and when
  blobs are missing names them (only those are sent, over SFTP, then `prepare` is asked again); it copies
  blobs to paths in the run directory `<base>/runs/<run id>` (refusing paths that escape it) and builds
  the environment's virtualenv under `<base>/envs/<build key>` if it is not there yet;
* start: `launch` reads the command line and the variables (secrets among them) from its stdin and starts
  the run under the supervisor (`supervisor.py`, copied beside the helper), in a session and process group
  of its own, handing it that request through a pipe (never a file, never a command line). The supervisor
  enforces the run's max_run_duration_seconds on the host and records its exit code in
  `<run dir>/.amlrun/`: a dropped connection or a dead worker neither ends the run nor lets it overrun;
* follow: log and metric lines are read over SFTP by byte offset, so a reconnect loses nothing; the exit
  code file decides the outcome. A control file is read only once `lstat` says it is a regular file (a
  FIFO put there would hang the host's SFTP server). The run's process is named by pid, start time and
  boot id: nothing else is ever signalled. A run whose supervisor ended without an exit code (killed
  alone, or unable to write) is recorded Failed with the reason, and what it left running is ended by the
  helper (only processes that provably belong to it);
* collect: `pack` sends outputs/ and logs/ back as a tar stream, skipping (with a warning in the task log)
  any link that leads out of its folder.

A host whose sshd offers no SFTP subsystem still works: blobs and reads then go through the helper on the
command channel, and the task log says how to enable SFTP there.

The base dir must be the login user's own and writable by nobody else (checked on every first contact, in
the same round trip that looks at the interpreter); the helper and the supervisor under `<base>/lib/` are
checked against their SHA-256 there too, and written again (atomically) when they differ. Everything that
runs under one SSH login can change what later runs of that login execute (files of the base dir, the
login's own Python site folders): DAGs sharing an SSH login trust each other, as users sharing a Unix
account do. Code blobs are not hashed again on the host for that reason.

A managed environment whose index URLs refer to `${VAR}` gets the values from the worker's environment,
sent in the helper's stdin request and handed only to the installer's process environment on the host;
the lock written there keeps the references.

Connection extras read besides the SSH provider's own: `amlrun_base_dir` (default `~/.amlrun`),
`amlrun_python` (default `python3`), `amlrun_reconnect_timeout` (seconds, default 300),
`amlrun_io_timeout` (seconds of silence after which a connection counts as dropped, default 20) and
`known_hosts` (a known_hosts file holding the host's key, as the provider's async hook reads it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import select
import shlex
import shutil
import stat
import tarfile
import tempfile
import time
import weakref
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Literal

from airflow_amlrun.environment.lock import has_requirements
from airflow_amlrun.errors import AmlRunError, ConfigurationError, TargetUnreachableError
from airflow_amlrun.snapshot import hash_bytes
from airflow_amlrun.targets import supervisor
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
    stopped_for_limit,
    supervisor_lost_reason,
    supervisor_request,
    write_run_context_package,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import paramiko
    from airflow.providers.ssh.hooks.ssh import SSHHook

    from airflow_amlrun.config import Settings
    from airflow_amlrun.workspace import Workspace

log = logging.getLogger(__name__)

DEFAULT_BASE_DIR = "~/.amlrun"
DEFAULT_PYTHON = "python3"
DEFAULT_RECONNECT_TIMEOUT = 300.0
DEFAULT_CONN_TIMEOUT = 10
# A remote step that answers nothing for this long is taken for a dropped connection.
DEFAULT_IO_TIMEOUT = 20.0
# Building a virtualenv on the host may take long; it answers only once done.
BUILD_TIMEOUT = 1800.0
# How often a run without an exit code yet is checked for being alive (the exit code file is polled often).
LIVENESS_SECONDS = 2.0
HELPER_SOURCE = Path(__file__).with_name("ssh_remote.py")
SUPERVISOR_SOURCE = Path(supervisor.__file__)
REFUSED = 3
# The line of sshd_config that gives a host the SFTP subsystem.
SFTP_SUBSYSTEM = "Subsystem sftp internal-sftp"
# What is known of the run while a remote operation fails, for the message that gives up on it.
RunState = Literal["not started", "unknown", "ended"]
# The folders of the base dir that other users must not be able to write (the base dir itself first).
PRIVATE_DIRS = ("", "lib", "blobs", "envs", "runs")
# Run on the host by the probe: the interpreter's version and platform, then (JSON) the login's uid, owner
# and mode of the base dir's folders, and the SHA-256 of the files of lib/ named in the arguments.
PROBE_SCRIPT = """
import hashlib, json, os, stat, sys, sysconfig
print("%d.%d" % sys.version_info[:2])
print(sys.implementation.name + "-" + sysconfig.get_platform())
base, names = sys.argv[1], sys.argv[2:]
found = {"uid": os.getuid(), "dirs": {}, "lib": {}}
for name in PRIVATE_DIRS:
    try:
        st = os.stat(os.path.join(base, name) if name else base)
    except OSError:
        continue
    found["dirs"][name] = [st.st_uid, st.st_mode]
for name in names:
    path, digest = os.path.join(base, "lib", name), None
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            with open(path, "rb") as stream:
                digest = hashlib.sha256(stream.read()).hexdigest()
    except OSError:
        pass
    found["lib"][name] = digest
print(json.dumps(found))
""".replace("PRIVATE_DIRS", repr(PRIVATE_DIRS))


class SSHTargetError(AmlRunError):
    """The SSH target could not do what a run needs on its host; the message names the host and the fix."""

    def __init__(self, message: str, *, host: str) -> None:
        super().__init__(message)
        self.host = host


class SSHTargetConfigurationError(SSHTargetError, ConfigurationError):
    """The connection or the environment does not fit the host (credentials, host key, interpreter)."""


class SSHTargetUnreachableError(SSHTargetError, TargetUnreachableError):
    """The host did not answer again within the reconnect timeout; the run may go on there."""


class SSHTarget:
    """Runs on the host of an Airflow `ssh` connection, in a run directory under the connection's base dir."""

    kind = "ssh"

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
        self.port = port
        self.login = login
        self.extras = extras
        self.base_dir = str(extras.get("amlrun_base_dir") or DEFAULT_BASE_DIR)
        self.python = str(extras.get("amlrun_python") or DEFAULT_PYTHON)
        self.reconnect_timeout = float(extras.get("amlrun_reconnect_timeout") or DEFAULT_RECONNECT_TIMEOUT)
        self.conn_timeout = int(extras.get("conn_timeout") or DEFAULT_CONN_TIMEOUT)
        self.io_timeout = float(extras.get("amlrun_io_timeout") or DEFAULT_IO_TIMEOUT)
        self.runs_dir = settings.local_runs_dir
        self._connection = _Connection()
        # A target dropped without cleanup (a notebook, a failed run kept for inspection) closes its
        # connection when collected; paramiko's own thread would otherwise keep it open for good.
        weakref.finalize(self, self._connection.drop)
        self._remote_base: str | None = None
        self._probed: dict[str, tuple[str, str]] = {}
        # Base dirs whose lib/ holds this version's helper and supervisor.
        self._lib_present: set[str] = set()
        # False once the host turned out to offer no SFTP: transfers then go through the helper.
        self._sftp_offered = True
        self._pythons: dict[str, str] = {}
        self._blob_bytes_sent: dict[str, tuple[int, int]] = {}
        self._last_liveness: dict[str, float] = {}
        # The interpreter the helper runs with: the first one found working on the host.
        self._helper_python: str | None = None
        # Whether a connection to the host was ever made (a failure is then a lost one, not an unreachable host).
        self._ever_connected = False
        # Control files of runs already named in the task log as not read: (run id, file name).
        self._not_read: set[tuple[str, str]] = set()

    @classmethod
    def from_connection(cls, name: str, conn: Any, settings: Settings, workspace: Workspace) -> SSHTarget:
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
        user = f"{self.login}@" if self.login else ""
        return f"{user}{self.host}:{self.port}"

    # ------------------------------------------------------------------ the protocol

    def check(self, job: Job) -> None:
        """Connect and look at the host now, so an unreachable host, refused credentials or a missing
        interpreter fail before the run is recorded."""
        self._connect()
        self._probe(self._base_python(job))
        self._credentials(job)

    def prepare(self, job: Job, code: CodeSource) -> None:
        base_python = self._base_python(job)
        version, platform = self._probe(base_python)
        base = self._base()
        files = {
            entry.path: (entry.digest, entry.size, entry.mode)
            for entry in code.snapshot.entries
            if entry.digest is not None
        }
        pylib = self._run_context_blobs
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
        timeout = self.io_timeout
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
        answer = self._call(
            "preparing the run directory", "prepare", job.run_id, request, timeout=timeout, run="not started"
        )
        sent = missing = 0
        if "missing" in answer:
            sent, missing = self._send_code(job, code, blobs, answer)
            answer = self._call(
                "preparing the run directory",
                "prepare",
                job.run_id,
                request,
                timeout=timeout,
                run="not started",
            )
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
                f"Host {self.host} has {_mb(cache['free'])} free in {self._base()}, but run {job.run_id} needs "
                f"about {_mb(needed)} there (new code blobs plus the run directory). Free space on the host, or "
                f"set the connection's extra amlrun_base_dir to a folder on a larger disk.",
                host=self.host,
            )
        pylib_bytes = dict(self._run_context_blobs.values())
        sent = 0
        for digest in missing:
            data = pylib_bytes[digest] if digest in pylib_bytes else code.store.get_bytes(digest)
            self._remote(
                f"sending code blob {digest[:12]}", _bind(self._put_blob, digest, data), run="not started"
            )
            sent += len(data)
        return sent, len(missing)

    def submit(self, job: Job) -> dict[str, Any]:
        run_dir = self._run_dir(job.run_id)
        control = PurePosixPath(run_dir) / CONTROL_DIR
        python = self._pythons.get(job.run_id) or self._base_python(job)
        env = job_environment(job, run_dir=run_dir, events_file=str(control / EVENTS))
        env["PYTHONPATH"] = ":".join(filter(None, [str(control / PYLIB), env.get("PYTHONPATH")]))
        request = {
            **supervisor_request(job, job_argv(job, python), env),
            "supervisor": self._lib_path("supervisor"),
        }
        process = self._call("starting the run", "launch", job.run_id, request)
        sent, count = self._blob_bytes_sent.pop(job.run_id, (0, 0))
        return self._handle(job.run_id, run_dir, process, python, blob_bytes_sent=sent, blobs_sent=count)

    def wait(self, handle: dict[str, Any], timeout: float) -> TargetStatus:
        deadline = time.monotonic() + timeout
        run_id = handle["run_id"]
        while True:
            code = self._exit_code(handle)
            if code is not None:
                self._last_liveness.pop(run_id, None)
                return self._outcome(handle, code)
            now = time.monotonic()
            if now - self._last_liveness.get(run_id, 0.0) >= LIVENESS_SECONDS:
                self._last_liveness[run_id] = now
                status = self._call(
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

    def _supervisor_lost(self, handle: dict[str, Any], status: dict[str, Any]) -> TargetStatus:
        """The outcome of a run whose supervisor ended without recording an exit code; what the run left
        running on the host is ended first."""
        stopped = self._call(
            "stopping what the run left running",
            "kill",
            handle["run_id"],
            {"grace": TERM_GRACE_SECONDS, "process": _process(handle)},
            handle=handle,
            timeout=self.io_timeout + TERM_GRACE_SECONDS,
            run="ended",
        )
        reason = supervisor_lost_reason(
            f"host {self.host}",
            f"{handle['run_dir']}/{CONTROL_DIR}",
            control_exists=bool(status.get("control_exists", True)),
            leftovers=int(stopped.get("leftovers") or 0),
        )
        return TargetStatus(running=False, exit_code=None, reason=reason)

    def read_log(self, handle: dict[str, Any], offset: int, final: bool = False) -> Chunk:
        return self._read_lines(handle, STD_LOG, offset, final)

    def read_events(self, handle: dict[str, Any], offset: int, final: bool = False) -> Chunk:
        return self._read_lines(handle, EVENTS, offset, final)

    def cancel(self, handle: dict[str, Any]) -> None:
        self._call(
            "stopping the run",
            "kill",
            handle["run_id"],
            {"grace": TERM_GRACE_SECONDS, "process": _process(handle)},
            handle=handle,
            timeout=self.io_timeout + TERM_GRACE_SECONDS,
        )
        # The next wait looks at the process at once rather than at its next periodic check.
        self._last_liveness.pop(handle["run_id"], None)

    def collect(self, handle: dict[str, Any]) -> Collected:
        dest = self.runs_dir / handle["run_id"]
        with tempfile.TemporaryFile() as spool:

            def pack() -> None:
                spool.seek(0)
                spool.truncate()
                self._run_helper(
                    "pack", handle["run_id"], None, handle=handle, timeout=self.io_timeout, sink=spool
                )

            self._remote("collecting outputs and logs", pack, run="ended")
            spool.seek(0)
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            with tarfile.open(fileobj=spool, mode="r|") as tar:
                for member in tar:
                    try:
                        tar.extract(member, dest, filter="data")
                    except (tarfile.TarError, OSError) as err:
                        # One file that cannot be written here does not cost the run its other outputs.
                        log.warning(
                            "Run %s: skipped %s from %s: %s",
                            handle["run_id"],
                            _shorten(member.name),
                            self.host,
                            err.strerror if isinstance(err, OSError) and err.strerror else err,
                        )
        for folder in ("outputs", "logs"):
            (dest / folder).mkdir(exist_ok=True)
        return Collected(
            outputs_dir=dest / "outputs",
            logs_dir=dest / "logs",
            extra={"blob_bytes_sent": handle.get("blob_bytes_sent")},
        )

    def cleanup(self, handle: dict[str, Any], *, remove_files: bool) -> None:
        if remove_files:
            self._call("removing the run directory", "remove", handle["run_id"], handle=handle, run="ended")
            shutil.rmtree(self.runs_dir / handle["run_id"], ignore_errors=True)

    def attachable(self, handle: dict[str, Any]) -> str | None:
        return None

    def gone(self, handle: dict[str, Any]) -> str | None:
        return None

    def find(self, job: Job) -> dict[str, Any] | None:
        status = self._call("looking for an earlier run", "status", job.run_id, {})
        if not status["exists"] or status["process"] is None:
            return None
        return self._handle(job.run_id, status["run_dir"], status["process"], None)

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
    ) -> dict[str, Any]:
        """What the run row keeps to follow a remote run from any process (a retry re-attaching)."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.login,
            "run_id": run_id,
            "base_dir": self._base(),
            "run_dir": run_dir,
            # The run's supervisor on the host: the pid names it only together with its start and boot.
            "pid": process["pid"],
            "start_time": process.get("start_time"),
            "boot_id": process.get("boot_id"),
            "pid_namespace": process.get("pid_namespace"),
            "python": python,
            "helper": self._lib_path("helper"),
            "helper_python": self._helper_python,
            "blob_bytes_sent": blob_bytes_sent,
            "blobs_sent": blobs_sent,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "user": self.login,
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

    def _base_expression(self) -> str:
        """The base dir as a shell word, `~` standing for the remote user's home."""
        base = self.base_dir
        if base == "~":
            return '"$HOME"'
        if base.startswith("~/"):
            return '"$HOME"/' + shlex.quote(base[2:])
        return shlex.quote(base)

    def _probe(self, python: str) -> tuple[str, str]:
        """(Python version, platform) of an interpreter on the host; also learns the base dir, checks that it
        is private to the login user, and whether lib/ holds this version's helper and supervisor intact, in
        the same round trip."""
        if python in self._probed:
            return self._probed[python]
        base = self._base_expression()
        names = " ".join(shlex.quote(name) for name in self._lib)
        command = (
            f"printf '%s\\n' {base}; {shlex.quote(python)} -I -c {shlex.quote(PROBE_SCRIPT)} {base} {names}"
        )
        rc, out, err = self._remote(
            "looking at the host", lambda: self._exec(command, None, self.io_timeout), run="not started"
        )
        lines = out.decode("utf-8", "replace").splitlines()
        if len(lines) < 1:
            raise SSHTargetError(
                f"Host {self.host} answered {out!r} {err!r} to a shell command; the login shell of "
                f"{self.where} must be a POSIX shell (sh, bash, zsh).",
                host=self.host,
            )
        remote_base = lines[0]
        if rc != 0 or len(lines) < 4:
            raise SSHTargetConfigurationError(
                f"No usable Python interpreter {python!r} on host {self.host} (SSH connection {self.name!r}): "
                f"{err.decode('utf-8', 'replace').strip() or f'exit status {rc}'}. Install Python 3 there "
                "(e.g. apt-get install python3), or name the interpreter: the environment's "
                "python.interpreter_path, or the connection's extra amlrun_python.",
                host=self.host,
            )
        version, platform = lines[1], lines[2]
        if tuple(int(p) for p in version.split(".")) < (3, 7):
            raise SSHTargetConfigurationError(
                f"Python {version} at {python!r} on host {self.host} is too old; runs need Python 3.7 or newer "
                "there. Set the environment's python.interpreter_path or the connection's extra amlrun_python "
                "to a newer interpreter.",
                host=self.host,
            )
        found = json.loads(lines[3])
        self._check_private(remote_base, found)
        self._remote_base = remote_base
        self._note_lib(remote_base, found["lib"])
        self._probed[python] = (version, platform)
        self._helper_python = self._helper_python or python
        return version, platform

    def _check_private(self, base: str, found: dict[str, Any]) -> None:
        """Refuse a base dir that another user of the host owns or may write: they could change the helper,
        the code and the environments runs execute there, and read the secrets runs receive."""
        uid = int(found["uid"])
        for name, (owner, mode) in found["dirs"].items():
            folder = f"{base}/{name}" if name else base
            if owner != uid:
                problem = f"belongs to uid {owner}, not to {self.login or 'the login user'} (uid {uid})"
            elif mode & 0o022:
                problem = (
                    f"is writable by {'other users' if mode & 0o002 else 'its group'} (mode {mode & 0o777:o})"
                )
            else:
                continue
            user = self.login or "the login user"
            raise SSHTargetConfigurationError(
                f"The amlrun folder {folder} on host {self.host} (SSH connection {self.name!r}) {problem}: other "
                "users of the host could change the helper, code and environments runs execute there, and read "
                f"the secrets they receive. Make it private to {user} (as that user: `chmod -R go-w {base}`, "
                f"and as root `chown -R {user} {base}` if needed), or set the connection's extra "
                f"amlrun_base_dir to a folder only {user} can write.",
                host=self.host,
            )

    def _note_lib(self, base: str, digests: dict[str, str | None]) -> None:
        """Remember whether base/lib holds this version's files intact; warn of one changed since written."""
        stale = False
        for name, data in self._lib.items():
            digest = digests.get(name)
            if digest == hashlib.sha256(data).hexdigest():
                continue
            stale = True
            if digest is not None:
                log.warning(
                    "Host %s: %s/lib/%s was changed since it was written (its content no longer matches its "
                    "SHA-256); writing it again. Something running as %s changed it: a run of a DAG sharing "
                    "this SSH login?",
                    self.host,
                    base,
                    name,
                    self.login or "the login user",
                )
        if stale:
            self._lib_present.discard(base)
        else:
            self._lib_present.add(base)

    def _base(self) -> str:
        if self._remote_base is None:
            self._probe(self.python)
        assert self._remote_base is not None
        return self._remote_base

    def _run_dir(self, run_id: str) -> str:
        return f"{self._base()}/runs/{run_id}"

    @cached_property
    def _lib(self) -> dict[str, bytes]:
        """The files runs need in <base>/lib on the host, each named by its content hash (a changed one is a
        new file): the helper, and the supervisor every run starts under."""
        files = {}
        for prefix, source in (("amlrun-remote", HELPER_SOURCE), ("amlrun-supervisor", SUPERVISOR_SOURCE)):
            data = source.read_bytes()
            files[f"{prefix}-{hashlib.sha256(data).hexdigest()[:16]}.py"] = data
        return files

    def _lib_path(self, which: str, base: str | None = None) -> str:
        """Path on the host of this version's `helper` or `supervisor`, under base (default: the target's)."""
        helper, supervisor_file = self._lib
        return f"{base or self._base()}/lib/{helper if which == 'helper' else supervisor_file}"

    @cached_property
    def _run_context_blobs(self) -> dict[str, tuple[str, bytes]]:
        """The importable run_context package, as run-dir path -> (digest, bytes), cached like code blobs."""
        with tempfile.TemporaryDirectory() as tmp:
            root = write_run_context_package(tmp)
            files = sorted(p for p in root.rglob("*") if p.is_file())
            blobs = {}
            for path in files:
                data = path.read_bytes()
                relative = f"{CONTROL_DIR}/{PYLIB}/{path.relative_to(root).as_posix()}"
                blobs[relative] = (hash_bytes(data), data)
            return blobs

    def _ensure_lib(self, base: str) -> None:
        """Write the helper and the supervisor to base/lib on the host, unless the probe found them intact
        there; each is written to a temporary name, then renamed over the final one."""
        if base in self._lib_present:
            return
        folder = f"{base}/lib"
        for name, data in self._lib.items():
            final = shlex.quote(f"{folder}/{name}")
            tmp = shlex.quote(f"{folder}/{name}.tmp-{time.monotonic_ns()}")
            # One round trip each, and no SFTP needed.
            command = f"umask 077 && mkdir -p {shlex.quote(folder)} && cat > {tmp} && mv -f {tmp} {final}"
            rc, _out, err = self._exec(command, data, self.io_timeout)
            if rc != 0:
                raise SSHTargetError(
                    f"Cannot write to {folder} on host {self.host} as {self.login or 'the connection user'}: "
                    f"{err.decode('utf-8', 'replace').strip()}. Make the folder writable by that user, or set "
                    "the connection's extra amlrun_base_dir to a folder it can write (default ~/.amlrun).",
                    host=self.host,
                )
        self._lib_present.add(base)

    def _put_blob(self, digest: str, data: bytes) -> None:
        sftp = self._sftp_client()
        if sftp is None:
            header = json.dumps({"size": len(data)}).encode() + b"\n"
            self._run_helper("put", digest, None, handle=None, timeout=self.io_timeout, raw=header + data)
            return
        final = f"{self._base()}/blobs/{digest}"
        tmp = f"{final}.tmp-{time.monotonic_ns()}"
        try:
            sftp.putfo(io.BytesIO(data), tmp, file_size=len(data))
            sftp.posix_rename(tmp, final)
        except OSError as err:
            if not self._connected():
                raise
            with contextlib.suppress(OSError):
                sftp.remove(tmp)
            raise SSHTargetError(
                f"Could not write code blob {digest[:12]} ({len(data)} bytes) to {final} on host {self.host}: "
                f"{err}. Check the free space and permissions there, or set the connection's extra "
                "amlrun_base_dir to a writable folder on a larger disk.",
                host=self.host,
            ) from err

    def _call(
        self,
        action: str,
        command: str,
        run_id: str | None,
        request: dict[str, Any] | None = None,
        *,
        handle: dict[str, Any] | None = None,
        timeout: float | None = None,
        run: RunState = "unknown",
    ) -> Any:
        """Run one helper command on the host (reconnecting if the connection drops) and parse its answer."""
        limit = timeout or self.io_timeout
        out = self._remote(
            action, lambda: self._run_helper(command, run_id, request, handle=handle, timeout=limit), run=run
        )
        return json.loads(out) if out else None

    def _run_helper(
        self,
        command: str,
        run_id: str | None,
        request: dict[str, Any] | None,
        *,
        handle: dict[str, Any] | None,
        timeout: float,
        sink: IO[bytes] | None = None,
        raw: bytes | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> bytes:
        """Run one helper command; `raw` is sent on its stdin as it is, else the JSON of `request`. Its
        warnings go to the task log, or to `on_warning`."""
        # This version's helper, also for a run an older version started: it reads older run directories.
        base = handle["base_dir"] if handle else self._base()
        python = (handle or {}).get("helper_python") or self._helper_python or self.python
        self._ensure_lib(base)
        # Isolated (-I: no PYTHON* variables, no user site folder), without site (-S): stdlib only, fast.
        words = [
            python,
            "-I",
            "-S",
            self._lib_path("helper", base),
            command,
            base,
            *([run_id] if run_id else []),
        ]
        line = " ".join(shlex.quote(w) for w in words)
        stdin = raw if raw is not None else json.dumps(request).encode() if request is not None else None
        rc, out, err = self._exec(line, stdin, timeout, sink=sink)
        message = err.decode("utf-8", "replace").strip()
        if rc == REFUSED:
            raise SSHTargetError(f"Host {self.host}: {message}", host=self.host)
        if rc != 0:
            raise SSHTargetError(
                f"The amlrun helper failed on host {self.host} ({command}, exit status {rc}):\n{message[-3000:]}",
                host=self.host,
            )
        for warning in filter(None, message.splitlines()):
            if on_warning is not None:
                on_warning(warning)
            else:
                log.warning("Host %s: %s", self.host, warning)
        return out

    def _read_lines(self, handle: dict[str, Any], name: str, offset: int, final: bool) -> Chunk:
        data = self._remote(
            "reading the run's output", lambda: self._read_control(handle, name, offset, READ_CAP)
        )
        return lines_from(data, offset, final)

    def _exit_code(self, handle: dict[str, Any]) -> int | None:
        data = self._remote("checking the run", lambda: self._read_control(handle, EXIT_CODE, 0, 64))
        try:
            return int(data.strip()) if data else None
        except ValueError:
            return None

    def _outcome(self, handle: dict[str, Any], code: int) -> TargetStatus:
        ended_by = self._remote(
            "checking the run", lambda: self._read_control(handle, ENDED_BY, 0, 4096), run="ended"
        )
        if stopped_for_limit(ended_by):
            return TargetStatus(
                running=False,
                exit_code=code,
                reason=f"stopped on {self.host} for exceeding max_run_duration_seconds",
                timed_out=True,
            )
        return _outcome(code, self.host)

    def _read_control(self, handle: dict[str, Any], name: str, offset: int, size: int) -> bytes:
        """Bytes of a file of the run's control folder from an offset (nothing while it does not exist).

        Only a regular file is opened: the script may have put a FIFO there (an SFTP server opening it would
        hang) or a link. Anything else is named once in the task log and read as empty.
        """
        sftp = self._sftp_client()
        if sftp is None:
            request = {"name": name, "offset": offset, "size": size}
            return self._run_helper(
                "read",
                handle["run_id"],
                request,
                handle=handle,
                timeout=self.io_timeout,
                on_warning=lambda warning: self._not_read_once(handle, name, warning),
            )
        path = f"{handle['run_dir']}/{CONTROL_DIR}/{name}"
        try:
            mode = sftp.lstat(path).st_mode or 0
        except FileNotFoundError:
            return b""
        if not stat.S_ISREG(mode):
            self._not_read_once(handle, name, f"{path} is {_kind(mode)}, not a regular file")
            return b""
        try:
            with sftp.open(path, "rb") as stream:
                stream.seek(offset)
                data: bytes = stream.read(size)
                return data
        except FileNotFoundError:
            return b""

    def _not_read_once(self, handle: dict[str, Any], name: str, why: str) -> None:
        if (handle["run_id"], name) not in self._not_read:
            self._not_read.add((handle["run_id"], name))
            log.warning("Host %s: the run's file %s: it is not read, and counts as empty.", self.host, why)

    # ------------------------------------------------------------------ the connection

    @cached_property
    def _hook(self) -> SSHHook:
        from airflow.providers.ssh.hooks.ssh import SSHHook

        hook = SSHHook(ssh_conn_id=self.name, conn_timeout=self.conn_timeout, conn_retry_attempts=1)
        known_hosts = self.extras.get("known_hosts")
        if known_hosts and hook.host_key is None and not hook.no_host_key_check:
            hook.host_key = _known_host_key(str(known_hosts), self.host, self.port, self.name)
        return hook

    def _connect(self) -> paramiko.SSHClient:
        import paramiko

        if self._connection.client is not None and self._connected():
            return self._connection.client
        self._reset()
        hook = self._hook
        hook.client = None
        try:
            client = hook.get_conn()
        except paramiko.BadHostKeyException as err:
            raise SSHTargetConfigurationError(
                f"The host key of {self.host} (SSH connection {self.name!r}) is not the one on record: "
                f"{err}. If the host was reinstalled, update its entry in known_hosts (or the connection's "
                "extra host_key); otherwise someone may be intercepting the connection.",
                host=self.host,
            ) from err
        except paramiko.AuthenticationException as err:
            raise SSHTargetConfigurationError(
                f"Authentication to {self.where} (SSH connection {self.name!r}) failed: {err}. Check the "
                "connection's login and key_file / private_key / password, and that the public key is in "
                f"~{self.login or ''}/.ssh/authorized_keys on {self.host}.",
                host=self.host,
            ) from err
        except paramiko.SSHException as err:
            if "known_hosts" in str(err) or "not found in" in str(err):
                raise SSHTargetConfigurationError(
                    f"The host key of {self.host}:{self.port} is unknown (SSH connection {self.name!r}), so "
                    "the host cannot be trusted. Add it to ~/.ssh/known_hosts on the worker (ssh-keyscan), "
                    "or to the file the connection's extra known_hosts names, or set its extra host_key.",
                    host=self.host,
                ) from err
            raise SSHTargetError(self._unreachable(err), host=self.host) from err
        except OSError as err:
            error = SSHTargetError(self._unreachable(err), host=self.host)
            raise error from err
        self._connection.client = client
        self._ever_connected = True
        return client

    def _unreachable(self, err: BaseException) -> str:
        return (
            f"Cannot reach SSH host {self.where} (connection {self.name!r}): {_describe(err)}. "
            "Check that the host is up and sshd listens on that port and that the worker can reach it; "
            f"raise the connection's extra conn_timeout (now {self.conn_timeout} s) for a slow network."
        )

    def _connected(self) -> bool:
        client = self._connection.client
        transport = client.get_transport() if client is not None else None
        return bool(transport is not None and transport.is_active())

    def _reset(self) -> None:
        self._connection.close()

    def _sftp_client(self) -> paramiko.SFTPClient | None:
        """The SFTP session, or None on a host whose sshd offers no SFTP (transfers then use the helper)."""
        import paramiko

        if not self._sftp_offered:
            return None
        if self._connection.sftp is None or not self._connected():
            transport = self._connect().get_transport()
            assert transport is not None
            channel = self._open_session(transport, self.io_timeout)
            try:
                channel.invoke_subsystem("sftp")
                # Silence from here on (the version handshake too) is a TimeoutError, as for a command.
                channel.settimeout(self.io_timeout)
                sftp = paramiko.SFTPClient(channel)
            except paramiko.SSHException as err:
                channel.close()
                if not self._connected():
                    raise
                # The connection is fine, so the server refused the subsystem itself.
                self._sftp_offered = False
                log.warning(
                    "Host %s (SSH connection %r) offers no SFTP subsystem (%s); sending code and reading logs "
                    "through the amlrun helper on the command channel instead, which is slower. To enable "
                    "SFTP, add the line `%s` to the host's /etc/ssh/sshd_config and reload sshd.",
                    self.host,
                    self.name,
                    _describe(err),
                    SFTP_SUBSYSTEM,
                )
                return None
            self._connection.sftp = sftp
        return self._connection.sftp

    @staticmethod
    def _open_session(transport: paramiko.Transport, timeout: float) -> paramiko.Channel:
        """A new channel on the connection; TimeoutError when the host does not answer within timeout."""
        import paramiko

        try:
            return transport.open_session(timeout=timeout)
        except paramiko.SSHException as err:
            # paramiko says so only in words; a link gone silent must count as such, not as a refusal.
            if transport.is_active() and "Timeout" in str(err):
                raise TimeoutError(f"no answer to opening an SSH channel for {timeout:g} s") from err
            raise

    def _exec(
        self, command: str, stdin: bytes | None, timeout: float, sink: IO[bytes] | None = None
    ) -> tuple[int, bytes, bytes]:
        """Run a command on the host: its exit status, stdout (unless sent to sink) and stderr.

        Both streams are read as they come: they share the channel's flow-control window, so one left
        unread (megabytes of warnings on stderr) would stall the other. Silence on both for `timeout`
        seconds raises TimeoutError.
        """
        transport = self._connect().get_transport()
        assert transport is not None
        channel = self._open_session(transport, timeout)
        try:
            channel.settimeout(timeout)
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            out, err = bytearray(), bytearray()
            while True:
                if channel.recv_stderr_ready():
                    err += channel.recv_stderr(1 << 16)
                elif channel.recv_ready():
                    data = channel.recv(1 << 16)
                    if sink is not None:
                        sink.write(data)
                    else:
                        out += data
                elif channel.eof_received or channel.closed:
                    break
                elif not select.select([channel], [], [], timeout)[0]:
                    raise TimeoutError(f"no answer to {command.split()[0]} ... for {timeout:g} s")
            if not channel.status_event.wait(timeout):
                raise TimeoutError(f"no exit status from {command.split()[0]} ... within {timeout:g} s")
            if channel.exit_status < 0 and not transport.is_active():
                raise EOFError("the connection closed before the command's exit status arrived")
            return channel.exit_status, bytes(out), bytes(err)
        finally:
            channel.close()

    def _remote(self, action: str, operation: Any, *, run: RunState = "unknown") -> Any:
        """Do a remote operation, reconnecting while the connection is lost, for at most the reconnect timeout.

        The run goes on on the host meanwhile; every read is by offset, so nothing is lost or repeated.
        `run` says what is known of the run, for the message that gives up.
        """
        import paramiko

        deadline = time.monotonic() + self.reconnect_timeout
        attempt = 0
        while True:
            try:
                result = operation()
                if attempt:
                    log.warning("Reconnected to %s; %s again.", self.where, action)
                return result
            except (
                SSHTargetConfigurationError,
                paramiko.BadHostKeyException,
                paramiko.AuthenticationException,
            ):
                raise
            except (SSHTargetError, paramiko.SSHException, OSError, EOFError) as err:
                connected = self._connected()
                # Silence while the connection stands: a dead link the transport has not noticed yet, or a
                # host too slow to answer within amlrun_io_timeout.
                silent = isinstance(err, TimeoutError) and connected
                if isinstance(err, SSHTargetError) and connected:
                    raise
                if not (silent or isinstance(err, EOFError) or not connected):
                    raise
                self._reset()
                if time.monotonic() > deadline:
                    raise SSHTargetUnreachableError(
                        self._gave_up(action, err, silent, run), host=self.host
                    ) from err
                if attempt == 0:
                    if silent:
                        log.warning(
                            "No answer from %s for %g s while %s (%s); reconnecting.%s",
                            self.where,
                            self.io_timeout,
                            action,
                            _describe(err),
                            " The run goes on on the host." if run == "unknown" else "",
                        )
                    elif self._ever_connected:
                        log.warning(
                            "Lost the SSH connection to %s while %s (%s); reconnecting.%s",
                            self.where,
                            action,
                            _describe(err),
                            " The run goes on on the host." if run == "unknown" else "",
                        )
                    else:
                        log.warning("%s Trying again while %s.", _describe(err, bare=True), action)
                attempt += 1
                time.sleep(min(0.5 * attempt, 3.0))

    def _gave_up(self, action: str, err: BaseException, silent: bool, run: RunState) -> str:
        """Why a remote operation was given up after the reconnect timeout, and what to do."""
        wait = f"{self.reconnect_timeout:.0f} s"
        if not self._ever_connected:
            message = (
                f"{_describe(err, bare=True)} Tried for {wait} while {action}; raise the connection's extra "
                "amlrun_reconnect_timeout to wait longer."
            )
        elif silent:
            message = (
                f"Host {self.where} did not answer while {action}: nothing came for {self.io_timeout:g} s, again "
                f"for {wait}, although the SSH connection itself was up ({_describe(err)}). A slow or busy host "
                f"needs a longer wait: raise the connection's extra amlrun_io_timeout (now {self.io_timeout:g} s)."
            )
        else:
            message = (
                f"Lost the connection to {self.where} while {action} and could not reconnect within {wait} "
                f"({_describe(err)}). Raise the connection's extra amlrun_reconnect_timeout to wait longer."
            )
        if run == "unknown":
            message += (
                " The run itself may still be going on the host: a retry of the task re-attaches to it."
            )
        elif run == "ended":
            message += (
                " The run itself has ended on the host: a retry of the task (or `amlrun reconcile`) records "
                "its outcome and collects its outputs."
            )
        return message


class _Connection:
    """The open SSH client and its SFTP session, closed together."""

    def __init__(self) -> None:
        self.client: paramiko.SSHClient | None = None
        self.sftp: paramiko.SFTPClient | None = None

    def close(self) -> None:
        for closable in (self.sftp, self.client):
            if closable is not None:
                with contextlib.suppress(Exception):
                    closable.close()
        self.sftp = None
        self.client = None

    def drop(self) -> None:
        """Close the transport (and so the SFTP session on it) quietly, as a finalizer may run late."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        self.sftp = None
        self.client = None


def _bind(function: Any, *args: Any) -> Any:
    return lambda: function(*args)


def _describe(err: BaseException, bare: bool = False) -> str:
    """An error as the user reads it: its type named when its message is empty (a socket timeout says
    nothing), its cause's when it only wraps one; `bare` keeps the message of our own error as it is."""
    if isinstance(err, SSHTargetError):
        if bare:
            return str(err)
        if err.__cause__ is not None:
            return _describe(err.__cause__)
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _kind(mode: int) -> str:
    """What a file of the given mode is, in words."""
    for test, kind in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device node"),
        (stat.S_ISBLK, "a device node"),
    ):
        if test(mode):
            return kind
    return "a special file"


def _shorten(text: str, keep: int = 100) -> str:
    return text if len(text) <= 2 * keep + 3 else f"{text[:keep]}...{text[-keep:]}"


def _process(handle: dict[str, Any]) -> dict[str, Any] | None:
    """The run's process as the handle names it, for the helper; None for a handle without a start time
    (recorded by an older version), which the helper then reads from the run directory."""
    if handle.get("start_time") is None:
        return None
    return {
        "pid": handle["pid"],
        "start_time": handle["start_time"],
        "boot_id": handle.get("boot_id"),
        "pid_namespace": handle.get("pid_namespace"),
    }


def _outcome(code: int, host: str) -> TargetStatus:
    if code > 128:
        import signal

        with contextlib.suppress(ValueError):
            name = signal.Signals(code - 128).name
            return TargetStatus(running=False, exit_code=code, reason=f"killed by signal {name} on {host}")
    return TargetStatus(running=False, exit_code=code)


def _known_host_key(path: str, host: str, port: int, conn_id: str) -> paramiko.PKey | None:
    import os

    import paramiko

    keys = paramiko.HostKeys()
    try:
        keys.load(os.path.expanduser(path))
    except OSError as err:
        raise SSHTargetConfigurationError(
            f"SSH connection {conn_id!r}: cannot read its known_hosts file {path!r} ({err}); fix the extra "
            "known_hosts or remove it to use ~/.ssh/known_hosts.",
            host=host,
        ) from err
    found = keys.lookup(host if port == 22 else f"[{host}]:{port}")
    # None leaves the host unknown: the connection is then refused once the host answers.
    return next(iter(found.values())) if found else None


def _mb(size: int | str) -> str:
    return f"{int(size) / 1_000_000:.1f} MB"
