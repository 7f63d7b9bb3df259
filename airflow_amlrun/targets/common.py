"""What every target does the same way: the command line, the script's variables, the run directory's
control files, and reading growing files line by line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from airflow_amlrun import run_context
from airflow_amlrun.targets.base import Chunk, Job

# Inside a run directory: the folder of files the target writes beside the code.
CONTROL_DIR = ".amlrun"
STD_LOG = "std_log.txt"
EVENTS = "events.jsonl"
EXIT_CODE = "exit_code"
PID = "pid"
# The importable copy of run_context (CONTROL_DIR/pylib/airflow_amlrun/run_context.py).
PYLIB = "pylib"
# Largest piece of a log read at once, so a chatty script cannot balloon the worker's memory.
READ_CAP = 1 << 20

# Runs the job, then records its exit code in the file named by $0. A target reading the run from another
# process (a retry re-attaching) learns the outcome from that file; a run killed as a whole leaves none.
EXIT_WRAPPER = '"$@"; rc=$?; echo "$rc" > "$0.tmp" && mv "$0.tmp" "$0"; exit "$rc"'


def job_argv(job: Job, python: str) -> list[str]:
    """The command line of a job: the script under the environment's interpreter, or the command."""
    if job.script is not None:
        return [python, job.script, *job.arguments]
    if isinstance(job.command, list):
        return list(job.command)
    return ["/bin/sh", "-c", str(job.command)]


def wrapped_argv(argv: list[str], exit_file: str) -> list[str]:
    """argv run under the wrapper that writes its exit code to exit_file."""
    return ["/bin/sh", "-c", EXIT_WRAPPER, exit_file, *argv]


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
