"""The SSH target's helper on the remote host: blob cache, run directory, environment, detached launch.

This file is copied as it is to ``<base>/lib/`` on the remote host (named by its content hash, so a changed
helper is a new file) and run there by the remote's own Python 3 with the standard library only: nothing of
airflow-amlrun is installed there. One invocation is one command:

    python3 ssh_remote.py COMMAND BASE_DIR [RUN_ID]

with a JSON request on stdin and a JSON answer on stdout (``pack`` answers with a tar stream). A refusal
exits with status 3 and one line on stderr that the worker shows the user as it is.

Layout under BASE_DIR: ``blobs/<digest>`` (the code cache, one file per content hash), ``envs/<build key>``
(virtualenvs, complete once renamed into place), ``runs/<run id>`` (run directories), ``lib/`` (this file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from typing import Any

# Kept in step with airflow_amlrun.targets.common (this file may not import it: it runs on its own).
CONTROL_DIR = ".amlrun"
STD_LOG = "std_log.txt"
EXIT_CODE = "exit_code"
PID = "pid"
ENV_FILE = "env.json"
EXIT_WRAPPER = '"$@"; rc=$?; echo "$rc" > "$0.tmp" && mv "$0.tmp" "$0"; exit "$rc"'
BUILD_MARKER = "amlrun-build.json"
REFUSED = 3


class Refused(Exception):
    """A request the helper will not carry out; its message goes to the user."""


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write("usage: ssh_remote.py COMMAND BASE_DIR [RUN_ID]\n")
        return 2
    command, base = argv[1], argv[2]
    run_id = argv[3] if len(argv) > 3 else None
    handler = COMMANDS.get(command)
    if handler is None:
        sys.stderr.write(f"amlrun-remote: unknown command {command!r}\n")
        return 2
    try:
        request = json.loads(sys.stdin.read() or "{}") if command in READS_STDIN else {}
        answer = handler(base, run_id, request)
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


def cmd_missing(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    """Which of the given blobs (digest -> size) the cache lacks, and the free space beside it."""
    if not os.path.isdir(base):
        # Code, logs and outputs of runs are the user's own: other users of the host see nothing of them.
        os.makedirs(base, mode=0o700)
    blobs = os.path.join(base, "blobs")
    os.makedirs(blobs, exist_ok=True)
    missing = []
    for digest, size in request["blobs"].items():
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise Refused(f"Refusing blob name {digest!r}: not a content hash.")
        try:
            if os.stat(os.path.join(blobs, digest)).st_size == size:
                continue
        except FileNotFoundError:
            pass
        missing.append(digest)
    stat = os.statvfs(blobs)
    return {"missing": missing, "free": stat.f_bavail * stat.f_frsize}


# ------------------------------------------------------------------ run directory


def cmd_prepare(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    """Materialize the run directory from the blob cache, then make sure the environment is built."""
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
    for folder in ("outputs", "logs", CONTROL_DIR):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    environment = request.get("environment")
    python = ensure_env(base, environment) if environment else request["python"]
    return {"python": python, "run_dir": root}


def ensure_env(base: str, environment: dict[str, Any]) -> str:
    """The interpreter of the environment's virtualenv under envs/<key>, built once, atomically."""
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
    base_python = environment["python"]
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
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1", PIP_NO_INPUT="1")
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd="/")
    if done.returncode != 0:
        output = done.stdout.decode("utf-8", "replace").strip()[-4000:]
        raise Refused(
            f"Building environment {environment.get('name')!r} on this host failed while {what} "
            f"({' '.join(command[:3])} ...):\n{output}"
        )


# ------------------------------------------------------------------ the run's process


def cmd_launch(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    """Start the run in a session and process group of its own, detached from this SSH session."""
    root = run_dir(base, run_id)
    control = os.path.join(root, CONTROL_DIR)
    existing = read_pid(root)
    if existing is not None:
        # A retried launch (the connection dropped while it answered): the run is started already.
        return {"pid": existing}
    env_file = os.path.join(control, ENV_FILE)
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(request["env"], out)
    argv = ["/bin/sh", "-c", EXIT_WRAPPER, os.path.join(control, EXIT_CODE), *request["argv"]]
    pid = os.fork()
    if pid == 0:  # the run: never returns
        try:
            os.setsid()
            with open(env_file) as stream:
                variables = json.load(stream)
            os.unlink(env_file)  # the values live on only in the run's own environment
            os.chdir(root)
            null = os.open(os.devnull, os.O_RDONLY)
            log = os.open(os.path.join(control, STD_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.execve(argv[0], argv, {**os.environ, **variables})
        finally:
            os._exit(127)
    pid_tmp = os.path.join(control, PID + ".tmp")
    with open(pid_tmp, "w") as out:
        out.write(str(pid))
    os.rename(pid_tmp, os.path.join(control, PID))
    return {"pid": pid}


def read_pid(root: str) -> int | None:
    try:
        with open(os.path.join(root, CONTROL_DIR, PID)) as stream:
            return int(stream.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def read_exit_code(root: str) -> int | None:
    try:
        with open(os.path.join(root, CONTROL_DIR, EXIT_CODE)) as stream:
            return int(stream.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int, root: str) -> bool:
    """Whether the run's leader process still runs (a pid reused by another process does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            if stream.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        return os.path.realpath(f"/proc/{pid}/cwd") == os.path.realpath(root)
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except PermissionError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def cmd_status(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    root = run_dir(base, run_id)
    pid = read_pid(root)
    return {
        "exists": os.path.isdir(root),
        "pid": pid,
        "alive": pid is not None and alive(pid, root),
        "exit_code": read_exit_code(root),
        "run_dir": root,
    }


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def group_exists(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_kill(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    """SIGTERM to the run's process group, SIGKILL to what is left after the grace period."""
    root = run_dir(base, run_id)
    pid = read_pid(root)
    if pid is None:
        return {"killed": False}
    if alive(pid, root):
        kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + float(request.get("grace", 5.0))
        while time.monotonic() < deadline and alive(pid, root):
            time.sleep(0.05)
    if read_exit_code(root) is None or alive(pid, root):
        kill_group(pid, signal.SIGKILL)
    return {"killed": True}


def cmd_pack(base: str, run_id: str | None, request: dict[str, Any]) -> None:
    """A tar stream of outputs/ and logs/ (with the combined log as logs/std_log.txt) on stdout."""
    root = run_dir(base, run_id)
    pid = read_pid(root)
    if pid is not None and not alive(pid, root):
        # Whatever the script left running in its group ends with it.
        kill_group(pid, signal.SIGKILL)
    out = sys.stdout.buffer
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for folder in ("outputs", "logs"):
            path = os.path.join(root, folder)
            if os.path.isdir(path):
                tar.add(path, arcname=folder)
        log = os.path.join(root, CONTROL_DIR, STD_LOG)
        if os.path.isfile(log):
            tar.add(log, arcname=f"logs/{STD_LOG}")
    out.flush()


def cmd_remove(base: str, run_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
    root = run_dir(base, run_id)
    shutil.rmtree(root, ignore_errors=True)
    return {"removed": root}


COMMANDS = {
    "missing": cmd_missing,
    "prepare": cmd_prepare,
    "launch": cmd_launch,
    "status": cmd_status,
    "kill": cmd_kill,
    "pack": cmd_pack,
    "remove": cmd_remove,
}
READS_STDIN = {"missing", "prepare", "launch", "kill"}


if __name__ == "__main__":
    sys.exit(main(sys.argv))
