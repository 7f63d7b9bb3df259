"""What every target does the same way: the command line, the script's variables, the run directory and its
control files, reading growing files line by line, and what an exit status says."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from airflow_amlrun import mlflow_capture, run_context
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.targets import standin_package
from airflow_amlrun.targets.base import Chunk, Job, TargetStatus
from airflow_amlrun.targets.files import UnsafeFileError, read_beneath
from airflow_amlrun.targets.supervisor import ENDED_BY as ENDED_BY
from airflow_amlrun.targets.supervisor import EXIT_CODE as EXIT_CODE
from airflow_amlrun.targets.supervisor import MAX_DURATION, STDERR_MARK, STDOUT_MARK, STOPPED

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

# Inside a run directory: the folder of files the target writes beside the code. The supervisor writes
# EXIT_CODE and ENDED_BY there; their names are its own.
CONTROL_DIR = ".amlrun"
STD_LOG = "std_log.txt"
EVENTS = "events.jsonl"
PID = "pid"
# The importable copy of run_context (CONTROL_DIR/pylib/airflow_amlrun/run_context.py), see
# write_run_context_package.
PYLIB = "pylib"
# The folders of a run directory beside the code: what the script writes, and the target's own.
RUN_FOLDERS = ("outputs", "logs", CONTROL_DIR)
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


def supervisor_request(
    job: Job, argv: list[str], env: dict[str, str] | None = None, *, in_container: bool = False
) -> dict[str, Any]:
    """What the supervisor is told to run (see supervisor.py): the job, its time limit, and that whatever
    the job leaves running in its process group ends with it (in a container, the container's end ends
    everything instead). A stop signals the supervisor alone (`docker stop` through the container's init; the
    other targets too), which passes it on to the group: so it knows the stop found the job running before the
    job gets it, whereas a signal to the whole group may end the job first."""
    request: dict[str, Any] = {
        "argv": argv,
        "max_seconds": job.max_run_duration_seconds,
        "grace_seconds": TERM_GRACE_SECONDS,
        "forward_signals": True,
    }
    if not in_container:
        request["end_group"] = True
    if env is not None:
        request["env"] = env
    return request


def stopped_for_limit(ended_by: bytes | str | None) -> bool:
    """Whether the supervisor's ENDED_BY file (its content, None when absent) says the time limit ended
    the run."""
    return _ended_by(ended_by).get("reason") == MAX_DURATION


def stopped_by(ended_by: bytes | str | None) -> str | None:
    """The signal of a stop that found the run running, if the supervisor's ENDED_BY file says one did."""
    said = _ended_by(ended_by)
    return str(said.get("signal")) if said.get("reason") == STOPPED else None


def _ended_by(content: bytes | str | None) -> dict[str, Any]:
    if not content:
        return {}
    try:
        said = json.loads(content)
    except ValueError:
        return {}
    return said if isinstance(said, dict) else {}


