"""The supervisor that every target starts a run under: exit codes, time limits, signals, the request file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from airflow_amlrun.targets import supervisor

SUPERVISOR = supervisor.__file__


def start(control: Path, request: dict[str, object], **kwargs: object) -> subprocess.Popen[bytes]:
    """The supervisor in a session of its own, as a target starts it, with the request on stdin."""
    kwargs.setdefault("cwd", control)
    process = subprocess.Popen(
        [sys.executable, SUPERVISOR, str(control)],
        stdin=subprocess.PIPE,
        start_new_session=True,
        **kwargs,  # type: ignore[call-overload]
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps(request).encode())
    process.stdin.close()
    return process


def test_the_jobs_exit_code_is_recorded_and_returned(tmp_path: Path) -> None:
    job = start(
        tmp_path, {"argv": ["sh", "-c", 'test "$GREETING" = hello && exit 3'], "env": {"GREETING": "hello"}}
    )
    assert job.wait(timeout=30) == 3
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == "3"
    assert not (tmp_path / supervisor.ENDED_BY).exists()


def test_a_job_killed_by_a_signal_reports_128_plus_the_signal(tmp_path: Path) -> None:
    job = start(tmp_path, {"argv": ["sh", "-c", "kill -KILL $$"]})
    assert job.wait(timeout=30) == 128 + signal.SIGKILL
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == str(128 + signal.SIGKILL)


# What a request gives the supervisor to read the pipes of a job that left a child holding them: the default
# second proves nothing more (test_what_the_job_writes_as_its_limit_stops_it_reaches_the_log reads what the
# pipes held with the default).
SHORT_DRAIN = 0.1


def test_a_job_past_its_limit_is_stopped_with_everything_it_started(tmp_path: Path) -> None:
    # The job ignores SIGTERM and leaves a grandchild behind (which ignores it too, and holds the job's pipes):
    # both must go. A shell, which takes its trap at once, not Python, which may take longer than the limit
    # to start on a loaded machine.
    script = "trap '' TERM; sleep 300 & echo $! > grandchild; sleep 300"
    job = start(
        tmp_path,
        {
            "argv": ["sh", "-c", script],
            "max_seconds": 0.2,
            "grace_seconds": 0.3,
            "drain_seconds": SHORT_DRAIN,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    err = _log(job)
    assert job.returncode == -signal.SIGKILL  # the supervisor ends with its group
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == str(128 + signal.SIGKILL)
    assert json.loads((tmp_path / supervisor.ENDED_BY).read_text())["reason"] == supervisor.MAX_DURATION
    assert b"exceeded max_run_duration_seconds=0.2" in err
    grandchild = int((tmp_path / "grandchild").read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_a_job_past_its_limit_is_stopped_even_when_its_control_folder_is_gone(tmp_path: Path) -> None:
    # The job removes the folder the supervisor records in (a full disk fails the writes the same way).
    control = tmp_path / ".amlrun"
    control.mkdir()
    script = "sleep 300 & echo $$ $! > pids; rm -r .amlrun; sleep 300"
    with open(tmp_path / "log", "wb") as log:
        job = start(
            control,
            {
                "argv": ["sh", "-c", script],
                "max_seconds": 0.3,
                "grace_seconds": 0.3,
                "end_group": True,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    job.wait(timeout=60)
    err = (tmp_path / "log").read_text()

    pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    deadline = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    still = [pid for pid in pids if _alive(pid)]
    for pid in still:
        os.kill(pid, signal.SIGKILL)
    assert not still, "the run outlived its limit"
    assert "exceeded max_run_duration_seconds=0.3" in err
    assert "could not record ended_by" in err and f"could not record exit_code (143) in {control}" in err


def test_the_job_dies_with_its_supervisor_and_carries_its_name(tmp_path: Path) -> None:
    script = (
        "import os, time; open('job', 'w').write(f\"{os.getpid()} {os.environ.get('AMLRUN_SUPERVISOR')}\"); "
        "time.sleep(300)"
    )
    job = start(tmp_path, {"argv": [sys.executable, "-c", script]})
    deadline = time.monotonic() + 30
    while not (tmp_path / "job").exists() or not (tmp_path / "job").read_text():
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.02)
    pid, name = (tmp_path / "job").read_text().split()
    started = Path(f"/proc/{job.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]

    job.kill()  # the supervisor alone, as the out-of-memory killer would
    job.wait()
    deadline = time.monotonic() + 10
    while _alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(int(pid))
    if alive:
        os.kill(int(pid), signal.SIGKILL)
    assert not alive, "the job outlived its supervisor"
    # The name a target proves the job's processes by: the supervisor's pid and start time.
    assert name == f"{job.pid}:{started}"


def test_with_end_group_what_the_job_left_running_ends_with_it(tmp_path: Path) -> None:
    # The job exits at once, leaving a child of its own behind in the group.
    script = "sleep 300 & echo $! > grandchild; exit 4"
    job = start(tmp_path, {"argv": ["sh", "-c", script], "end_group": True, "drain_seconds": SHORT_DRAIN})
    job.wait(timeout=30)
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == "4"
    grandchild = int((tmp_path / "grandchild").read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_without_end_group_the_group_is_left_alone(tmp_path: Path) -> None:
    job = start(
        tmp_path,
        {"argv": ["sh", "-c", "sleep 300 & echo $! > grandchild; exit 0"], "drain_seconds": SHORT_DRAIN},
    )
    assert job.wait(timeout=30) == 0
    grandchild = int((tmp_path / "grandchild").read_text())
    try:
        assert _alive(grandchild)
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_a_request_file_is_deleted_once_read(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps({"argv": ["sh", "-c", 'test "$TOKEN" = s3cr3t'], "env": {"TOKEN": "s3cr3t"}})
    )
    done = subprocess.run(
        [sys.executable, SUPERVISOR, str(tmp_path), "--request-file", str(request)], start_new_session=True
    )
    assert done.returncode == 0
    assert not request.exists()


def test_signals_to_the_group_end_the_job_but_not_the_supervisor(tmp_path: Path) -> None:
    job = start(tmp_path, {"argv": ["sleep", "300"]})
    _wait_for_child(job.pid)
    os.killpg(job.pid, signal.SIGTERM)
    assert job.wait(timeout=30) == 128 + signal.SIGTERM
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == str(128 + signal.SIGTERM)


def test_a_signal_to_the_group_as_the_job_starts_ends_it_all_the_same(tmp_path: Path) -> None:
    # A cancel that comes right after the start reaches the job while it is still a fork of the supervisor,
    # before its program runs: it must end it as surely as later, and be known to have found it. Several tries,
    # to meet that moment.
    _stop_each_try(tmp_path, 8, _wait_for_fork, signal.SIGTERM)


def _stop_each_try(tmp_path: Path, tries: int, ready: Callable[[int], None], sig: signal.Signals) -> None:
    """Start `sleep 300` under a supervisor `tries` times and signal its group once `ready(pid)` returns: each
    time the job ends by the signal, and the supervisor records that a stop found it."""
    for attempt in range(tries):
        control = tmp_path / str(attempt)
        control.mkdir()
        job = start(control, {"argv": ["sleep", "300"]})
        ready(job.pid)
        os.killpg(job.pid, sig)
        assert job.wait(timeout=30) == 128 + sig, f"try {attempt}"
        ended_by = json.loads((control / supervisor.ENDED_BY).read_text())
        assert ended_by == {"reason": supervisor.STOPPED, "signal": sig.name}, f"try {attempt}"


def _wait_for_fork(pid: int) -> None:
    """Wait until the supervisor has forked its job, whether or not that runs its own program yet."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                return
        time.sleep(0.001)
    raise AssertionError("the supervisor did not start its job")


