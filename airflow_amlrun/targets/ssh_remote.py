"""The SSH target's helper on the remote host: blob cache, run directory, environment, detached launch.

This file is copied as it is to ``<base>/lib/`` on the remote host (named by its content hash, so a changed
helper is a new file) and run there by the remote's own Python 3 with the standard library only: nothing of
airflow-amlrun is installed there. One invocation is one command:

    python3 ssh_remote.py COMMAND BASE_DIR [NAME]

with a JSON request on stdin and a JSON answer on stdout (``pack`` answers with a tar stream, ``read`` with
the bytes asked for; ``put`` reads a header line and the blob's bytes from stdin). A refusal exits with
status 3 and one line on stderr that the worker shows the user as it is; a command that succeeds may still
write warnings to stderr, one a line, which the worker logs.

Layout under BASE_DIR: ``blobs/<digest>`` (the code cache, one file per content hash), ``envs/<build key>``
(virtualenvs, complete once renamed into place), ``runs/<run id>`` (run directories), ``lib/`` (this file
and the supervisor each run starts under).

A run's process is named by its pid together with its start time and the host's boot id (kept in
``<run dir>/.amlrun/pid`` and in the worker's handle): the helper signals a process group only while its
leader is provably that process, never a pid that another process has since been given. Once the leader
(the supervisor) is gone without recording an exit code, ``kill`` ends the processes of its group whose
environment names that supervisor (supervisor.py's AMLRUN_SUPERVISOR), on the same boot and pid namespace.

The run's control files are opened without following a link or blocking, and read only if they are regular
files (a FIFO there would hang the helper). Warnings are capped: the first MAX_WARNINGS, then a count.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import signal
import stat
import sys
import time

# shutil, subprocess, tarfile and uuid are imported by the commands that use them, and typing not at all
# (mypy reads any name TYPE_CHECKING as true): the helper starts once per command, and what most commands
# need starts faster alone.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import tarfile
    from typing import Any

# The names of airflow_amlrun.targets.common (this file runs alone on the host; a unit test holds them equal).
CONTROL_DIR = ".amlrun"
STD_LOG = "std_log.txt"
EVENTS = "events.jsonl"
EXIT_CODE = "exit_code"
ENDED_BY = "ended_by"
PID = "pid"
RUN_FOLDERS = ("outputs", "logs", CONTROL_DIR)
BUILD_MARKER = "amlrun-build.json"
REFUSED = 3
# The files of a run's control folder that `read` serves (to a worker that cannot use SFTP on this host).
READABLE = (STD_LOG, EVENTS, EXIT_CODE, ENDED_BY)
# What the supervisor is told, of a launch request; the rest of the request is the helper's.
SUPERVISOR_REQUEST = ("argv", "env", "max_seconds", "grace_seconds", "end_group", "forward_signals")
# supervisor.LEADER_ENV: the variable of the job's environment naming its supervisor by pid and start time.
LEADER_ENV = "AMLRUN_SUPERVISOR"
# Warnings one command writes at most (one per skipped output, say); the rest are counted.
MAX_WARNINGS = 100
# Where the kernel shows processes; on a host without it (BSD, macOS), `ps` is asked.
PROC = "/proc"


class Refused(Exception):
    """A request the helper will not carry out; its message goes to the user."""


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write("usage: ssh_remote.py COMMAND BASE_DIR [NAME]\n")
        return 2
    command, base = argv[1], argv[2]
    name = argv[3] if len(argv) > 3 else None
    handler = COMMANDS.get(command)
    if handler is None:
        sys.stderr.write(f"amlrun-remote: unknown command {command!r}\n")
        return 2
    try:
        request = json.loads(sys.stdin.read() or "{}") if command in READS_STDIN else {}
        try:
            answer = handler(base, name, request)
        finally:
            warnings_summary()
    except Refused as err:
        sys.stderr.write(f"{err}\n")
        return REFUSED
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            sys.stderr.write(
                f"No space left on the device holding {base} ({err.filename or ''}); free space there or "
                "set the connection extra amlrun_base_dir to a folder on a larger disk.\n"
            )
            return REFUSED
        raise
    if answer is not None:
        sys.stdout.write(json.dumps(answer))
    return 0


# ------------------------------------------------------------------ paths


def run_dir(base: str, run_id: str | None) -> str:
    if not run_id or run_id in (".", "..") or "/" in run_id or "\0" in run_id:
        raise Refused(f"Refusing run id {run_id!r}: it is not a plain name.")
    return os.path.join(base, "runs", run_id)


def inside(root: str, relative: str) -> str:
    """root/relative, refusing a path that is absolute, has '..' or '.' parts, or escapes through a link."""
    parts = relative.split("/")
    if (
        not relative
        or relative.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\0" in relative
    ):
        raise Refused(f"Refusing manifest path {relative!r}: it would not stay inside the run directory.")
    path = os.path.join(root, *parts)
    parent = os.path.realpath(os.path.dirname(path))
    real_root = os.path.realpath(root)
    if parent != real_root and not parent.startswith(real_root + os.sep):
        raise Refused(f"Refusing manifest path {relative!r}: a link would take it outside the run directory.")
    return path


def check_link(relative: str, target: str) -> None:
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relative), target))
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise Refused(f"Refusing symlink {relative!r} -> {target!r}: it points outside the run directory.")


# ------------------------------------------------------------------ blob cache


def missing_blobs(base: str, blobs_wanted: dict[str, int]) -> dict[str, Any]:
    """Which of the given blobs (digest -> size) the cache lacks, and the free space beside it."""
    if not os.path.isdir(base):
        # Code, logs and outputs of runs are the user's own: other users of the host see nothing of them.
        os.makedirs(base, mode=0o700)
    blobs = os.path.join(base, "blobs")
    os.makedirs(blobs, exist_ok=True)
    missing = []
    for digest, size in blobs_wanted.items():
        check_digest(digest)
        try:
            if os.stat(os.path.join(blobs, digest)).st_size == size:
                continue
        except FileNotFoundError:
            pass
        missing.append(digest)
    disk = os.statvfs(blobs)
    return {"missing": missing, "free": disk.f_bavail * disk.f_frsize}


def check_digest(digest: str | None) -> str:
    if not digest or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise Refused(f"Refusing blob name {digest!r}: not a content hash.")
    return digest


def cmd_put(base: str, digest: str | None, request: dict[str, Any]) -> dict[str, Any]:
    """Store one blob sent on stdin: a JSON header line ``{"size": N}``, then exactly N bytes.

    The worker sends blobs this way when the host's sshd offers no SFTP; a blob cut short (a dropped
    connection) is not kept.
    """
    import uuid

    name = check_digest(digest)
    stream = sys.stdin.buffer
    size = int(json.loads(stream.readline().decode("utf-8"))["size"])
    blobs = os.path.join(base, "blobs")
    os.makedirs(blobs, exist_ok=True)
    final = os.path.join(blobs, name)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as out:
            left = size
            while left:
                data = stream.read(min(left, 1 << 20))
                if not data:
                    raise Refused(f"Blob {name} arrived cut short: {size - left} of {size} bytes.")
                out.write(data)
                left -= len(data)
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"stored": size}


# ------------------------------------------------------------------ run directory


def cmd_prepare(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    """Materialize the run directory from the blob cache, then make sure the environment is built.

    With ``blobs`` (digest -> size, all the run's code), the cache is checked first: when it lacks some, or
    the disk lacks room for them and the run directory, nothing is done and the answer says which are
    missing and how much space is free (the worker sends them, then asks again). Unchanged code so costs
    one round trip.
    """
    import shutil

    wanted = request.get("blobs")
    if wanted is not None:
        cache = missing_blobs(base, wanted)
        needed = sum(wanted[d] for d in cache["missing"]) + sum(wanted.values())
        if cache["missing"] or needed > cache["free"]:
            return cache
    root = run_dir(base, run_id)
    if os.path.lexists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    blobs = os.path.join(base, "blobs")
    links = []
    for entry in request["entries"]:
        relative = entry["path"]
        if entry.get("link") is not None:
            check_link(relative, entry["link"])
            links.append(entry)
            continue
        os.makedirs(os.path.dirname(os.path.join(root, *relative.split("/"))), exist_ok=True)
        dest = inside(root, relative)
        blob = os.path.join(blobs, entry["digest"])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with open(blob, "rb") as src:
            fd = os.open(dest, flags, entry["mode"] & 0o777)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
                copied = out.tell()
        if copied != entry["size"]:
            raise Refused(
                f"Blob {entry['digest']} in the cache has {copied} bytes, {entry['size']} expected."
            )
    # Links last, so no file write above can go through a link this step made.
    for entry in links:
        path = entry["path"]
        os.makedirs(os.path.dirname(os.path.join(root, *path.split("/"))), exist_ok=True)
        os.symlink(entry["link"], inside(root, path))
    for folder in RUN_FOLDERS:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    environment = request.get("environment")
    python = ensure_env(base, environment) if environment else request["python"]
    return {"python": python, "run_dir": root}


def ensure_env(base: str, environment: dict[str, Any]) -> str:
    """The interpreter of the environment's virtualenv under envs/<key>, built once, atomically."""
    import fcntl
    import shutil
    import uuid

    key = environment["key"]
    if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
        raise Refused(f"Refusing build key {key!r}: not a hash.")
    envs = os.path.join(base, "envs")
    final = os.path.join(envs, key)
    python = os.path.join(final, "bin", "python")
    if os.path.exists(os.path.join(final, BUILD_MARKER)):
        return python
    os.makedirs(envs, exist_ok=True)
    with open(os.path.join(envs, f".{key}.lock"), "w") as lock:
        # Two runs needing the same key build it once: the second waits here, then finds it done.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(final, BUILD_MARKER)):
            return python
        for name in os.listdir(envs):
            if name.startswith(f".tmp-{key}-"):
                shutil.rmtree(os.path.join(envs, name), ignore_errors=True)
        if os.path.lexists(final):
            shutil.rmtree(final)
        tmp = os.path.join(envs, f".tmp-{key}-{uuid.uuid4().hex[:8]}")
        try:
            started = time.time()
            tool = build(tmp, environment)
            record = {"build_key": key, "tool": tool, "seconds": round(time.time() - started, 3)}
            with open(os.path.join(tmp, BUILD_MARKER), "w") as marker:
                json.dump(record, marker)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return python


def build(tmp: str, environment: dict[str, Any]) -> str:
    import shutil

    base_python = environment["python"]
    # The lock keeps its ${VAR} references as written: uv and pip expand them from their own environment,
    # which alone receives the values (they came on stdin, and are written nowhere).
    lock_file = tmp + ".lock.txt"
    with open(lock_file, "w") as out:
        out.write(environment["lock"])
    try:
        uv = shutil.which("uv")
        if uv:
            step(
                environment,
                "creating the virtualenv",
                [uv, "venv", "--relocatable", "--python", base_python, tmp],
            )
            if environment.get("has_requirements", True):
                step(
                    environment,
                    "installing the lock",
                    [
                        uv,
                        "pip",
                        "sync",
                        "--require-hashes",
                        "--python",
                        os.path.join(tmp, "bin", "python"),
                        lock_file,
                    ],
                )
            return "uv"
        step(environment, "creating the virtualenv", [base_python, "-m", "venv", tmp])
        if environment.get("has_requirements", True):
            pip = [os.path.join(tmp, "bin", "python"), "-m", "pip", "install", "--disable-pip-version-check"]
            step(
                environment, "installing the lock", [*pip, "--no-input", "--require-hashes", "-r", lock_file]
            )
        return "venv+pip"
    finally:
        os.unlink(lock_file)


def step(environment: dict[str, Any], what: str, command: list[str]) -> None:
    import subprocess

    credentials = {str(k): str(v) for k, v in (environment.get("credentials") or {}).items()}
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1", PIP_NO_INPUT="1")
    env.update(credentials)
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd="/")
    if done.returncode != 0:
        output = done.stdout.decode("utf-8", "replace")
        # An installer may echo a URL with the password it expanded: the message never carries one.
        for value in credentials.values():
            if value:
                output = output.replace(value, "***")
        raise Refused(
            f"Building environment {environment.get('name')!r} on this host failed while {what} "
            f"({' '.join(command[:3])} ...):\n{output.strip()[-4000:]}"
        )


