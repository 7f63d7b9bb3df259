"""The local target: the script runs as a process group on the Airflow worker itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from airflow_amlrun.config import Settings
from airflow_amlrun.environment import ensure_local_python
from airflow_amlrun.targets.base import Chunk, CodeSource, Collected, Job, TargetStatus
from airflow_amlrun.targets.common import (
    CONTROL_DIR,
    EVENTS,
    EXIT_CODE,
    PYLIB,
    STD_LOG,
    job_argv,
    job_environment,
    read_lines,
    wrapped_argv,
    write_run_context_package,
)

# How long a canceled run gets to exit on SIGTERM before the whole group is killed.
TERM_GRACE_SECONDS = 5.0


class LocalTarget:
    """Runs on the Airflow worker: a fresh run directory, the script in its own process group."""

    kind = "local"

    def __init__(self, settings: Settings, cache_dir: Path, name: str = "local") -> None:
        self.name = name
        self.runs_dir = settings.local_runs_dir
        self.cache_dir = cache_dir
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    def check(self, job: Job) -> None:
        if job.environment.user_managed:
            job.environment.spec.local_interpreter()

    def python(self, job: Job) -> str:
        """The job's interpreter here: the user's own, or the environment's cached virtualenv (built if new)."""
        return ensure_local_python(job.environment, self.cache_dir)

    def run_dir(self, job: Job) -> Path:
        return self.runs_dir / job.run_id

    def prepare(self, job: Job, code: CodeSource) -> None:
        run_dir = self.run_dir(job)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        code.materialize(run_dir)
        self.python(job)
        for folder in ("outputs", "logs", CONTROL_DIR):
            (run_dir / folder).mkdir(exist_ok=True)

    def submit(self, job: Job) -> dict[str, Any]:
        run_dir = self.run_dir(job)
        control = run_dir / CONTROL_DIR
        python = self.python(job)
        env = {
            **os.environ,
            **job_environment(job, run_dir=str(run_dir), events_file=str(control / EVENTS)),
        }
        if python != sys.executable:
            # Another interpreter does not see this package: give it run_context alone.
            pylib = write_run_context_package(control / PYLIB)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pylib), env.get("PYTHONPATH")]))
        with open(control / STD_LOG, "wb") as log:
            process = subprocess.Popen(
                wrapped_argv(job_argv(job, python), str(control / EXIT_CODE)),
                cwd=run_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._processes[process.pid] = process
        return {
            "pid": process.pid,
            "run_dir": str(run_dir),
            "std_log": str(control / STD_LOG),
            "events": str(control / EVENTS),
            "exit_code": str(control / EXIT_CODE),
            "python": python,
        }

    def wait(self, handle: dict[str, Any], timeout: float) -> TargetStatus:
        process = self._processes.get(handle["pid"])
        if process is not None:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return TargetStatus(running=True)
        elif _alive(handle["pid"], handle["run_dir"]):
            # A run started by an earlier try of this task: not our child, so watch it from outside.
            time.sleep(timeout)
            return TargetStatus(running=True)
        # Whatever the script left running in its group ends with it.
        _signal_group(handle["pid"], signal.SIGKILL)
        return _outcome(Path(handle["exit_code"]), process)

    def read_log(self, handle: dict[str, Any], offset: int, final: bool = False) -> Chunk:
        return read_lines(handle["std_log"], offset, final)

    def read_events(self, handle: dict[str, Any], offset: int, final: bool = False) -> Chunk:
        return read_lines(handle["events"], offset, final)

    def cancel(self, handle: dict[str, Any]) -> None:
        pid = handle["pid"]
        _signal_group(pid, signal.SIGTERM)
        process = self._processes.get(pid)
        deadline = time.monotonic() + TERM_GRACE_SECONDS
        while time.monotonic() < deadline and (
            process.poll() is None if process else _alive(pid, handle["run_dir"])
        ):
            time.sleep(0.05)
        _signal_group(pid, signal.SIGKILL)
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=TERM_GRACE_SECONDS)

    def collect(self, handle: dict[str, Any]) -> Collected:
        run_dir = Path(handle["run_dir"])
        logs = run_dir / "logs"
        logs.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(handle["std_log"], logs / STD_LOG)
        return Collected(outputs_dir=run_dir / "outputs", logs_dir=logs)

    def cleanup(self, handle: dict[str, Any]) -> None:
        self._processes.pop(handle["pid"], None)
        shutil.rmtree(handle["run_dir"], ignore_errors=True)

    def attachable(self, handle: dict[str, Any]) -> str | None:
        return None

    def find(self, job: Job) -> dict[str, Any] | None:
        # A process leaves no trace by run id that could be trusted; an unsaved handle means a lost run.
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "host": os.uname().nodename}


def _outcome(exit_file: Path, process: subprocess.Popen[bytes] | None) -> TargetStatus:
    try:
        code = int(exit_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        # The wrapper itself was killed (the group was signalled): no exit code was written.
        if process is not None and process.returncode is not None and process.returncode < 0:
            name = signal.Signals(-process.returncode).name
            return TargetStatus(
                running=False, exit_code=process.returncode, reason=f"killed by signal {name}"
            )
        return TargetStatus(
            running=False, exit_code=None, reason="the run's process ended without an exit code"
        )
    if code > 128 and code - 128 in signal.valid_signals():
        return TargetStatus(
            running=False, exit_code=code, reason=f"killed by signal {signal.Signals(code - 128).name}"
        )
    return TargetStatus(running=False, exit_code=code)


def _alive(pid: int, run_dir: str) -> bool:
    """Whether the run's process still runs: the pid exists, is no zombie, and works in the run directory
    (a pid reused by an unrelated process after the run ended does not count)."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return os.readlink(f"/proc/{pid}/cwd") == run_dir
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except PermissionError:
        return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