def test_with_forward_signals_a_signal_to_the_supervisor_reaches_the_job(tmp_path: Path) -> None:
    job = start(tmp_path, {"argv": ["sleep", "300"], "forward_signals": True})
    _wait_for_child(job.pid)
    os.kill(job.pid, signal.SIGTERM)  # as docker stop does, through the container's init, and the targets do
    assert job.wait(timeout=30) == 128 + signal.SIGTERM
    # Taken before the job got it: the stop is known to have found it running.
    assert json.loads((tmp_path / supervisor.ENDED_BY).read_text())["signal"] == "SIGTERM"


def test_a_job_that_exits_0_as_soon_as_it_is_stopped_is_known_to_have_been_stopped(tmp_path: Path) -> None:
    # A script that saves and ends at once when asked to stop: the stop passes through the supervisor first.
    script = "import os, signal, time; signal.signal(signal.SIGTERM, lambda *_: os._exit(0)); print('up', flush=True); time.sleep(300)"
    for attempt in range(5):
        control = tmp_path / str(attempt)
        control.mkdir()
        job = start(
            control, {"argv": [sys.executable, "-c", script], "forward_signals": True}, stdout=subprocess.PIPE
        )
        assert job.stdout is not None
        assert job.stdout.readline().endswith(b"up\n")
        os.kill(job.pid, signal.SIGTERM)
        assert job.wait(timeout=30) == 0, f"try {attempt}"
        assert json.loads((control / supervisor.ENDED_BY).read_text())["signal"] == "SIGTERM", (
            f"try {attempt}"
        )