# ------------------------------------------------------------------ the run's process


def cmd_launch(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    """Start the run under the supervisor, in a session and process group of its own, detached from this
    SSH session; the supervisor gets its request (the variables, secrets among them) through a pipe."""
    import subprocess

    root = run_dir(base, run_id)
    control = os.path.join(root, CONTROL_DIR)
    existing = read_pid(root)
    if existing is not None:
        # A retried launch (the connection dropped while it answered): the run is started already.
        return existing
    supervisor = request["supervisor"]
    lib = os.path.realpath(os.path.join(base, "lib"))
    if os.path.dirname(os.path.realpath(supervisor)) != lib or not os.path.isfile(supervisor):
        raise Refused(f"Refusing supervisor {supervisor!r}: it is not a file in {lib}.")
    log = os.open(os.path.join(control, STD_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        # This interpreter, isolated (-I: no PYTHON* variables meant for the job, -S: no site).
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", supervisor, control],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    finally:
        os.close(log)
    # Read while the child is ours and unreaped: its pid cannot name another process yet.
    record = {
        "pid": process.pid,
        "start_time": start_time(process.pid),
        "boot_id": boot_id(),
        "pid_namespace": pid_namespace(),
    }
    pid_tmp = os.path.join(control, PID + ".tmp")
    with open(pid_tmp, "w") as out:
        json.dump(record, out)
    os.rename(pid_tmp, os.path.join(control, PID))
    assert process.stdin is not None
    with process.stdin:
        process.stdin.write(json.dumps({k: request[k] for k in SUPERVISOR_REQUEST if k in request}).encode())
    # The run outlives this helper, which does not wait for it: once the helper exits, init adopts it.
    return record


def read_pid(root: str) -> dict[str, Any] | None:
    """The run's process as launch recorded it; a bare pid from an older helper gives {"pid": N}."""
    try:
        value = json.loads(read_control(root, PID, 0, 4096) or b"null")
    except (ValueError, NotRegular):
        return None
    if isinstance(value, int):
        return {"pid": value}
    if isinstance(value, dict) and isinstance(value.get("pid"), int):
        return value
    return None


def read_exit_code(root: str) -> int | None:
    try:
        return int(read_control(root, EXIT_CODE, 0, 64).strip())
    except (ValueError, NotRegular):
        return None


class NotRegular(Exception):
    """A control file that is not read: a link, a FIFO, a folder... (the message says which)."""


def read_control(root: str, name: str, offset: int, size: int) -> bytes:
    """Up to size bytes of a control file of the run directory from an offset; empty while it does not exist.

    The script controls its run directory: no link is followed (neither .amlrun nor the file may be one), the
    open does not block (a FIFO would hang it), and only a regular file is read; else NotRegular.
    """
    try:
        folder = os.open(os.path.join(root, CONTROL_DIR), DIR_FLAGS)
    except FileNotFoundError:
        return b""
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotRegular(f"{CONTROL_DIR} is a symbolic link or not a folder") from None
        raise
    try:
        try:
            fd = os.open(name, FILE_FLAGS, dir_fd=folder)
        except FileNotFoundError:
            return b""
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise NotRegular(f"{CONTROL_DIR}/{name} is a symbolic link") from None
            raise
    finally:
        os.close(folder)
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(f"{CONTROL_DIR}/{name} is not a regular file (a FIFO, socket, device or folder)")
        stream.seek(offset)
        data: bytes = stream.read(size)
        return data


def boot_id() -> str | None:
    try:
        with open(f"{PROC}/sys/kernel/random/boot_id") as stream:
            return stream.read().strip()
    except OSError:
        return None


def pid_namespace() -> str | None:
    try:
        return os.readlink(f"{PROC}/self/ns/pid")
    except OSError:
        return None


def start_time(pid: int) -> str | None:
    """What, with the pid, names one process for good: its start time. None when it is gone, a zombie, or
    cannot be read."""
    if not os.path.isdir(f"{PROC}/self"):
        return ps_start_time(pid)
    try:
        with open(f"{PROC}/{pid}/stat") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X") or len(fields) < 20:
        return None
    # Clock ticks since boot (field 22 of /proc/PID/stat): unique with the pid and the boot id.
    return f"ticks:{fields[19]}"


def ps_start_time(pid: int) -> str | None:
    """start_time on a host without /proc (BSD, macOS): `ps` reports it to the second, as a date."""
    import subprocess

    try:
        done = subprocess.run(
            ["ps", "-o", "stat=", "-o", "lstart=", "-p", str(pid)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, LC_ALL="C"),
        )
    except OSError:
        return None
    words = done.stdout.decode("ascii", "replace").split()
    if done.returncode != 0 or len(words) < 2 or words[0].startswith("Z"):
        return None
    return "lstart:" + " ".join(words[1:])


def alive(record: dict[str, Any], root: str) -> bool:
    """Whether the run's leader (its supervisor) still runs, provably the process launch started.

    A pid now used by another process, a process on another boot, or one this user may not inspect counts
    as ended: it is never signalled.
    """
    pid = int(record["pid"])
    if "start_time" in record:
        started = record["start_time"]
        return started is not None and record.get("boot_id") == boot_id() and start_time(pid) == started
    # Launched by an older helper, which kept no start time: the process must work in the run directory.
    if start_time(pid) is None:
        return False
    try:
        return os.readlink(f"{PROC}/{pid}/cwd") == os.path.realpath(root)
    except OSError:
        return False


def run_process(root: str, request: dict[str, Any]) -> dict[str, Any] | None:
    """The run's process as the worker's handle names it, else as this host recorded it."""
    known = request.get("process")
    if isinstance(known, dict) and isinstance(known.get("pid"), int):
        return known
    return read_pid(root)


def cmd_status(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    root = run_dir(base, run_id)
    record = run_process(root, request)
    return {
        "exists": os.path.isdir(root),
        "pid": record["pid"] if record else None,
        "process": record,
        "alive": record is not None and alive(record, root),
        "exit_code": read_exit_code(root),
        "run_dir": root,
        "control_exists": stat.S_ISDIR(lstat_mode(os.path.join(root, CONTROL_DIR))),
    }


def lstat_mode(path: str) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def cmd_kill(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    """SIGTERM to the run's supervisor, which passes it on to the run's process group; SIGKILL to the group after
    the grace period if its leader still runs.

    Only while the leader is provably the run's. Once it has ended, what the job left in its group was
    ended by the supervisor itself, unless the supervisor ended abnormally: then what is provably the run's
    of its group is ended here (see end_leftovers); ``leftovers`` says how many processes that was.
    """
    root = run_dir(base, run_id)
    record = run_process(root, request)
    if record is None:
        return {"killed": False, "leftovers": 0}
    if not alive(record, root):
        return {"killed": False, "leftovers": end_leftovers(record)}
    pid = int(record["pid"])
    # To the supervisor alone, which passes it on to the group (it was asked to: forward_signals).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + float(request.get("grace", 5.0))
    while time.monotonic() < deadline and alive(record, root):
        time.sleep(0.05)
    if alive(record, root):
        kill_group(pid, signal.SIGKILL)
    return {"killed": True}


def end_leftovers(record: dict[str, Any]) -> int:
    """SIGKILL what the run left running in its process group once its supervisor (the group's leader) is
    gone; how many processes that was.

    The group's id is the supervisor's pid, which no new process gets while the group lives; but once the
    group ended, a new group may take that id. So a member counts as the run's only if its environment
    names the supervisor by pid and start time (LEADER_ENV), which nothing else's does; and only on the
    boot and pid namespace the run started in. Where it can, each is signalled through a pidfd opened before
    it is looked at, so a pid reused in between cannot be hit.
    """
    started = record.get("start_time")
    if (
        not isinstance(started, str)
        or not started.startswith("ticks:")
        or record.get("boot_id") != boot_id()
        or record.get("pid_namespace") is None
        or record.get("pid_namespace") != pid_namespace()
    ):
        return 0
    pgid = int(record["pid"])
    if start_time(pgid) == started:
        return 0  # the supervisor runs: the group is its business
    marker = f"\0{LEADER_ENV}={pgid}:{started[len('ticks:') :]}\0".encode()
    ended = 0
    for pid in group_members(pgid):
        pidfd = None
        try:
            if hasattr(os, "pidfd_open"):
                pidfd = os.pidfd_open(pid)
            if group_of(pid) != pgid:
                continue
            with open(f"{PROC}/{pid}/environ", "rb") as stream:
                if marker not in b"\0" + stream.read():
                    continue
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            ended += 1
        except OSError:
            continue
        finally:
            if pidfd is not None:
                os.close(pidfd)
    return ended


def group_of(pid: int) -> int | None:
    """The process group of a live (not zombie) process, or None."""
    try:
        with open(f"{PROC}/{pid}/stat") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[2]) if len(fields) > 2 and fields[0] not in ("Z", "X") else None


def group_members(pgid: int) -> list[int]:
    if not os.path.isdir(f"{PROC}/self"):
        return []
    return [int(n) for n in os.listdir(PROC) if n.isdigit() and group_of(int(n)) == pgid]


# ------------------------------------------------------------------ reading back


def cmd_read(base: str, run_id: str | None, request: dict[str, Any]) -> None:
    """Bytes of a control file from an offset, on stdout (for a worker that cannot use SFTP here)."""
    name = request.get("name")
    if name not in READABLE:
        raise Refused(f"Refusing to read {name!r}: not one of {', '.join(READABLE)}.")
    root = run_dir(base, run_id)
    try:
        data = read_control(root, name, int(request.get("offset", 0)), int(request.get("size", 1 << 20)))
    except NotRegular as err:
        warn(f"{NOT_READ}{err}")
        data = b""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def cmd_pack(base: str, run_id: str | None, request: dict[str, Any]) -> None:
    """A tar stream of outputs/ and logs/ (with the combined log as logs/std_log.txt) on stdout.

    The script wrote these folders, so they are read without ever leaving them, as the local target reads
    its own: every folder and file is opened with O_NOFOLLOW relative to its parent's descriptor and must
    be the entry that was listed; a link to a file inside the folder is sent as that file; a link leading
    out, dangling or to a folder, and anything not a regular file, is skipped with a warning (on stderr,
    which the worker writes to the task log).
    """
    import tarfile

    root = run_dir(base, run_id)
    out = sys.stdout.buffer
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for folder in ("outputs", "logs"):
            pack_folder(tar, os.path.join(root, folder), folder)
        with contextlib.suppress(FileNotFoundError):
            control = os.open(os.path.join(root, CONTROL_DIR), DIR_FLAGS)
            try:
                log = open_listed(control, STD_LOG, None, FILE_FLAGS, repr(f"{CONTROL_DIR}/{STD_LOG}"))
                if log is not None:
                    add_open_file(tar, log, f"logs/{STD_LOG}")
            finally:
                os.close(control)
    out.flush()


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# Non-blocking, so that a FIFO in a file's place cannot hang the open.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK


# How `read` starts the warning about a control file it does not read (the worker names it once).
NOT_READ = "not read: "
_warnings = {"shown": 0, "left_out": 0}


def warn(message: str) -> None:
    """One line on stderr, which the worker writes to the task log; beyond MAX_WARNINGS, only counted."""
    if _warnings["shown"] >= MAX_WARNINGS:
        _warnings["left_out"] += 1
        return
    _warnings["shown"] += 1
    sys.stderr.write(message.replace("\n", " ") + "\n")
    sys.stderr.flush()


def warnings_summary() -> None:
    if _warnings["left_out"]:
        sys.stderr.write(f"... and {_warnings['left_out']} more warnings like these, not shown.\n")
        sys.stderr.flush()


def pack_folder(tar: tarfile.TarFile, top: str, label: str) -> None:
    try:
        root_fd = os.open(top, DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            warn(
                f"{label}/ is a symlink to {readlink(top)!r} (or not a folder): nothing in it was collected. "
                f"A run's {label} are the files inside its own {label}/ folder."
            )
            return
        raise
    try:
        try:
            real_root = os.readlink(f"/proc/self/fd/{root_fd}")
        except OSError:
            real_root = os.path.realpath(top)
        Packer(tar, root_fd, real_root, label).folder(root_fd, "")
    finally:
        os.close(root_fd)


class Packer:
    """One walk of a folder under its open descriptor, adding what lies inside it to the tar stream."""

    def __init__(self, tar: tarfile.TarFile, root_fd: int, real_root: str, label: str) -> None:
        self.tar = tar
        self.root_fd = root_fd
        self.real_root = real_root
        self.label = label

    def folder(self, dir_fd: int, rel_dir: str) -> None:
        import tarfile

        # The listing, with each entry's own stat, comes first: what is opened must be what was listed.
        listed = []
        for entry in os.scandir(dir_fd):
            with contextlib.suppress(OSError):
                listed.append((entry.name, entry.stat(follow_symlinks=False)))
        info = tarfile.TarInfo(f"{self.label}/{rel_dir}" if rel_dir else self.label)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        self.tar.addfile(info)
        for name, status in sorted(listed, key=lambda item: item[0]):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            shown = repr(f"{self.label}/{rel}")
            if stat.S_ISLNK(status.st_mode):
                self.link(dir_fd, name, rel, shown)
            elif stat.S_ISDIR(status.st_mode):
                sub = open_listed(dir_fd, name, status, DIR_FLAGS, shown)
                if sub is not None:
                    try:
                        self.folder(sub, rel)
                    finally:
                        os.close(sub)
            elif stat.S_ISREG(status.st_mode):
                fd = open_listed(dir_fd, name, status, FILE_FLAGS, shown)
                if fd is not None:
                    add_open_file(self.tar, fd, f"{self.label}/{rel}")
            else:
                warn(f"{shown} is not a regular file (a FIFO, socket or device): not collected.")

    def link(self, dir_fd: int, name: str, rel: str, shown: str) -> None:
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            return  # gone since it was listed
        shown = f"{shown} is a symlink to {target!r}"
        resolved = os.path.realpath(os.path.join(self.real_root, *rel.split("/")[:-1], target))
        if resolved != self.real_root and not resolved.startswith(self.real_root + os.sep):
            warn(
                f"{shown}, outside {self.label}/: it was not read or collected. A run's {self.label} are the "
                f"files inside {self.label}/; copy a file there to keep it."
            )
            return
        parts = os.path.relpath(resolved, self.real_root).split(os.sep)
        fd = self.open_beneath([] if parts == ["."] else parts)
        if fd is None:
            warn(f"{shown}, which does not exist (or changed while it was collected): not collected.")
            return
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            warn(
                f"{shown}, a folder: not followed (the files inside {self.label}/ are collected under their "
                "own paths)."
            )
            return
        add_open_file(self.tar, fd, f"{self.label}/{rel}")

    def open_beneath(self, parts: list[str]) -> int | None:
        """Open a resolved (link-free) path from the root, following no link on the way."""
        fd = os.dup(self.root_fd)
        for i, part in enumerate(parts):
            try:
                child = os.open(part, DIR_FLAGS if i < len(parts) - 1 else FILE_FLAGS, dir_fd=fd)
            except OSError:
                os.close(fd)
                return None
            os.close(fd)
            fd = child
        return fd


def open_listed(dir_fd: int, name: str, listed: os.stat_result | None, flags: int, shown: str) -> int | None:
    """Open an entry of a folder without following a link; it must still be what the listing saw."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            warn(f"{shown} is a symlink: not collected.")
        elif err.errno != errno.ENOENT:
            warn(f"{shown} could not be read ({err.strerror}): not collected.")
        return None
    status = os.fstat(fd)
    same = listed is None or (status.st_dev, status.st_ino) == (listed.st_dev, listed.st_ino)
    if not same or (listed is None and not stat.S_ISREG(status.st_mode)):
        os.close(fd)
        warn(f"{shown} was replaced while it was collected: not collected.")
        return None
    return fd


def add_open_file(tar: tarfile.TarFile, fd: int, arcname: str) -> None:
    with os.fdopen(fd, "rb") as stream:
        info = tar.gettarinfo(arcname=arcname, fileobj=stream)
        tar.addfile(info, stream)


def readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def cmd_remove(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    import shutil

    root = run_dir(base, run_id)
    shutil.rmtree(root, ignore_errors=True)
    return {"removed": root}


COMMANDS = {
    "put": cmd_put,
    "prepare": cmd_prepare,
    "launch": cmd_launch,
    "status": cmd_status,
    "kill": cmd_kill,
    "read": cmd_read,
    "pack": cmd_pack,
    "remove": cmd_remove,
}
# Commands whose stdin is a JSON request (`put` reads its own).
READS_STDIN = {"prepare", "launch", "status", "kill", "read"}


if __name__ == "__main__":
    sys.exit(main(sys.argv))
