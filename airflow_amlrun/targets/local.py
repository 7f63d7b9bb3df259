"""The local target: the script runs as a process group on the Airflow worker itself.

The run starts under the supervisor (supervisor.py, run by the worker's own interpreter), which enforces
the run's time limit and records its exit code even when the task that started it is gone. The handle
names the supervisor's process by what identifies it for certain: the host, the boot, the pid namespace,
the pid and the process's start time. A retry follows (and signals) only a process that matches all of
them; a pid that now belongs to someone else is taken for a run that ended, and left alone.

A supervisor that ended without recording an exit code (killed alone, or unable to write) leaves behind
what the job started: those processes of its group whose environment names that very supervisor (see
supervisor.py) are ended when the run is next looked at, and nothing else.

The script controls its run directory: the control files are read without following links or blocking
(common.read_control), and the log is copied into logs/ without writing through a link.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from airflow_amlrun.config import Settings
from airflow_amlrun.environment import ensure_local_python
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
    add_run_folders,
    check_pyspark,
    job_argv,
    job_environment,
    new_run_dir,
    python_path,
    read_control,
    read_control_lines,
    recorded_status,
    remove_run_dir,
    stopped_by,
    supervisor_lost_reason,
    supervisor_request,
    unmarked,
    worker_environment,
    write_run_context_package,
)
from airflow_amlrun.targets.handles import LocalHandle

log = logging.getLogger(__name__)

# The handle of a run under the supervisor: the local target's, or a target's that starts its runs the same way.
SupervisedHandle = TypeVar("SupervisedHandle", bound=LocalHandle)

# How often a run started by another process (an earlier try) is looked at while it runs.
WATCH_SECONDS = 0.05


class LocalTarget:
    """Runs on the Airflow worker: a fresh run directory, the script in its own process group."""

    kind = "local"
    handle_type = LocalHandle
    # A process of this machine, with its run directory here.
    followed_only_here = True
    # A pyspark script (framework="pyspark") gets a local Spark (local[*]) of its own.
    local_spark = True

    def __init__(self, settings: Settings, cache_dir: Path, name: str = "local") -> None:
        self.name = name
        # Resolved once: the handle names the run directory as the kernel reports a process's cwd.
        self.runs_dir = Path(settings.local_runs_dir).expanduser().resolve()
        self.cache_dir = cache_dir
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        # The handles of the runs this target started, by run id, known before the supervisor gets its request.
        self._started: dict[str, LocalHandle] = {}

    def check(self, job: Job) -> None:
        if job.environment.user_managed:
            python = job.environment.spec.local_interpreter()
            if job.framework == "pyspark" and self.local_spark:
                check_pyspark(python, f"compute target {self.name!r}")

    def python(self, job: Job) -> str:
        """The job's interpreter here: the user's own, or the environment's cached virtualenv (built if new)."""
        return ensure_local_python(job.environment, self.cache_dir)

    def run_dir(self, job: Job) -> Path:
        return self.runs_dir / job.run_id

    def prepare(self, job: Job, code: CodeSource) -> None:
        run_dir = self.run_dir(job)
        new_run_dir(run_dir)
        code.materialize(run_dir)
        self.python(job)
        add_run_folders(run_dir)

    def submit(self, job: Job) -> LocalHandle:
        python = self.python(job)
        return self.start_supervised(job, job_argv(job, python), python, LocalHandle)

    def start_supervised(
        self,
        job: Job,
        argv: list[str],
        python: str,
        make_handle: Callable[..., SupervisedHandle],
        extra_env: dict[str, str] | None = None,
        *,
        grace_seconds: float = TERM_GRACE_SECONDS,
    ) -> SupervisedHandle:
        """Start argv under the run's supervisor in the job's run directory; its handle, made by `make_handle`
        from the local handle's fields.

        :param python: the interpreter the script runs with: one other than the worker's gets the run folder's
            copy of run_context (write_run_context_package).
        :param extra_env: variables the job gets besides the script's own (the target's, never recorded).
        :param grace_seconds: how long the job gets on SIGTERM at its time limit (as `stop_grace_seconds`).
        """
        run_dir = self.run_dir(job).resolve()
        control = run_dir / CONTROL_DIR
        env = {
            **worker_environment(),
            **(extra_env or {}),
            **job_environment(
                job,
                run_dir=str(run_dir),
                events_file=str(control / EVENTS),
                python=python if self.local_spark else None,
            ),
        }
        if python != sys.executable:
            # Another interpreter may lack this package: give it run_context, whose stand-in package gives way
            # to an installed airflow_amlrun where that interpreter has one of the worker's run protocol.
            pylib = write_run_context_package(control / PYLIB)
            env["PYTHONPATH"] = python_path(str(pylib), env.get("PYTHONPATH"))
        request = json.dumps({**supervisor_request(job, argv), "grace_seconds": grace_seconds}).encode()
        here = _machine()
        process: subprocess.Popen[bytes] | None = None
        try:
            with open(control / STD_LOG, "wb") as log:
                # The worker's own interpreter, isolated (-I: no PYTHON* variables of the job, -S: no site), so the
                # supervisor starts in a few tens of milliseconds; it leads the run's new session and group.
                process = subprocess.Popen(
                    [sys.executable, "-I", "-S", supervisor.__file__, str(control)],
                    cwd=run_dir,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            # Read before anything can reap the child: until then its pid (and its start time) stays its own.
            handle = make_handle(
                pid=process.pid,
                start_time=_start_time(process.pid),
                host=here["host"],
                boot_id=here["boot_id"],
                pid_namespace=here["pid_namespace"],
                run_dir=str(run_dir),
                std_log=str(control / STD_LOG),
                events=str(control / EVENTS),
                exit_code=str(control / EXIT_CODE),
                ended_by=str(control / ENDED_BY),
                python=python,
            )
        except BaseException:
            # Interrupted before the run is known by its id: the supervisor, still waiting for its request, ends.
            if process is not None:
                _abandon(process)
            raise
        # Known by its run id before the job can start (the supervisor waits for its request): a start interrupted
        # from here on is found, and stopped, by find.
        self._started[job.run_id] = handle
        self._processes[process.pid] = process
        assert process.stdin is not None
        # A supervisor that ends before reading it all was stopped before its job started (it records so) or
        # failed: its outcome says which, as for any run.
        with contextlib.suppress(BrokenPipeError), process.stdin:
            process.stdin.write(request)
        return handle

    def wait(self, handle: LocalHandle, timeout: float) -> TargetStatus:
        process = self._processes.get(handle.pid)
        if process is not None:
            if not supervisor.wait_child(process, timeout):
                return TargetStatus(running=True)
        else:
            # A run started by an earlier try of this task: not our child, so watch it from outside.
            deadline = time.monotonic() + timeout
            while _running(handle):
                if time.monotonic() >= deadline:
                    return TargetStatus(running=True)
                time.sleep(WATCH_SECONDS)
        return _outcome(handle, process)

    def read_log(self, handle: LocalHandle, offset: int, final: bool = False) -> Chunk:
        return read_control_lines(handle.run_dir, STD_LOG, offset, final)

    def read_events(self, handle: LocalHandle, offset: int, final: bool = False) -> Chunk:
        return read_control_lines(handle.run_dir, EVENTS, offset, final)

    def stop_grace_seconds(self, handle: LocalHandle) -> float:
        """How long a stopped run gets to exit on SIGTERM before its whole process group is killed."""
        return TERM_GRACE_SECONDS

    def cancel(self, handle: LocalHandle) -> bool:
        pid = handle.pid
        process = self._processes.get(pid)

        def running() -> bool:
            # Our own child keeps its pid until it is reaped, so its group is surely the run's while
            # poll() says it runs; another try's run counts only while provably the same process.
            return process.poll() is None if process is not None else _running(handle)

        if not running():
            if process is None or process.poll() is not None:
                # The supervisor is gone: what the run left in its group (if it could not end it) goes now.
                _end_leftovers(handle)
            return False
        # To the supervisor alone, which passes it on to the group (see supervisor_request).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
        if process is not None:
            supervisor.wait_child(process, self.stop_grace_seconds(handle))
        else:
            deadline = time.monotonic() + self.stop_grace_seconds(handle)
            while time.monotonic() < deadline and running():
                time.sleep(0.05)
        if running():
            _signal_group(pid, signal.SIGKILL)
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=TERM_GRACE_SECONDS)
        return True

    def collect(self, handle: LocalHandle) -> Collected:
        run_dir = Path(handle.run_dir)
        _copy_log(run_dir)
        return Collected(outputs_dir=run_dir / "outputs", logs_dir=run_dir / "logs")

    def cleanup(self, handle: LocalHandle, *, remove_files: bool) -> None:
        self._processes.pop(handle.pid, None)
        self._started = {run_id: h for run_id, h in self._started.items() if h.pid != handle.pid}
        if remove_files:
            remove_run_dir(handle.run_dir, self.runs_dir)

    def attachable(self, handle: LocalHandle) -> str | None:
        if "host" in handle.absent:
            # Recorded before handles named their machine: followed only while provably the same process.
            return None
        here = _machine()
        if handle.host != here["host"]:
            return (
                f"it runs on worker {handle.host!r} as a local process, and this retry runs on worker "
                f"{here['host']!r}; a local run can be followed only on the machine it runs on"
            )
        if handle.boot_id != here["boot_id"]:
            return f"worker {here['host']!r} has restarted since the run started, which ended it"
        if handle.pid_namespace != here["pid_namespace"]:
            return (
                f"it was started in another process namespace on worker {here['host']!r} (a container that "
                "has since been restarted?), where this retry cannot see it"
            )
        return None

    def gone(self, handle: LocalHandle) -> str | None:
        here = _machine()
        if handle.host == here["host"] and handle.boot_id not in (None, here["boot_id"]):
            # A restart ends every process of the machine: nothing of the run's process is left to follow.
            return f"worker {here['host']!r} restarted while the run ran, which ended it"
        return None

    def find(self, job: Job) -> LocalHandle | None:
        # A run this target started (its start interrupted before its handle was returned) is its child; any other
        # process leaves no trace by run id that could be trusted: an unsaved handle means a lost run.
        return self._started.get(job.run_id)

    def detach(self, handle: LocalHandle) -> None:
        pass  # nothing is held open per run: each look reads the run's files afresh

    def discard(self, job: Job) -> None:
        return None  # a run that never started left no process behind

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "host": os.uname().nodename}


