"""Runs on the target beside the training script: starts it, enforces its time limit, records how it ended.

Every target starts a run through this file, so that a run keeps its limit and leaves its outcome behind
even when nobody watches it (the task that submitted it died): the local target runs it with the worker's
Python, the SSH target copies it to the host beside its helper, the Docker target mounts (or copies) it
into the container. It uses the standard library only and runs on Python 3.7 and newer.

    python3 supervisor.py CONTROL_DIR [--request-file FILE]

The request is a JSON object read from stdin, or from FILE, which is deleted once read (it may hold
secret values that must not stay on disk)::

    {"argv": ["python", "train.py", "--alpha", "0.5"],   # the job, run in the current directory
     "env": {"NAME": "value"},                            # added to the supervisor's own environment
     "max_seconds": 600,                                  # optional time limit, from the supervisor's start
     "grace_seconds": 5,                                  # SIGTERM first, SIGKILL after this long
     "drain_seconds": 1,                                  # optional, see below
     "hold_seconds": 0.25,                                # optional, see below
     "forward_signals": false,                            # see below
     "end_group": false}                                  # see below

The supervisor is the leader of the run's process group (its starter made it one: a new session on the
worker and on an SSH host, ``docker run --init`` in a container); the job and everything it starts stay
in that group. When the job ends, the supervisor writes its exit code (128 + the signal number for a
job killed by a signal, as a shell reports it) to ``CONTROL_DIR/exit_code`` and exits with it. A job that
runs past ``max_seconds`` gets SIGTERM, then SIGKILL after the grace period, together with everything it
started; ``CONTROL_DIR/ended_by`` then says why, and the job's log says so too. With ``end_group``, what
the job left running in its group when it ended (a stray child, a daemon it forked) is killed too, once
the exit code is recorded. That signal ends the supervisor itself, so a target using it reads the exit
code from the file. Once the job ended, what its pipes still hold is read into the log for up to
``drain_seconds`` (default ``DRAIN_SECONDS``): what it left running in its group may hold them open.

The run must not outlive its supervisor, whatever ends it:
- recording is best effort: a control file that cannot be written (a full disk, a job that deleted
  ``CONTROL_DIR``) is reported on stderr (the run's log) instead, and the job is signalled first;
- a supervisor that fails ends the run's group before it exits;
- on Linux the job gets PR_SET_PDEATHSIG, so it is killed when the supervisor is (the out-of-memory
  killer, ``kill -9``). What the job started is left for the target: the job's environment carries
  ``AMLRUN_SUPERVISOR=<pid>:<start time>``, which names this supervisor for good, so a target that finds
  the leader gone without an exit code can end the processes of its group that carry it, and no other.

The run's log is the supervisor's stdout: what the job writes to stdout and to stderr, one line holding one
stream's bytes (a line left open by one stream is ended when the other writes, once it had up to
``hold_seconds``, default ``HOLD_SECONDS``, to end: see ``_copy_output``), each stderr line beginning
with ``STDERR_MARK``, the supervisor's own messages too. A stdout line that begins with ESC (a colour code,
or the mark's own bytes) begins with ``STDOUT_MARK`` before it, so no output of the job's passes for a mark.
A follower takes one mark off the start of a line (and logs a line that had ``STDERR_MARK`` as the script's
error output); the log a run keeps is written without them. The job writes into two pipes the supervisor
reads as they fill: what the job wrote to both streams before the supervisor read either (a flushed
``logging.warning`` right before a ``print``) is logged stdout first (unless stderr has a line open, which is
given its hold first), so the two streams' lines are in order only as far as the supervisor read them apart.
Output the log cannot take (a full disk) is counted, and the count and the reason are written to the log and
to ``CONTROL_DIR/log_loss`` once the job ended.

Signals: the supervisor does not die of SIGTERM, SIGINT or SIGHUP (it must outlive the job to record its exit
code). A target stops a run by signalling the supervisor alone (inside a container, ``docker stop`` does, through
the container's init), which with ``forward_signals`` passes the signal on to the group: so it knows whether the
stop found the job running before the job gets it. A signal to the whole group (sent by someone else) reaches
the job and the supervisor at once, and is seen as well. A stop is the supervisor's to see through: once
such a signal found the job running (or ended it), ``CONTROL_DIR/ended_by`` says so, and a job still running
``grace_seconds`` later is killed (SIGKILL; what it left in its group then goes as when it ends on its own).
So a stop holds even when whoever sent it is gone before it could follow it up (Airflow kills a task
5 seconds after asking it to stop, which may be before the run's grace period ended). A signal the job, or
what it started, sends its own group (``kill 0``, to end its helpers) is no stop: it reaches the supervisor too,
which tells it apart by its sender. A stop that comes before the job started (while the request is awaited or
read) is recorded in ``ended_by`` at once, and the job is never started: the exit code is the signal's.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

# The job waits for this process to start, so it imports no more than it needs: not typing (mypy reads any
# name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO, Any

EXIT_CODE = "exit_code"
ENDED_BY = "ended_by"
# What ENDED_BY holds when the supervisor stopped the job for its time limit.
MAX_DURATION = "max_run_duration"
# What ENDED_BY holds when a stop's signal to the group found the job running.
STOPPED = "stopped"
# How often the supervisor looks whether a stop's grace period has passed, while it waits for the job.
STOP_CHECK_SECONDS = 0.25
DEFAULT_GRACE_SECONDS = 5.0
# Exit status of the supervisor when it cannot start the job (as a shell reports a missing command).
CANNOT_START = 127
# The job's variable naming its supervisor by pid and start time (clock ticks since boot, field 22 of
# /proc/PID/stat): what proves a process of the run's group to be the run's once the supervisor is gone.
LEADER_ENV = "AMLRUN_SUPERVISOR"
# prctl(2) option: the signal a process gets when its parent ends.
PR_SET_PDEATHSIG = 1
# The signals the supervisor handles itself (passing them on to the group when asked to).
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What the supervisor's wait for its job takes: those, and the job's end.
WAITED_SIGNALS = (*HANDLED_SIGNALS, signal.SIGCHLD)
# What begins a line of the run's log that the job (or the supervisor) wrote to stderr: an OSC escape
# sequence, which a terminal showing the raw log ignores.
STDERR_MARK = b"\x1b]amlrun;stderr\x07"
# What begins a line of the log that the job wrote to stdout beginning with ESC, the first byte of both marks:
# one byte, so a line start is known whatever the pipe's reads cut, at the cost of a mark on lines that begin
# with a colour code.
STDOUT_MARK = b"\x1b]amlrun;stdout\x07"
# Where the supervisor records how much of the job's output the log could not take, and why (JSON).
LOG_LOSS = "log_loss"
# How long the job's output pipes are read once the job ended, unless the request says: what it left running
# in its group may hold them open (and is stopped next).
DRAIN_SECONDS = 1.0
# How long output of one stream waits for a line the other left open to end (see _copy_output).
HOLD_SECONDS = 0.25


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "--request-file"):
        sys.stderr.write("usage: supervisor.py CONTROL_DIR [--request-file FILE]\n")
        return 2
    control = argv[1]
    # Stops are held from here on: one that comes while the request is read is seen before the job would start
    # (see _supervise), where the signal's default action would end this process with nothing recorded.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    data = _read_request(argv[3] if len(argv) == 4 else None)
    stop = _stop_before_start()
    if stop is not None:
        return _not_started(control, stop)
    request = _parse_request(data)
    try:
        return _supervise(control, request)
    except BaseException as err:
        if _state["job"] is not None:
            # Nothing would stop the run, or record how it ended, once this process is gone. Signalled before
            # anything is written: a log that blocks must not keep the run going.
            _signal_group(signal.SIGTERM)
            _say(f"amlrun: the run's supervisor failed ({type(err).__name__}: {err}); stopping the run")
            _await_end(_state["job"], float(request.get("grace_seconds") or DEFAULT_GRACE_SECONDS))
            _finish_log(control, _drain_seconds(request))
            _signal_group(signal.SIGKILL)
        raise


# Whether to pass a signal on to the group, whether the group was signalled already (by this process), when
# (time.monotonic()) and by which signal a stop from outside found the job running, the job and the thread
# copying its output.
_state: dict[str, Any] = {
    "forward": False,
    "signalled": False,
    "stopped_at": None,
    "stopped_by": None,
    "stop_recorded": False,
    "taken": False,
    "job": None,
    "pump": None,
    "hold": HOLD_SECONDS,
}


def _supervise(control: str, request: dict[str, Any]) -> int:
    _state["forward"] = bool(request.get("forward_signals"))
    # The job's end is taken as SIGCHLD: whoever started this process may have left it ignored, under which
    # the job would leave no exit status.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # The signals stay blocked, for the wait for the job to take them one by one, together with who sent them
    # (see _wait); SIGCHLD too, which ends that wait when the job ends. Where the system cannot say who sent a
    # signal (no sigtimedwait), a handler takes them, and they are blocked only while the job starts: between fork
    # and exec the job would still have this process's handlers, under which a signal to the group is lost when
    # exec replaces them.
    _state["taken"] = taken = hasattr(signal, "sigtimedwait")
    if not taken:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, lambda signum, frame: _on_stop(signum, None))
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED_SIGNALS if taken else HANDLED_SIGNALS)
    limit = request.get("max_seconds")
    max_seconds = None if limit is None else float(limit)
    grace = float(request.get("grace_seconds") or DEFAULT_GRACE_SECONDS)
    drain = _drain_seconds(request)
    hold = request.get("hold_seconds")
    # Held output must reach the log before the drain ends.
    _state["hold"] = min(HOLD_SECONDS if hold is None else float(hold), drain / 2)

    stop = _stop_before_start()
    if stop is not None:
        return _not_started(control, stop)
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
    started = _own_start_time()
    if started is not None:
        env[LEADER_ENV] = f"{os.getpid()}:{started}"
    try:
        job = subprocess.Popen(
            [str(word) for word in request["argv"]],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            preexec_fn=_in_job_before_exec(),
        )
    except OSError as err:
        _say(f"amlrun: cannot start {request['argv'][0]!r}: {err}")
        _record(control, EXIT_CODE, str(CANNOT_START))
        return CANNOT_START
    _state["job"] = job
    if not taken:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    assert job.stdout is not None and job.stderr is not None
    pump = threading.Thread(target=_pump, args=(job.stdout, job.stderr), daemon=True)
    pump.start()
    _state["pump"] = pump

    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    code = _wait(job, control, deadline, grace)
    if code is None:
        assert max_seconds is not None
        code = _stop_for_limit(job, control, max_seconds, grace, drain)
    _say_stopped(control)  # a stop that came as the job ended, if one did
    _finish_log(control, drain)
    _record(control, EXIT_CODE, str(code))
    if request.get("end_group"):
        _signal_group(signal.SIGKILL)
    return code


def _take_signals(timeout: float) -> None:
    """Wait at most `timeout` seconds for a signal (a stop, or SIGCHLD: the job ended), and take every one that
    came, each with the pid of its sender."""
    while True:
        info = signal.sigtimedwait(WAITED_SIGNALS, timeout)
        if info is None:
            return
        timeout = 0  # then only those already there
        if info.si_signo != signal.SIGCHLD:
            # A pid is told only for a signal a process sent (kill, killpg, sigqueue); the kernel's own have none.
            _on_stop(info.si_signo, info.si_pid if info.si_code <= 0 else None)


def _on_stop(signum: int, sender: int | None) -> None:
    """A stop's signal reached the run's group, unless this process or the run itself sent it (a script's
    ``kill 0`` to end what it started reaches the supervisor too): note that it found the job running (or still
    starting), which makes the supervisor see it through (see _wait), and pass it on if asked to."""
    if _state["signalled"] or (sender is not None and _sent_by_the_run(sender)):
        # This process's own signal to the group (its copy), a stop it passed on already, or the run's own.
        return
    job = _state["job"]
    # A signal whose sender is not known (the kernel's own, or where the system cannot tell) is passed on
    # only: it may be the run's own.
    if sender is not None and _state["stopped_by"] is None and (job is None or _found_running(job, signum)):
        _state["stopped_at"] = time.monotonic()
        _state["stopped_by"] = signal.Signals(signum).name
    # Passed on once: the supervisor receives its own copy of what it sends the group.
    if _state["forward"]:
        _signal_group(signum)


def _sent_by_the_run(pid: int) -> bool:
    """Whether a signal's sender is this process or one of the run's group other than whoever started this
    process (a container's entrypoint script that passes `docker stop` on). One that is gone already is taken for
    the run's: whoever stops a run from outside (a target, a container's init) waits for it to end, where one of
    the run's own processes may end right after signalling its group."""
    if pid == os.getpid():
        return True
    if pid == os.getppid():
        return False
    try:
        return os.getpgid(pid) == os.getpgrp()
    except OSError:
        return True


