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
     "forward_signals": false,                            # see below
     "end_group": false}                                  # see below

The supervisor is the leader of the run's process group (its starter made it one: a new session on the
worker and on an SSH host, ``docker run --init`` in a container); the job and everything it starts stay
in that group. When the job ends, the supervisor writes its exit code (128 + the signal number for a
job killed by a signal, as a shell reports it) to ``CONTROL_DIR/exit_code`` and exits with it. A job that
runs past ``max_seconds`` gets SIGTERM, then SIGKILL after the grace period, together with everything it
started; ``CONTROL_DIR/ended_by`` then says why, and the job's log says so too. With ``end_group``, what
the job left running in its group when it ended (a stray child, a daemon it forked) is killed too, once
the exit code is recorded: the supervisor is the one process that knows for sure that the group is still
the run's (a target that finds the leader gone cannot tell the group from a stranger's reusing its id).
That signal ends the supervisor itself, so a target using it reads the exit code from the file.

Signals: a target stops a run by signalling the whole group, so by default the supervisor ignores SIGTERM,
SIGINT and SIGHUP (it must outlive the job to record its exit code). Inside a container, ``docker stop``
signals only the supervisor (the init process passes the signal on to its child alone), so with
``forward_signals`` it passes such a signal on to the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

# The job waits for this process to start, so it imports no more than it needs: not typing (mypy reads any
# name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

EXIT_CODE = "exit_code"
ENDED_BY = "ended_by"
# What ENDED_BY holds when the supervisor stopped the job for its time limit.
MAX_DURATION = "max_run_duration"
DEFAULT_GRACE_SECONDS = 5.0
# Exit status of the supervisor when it cannot start the job (as a shell reports a missing command).
CANNOT_START = 127


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "--request-file"):
        sys.stderr.write("usage: supervisor.py CONTROL_DIR [--request-file FILE]\n")
        return 2
    control = argv[1]
    request = _read_request(argv[3] if len(argv) == 4 else None)
    _state["forward"] = bool(request.get("forward_signals"))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
    try:
        job = subprocess.Popen(
            [str(word) for word in request["argv"]], env=env, stdin=subprocess.DEVNULL, close_fds=True
        )
    except OSError as err:
        sys.stderr.write(f"amlrun: cannot start {request['argv'][0]!r}: {err}\n")
        sys.stderr.flush()
        _record(control, EXIT_CODE, str(CANNOT_START))
        return CANNOT_START

    limit = request.get("max_seconds")
    max_seconds = None if limit is None else float(limit)
    grace = float(request.get("grace_seconds") or DEFAULT_GRACE_SECONDS)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    code = _wait(job, deadline)
    if code is None:
        assert max_seconds is not None
        code = _stop_for_limit(job, control, max_seconds, grace)
    _record(control, EXIT_CODE, str(code))
    if request.get("end_group"):
        _signal_group(signal.SIGKILL)
    return code


# Whether to pass a signal on to the group, and whether the group was signalled already.
_state = {"forward": False, "signalled": False}


def _on_signal(signum: int, frame: object) -> None:
    # Only the first signal is passed on: the supervisor receives its own copy of what it sends the group.
    if _state["forward"] and not _state["signalled"]:
        _signal_group(signum)


def _read_request(path: str | None) -> dict[str, Any]:
    if path is None:
        data = sys.stdin.buffer.read()
        # The job gets no stdin; the request (and any secret in it) is not left readable there.
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    else:
        with open(path, "rb") as stream:
            data = stream.read()
        os.unlink(path)
    request = json.loads(data.decode("utf-8"))
    if not isinstance(request, dict) or not request.get("argv"):
        raise SystemExit("amlrun supervisor: the request must be a JSON object with a non-empty 'argv'")
    return request


def _wait(job: subprocess.Popen[bytes], deadline: float | None) -> int | None:
    """The job's exit code once it ends, or None when the deadline passes first."""
    while True:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            return None
        try:
            return _exit_code(job.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            return None


def _stop_for_limit(job: subprocess.Popen[bytes], control: str, max_seconds: float, grace: float) -> int:
    _record(control, ENDED_BY, json.dumps({"reason": MAX_DURATION, "max_seconds": max_seconds}))
    sys.stderr.write(
        f"amlrun: the run exceeded max_run_duration_seconds={max_seconds:g}; stopping it (SIGTERM, then "
        f"SIGKILL after {grace:g} s)\n"
    )
    sys.stderr.flush()
    _signal_group(signal.SIGTERM)
    try:
        code = _exit_code(job.wait(timeout=grace))
    except subprocess.TimeoutExpired:
        code = 128 + signal.SIGKILL
    # Whatever the job started goes too; the exit code is recorded first, as this ends the supervisor.
    _record(control, EXIT_CODE, str(code))
    _signal_group(signal.SIGKILL)
    return code


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(sig: int) -> None:
    _state["signalled"] = True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgrp(), sig)


def _record(control: str, name: str, text: str) -> None:
    """Write a control file atomically: a reader sees it whole or not at all."""
    final = os.path.join(control, name)
    tmp = f"{final}.tmp-{os.getpid()}"
    with open(tmp, "w") as out:
        out.write(text + "\n")
    os.replace(tmp, final)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