def _abandon(process: subprocess.Popen[bytes]) -> None:
    """End a supervisor that has not had its request: the end of its input tells it so; a kill makes sure."""
    with contextlib.suppress(OSError):
        if process.stdin is not None:
            process.stdin.close()
    if process.poll() is None:  # not reaped: its pid (the group's id) is still its own
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=TERM_GRACE_SECONDS)


def _outcome(handle: LocalHandle, process: subprocess.Popen[bytes] | None) -> TargetStatus:
    run_dir = handle.run_dir
    try:
        code = int(read_control(run_dir, EXIT_CODE, 0, 64).strip())
    except ValueError:
        # The supervisor ended without recording an exit code: killed with the run as a stop it recorded ended
        # them both (the stop then explains the end), killed alone, or unable to write.
        stop = stopped_by(read_control(run_dir, ENDED_BY, 0, 4096))
        if stop is not None:
            _end_leftovers(handle)
            return TargetStatus(running=False, exit_code=None, stopped_by=stop)
        returncode = process.returncode if process is not None else None
        killed = returncode if returncode is not None and returncode < 0 else None
        control = Path(run_dir) / CONTROL_DIR
        reason = supervisor_lost_reason(
            f"worker {handle.host or os.uname().nodename!r}",
            str(control),
            control_exists=control.is_dir() and not control.is_symlink(),
            killed_by=None if killed is None else signal.Signals(-killed).name,
            leftovers=_end_leftovers(handle),
        )
        return TargetStatus(running=False, exit_code=killed, reason=reason)
    return recorded_status(code, read_control(run_dir, ENDED_BY, 0, 4096), "the worker")