def _found_running(job: subprocess.Popen[bytes], signum: int) -> bool:
    """Whether a stop's signal found the job running: it still runs, or it ended by that very signal (the
    group's signal reaches the job as it reaches this process, and may end it first). Looked at without
    reaping it; True where the system cannot tell (no waitid)."""
    if job.returncode is not None:
        return job.returncode == -signum
    try:
        ended = os.waitid(os.P_PID, job.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return job.returncode == -signum  # reaped already
    except (AttributeError, OSError):
        return True
    if ended is None:
        return True
    return ended.si_code in (os.CLD_KILLED, os.CLD_DUMPED) and ended.si_status == signum


def _stop_before_start() -> str | None:
    """The name of a stop's signal that came before the job started (they are held from main's first step), taken
    now; None if none came. Before the job exists nothing of the run can have sent it: whoever did, it is a stop."""
    pending = [sig for sig in HANDLED_SIGNALS if sig in signal.sigpending()]
    for sig in pending:
        signal.sigwait({sig})
    # Which came first is not known: the first of HANDLED_SIGNALS (SIGTERM, what targets send) is named.
    return pending[0].name if pending else None


def _not_started(control: str, stop: str) -> int:
    """Record that a stop came before the job started, which is then never started; the exit status to end with."""
    _say(f"amlrun: the run was stopped ({stop}) before its script started")
    _state["stopped_by"] = stop
    _say_stopped(control)
    status = 128 + signal.Signals[stop].value
    _record(control, EXIT_CODE, str(status))
    return status


def _read_stdin() -> bytes | None:
    """All of stdin, or None as soon as a stop is pending (see main): whoever gave up on starting the run may keep
    its end of the pipe open."""
    chunks: list[bytes] = []
    while not set(HANDLED_SIGNALS) & signal.sigpending():
        if _readable(0, STOP_CHECK_SECONDS):
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    return None


def _read_request(path: str | None) -> bytes | str | None:
    """The request as it came, None if a stop came first (see main), or why it could not be read."""
    if path is None:
        data = _read_stdin()
        # The job gets no stdin; the request (and any secret in it) is not left readable there.
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        return data
    try:
        with open(path, "rb") as stream:
            data = stream.read()
        os.unlink(path)
    except OSError as err:
        return f"the request file cannot be read and removed ({err})"
    return data


def _parse_request(data: bytes | str | None) -> dict[str, Any]:
    """The request read by _read_request; a request that is none ends this process with a line saying why."""
    if isinstance(data, str):
        raise SystemExit(f"amlrun supervisor: {data}; nothing ran")
    if not data:
        raise SystemExit(
            "amlrun supervisor: the request is empty (whoever started the run went away before sending it); "
            "nothing ran"
        )
    try:
        request = json.loads(data.decode("utf-8"))
    except ValueError as err:
        raise SystemExit(f"amlrun supervisor: the request is not JSON ({err}); nothing ran") from None
    if not isinstance(request, dict) or not request.get("argv"):
        raise SystemExit("amlrun supervisor: the request must be a JSON object with a non-empty 'argv'")
    return request


def _wait(job: subprocess.Popen[bytes], control: str, deadline: float | None, grace: float) -> int | None:
    """The job's exit code once it ends, or None when the deadline passes first. Once a stop's signal found the job
    running, ENDED_BY says so at once (whatever ends the run and this process next, that is known), the deadline no
    longer counts, and a job still running `grace` seconds later is killed (SIGKILL, the job alone: its output is
    read next); one that outlives that too (uninterruptible sleep) is given the kill's exit code."""
    killed_at = None
    while True:
        if _state["taken"] and job.poll() is not None:
            # The signals that reached this process with the one that ended the job (a stop's signal to the group
            # is there before the job it killed is seen to end) are taken first.
            _take_signals(0)
            return _exit_code(job.returncode)
        now = time.monotonic()
        stopped_at = _state["stopped_at"]
        # Looked at again at least every STOP_CHECK_SECONDS.
        step = STOP_CHECK_SECONDS
        if stopped_at is not None:
            _say_stopped(control)
            if killed_at is None and now >= stopped_at + grace:
                _say(f"amlrun: the run did not end within {grace:g} s of its stop; killing it (SIGKILL)")
                job.kill()
                killed_at = now
            elif killed_at is not None and now >= killed_at + grace:
                return 128 + signal.SIGKILL
        elif deadline is not None:
            if now >= deadline:
                return None
            step = min(step, deadline - now)
        if _state["taken"]:
            _take_signals(step)
        elif wait_child(job, step):
            return _exit_code(job.returncode)


def _say_stopped(control: str) -> None:
    """Record in ENDED_BY, once, that a stop's signal found the job running, if one did."""
    if _state["stopped_by"] is not None and not _state["stop_recorded"]:
        _state["stop_recorded"] = True
        _record(control, ENDED_BY, json.dumps({"reason": STOPPED, "signal": _state["stopped_by"]}))


def wait_child(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait at most ``timeout`` seconds for this process's child ``process`` to exit; whether it did (then it is
    reaped and has its returncode).

    The kernel wakes the wait the moment the child exits (a pidfd becomes readable), where ``Popen.wait`` with a
    timeout sleeps in steps of up to 50 ms, by which every run would be seen to end later. Falls back to
    ``Popen.wait`` where pidfds are missing (a kernel before 5.3, a Python before 3.9, a sandbox refusing the
    call). The local target waits for a run's supervisor with it, and the supervisor for its job.
    """
    if process.returncode is None and timeout > 0:
        try:
            # Our own child, not yet reaped: its pid cannot name another process meanwhile.
            pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            pidfd = None
        if pidfd is not None:
            try:
                _readable(pidfd, timeout)  # readable once the child exited
            finally:
                os.close(pidfd)
            return process.poll() is not None
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _stop_for_limit(
    job: subprocess.Popen[bytes], control: str, max_seconds: float, grace: float, drain: float
) -> int:
    # Signalled before anything is written: a file that cannot be written, or a log that blocks, must not
    # keep the run going.
    _signal_group(signal.SIGTERM)
    _say(
        f"amlrun: the run exceeded max_run_duration_seconds={max_seconds:g}; stopping it (SIGTERM, then "
        f"SIGKILL after {grace:g} s)"
    )
    _record(control, ENDED_BY, json.dumps({"reason": MAX_DURATION, "max_seconds": max_seconds}))
    code = _await_end(job, grace)
    # What the job wrote last (a checkpoint's message, a traceback) is still in the pipes.
    _finish_log(control, drain)
    # Whatever the job started goes too; the exit code is recorded first, as this ends the supervisor.
    _record(control, EXIT_CODE, str(code))
    _signal_group(signal.SIGKILL)
    return code


def _await_end(job: subprocess.Popen[bytes], grace: float) -> int:
    """The exit code of a signalled job once it ends, SIGKILLed (alone: its output is read next) if it is
    still running after the grace period."""
    if wait_child(job, grace):
        return _exit_code(job.returncode)
    job.kill()
    # A job in uninterruptible sleep (a hung device, a dead disk) may outlive SIGKILL for a while: its exit
    # code is then the kill's, and the run still ends.
    if wait_child(job, grace):
        return _exit_code(job.returncode)
    return 128 + signal.SIGKILL


def _drain_seconds(request: dict[str, Any]) -> float:
    drain = request.get("drain_seconds")
    return DRAIN_SECONDS if drain is None else float(drain)


def _finish_log(control: str, drain: float) -> None:
    """Read what the job's pipes still hold into the log (for `drain` seconds at most: what the job left
    running may hold them open), then say there what the log lost, if anything: the log is whole before the
    exit code says the run ended, so a follower then reads it to its end."""
    if _state["pump"] is not None:
        _state["pump"].join(drain)
    lost, error = _log.lost, _log.error
    if lost:
        _say(f"amlrun: {lost} bytes of the run's output could not be written to its log ({error})")
        _record(control, LOG_LOSS, json.dumps({"bytes": lost, "error": error}))


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(sig: int) -> None:
    _state["signalled"] = True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgrp(), sig)


def _record(control: str, name: str, text: str) -> bool:
    """Write a control file atomically (a reader sees it whole or not at all); False, with the reason on
    stderr (the run's log), when it cannot be written."""
    final = os.path.join(control, name)
    tmp = f"{final}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as out:
            out.write(text + "\n")
        os.replace(tmp, final)
        return True
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        then = (
            "; the run's target will report that the run ended without an exit code"
            if name == EXIT_CODE
            else ""
        )
        _say(
            f"amlrun: the supervisor could not record {name} ({text}) in {control}: {err.strerror or err}{then}"
        )
        return False


class _Log:
    """The run's log (this process's stdout), which the job's two streams and the supervisor share."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        # The stream (1 or 2) whose line is left open at the end of the log, None at the start of a line.
        self.open_line: int | None = None
        # Bytes the log could not take, and the first reason why.
        self.lost = 0
        self.error: str | None = None

    def write(self, stream: int, data: bytes, new_line: bool = False) -> None:
        """Append what `stream` wrote: its lines marked if it is stderr, after ending a line the other left
        open (any open line, with `new_line`: the supervisor's own messages). Never raises: a log that cannot
        be written (a full disk) loses the data, counted in `lost`, and the run goes on."""
        with self.lock:
            if stream == 2:
                out = data.replace(b"\n", _STDERR_LINE)
                if data.endswith(b"\n"):
                    out = out[: -len(STDERR_MARK)]  # the next line may be stdout's
                if self.open_line != 2 or new_line:
                    out = (STDERR_MARK if self.open_line is None else b"\n" + STDERR_MARK) + out
            else:
                # Passed on as it is, but for what could pass for a mark. Looking for the one byte first is
                # what keeps this cheap: that search is a memchr, a two-byte one is not.
                out = data
                if b"\x1b" in data and b"\n\x1b" in data:
                    out = data.replace(b"\n\x1b", _ESCAPED_STDOUT_LINE)
                if self.open_line != 1 and out[:1] == b"\x1b":
                    out = STDOUT_MARK + out
                if self.open_line == 2:
                    out = b"\n" + out
            written = self._write_all(out)
            if written:
                # As far as the log got: a line cut by a failed write is ended by the next stream that writes.
                self.open_line = None if out[written - 1] == 10 else stream

    def _write_all(self, out: bytes) -> int:
        view = memoryview(out)
        written = 0
        try:
            while written < len(out):
                try:
                    written += os.write(self.fd, view[written:])
                except BlockingIOError:
                    # A stdout left non-blocking by whoever started this process: wait until it takes more.
                    poller = select.poll()
                    poller.register(self.fd, select.POLLOUT)
                    poller.poll()
        except OSError as err:
            self.lost += len(out) - written
            if self.error is None:
                self.error = err.strerror or str(err)
        return written


_STDERR_LINE = b"\n" + STDERR_MARK
_ESCAPED_STDOUT_LINE = b"\n" + STDOUT_MARK + b"\x1b"
_log = _Log(1)


def _pump(stdout: IO[bytes], stderr: IO[bytes]) -> None:
    """Copy the job's output into the run's log until the job closes its pipes. Should copying fail (an I/O
    error, no memory), the pipes are closed, so the job gets EPIPE (or SIGPIPE) rather than blocking forever on
    a full pipe, and the log says why."""
    try:
        _copy_output(stdout.fileno(), stderr.fileno(), _state["hold"])
    except BaseException as err:
        for pipe in (stdout, stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        _say(
            f"amlrun: copying the run's output to its log failed ({type(err).__name__}: {err}); what the run "
            "writes from now on is lost, and writing it fails"
        )


def _copy_output(stdout: int, stderr: int, hold: float = HOLD_SECONDS) -> None:
    """Copy the job's stdout and stderr pipes into the run's log as they fill, until both are closed.

    A line one stream left open is given up to `hold` seconds to end before the other stream's output is
    written, which would cut it in two: an unbuffered ``print("loss", x)`` writes its words one by one, and
    the log line of a thread (or of the JVM a Spark driver runs under) may come between them. What the open
    stream writes meanwhile is written whole (what was read together cannot be ordered: the open stream's
    first), and the other stream's output once no line is left open, at most `hold` seconds after it came. A
    line the hold ran out on (a progress bar redrawn with "\r") is not held for again until it ends: the
    other stream's output then goes on as it comes."""
    streams = {stdout: 1, stderr: 2}
    # poll rather than select: the pipes' descriptors may be past select's limit (1024).
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    # The streams whose open line a hold ran out on.
    cut: set[int] = set()

    def copy(fd: int) -> None:
        data = os.read(fd, 65536)
        if not data:
            poller.unregister(fd)
            del streams[fd]
            return
        if b"\n" in data:
            cut.discard(streams[fd])
        _log.write(streams[fd], data)

    def holds(fd: int) -> bool:
        """Whether fd (just copied) left a line open that the other stream's output waits for."""
        return fd in streams and _log.open_line == streams[fd] and streams[fd] not in cut

    # Until when the other stream's output, held, may wait (from when it first waited).
    hold_until: float | None = None
    while streams:
        ready = [fd for fd, _ in poller.poll()]
        open_fd = next((fd for fd, stream in streams.items() if stream == _log.open_line), None)
        held = [fd for fd in ready if fd != open_fd]
        if not held:
            hold_until = None
        elif open_fd is not None and holds(open_fd):
            if hold_until is None:
                hold_until = time.monotonic() + hold
            left = hold_until - time.monotonic()
            if left > 0 and (open_fd in ready or _readable(open_fd, left)):
                copy(open_fd)  # the line goes on, or ends (the held output then goes next)
                continue
            cut.add(streams[open_fd])  # the line stays open: the other stream's output ends it
        # Both ready: stdout first (which of the two was written first cannot be known). A line it leaves open
        # is held for, as above, before stderr's output is written, unless that output waited long enough.
        order = sorted(ready, key=lambda fd: streams[fd])
        for i, fd in enumerate(order):
            copy(fd)
            waiting = hold_until is None or time.monotonic() < hold_until
            if holds(fd) and waiting and any(other in streams for other in order[i + 1 :]):
                break
        else:
            hold_until = None


def _readable(fd: int, timeout: float) -> bool:
    """Whether fd has something to read (or is closed) within timeout seconds. poll takes at most 2**31 - 1 ms
    (24 days): a longer wait ends there."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(min(timeout * 1000, 2**31 - 1)))


def _say(message: str) -> None:
    """A line of the supervisor's own in the run's log, as stderr, if it can be written at all."""
    _log.write(2, (message + "\n").encode("utf-8", "replace"), new_line=True)


def _own_start_time() -> str | None:
    """This process's start time in clock ticks since boot, or None without a readable /proc."""
    try:
        with open("/proc/self/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _in_job_before_exec() -> Callable[[], None]:
    """What the job runs before its program: the default signal handlers, then the signals the supervisor
    held back (one sent to the group meanwhile now ends it); on Linux it also asks the kernel to SIGKILL it
    when the supervisor ends."""
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (ImportError, OSError, AttributeError):
            prctl = None
    parent = os.getpid()

    def in_child() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                # The supervisor ended before the request took effect: nothing will follow this job.
                os._exit(CANNOT_START)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WAITED_SIGNALS)

    return in_child


if __name__ == "__main__":
    sys.exit(main(sys.argv))