def new_run_dir(run_dir: Path, *, private: bool = False) -> None:
    """Make run_dir anew and empty (what an earlier try left there goes), with its parents; a private one
    only its owner may enter, whatever the umask."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(mode=0o700 if private else 0o777)
    if private:
        run_dir.chmod(0o700)


def remove_run_dir(recorded: str, runs_dir: Path) -> None:
    """Remove a run's folder, as its row records it, only if it is one of this target's run folders: the
    row is data, and a path changed in it must not make the worker delete another folder."""
    path = Path(recorded)
    if path.name in ("", ".", "..") or path.parent.resolve() != runs_dir.resolve():
        log.warning(
            "The recorded run folder %s is not in %s, where this worker keeps its runs; it was not removed.",
            recorded,
            runs_dir,
        )
        return
    shutil.rmtree(path, ignore_errors=True)


def add_run_folders(root: Path) -> None:
    """Make the RUN_FOLDERS in root (the code is there already: a folder of it by that name stays)."""
    for folder in RUN_FOLDERS:
        (root / folder).mkdir(exist_ok=True)


# The worker's variables a run on this machine does not inherit: Airflow's connections and variables (the
# workspace's database password among them), and the settings that hold a secret (the metadata database,
# the Fernet and signing keys, the Celery broker and result backend), in each of their forms (_CMD, _SECRET).
_WORKER_SECRETS = re.compile(
    r"AIRFLOW_(CONN|VAR)_.*"
    r"|AIRFLOW__[A-Z0-9_]+__(SQL_ALCHEMY_CONN(_ASYNC)?|FERNET_KEY|SECRET_KEY|JWT_SECRET|BROKER_URL"
    r"|RESULT_BACKEND|PASSWORD|[A-Z0-9_]*(PASSWORD|TOKEN|SECRET))(_CMD|_SECRET)?",
    re.IGNORECASE,
)


def worker_environment() -> dict[str, str]:
    """The worker's environment without its secrets, for a process of a run on this machine: what the script
    can read it may print, and its log is stored in the history."""
    return {k: v for k, v in os.environ.items() if not _WORKER_SECRETS.fullmatch(k)}


def python_path(pylib: str, existing: str | None) -> str:
    """A PYTHONPATH that finds run_context in the folder pylib first, then what the existing one held."""
    return ":".join(filter(None, [pylib, existing]))


def exit_status(
    code: int | None, *, on: str | None = None, timed_out: bool = False, stopped_by: str | None = None
) -> TargetStatus:
    """How a run ended with exit status code: past 128, as a shell reports it, the signal that killed it is
    named (with the host `on`, when the run was not on the worker).

    :param stopped_by: the signal of a stop that reached it while it ran (see `stopped_by`).
    """
    if code is not None and code > 128:
        with contextlib.suppress(ValueError):
            name = signal.Signals(code - 128).name
            where = f" on {on}" if on else ""
            return TargetStatus(
                running=False,
                exit_code=code,
                reason=f"killed by signal {name}{where}",
                timed_out=timed_out,
                stopped_by=stopped_by,
            )
    return TargetStatus(running=False, exit_code=code, timed_out=timed_out, stopped_by=stopped_by)


def recorded_status(
    code: int, ended_by: bytes | str | None, where: str, *, on: str | None = None
) -> TargetStatus:
    """How a run ended whose supervisor recorded exit status ``code``, with its ENDED_BY file's content (None when
    absent): stopped on ``where`` for its time limit, else as :func:`exit_status` names it (``on`` the host, when
    the run was not on the worker), with the stop that found it running, if one did."""
    if stopped_for_limit(ended_by):
        return TargetStatus(
            running=False,
            exit_code=code,
            reason=f"stopped on {where} for exceeding max_run_duration_seconds",
            timed_out=True,
        )
    return exit_status(code, on=on, stopped_by=stopped_by(ended_by))


def job_environment(job: Job, *, run_dir: str, events_file: str, python: str | None = None) -> dict[str, str]:
    """Variables the script sees besides the target's own: the environment's, the job's and the run's.

    Paths are given as the script sees them (inside a container or on a remote host they differ from
    this machine's).

    :param python: the script's interpreter there: a ``pyspark`` script's local Spark starts its Python
        workers on it too (not on whatever ``python3`` is on PATH), so they have the run's packages.
    """
    spark = (
        {"PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python}
        if python and job.framework == "pyspark"
        else {}
    )
    return {
        **spark,
        # MLflow's calls land in the run (mlflow_capture); a tracking URI of the run's own comes after, and wins.
        mlflow_capture.TRACKING_URI_ENV: mlflow_capture.TRACKING_URI,
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
    """Complete lines in data read at offset; a trailing partial line waits for more unless final.

    data is what a read of at most READ_CAP bytes returned, or all there is (which may be longer): a read
    that filled the cap may have cut the last line, which then waits for the next read even when final.
    Lines end at "\n" only (the "\r" of a "\r\n" is taken off): a progress bar's "\r" updates stay one line.
    """
    if not data:
        return Chunk([], offset)
    end = data.rfind(b"\n") + 1
    if final and len(data) != READ_CAP:
        end = len(data)
    cut = False
    if end == 0 and len(data) >= READ_CAP:
        # One line longer than the cap: hand it over in pieces rather than never.
        end, cut = len(data), True
    lines = data[:end].decode("utf-8", errors="replace").split("\n")
    if lines[-1]:
        last = lines.pop()  # not ended by a newline: its "\r" may be the script's last word
    else:
        lines.pop()
        last = None
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if last is not None:
        lines.append(last)
    return Chunk(lines, offset + end, cut=cut, pending=len(data) - end)


def read_lines(path: str | os.PathLike[str], offset: int, final: bool) -> Chunk:
    """Complete lines of a growing local file from a byte offset.

    The file is opened without blocking and without following a link, and read only if it is a regular
    file: anything else (a FIFO would hang the open) is named once in the task log and read as empty.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return Chunk([], offset)
    except OSError as err:
        _warn_once(str(path), f"cannot be opened ({err.strerror or err})")
        return Chunk([], offset)
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            _warn_once(str(path), "is not a regular file")
            return Chunk([], offset)
        stream.seek(offset)
        data = stream.read(READ_CAP)
    return lines_from(data, offset, final)


def read_control(run_dir: str | os.PathLike[str], name: str, offset: int = 0, size: int = READ_CAP) -> bytes:
    """Bytes of a file of a run directory's control folder on this machine from an offset.

    The script controls its run directory: the file is read without following a link on the way, without
    blocking, and only if it is a regular file. Absent, it reads as empty; anything else is named once in
    the task log and read as empty too, so a FIFO or a link put there cannot hang or mislead the worker.
    """
    try:
        data = read_beneath(Path(run_dir), f"{CONTROL_DIR}/{name}", offset, size)
    except UnsafeFileError as err:
        _warn_once(f"{run_dir}/{err.relative}", err.why)
        return b""
    except OSError as err:
        _warn_once(f"{run_dir}/{CONTROL_DIR}/{name}", f"cannot be read ({err.strerror or err})")
        return b""
    return data or b""


def read_control_lines(run_dir: str | os.PathLike[str], name: str, offset: int, final: bool) -> Chunk:
    """Complete lines of a growing control file (see read_control) from a byte offset."""
    return lines_from(read_control(run_dir, name, offset), offset, final)


def unmarked(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The run's log, given in pieces, as a run keeps it: without the marks the supervisor put at the start of
    each line the job wrote to stderr (see supervisor.py)."""
    rest = b""
    at_line_start = True
    for piece in pieces:
        data = rest + piece
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) < READ_CAP:
            rest = data  # the start of a line, which may be a mark cut in two
            continue
        if end == 0:
            end = len(data)  # one line longer than the cap: given on in pieces
        yield _without_marks(data[:end], at_line_start)
        at_line_start = data[end - 1 : end] == b"\n"
        rest = data[end:]
    if rest:
        yield _without_marks(rest, at_line_start)


def _without_marks(data: bytes, at_line_start: bool) -> bytes:
    """data without the one mark that may begin each of its lines (what follows a mark is the script's)."""
    if at_line_start:
        for mark in (STDERR_MARK, STDOUT_MARK):
            if data.startswith(mark):
                data = data[len(mark) :]
                break
    if _STDOUT_LINE in data:
        return _MARKED_LINE.sub(b"\n", data)
    return data.replace(_STDERR_LINE, b"\n")


_STDERR_LINE = b"\n" + STDERR_MARK
_STDOUT_LINE = b"\n" + STDOUT_MARK
# One pass: a stderr line whose text begins with a mark's bytes keeps them.
_MARKED_LINE = re.compile(b"\n(?:" + re.escape(STDERR_MARK) + b"|" + re.escape(STDOUT_MARK) + b")")


def unmark_file(path: Path) -> None:
    """Take the stderr marks out of a run's log collected on this machine (a regular file, not followed if a
    link), in place."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        tmp = path.with_name(f".{path.name}.unmarked")
        with open(tmp, "wb") as out:
            for data in unmarked(iter(lambda: src.read(READ_CAP), b"")):
                out.write(data)
    os.replace(tmp, path)


# Control files already named in the task log as unreadable, so each is named once.
_warned: set[str] = set()


def _warn_once(path: str, why: str) -> None:
    if path not in _warned:
        _warned.add(path)
        log.warning("The run's file %s %s: it is not read, and counts as empty.", path, why)


def supervisor_lost_reason(
    where: str,
    control: str,
    *,
    control_exists: bool,
    killed_by: str | None = None,
    leftovers: int = 0,
) -> str:
    """Why a run ended without an exit code: its supervisor (which records it) ended before it could.

    :param where: the machine, as the user knows it ("the worker", "host 10.0.0.5").
    :param control: the run's control folder there.
    :param control_exists: whether that folder still exists.
    :param killed_by: the signal that ended the supervisor, when known.
    :param leftovers: how many processes the run had left in its group, which the target ended.
    """
    if not control_exists:
        reason = (
            f"the run's control folder {control} on {where} was removed while the run ran (by the script?), so "
            "its supervisor could not record how the run ended, and the run's log there is gone too"
        )
    elif killed_by is not None:
        reason = (
            f"the run's supervisor on {where} was killed by {killed_by} before the run ended (if by the "
            "out-of-memory killer, the kernel log says so: dmesg)"
        )
    else:
        reason = (
            f"the run's supervisor on {where} ended without recording the run's exit code in {control}: it "
            "was killed (if by the out-of-memory killer, the kernel log says so: dmesg), or could not write "
            f"there (a full disk?), in which case its message ends the run's log ({control}/{STD_LOG})"
        )
    if leftovers:
        reason += (
            f"; the {leftovers} process{'es' if leftovers > 1 else ''} the run had left running "
            f"{'were' if leftovers > 1 else 'was'} stopped"
        )
    return reason


def find_java() -> str:
    """Java on this worker, which spark-submit needs: JAVA_HOME's, else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        java = Path(home, "bin", "java")
        if os.access(java, os.X_OK):
            return str(java)
        raise ConfigurationError(
            f"JAVA_HOME is {home!r}, which has no bin/java: spark-submit needs Java. Point JAVA_HOME at a Java "
            "installation (Java 17 or 21), or unset it to use the java on PATH."
        )
    found = shutil.which("java")
    if found is None:
        raise ConfigurationError(
            "spark-submit needs Java, and there is no java on this worker's PATH (and JAVA_HOME is not set). "
            "Install a Java runtime (on Debian/Ubuntu: apt-get install -y default-jre-headless), or set "
            "JAVA_HOME."
        )
    return found


def check_pyspark(python: str, where: str) -> None:
    """A ``pyspark`` script's interpreter on this machine must import pyspark, and Spark needs Java."""
    found = subprocess.run(
        [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('pyspark') is None)"],
        capture_output=True,
        check=False,
    )
    if found.returncode != 0:
        raise ConfigurationError(
            f"The run's config says framework='pyspark', and the interpreter {python} of {where} cannot import "
            "pyspark. Add pyspark to the environment (python.pip_requirements: ['pyspark==4.3.0']), or use "
            "framework='python' for a script that does not use Spark."
        )
    find_java()


def run_context_files() -> list[Path]:
    """The package's files a run's pylib folder is made of (what its content, and a cache of it, depend on)."""
    # (The stand-in reads the run protocol it compares with an installed package's from run_context's text.)
    return [Path(standin_package.__file__), Path(run_context.__file__), *mlflow_capture.source_files()]


def write_run_context_package(dest: str | os.PathLike[str]) -> Path:
    """Write a folder holding `airflow_amlrun/run_context.py`, to put first on a run's interpreter's path.

    The training script imports `airflow_amlrun.run_context` wherever it runs; an interpreter that does
    not have this package installed (another virtualenv, a bare image, a remote host) gets it from this
    folder. The folder's `airflow_amlrun/__init__.py` is the stand-in that gives way to an installed
    airflow_amlrun whose run_context speaks this one's run protocol (standin_package.py), so an interpreter
    that has the package gets all of it, not this folder's part. It also holds the MLflow capture and the entry
    point MLflow finds it by (mlflow_capture/__init__.py).
    """
    root = Path(dest)
    package = root / "airflow_amlrun"
    package.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(standin_package.__file__, package / "__init__.py")
    shutil.copyfile(run_context.__file__, package / "run_context.py")
    mlflow_capture.write_package(root)
    return root