def _copy_log(run_dir: Path) -> None:
    """Copy the run's log into its logs/ folder, which the script controls: nothing is written through a
    link it put there (an entry in the way is replaced, and named in the task log)."""
    try:
        root = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        logs = _own_folder(root, "logs", run_dir)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(STD_LOG, dir_fd=logs)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(STD_LOG, flags, 0o644, dir_fd=logs), "wb") as out:
                for data in unmarked(_control_pieces(run_dir, STD_LOG)):
                    out.write(data)
        except OSError as err:
            log.warning("The run's log could not be copied to %s/logs/%s: %s", run_dir, STD_LOG, err)
        finally:
            os.close(logs)
    finally:
        os.close(root)


def _control_pieces(run_dir: Path, name: str) -> Iterator[bytes]:
    offset = 0
    while data := read_control(run_dir, name, offset, READ_CAP):
        yield data
        offset += len(data)


def _own_folder(parent: int, name: str, shown: Path) -> int:
    """A descriptor of the real folder `name` in `parent`, made so when a link or a file is in its place."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        log.warning(
            "The run's %s/%s/ was not a folder (a symbolic link?): replaced by an empty folder for its log.",
            shown,
            name,
        )
        os.unlink(name, dir_fd=parent)
    os.mkdir(name, 0o755, dir_fd=parent)
    return os.open(name, flags, dir_fd=parent)


def _machine() -> dict[str, str | None]:
    """What a pid is relative to: the host, its current boot, and this process's pid namespace."""
    return {"host": os.uname().nodename, "boot_id": _boot_id(), "pid_namespace": _pid_namespace()}


