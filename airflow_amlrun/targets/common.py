"""What every target does the same way: the command line, the script's variables, the run directory's
control files, and reading growing files line by line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from airflow_amlrun import run_context
from airflow_amlrun.targets.base import Chunk, Job
from airflow_amlrun.targets.supervisor import ENDED_BY as ENDED_BY
from airflow_amlrun.targets.supervisor import EXIT_CODE as EXIT_CODE
from airflow_amlrun.targets.supervisor import MAX_DURATION

# Inside a run directory: the folder of files the target writes beside the code. The supervisor writes
# EXIT_CODE and ENDED_BY there; their names are its own.
CONTROL_DIR = ".amlrun"
STD_LOG = "std_log.txt"
EVENTS = "events.jsonl"
PID = "pid"
# The importable copy of run_context (CONTROL_DIR/pylib/airflow_amlrun/run_context.py).
PYLIB = "pylib"
# Largest piece of a log read at once, so a chatty script cannot balloon the worker's memory.
READ_CAP = 1 << 20
# How long a run stopped by its target (canceled, or past its time limit) gets to exit on SIGTERM before
# its whole process group is killed.
TERM_GRACE_SECONDS = 5.0


def job_argv(job: Job, python: str) -> list[str]:
    """The command line of a job: the script under the environment's interpreter, or the command."""
    if job.script is not None:
        return [python, job.script, *job.arguments]
    if isinstance(job.command, list):
        return list(job.command)
    return ["/bin/sh", "-c", str(job.command)]


def supervisor_request(job: Job, argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """What the supervisor is told to run (see supervisor.py): the job, its time limit, and that whatever
    the job leaves running in its process group ends with it."""
    request: dict[str, Any] = {
        "argv": argv,
        "max_seconds": job.max_run_duration_seconds,
        "grace_seconds": TERM_GRACE_SECONDS,
        "end_group": True,
    }
    if env is not None:
        request["env"] = env
    return request


def stopped_for_limit(ended_by: bytes | str | None) -> bool:
    """Whether the supervisor's ENDED_BY file (its content, None when absent) says the time limit ended
    the run."""
    if not ended_by:
        return False
    try:
        return bool(json.loads(ended_by).get("reason") == MAX_DURATION)
    except (ValueError, AttributeError):
        return False


def job_environment(job: Job, *, run_dir: str, events_file: str) -> dict[str, str]:
    """Variables the script sees besides the target's own: the environment's, the job's and the run's.

    Paths are given as the script sees them (inside a container or on a remote host they differ from
    this machine's).
    """
    return {
        **job.environment.spec.environment_variables,
        **job.environment_variables,
        **job.secret_environment_variables,
        run_context.RUN_ID_ENV: job.run_id,
        run_context.EXPERIMENT_ENV: job.experiment,
        run_context.EVENTS_FILE_ENV: events_file,
        run_context.OUTPUTS_DIR_ENV: str(PurePosixPath(run_dir) / "outputs"),
        # The log is streamed line by line; a buffered stdout would hold lines back until exit.
        "PYTHONUNBUFFERED": "1",
    }


def lines_from(data: bytes, offset: int, final: bool) -> Chunk:
    """Complete lines in data read at offset; a trailing partial line waits for more unless final."""
    if not data:
        return Chunk([], offset)
    end = data.rfind(b"\n") + 1
    if final and len(data) < READ_CAP:
        end = len(data)
    if end == 0 and len(data) >= READ_CAP:
        # One line longer than the cap: hand it over in pieces rather than never.
        end = len(data)
    text = data[:end].decode("utf-8", errors="replace")
    return Chunk(text.splitlines(), offset + end)


def read_lines(path: str | os.PathLike[str], offset: int, final: bool) -> Chunk:
    """Complete lines of a growing local file from a byte offset."""
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            data = stream.read(READ_CAP)
    except FileNotFoundError:
        return Chunk([], offset)
    return lines_from(data, offset, final)


def write_run_context_package(dest: str | os.PathLike[str]) -> Path:
    """Write a folder holding only `airflow_amlrun/run_context.py`, to put on a foreign interpreter's path.

    The training script imports `airflow_amlrun.run_context` wherever it runs; an interpreter that does
    not have this package installed (another virtualenv, a bare image, a remote host) gets this folder.
    """
    root = Path(dest)
    package = root / "airflow_amlrun"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    shutil.copyfile(run_context.__file__, package / "run_context.py")
    return root