def _awaiting_request(control: Path) -> subprocess.Popen[bytes]:
    """The supervisor as a target starts it, its request not written yet, its log on its stdout."""
    return subprocess.Popen(
        [sys.executable, SUPERVISOR, str(control)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _blocks(pid: int, sig: signal.Signals) -> None:
    """Wait until process ``pid`` holds ``sig`` back (it blocked it: a signal then waits for it, pending)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
        if blocked & (1 << (sig - 1)):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not block {sig.name}")


def _stop(pid: int, sender: str) -> None:
    if sender == "a live process":
        os.kill(pid, signal.SIGTERM)
    else:  # `kill`, gone by the time the signal is looked at
        subprocess.run(["kill", "-TERM", str(pid)], check=True)


@pytest.mark.parametrize("sender", ["a live process", "a process gone at once"])
@pytest.mark.parametrize("forward", [False, True])
def test_a_stop_that_comes_before_the_request_is_read_is_recorded_and_the_job_never_starts(
    tmp_path: Path, forward: bool, sender: str
) -> None:
    # A target stops a run whose start it gave up on (the task was killed as it submitted) while the supervisor
    # still waits for its request: the stop must hold, and be recorded, not be lost or end the supervisor with
    # nothing written (a signal's default action).
    process = _awaiting_request(tmp_path)
    assert process.stdin is not None
    _blocks(process.pid, signal.SIGTERM)
    _stop(process.pid, sender)
    request = {"argv": ["sh", "-c", f"touch {tmp_path / 'started'}; sleep 300"], "forward_signals": forward}
    process.stdin.write(json.dumps(request).encode())
    process.stdin.close()
    try:
        process.wait(timeout=30)
    finally:
        # A job started in spite of the stop (the bug) is ended with its group: the test fails, not hangs.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    log = _log(process)

    assert process.returncode == 128 + signal.SIGTERM, log
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == str(128 + signal.SIGTERM)
    assert json.loads((tmp_path / supervisor.ENDED_BY).read_text()) == {
        "reason": supervisor.STOPPED,
        "signal": "SIGTERM",
    }
    assert b"stopped (SIGTERM) before its script started" in log
    assert not (tmp_path / "started").exists()


@pytest.mark.parametrize("request_text", [b"", b"not json", b'{"argv": []}'])
def test_a_stop_before_a_request_that_is_none_is_recorded_as_a_stop(
    tmp_path: Path, request_text: bytes
) -> None:
    # Two stops came (in an order the supervisor cannot know): the one targets send is named.
    process = _awaiting_request(tmp_path)
    assert process.stdin is not None
    _blocks(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGHUP)
    os.kill(process.pid, signal.SIGTERM)
    process.stdin.write(request_text)
    process.stdin.close()
    log = _log(process)

    assert process.returncode == 128 + signal.SIGTERM, log
    assert json.loads((tmp_path / supervisor.ENDED_BY).read_text())["signal"] == "SIGTERM"
    assert b"Traceback" not in log


def test_a_stop_ends_a_supervisor_whose_request_never_comes_while_its_starter_holds_the_pipe(
    tmp_path: Path,
) -> None:
    # The local target stops a run whose start it gave up on before writing the request: the stop is recorded at
    # once, not once (or if ever) the pipe is closed.
    process = _awaiting_request(tmp_path)
    assert process.stdin is not None
    try:
        _blocks(process.pid, signal.SIGTERM)
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        process.stdin.close()
    assert b"stopped (SIGTERM) before its script started" in _log(process)
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == str(128 + signal.SIGTERM)
    assert json.loads((tmp_path / supervisor.ENDED_BY).read_text())["signal"] == "SIGTERM"


def test_a_supervisor_whose_request_never_comes_says_so_in_the_log_without_a_traceback(
    tmp_path: Path,
) -> None:
    # The local target gives up a start by closing the supervisor's stdin before writing the request.
    process = _awaiting_request(tmp_path)
    assert process.stdin is not None
    process.stdin.close()
    log = _log(process)

    assert process.returncode == 1
    assert b"the request is empty" in log
    assert b"Traceback" not in log
    assert not (tmp_path / supervisor.EXIT_CODE).exists()


def test_a_job_that_cannot_start_says_so(tmp_path: Path) -> None:
    job = start(
        tmp_path, {"argv": ["/no/such/interpreter"]}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    err = _log(job)
    assert job.returncode == supervisor.CANNOT_START
    assert b"cannot start '/no/such/interpreter'" in err
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == str(supervisor.CANNOT_START)


def _log(job: subprocess.Popen[bytes]) -> bytes:
    """The run's log: the supervisor's stdout and stderr, as a target gives it one file."""
    assert job.stdout is not None
    err = job.stdout.read()
    job.wait(timeout=60)
    return err


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_for_child(pid: int) -> None:
    """Wait until the supervisor's job runs its own program: until it has, the forked child may still hold
    the supervisor's own signal dispositions."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if children and Path(f"/proc/{children[0]}/exe").resolve() != Path(sys.executable).resolve():
                return
        time.sleep(0.02)
    raise AssertionError("the supervisor did not start its job")


# The job's helper for writing in a known order: each write waits until the supervisor logged it, so what
# comes next is read apart from it (what the two pipes hold at once may be logged in either order).
IN_ORDER = """
import os, sys, time
LOG = sys.argv[1]
def say(stream, data):
    before = os.path.getsize(LOG)
    stream.buffer.write(data)
    stream.buffer.flush()
    deadline = time.monotonic() + 30
    while os.path.getsize(LOG) < before + len(data):
        assert time.monotonic() < deadline, "the supervisor did not log " + repr(data)
        time.sleep(0.001)
def stop_supervisor():
    # Every thread of it stopped: what is written next is read together once it goes on (go_on).
    import glob, signal
    os.kill(os.getppid(), signal.SIGSTOP)
    tasks = glob.glob(f'/proc/{os.getppid()}/task/*/stat')
    while any(open(t).read().rsplit(')', 1)[1].split()[0] != 'T' for t in tasks):
        time.sleep(0.001)
def go_on():
    import signal
    os.kill(os.getppid(), signal.SIGCONT)
"""


def _run_logged(tmp_path: Path, script: str, **request: object) -> tuple[int, bytes]:
    """Run a job under the supervisor with its log in tmp_path/log: its exit status and the log."""
    log_path = tmp_path / "log"
    with open(log_path, "wb") as log:
        job = start(
            tmp_path,
            {"argv": [sys.executable, "-c", IN_ORDER + script, str(log_path)], **request},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        code = job.wait(timeout=60)
    return code, log_path.read_bytes()


def test_the_log_keeps_both_streams_in_order_with_each_stderr_line_marked(tmp_path: Path) -> None:
    script = (
        "say(sys.stdout, b'loading\\n')\n"
        "say(sys.stdout, b'half a line')\n"
        "say(sys.stderr, b'warn 1\\nwarn 2\\n')\n"
        "say(sys.stdout, b'done\\n')\n"
        "say(sys.stderr, b'failed')\n"
        "say(sys.stderr, b' at step 3\\n')\n"
    )
    code, log = _run_logged(tmp_path, script)
    mark = supervisor.STDERR_MARK
    assert code == 0
    assert log == (
        b"loading\nhalf a line\n"
        + mark
        + b"warn 1\n"
        + mark
        + b"warn 2\ndone\n"
        + mark
        + b"failed at step 3\n"
    )


def test_a_line_written_in_pieces_is_not_cut_by_the_other_streams_line_between_them(tmp_path: Path) -> None:
    # An unbuffered print of several words writes them one by one; a line another thread (or the JVM under a
    # Spark driver) writes to stderr meanwhile waits for the line to end rather than cut it in two. What stdout
    # wrote with that end is written whole first: read together, which came first cannot be known. (A long
    # hold: the test does not depend on the machine's speed.)
    script = (
        "say(sys.stdout, b'loss')\n"
        "sys.stderr.buffer.write(b'INFO job 2 finished\\n'); sys.stderr.flush()\n"
        "time.sleep(0.05)\n"
        "say(sys.stdout, b' 0.5\\nepoch 2\\n')\n"
        "say(sys.stderr, b'INFO stopping\\n')\n"
    )
    code, log = _run_logged(tmp_path, script, hold_seconds=30, drain_seconds=60)
    mark = supervisor.STDERR_MARK
    assert code == 0
    assert log == b"loss 0.5\nepoch 2\n" + mark + b"INFO job 2 finished\n" + mark + b"INFO stopping\n"


def test_a_line_the_hold_ran_out_on_is_not_held_for_again(tmp_path: Path) -> None:
    # Progress dots on stderr keep a line open while stdout prints lines: the first stdout line waits out one
    # hold, then the dots' line is cut, and the other lines are written as they come (each waiting a hold,
    # the job would take 15 s).
    script = (
        "start = time.monotonic()\n"
        "for i in range(30):\n"
        "    sys.stderr.buffer.write(b'.'); sys.stderr.flush()\n"
        "    say(sys.stdout, b'line %d\\n' % i)\n"
        "    assert time.monotonic() - start < 7.5, 'the stdout lines wait for the dots'\n"
        "say(sys.stderr, b'\\n')\n"
    )
    code, log = _run_logged(tmp_path, script, hold_seconds=0.5)
    assert code == 0, log
    text = log.replace(supervisor.STDERR_MARK, b"")
    assert [line for line in text.split(b"\n") if line.startswith(b"line")] == [
        b"line %d" % i for i in range(30)
    ]
    assert b"".join(line for line in text.split(b"\n") if not line.startswith(b"line")) == b"." * 30


def test_a_stream_is_held_for_again_once_the_line_it_was_cut_on_ended(tmp_path: Path) -> None:
    # stderr's dot is cut by stdout's line once the hold (0.5 s) ran out; stderr ends that line, then leaves
    # another open, which stdout's next line waits for again.
    script = (
        "say(sys.stderr, b'.')\n"
        "say(sys.stdout, b'line 0\\n')\n"
        "say(sys.stderr, b'\\n')\n"
        "say(sys.stderr, b'loss')\n"
        "sys.stdout.buffer.write(b'INFO\\n'); sys.stdout.flush()\n"
        "time.sleep(0.05)\n"
        "say(sys.stderr, b' 0.5\\n')\n"
    )
    code, log = _run_logged(tmp_path, script, hold_seconds=0.5, drain_seconds=60)
    mark = supervisor.STDERR_MARK
    assert code == 0, log
    assert log.endswith(mark + b"loss 0.5\nINFO\n"), log


def test_no_line_is_cut_when_the_held_output_itself_ends_mid_line(tmp_path: Path) -> None:
    # stderr's held output ends mid-line: stdout's next line waits for that line's end in turn, not cut it.
    script = (
        "say(sys.stdout, b'loss')\n"
        "sys.stderr.buffer.write(b'INFO job 2 fin'); sys.stderr.flush()\n"
        "time.sleep(0.1)\n"
        "sys.stdout.buffer.write(b' 0.5\\nepoch 2\\n'); sys.stdout.flush()\n"
        "time.sleep(0.1)\n"
        "say(sys.stderr, b'ished\\n')\n"
        "say(sys.stdout, b'done\\n')\n"
    )
    code, log = _run_logged(tmp_path, script, hold_seconds=30, drain_seconds=60)
    mark = supervisor.STDERR_MARK
    assert code == 0, log
    assert log == b"loss 0.5\nepoch 2\n" + mark + b"INFO job 2 finished\ndone\n", log


def test_what_the_open_stream_wrote_before_the_other_streams_output_stays_before_it(tmp_path: Path) -> None:
    # The script prints two lines, a word and its newline at a time, then raises: the supervisor reads the end of
    # the first line and the whole second but its newline together with the traceback. The second line stays
    # before the traceback.
    script = (
        "say(sys.stdout, b'loading the data')\n"
        "stop_supervisor()\n"
        "sys.stdout.buffer.write(b'\\nepoch 1 of 1'); sys.stdout.flush()\n"
        "sys.stderr.buffer.write(b'Traceback (most recent call last):\\n'); sys.stderr.flush()\n"
        "go_on()\n"
        "time.sleep(0.05)\n"
        "say(sys.stdout, b'\\n')\n"
    )
    code, log = _run_logged(tmp_path, script, hold_seconds=30, drain_seconds=60)
    mark = supervisor.STDERR_MARK
    assert code == 0, log
    assert log == b"loading the data\nepoch 1 of 1\n" + mark + b"Traceback (most recent call last):\n", log


def test_a_line_left_open_is_held_for_when_both_streams_are_read_at_once(tmp_path: Path) -> None:
    # The supervisor falls behind (here: stopped, every thread of it) while the job writes a word to stdout and a
    # line to stderr: read together, the stderr line still waits for the stdout line's end.
    script = (
        "stop_supervisor()\n"
        "sys.stdout.buffer.write(b'loss'); sys.stdout.flush()\n"
        "sys.stderr.buffer.write(b'INFO job 2 finished\\n'); sys.stderr.flush()\n"
        "go_on()\n"
        "time.sleep(0.05)\n"
        "say(sys.stdout, b' 0.5\\n')\n"
    )
    code, log = _run_logged(tmp_path, script, hold_seconds=30, drain_seconds=60)
    mark = supervisor.STDERR_MARK
    assert code == 0, log
    assert log == b"loss 0.5\n" + mark + b"INFO job 2 finished\n", log


def test_a_new_open_line_gets_a_whole_hold_of_its_own(tmp_path: Path) -> None:
    # A first hold (stderr's line waiting for stdout's "loss") ends; then stdout's last whole line and a new open
    # stderr line are read in one pass. Much later, stdout's next line waits a whole hold for stderr's line, not
    # what was left of the first hold (long over: it would be cut at once).
    script = (
        "import fcntl\n"
        "fcntl.fcntl(1, 1031, 1 << 20)  # F_SETPIPE_SZ: room for more than one read of the supervisor's\n"
        "say(sys.stdout, b'loss')\n"
        "sys.stderr.buffer.write(b'INFO a\\n'); sys.stderr.flush()\n"
        "time.sleep(0.1)\n"
        "stop_supervisor()\n"
        "first = b' 0.5\\n' + b'x' * (65536 - 6) + b'\\n'\n"
        "sys.stdout.buffer.write(first + b'epoch 2\\n'); sys.stdout.flush()\n"
        "sys.stderr.buffer.write(b'WARN b'); sys.stderr.flush()\n"
        "go_on()\n"
        "time.sleep(0.7)\n"
        "sys.stdout.buffer.write(b'y\\n'); sys.stdout.flush()\n"
        "time.sleep(0.1)\n"
        "say(sys.stderr, b' continued\\n')\n"
        "say(sys.stdout, b'done\\n')\n"
    )
    code, log = _run_logged(tmp_path, script, hold_seconds=0.5, drain_seconds=60)
    mark = supervisor.STDERR_MARK
    assert code == 0, log[-300:]
    assert log.endswith(b"epoch 2\n" + mark + b"INFO a\n" + mark + b"WARN b continued\ny\ndone\n"), log[-300:]


def test_the_supervisors_own_message_begins_a_line_of_its_own(tmp_path: Path) -> None:
    # A progress bar left open on stderr when the time limit stops the job: the supervisor's message is not
    # glued to it. (A shell, which writes at once, not Python, which may take longer than the limit to start.)
    with open(tmp_path / "log", "wb") as out:
        job = start(
            tmp_path,
            {
                "argv": ["sh", "-c", "printf '\\r 45%%|####      | 450/1000' >&2; sleep 60"],
                "max_seconds": 0.3,
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        code = job.wait(timeout=60)
    log = (tmp_path / "log").read_bytes()
    mark = supervisor.STDERR_MARK
    assert code != 0
    assert mark + b"\r 45%|####      | 450/1000\n" + mark + b"amlrun: the run exceeded" in log, log


def test_a_line_left_open_does_not_hold_the_other_streams_output_back_for_long(tmp_path: Path) -> None:
    # A progress bar redraws its stderr line ("\r") without ending it: a line written to stdout meanwhile reaches
    # the log while the bar goes on, after HOLD_SECONDS at most, not when the bar ends.
    script = (
        "say(sys.stderr, b'step 0')\n"
        "before = os.path.getsize(LOG)\n"
        "sys.stdout.buffer.write(b'epoch 1\\n'); sys.stdout.flush()\n"
        "deadline = time.monotonic() + 30\n"
        "step = 0\n"
        "while b'epoch 1' not in open(LOG, 'rb').read():\n"
        "    assert time.monotonic() < deadline, 'the stdout line waits for the bar to end'\n"
        "    step += 1\n"
        "    sys.stderr.buffer.write(b'\\rstep %d' % step); sys.stderr.flush()\n"
        "    time.sleep(0.01)\n"
        "say(sys.stderr, b'\\rdone\\n')\n"
    )
    code, log = _run_logged(tmp_path, script)
    assert code == 0, log
    mark = supervisor.STDERR_MARK
    assert log.startswith(mark + b"step 0"), log
    assert b"\nepoch 1\n" + mark in log, log
    assert log.endswith(b"\rdone\n"), log


def test_output_that_looks_like_a_mark_keeps_its_stream_and_its_bytes(tmp_path: Path) -> None:
    from airflow_amlrun.run_output import OutputLine
    from airflow_amlrun.targets.common import read_lines, unmark_file

    written = [
        ("stdout", supervisor.STDERR_MARK + b"not an error"),
        ("stdout", b"\x1b[32mgreen\x1b[0m"),
        ("stdout", supervisor.STDOUT_MARK + b"plain"),
        ("stderr", supervisor.STDOUT_MARK + b"an error"),
        ("stderr", supervisor.STDERR_MARK + b"an error too"),
        ("stdout", b"epoch 1"),
    ]
    script = "".join(f"say(sys.{stream}, {text!r} + bytes([10]))\n" for stream, text in written)
    code, _ = _run_logged(tmp_path, script)
    assert code == 0

    lines = [OutputLine.read(line) for line in read_lines(tmp_path / "log", 0, final=True).lines]
    assert [(line.stream, line) for line in lines] == [(stream, text.decode()) for stream, text in written]
    unmark_file(tmp_path / "log")
    assert (tmp_path / "log").read_bytes() == b"".join(text + b"\n" for _, text in written)


def test_what_the_job_writes_as_its_limit_stops_it_reaches_the_log(tmp_path: Path) -> None:
    # On SIGTERM the job writes more than its pipes hold, then its last words on both streams, and ends. Its log
    # is read slowly (a busy disk, a remote reader), so the pipes still hold the end when the job is gone: that
    # must reach the log before the supervisor ends with its group, in the default drain time. A shell, which
    # takes its trap at once, not Python, which may take longer than the limit to start on a loaded machine.
    on_term = (
        f"i=0; while [ $i -lt 1000 ]; do echo {'x' * 199}; i=$((i + 1)); done; echo checkpoint saved; "
        "echo stopped at step 7 >&2; exit 1"
    )
    script = f"trap '{on_term}' TERM; sleep 300"
    job = start(
        tmp_path,
        {"argv": ["sh", "-c", script], "max_seconds": 0.2, "grace_seconds": 10},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert job.stdout is not None
    pieces = []
    while piece := os.read(job.stdout.fileno(), 16384):
        pieces.append(piece)
        time.sleep(0.01)
    log = b"".join(pieces)
    assert job.wait(timeout=30) == -signal.SIGKILL  # the supervisor ends with its group
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == "1"
    assert log.count(b"x" * 199 + b"\n") == 1000
    assert b"\ncheckpoint saved\n" in log
    assert log.endswith(supervisor.STDERR_MARK + b"stopped at step 7\n")


def test_output_the_log_could_not_take_is_counted_in_it(tmp_path: Path) -> None:
    # The log is at the largest size this process may write (as a full disk refuses more) while the job writes
    # 1 MB; the job then empties it, as a rotation would: the log ends saying how much it lost, and why.
    limit = 256 << 10
    log_path = tmp_path / "log"
    log_path.write_bytes(b"." * limit)
    script = (
        "say_lost = b'y' * 1023 + b'\\n'\n"
        "for _ in range(1024):\n"
        "    sys.stdout.buffer.write(say_lost)\n"
        "sys.stdout.flush()\n"
        "os.truncate(LOG, 0)\n"
    )
    with open(log_path, "ab") as log:
        job = start(
            tmp_path,
            {"argv": [sys.executable, "-c", IN_ORDER + script, str(log_path)]},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        )
        assert job.wait(timeout=60) == 0
    text = log_path.read_bytes()
    found = re.search(
        re.escape(supervisor.STDERR_MARK)
        + rb"amlrun: (\d+) bytes of the run's output could not be written to its log \(File too large\)\n$",
        text,
    )
    assert found, text[-300:]
    lost = int(found.group(1))
    # All of it but what the pipe and the pump held when the log was emptied, which the log has.
    assert (1 << 20) - (256 << 10) <= lost <= 1 << 20
    assert lost + found.start() == 1 << 20
    assert set(text[: found.start()]) <= set(b"y\n")
    recorded = json.loads((tmp_path / supervisor.LOG_LOSS).read_text())
    assert recorded == {"bytes": lost, "error": "File too large"}
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == "0"


def test_a_job_is_not_left_blocked_on_its_output_when_copying_it_fails(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # The stderr end fails when read (its peer left with data unread), while the job writes to stdout for ever:
    # only the pipe's closing ends it.
    failing, peer = socket.socketpair()
    failing.sendall(b"unread")
    peer.close()
    read_end, write_end = os.pipe()
    job = subprocess.Popen(["yes"], stdout=write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stdout, failing.makefile("rb") as stderr:
        supervisor._pump(stdout, stderr)
    failing.close()
    try:
        code = job.wait(timeout=30)
    finally:
        job.kill()
    assert code == -signal.SIGPIPE
    assert (
        "amlrun: copying the run's output to its log failed (ConnectionResetError" in capfd.readouterr().out
    )


@pytest.mark.parametrize("module", ["airflow_amlrun/targets/supervisor.py", "airflow_amlrun/run_context.py"])
def test_what_runs_with_an_images_python_is_written_for_python_3_7(module: str) -> None:
    # The supervisor and the training script's module run under whatever Python an image or host has.
    import ast

    source = (Path(__file__).resolve().parents[3] / module).read_text()
    ast.parse(source, feature_version=(3, 7))


def test_a_stop_the_job_outlives_is_seen_through_by_the_supervisor(tmp_path: Path) -> None:
    # The job ignores SIGTERM; whoever sent the stop is gone before it could send SIGKILL.
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
    job = start(
        tmp_path,
        {"argv": [sys.executable, "-c", script], "grace_seconds": 0.5, "end_group": True},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert job.stdout is not None
    assert job.stdout.readline().endswith(b"up\n")
    try:
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == str(128 + signal.SIGKILL)
    ended_by = json.loads((tmp_path / supervisor.ENDED_BY).read_text())
    assert ended_by == {"reason": supervisor.STOPPED, "signal": "SIGTERM"}


def test_a_stop_that_comes_after_the_job_ended_is_not_taken_for_its_end(tmp_path: Path) -> None:
    # The job ends at once, leaving a child that holds its output open: the supervisor reads that for up to
    # drain_seconds, and a stop comes meanwhile.
    job = start(tmp_path, {"argv": ["/bin/sh", "-c", "sleep 300 & exit 0"], "drain_seconds": 30})
    deadline = time.monotonic() + 30
    while _children_of(job.pid) != ["sleep"]:
        assert time.monotonic() < deadline, "the job did not end leaving its child"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGTERM)
    assert job.wait(timeout=30) == 0
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == "0"
    assert not (tmp_path / supervisor.ENDED_BY).exists()


def _children_of(pid: int) -> list[str]:
    """The names of the processes of pid's group besides pid, zombies left out."""
    names = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if int(rest[2]) == pid and int(entry.name) != pid and rest[0] != "Z":
                names.append(name)
    return names


def test_a_stop_the_job_heeds_is_recorded_with_its_own_exit_code(tmp_path: Path) -> None:
    # The group's signal reaches the job as it reaches the supervisor, and may end it before the supervisor
    # looks: the stop is recorded all the same. Several tries, to meet both orders.
    _stop_each_try(tmp_path, 10, _wait_for_child, signal.SIGINT)


def test_a_job_that_signals_its_own_group_is_not_taken_for_stopped(tmp_path: Path) -> None:
    # As a script ending what it started (``kill 0``, ``os.killpg(0, ...)``): the supervisor gets that too.
    script = (
        "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); os.killpg(0, signal.SIGTERM); "
        "time.sleep(0.5); print('done', flush=True)"
    )
    job = start(
        tmp_path, {"argv": [sys.executable, "-c", script], "grace_seconds": 0.2}, stdout=subprocess.PIPE
    )
    assert _log(job).endswith(b"done\n")
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == "0"
    assert not (tmp_path / supervisor.ENDED_BY).exists()


def test_a_limit_that_passes_while_a_stop_is_seen_through_does_not_keep_the_supervisor_busy(
    tmp_path: Path,
) -> None:
    # The job outlives its stop; its time limit passes during the stop's grace period. The stop wins, and the
    # supervisor waits out the grace period asleep. (A shell, whose sleep inherits the ignored SIGTERM: it
    # starts at once, where Python may take longer than the limit on a loaded machine.)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    job = start(
        tmp_path,
        {
            "argv": ["sh", "-c", "trap '' TERM; echo up; exec sleep 300"],
            "max_seconds": 0.4,
            "grace_seconds": 1.0,
        },
        stdout=subprocess.PIPE,
    )
    assert job.stdout is not None
    assert job.stdout.readline().endswith(b"up\n")
    os.killpg(job.pid, signal.SIGTERM)
    try:
        job.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert (tmp_path / supervisor.EXIT_CODE).read_text().strip() == str(128 + signal.SIGKILL)
    assert json.loads((tmp_path / supervisor.ENDED_BY).read_text())["reason"] == supervisor.STOPPED
    # The supervisor's start-up and the job's take a fraction of this; a busy wait from the limit to the end of
    # the grace period takes most of it.
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu < 0.4, f"the supervisor and its job used {cpu:.2f} s of CPU in a 1 s grace period"