def _on_this_machine(handle: LocalHandle) -> bool:
    """Whether the handle's pid is one of this machine, boot and pid namespace."""
    here = _machine()
    return (handle.host, handle.boot_id, handle.pid_namespace) == (
        here["host"],
        here["boot_id"],
        here["pid_namespace"],
    )


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None when unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot: with the pid, it names one process for good."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def _running(handle: LocalHandle) -> bool:
    """Whether the run's supervisor still runs, as far as this process can prove it is the same process.

    Anything else (another machine or boot, a pid now used by another process, a process this user may not
    inspect) counts as ended, so that it is never signalled or waited for.
    """
    pid = int(handle.pid)
    if handle.legacy:
        return _legacy_running(pid, handle.run_dir)
    if handle.start_time is None or not _on_this_machine(handle):
        return False
    fields = _stat_fields(pid)
    return (
        fields is not None and fields[0] != "Z" and len(fields) > 19 and int(fields[19]) == handle.start_time
    )


def _legacy_running(pid: int, run_dir: str) -> bool:
    """The same for a handle recorded before handles carried a start time: the process must work in the
    run directory (compared resolved), and be one this user may inspect."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    try:
        return os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(run_dir)
    except OSError:
        return False


def _end_leftovers(handle: LocalHandle) -> int:
    """SIGKILL what the run left running in its process group once its supervisor (the group's leader) is
    gone; how many processes that was.

    The group's id is the supervisor's pid, which no new process gets while the group lives; but once the
    group ended, a new group may take that id. So a member counts as the run's only if its environment
    names the supervisor by pid and start time (supervisor.LEADER_ENV), which nothing else's does; and
    only on the machine, boot and pid namespace the run started in. Each is signalled through a pidfd
    opened before it is looked at, so a pid reused in between cannot be hit.
    """
    if handle.start_time is None or not _on_this_machine(handle):
        return 0
    if _running(handle):
        return 0  # the supervisor runs: the group is its business
    pgid = int(handle.pid)
    marker = f"\0{supervisor.LEADER_ENV}={pgid}:{handle.start_time}\0".encode()
    ended = 0
    for pid in _group_members(pgid):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            fields = _stat_fields(pid)
            if fields is None or fields[0] == "Z" or int(fields[2]) != pgid:
                continue
            if marker not in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                continue
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            ended += 1
        except OSError:
            continue
        finally:
            os.close(pidfd)
    return ended


def _group_members(pgid: int) -> list[int]:
    """The live processes of a process group, as /proc shows them."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
