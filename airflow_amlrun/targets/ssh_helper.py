"""The worker's side of the SSH target's helper: the host's base dir, the helper's commands, the run's files.

One `probe` round trip looks at an interpreter on the host, learns the base dir, checks that it is the
login user's own and writable by nobody else, and whether `<base>/lib/` holds this version's helper
(`ssh_remote.py`) and supervisor intact (by SHA-256); they are written again (atomically) when they differ.
Everything that runs under one SSH login can change what later runs of that login execute (files of the
base dir, the login's own Python site folders): DAGs sharing an SSH login trust each other, as users
sharing a Unix account do. Code blobs are not hashed again on the host for that reason.

A run's control files are read over SFTP by byte offset, and only once `lstat` says they are regular files
(a FIFO put there would hang the host's SFTP server); on a host without SFTP the helper's `read` serves them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import shlex
import stat
import tempfile
import time
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from airflow_amlrun.hooks.ssh import RunState, SSHTargetConfigurationError, SSHTargetError
from airflow_amlrun.snapshot import hash_bytes
from airflow_amlrun.targets import supervisor
from airflow_amlrun.targets.common import CONTROL_DIR, PYLIB, write_run_context_package
from airflow_amlrun.targets.files import file_kind
from airflow_amlrun.targets.ssh_remote import REFUSED

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from airflow_amlrun.hooks.ssh import SSHHost
    from airflow_amlrun.targets.handles import SSHHandle

log = logging.getLogger(__name__)

HELPER_SOURCE = Path(__file__).with_name("ssh_remote.py")
SUPERVISOR_SOURCE = Path(supervisor.__file__)
# The folders of the base dir that other users must not be able to write (the base dir itself first).
PRIVATE_DIRS = ("", "lib", "blobs", "envs", "runs")
# Run on the host by the probe: the interpreter's version and platform, then (JSON) the login's uid, owner
# and mode of the base dir's folders, and the SHA-256 of the files of lib/ named in the arguments.
PROBE_SCRIPT = """
import hashlib, json, os, stat, sys, sysconfig
print("%d.%d" % sys.version_info[:2])
print(sys.implementation.name + "-" + sysconfig.get_platform())
base, names = sys.argv[1], sys.argv[2:]
found = {"uid": os.getuid(), "dirs": {}, "lib": {}}
for name in PRIVATE_DIRS:
    try:
        st = os.stat(os.path.join(base, name) if name else base)
    except OSError:
        continue
    found["dirs"][name] = [st.st_uid, st.st_mode]
for name in names:
    path, digest = os.path.join(base, "lib", name), None
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            with open(path, "rb") as stream:
                digest = hashlib.sha256(stream.read()).hexdigest()
    except OSError:
        pass
    found["lib"][name] = digest
print(json.dumps(found))
""".replace("PRIVATE_DIRS", repr(PRIVATE_DIRS))


def lib_files() -> dict[str, bytes]:
    """The files runs need in <base>/lib on a host, each named by its content hash (a changed one is a new file):
    the helper, and the supervisor every run starts under."""
    files = {}
    for prefix, source in (("amlrun-remote", HELPER_SOURCE), ("amlrun-supervisor", SUPERVISOR_SOURCE)):
        data = source.read_bytes()
        files[f"{prefix}-{hashlib.sha256(data).hexdigest()[:16]}.py"] = data
    return files


class RemoteHelper:
    """The amlrun helper on one SSH host, under one base dir, as the worker drives it.

    :param ssh: the host's connection.
    :param base_dir: the base dir on the host, `~` standing for the login user's home.
    :param python: the interpreter the host is first looked at with (the connection's amlrun_python).
    """

    def __init__(self, ssh: SSHHost, *, base_dir: str, python: str) -> None:
        self.ssh = ssh
        self.host = ssh.host
        self.base_dir = base_dir
        self.python = python
        self._remote_base: str | None = None
        self._probed: dict[str, tuple[str, str]] = {}
        # Base dirs whose lib/ holds this version's helper and supervisor.
        self._lib_present: set[str] = set()
        # The interpreter the helper runs with: the first one found working on the host.
        self.helper_python: str | None = None
        # Control files of runs already named in the task log as not read: (run id, file name).
        self._not_read: set[tuple[str, str]] = set()

    def _base_expression(self) -> str:
        """The base dir as a shell word, `~` standing for the remote user's home."""
        base = self.base_dir
        if base == "~":
            return '"$HOME"'
        if base.startswith("~/"):
            return '"$HOME"/' + shlex.quote(base[2:])
        return shlex.quote(base)

    def probe(self, python: str) -> tuple[str, str]:
        """(Python version, platform) of an interpreter on the host; also learns the base dir, checks that it
        is private to the login user, and whether lib/ holds this version's helper and supervisor intact, in
        the same round trip."""
        if python in self._probed:
            return self._probed[python]
        ssh = self.ssh
        base = self._base_expression()
        names = " ".join(shlex.quote(name) for name in self.lib)
        command = (
            f"printf '%s\\n' {base}; {shlex.quote(python)} -I -c {shlex.quote(PROBE_SCRIPT)} {base} {names}"
        )
        rc, out, err = ssh.retrying(
            "looking at the host", lambda: ssh.exec(command, None, ssh.io_timeout), run="not started"
        )
        lines = out.decode("utf-8", "replace").splitlines()
        if len(lines) < 1:
            raise SSHTargetError(
                f"Host {self.host} answered {out!r} {err!r} to a shell command; the login shell of "
                f"{ssh.where} must be a POSIX shell (sh, bash, zsh).",
                host=self.host,
            )
        remote_base = lines[0]
        if rc != 0 or len(lines) < 4:
            raise SSHTargetConfigurationError(
                f"No usable Python interpreter {python!r} on host {self.host} (SSH connection {ssh.name!r}): "
                f"{err.decode('utf-8', 'replace').strip() or f'exit status {rc}'}. Install Python 3 there "
                "(e.g. apt-get install python3), or name the interpreter: the environment's "
                "python.interpreter_path, or the connection's extra amlrun_python.",
                host=self.host,
            )
        version, platform = lines[1], lines[2]
        if tuple(int(p) for p in version.split(".")) < (3, 7):
            raise SSHTargetConfigurationError(
                f"Python {version} at {python!r} on host {self.host} is too old; runs need Python 3.7 or newer "
                "there. Set the environment's python.interpreter_path or the connection's extra amlrun_python "
                "to a newer interpreter.",
                host=self.host,
            )
        found = json.loads(lines[3])
        self._check_private(remote_base, found)
        self._remote_base = remote_base
        self._note_lib(remote_base, found["lib"])
        self._probed[python] = (version, platform)
        self.helper_python = self.helper_python or python
        return version, platform

    def _check_private(self, base: str, found: dict[str, Any]) -> None:
        """Refuse a base dir that another user of the host owns or may write: they could change the helper,
        the code and the environments runs execute there, and read the secrets runs receive."""
        uid = int(found["uid"])
        login = self.ssh.login
        for name, (owner, mode) in found["dirs"].items():
            folder = f"{base}/{name}" if name else base
            if owner != uid:
                problem = f"belongs to uid {owner}, not to {login or 'the login user'} (uid {uid})"
            elif mode & 0o022:
                problem = (
                    f"is writable by {'other users' if mode & 0o002 else 'its group'} (mode {mode & 0o777:o})"
                )
            else:
                continue
            user = login or "the login user"
            raise SSHTargetConfigurationError(
                f"The amlrun folder {folder} on host {self.host} (SSH connection {self.ssh.name!r}) {problem}: "
                "other users of the host could change the helper, code and environments runs execute there, and "
                f"read the secrets they receive. Make it private to {user} (as that user: `chmod -R go-w {base}`, "
                f"and as root `chown -R {user} {base}` if needed), or set the connection's extra "
                f"amlrun_base_dir to a folder only {user} can write.",
                host=self.host,
            )

    def _note_lib(self, base: str, digests: dict[str, str | None]) -> None:
        """Remember whether base/lib holds this version's files intact; warn of one changed since written."""
        stale = False
        for name, data in self.lib.items():
            digest = digests.get(name)
            if digest == hashlib.sha256(data).hexdigest():
                continue
            stale = True
            if digest is not None:
                log.warning(
                    "Host %s: %s/lib/%s was changed since it was written (its content no longer matches its "
                    "SHA-256); writing it again. Something running as %s changed it: a run of a DAG sharing "
                    "this SSH login?",
                    self.host,
                    base,
                    name,
                    self.ssh.login or "the login user",
                )
        if stale:
            self._lib_present.discard(base)
        else:
            self._lib_present.add(base)

    def base(self) -> str:
        """The base dir on the host, as its shell expands it (learnt by the first probe)."""
        if self._remote_base is None:
            self.probe(self.python)
        assert self._remote_base is not None
        return self._remote_base

    @cached_property
    def lib(self) -> dict[str, bytes]:
        """The files runs need in <base>/lib on the host (see :func:`lib_files`)."""
        return lib_files()

    def lib_path(self, which: str, base: str | None = None) -> str:
        """Path on the host of this version's `helper` or `supervisor`, under base (default: the target's)."""
        helper, supervisor_file = self.lib
        return f"{base or self.base()}/lib/{helper if which == 'helper' else supervisor_file}"

    def _ensure_lib(self, base: str) -> None:
        """Write the helper and the supervisor to base/lib on the host, unless the probe found them intact
        there; each is written to a temporary name, then renamed over the final one."""
        if base in self._lib_present:
            return
        folder = f"{base}/lib"
        for name, data in self.lib.items():
            final = shlex.quote(f"{folder}/{name}")
            tmp = shlex.quote(f"{folder}/{name}.tmp-{time.monotonic_ns()}")
            # One round trip each, and no SFTP needed.
            command = f"umask 077 && mkdir -p {shlex.quote(folder)} && cat > {tmp} && mv -f {tmp} {final}"
            rc, _out, err = self.ssh.exec(command, data, self.ssh.io_timeout)
            if rc != 0:
                raise SSHTargetError(
                    f"Cannot write to {folder} on host {self.host} as {self.ssh.login or 'the connection user'}: "
                    f"{err.decode('utf-8', 'replace').strip()}. Make the folder writable by that user, or set "
                    "the connection's extra amlrun_base_dir to a folder it can write (default ~/.amlrun).",
                    host=self.host,
                )
        self._lib_present.add(base)

    @contextlib.contextmanager
    def on_own_connection(self) -> Iterator[RemoteHelper]:
        """This helper over a connection of its own, closed after: for a call that must not wait for (or
        break) one in flight on the shared connection."""
        helper = copy.copy(self)
        helper.ssh = self.ssh.twin()
        try:
            yield helper
        finally:
            helper.ssh.reset()

    @cached_property
    def run_context_blobs(self) -> dict[str, tuple[str, bytes]]:
        """The importable run_context package every run gets, as run-dir path -> (digest, bytes); sent and
        cached on the host like code blobs."""
        with tempfile.TemporaryDirectory() as tmp:
            root = write_run_context_package(tmp)
            blobs = {}
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                data = path.read_bytes()
                blobs[f"{CONTROL_DIR}/{PYLIB}/{path.relative_to(root).as_posix()}"] = (hash_bytes(data), data)
            return blobs

    def put_blob(self, digest: str, data: bytes) -> None:
        """Write a code blob to the host's cache (over SFTP, else through the helper), atomically."""
        sftp = self.ssh.sftp()
        if sftp is None:
            header = json.dumps({"size": len(data)}).encode() + b"\n"
            self.run("put", digest, None, handle=None, timeout=self.ssh.io_timeout, raw=header + data)
            return
        final = f"{self.base()}/blobs/{digest}"
        tmp = f"{final}.tmp-{time.monotonic_ns()}"
        try:
            sftp.putfo(io.BytesIO(data), tmp, file_size=len(data))
            sftp.posix_rename(tmp, final)
        except OSError as err:
            if not self.ssh.connected():
                raise
            with contextlib.suppress(OSError):
                sftp.remove(tmp)
            raise SSHTargetError(
                f"Could not write code blob {digest[:12]} ({len(data)} bytes) to {final} on host {self.host}: "
                f"{err}. Check the free space and permissions there, or set the connection's extra "
                "amlrun_base_dir to a writable folder on a larger disk.",
                host=self.host,
            ) from err

    def call(
        self,
        action: str,
        command: str,
        run_id: str | None,
        request: dict[str, Any] | None = None,
        *,
        handle: SSHHandle | None = None,
        timeout: float | None = None,
        run: RunState = "unknown",
    ) -> Any:
        """Run one helper command on the host (reconnecting if the connection drops) and parse its answer."""
        limit = timeout or self.ssh.io_timeout
        out = self.ssh.retrying(
            action, lambda: self.run(command, run_id, request, handle=handle, timeout=limit), run=run
        )
        return json.loads(out) if out else None

    def run(
        self,
        command: str,
        run_id: str | None,
        request: dict[str, Any] | None,
        *,
        handle: SSHHandle | None,
        timeout: float,
        sink: IO[bytes] | None = None,
        raw: bytes | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> bytes:
        """Run one helper command; `raw` is sent on its stdin as it is, else the JSON of `request`. Its
        warnings go to the task log, or to `on_warning`."""
        # This version's helper, also for a run an older version started: it reads older run directories.
        base = self.base()
        if handle is not None and handle.base_dir != base:
            # A run row is data: the helper runs only in the base dir this connection names.
            raise SSHTargetConfigurationError(
                f"Run {handle.run_id} was recorded under {handle.base_dir} on host {self.host}, but connection "
                f"{self.ssh.name!r} uses {base} (its extra amlrun_base_dir): it is not followed there. Set "
                "amlrun_base_dir back to follow it.",
                host=self.host,
            )
        python = (handle.helper_python if handle else None) or self.helper_python or self.python
        self._ensure_lib(base)
        # Isolated (-I: no PYTHON* variables, no user site folder), without site (-S): stdlib only, fast.
        words = [
            python,
            "-I",
            "-S",
            self.lib_path("helper", base),
            command,
            base,
            *([run_id] if run_id else []),
        ]
        line = " ".join(shlex.quote(w) for w in words)
        stdin = raw if raw is not None else json.dumps(request).encode() if request is not None else None
        rc, out, err = self.ssh.exec(line, stdin, timeout, sink=sink)
        message = err.decode("utf-8", "replace").strip()
        if rc == REFUSED:
            raise SSHTargetError(f"Host {self.host}: {message}", host=self.host)
        if rc != 0:
            raise SSHTargetError(
                f"The amlrun helper failed on host {self.host} ({command}, exit status {rc}):\n{message[-3000:]}",
                host=self.host,
            )
        for warning in filter(None, message.splitlines()):
            if on_warning is not None:
                on_warning(warning)
            else:
                log.warning("Host %s: %s", self.host, warning)
        return out

    def read_control(self, handle: SSHHandle, name: str, offset: int, size: int) -> bytes:
        """Bytes of a file of the run's control folder from an offset (nothing while it does not exist).

        Only a regular file is opened: the script may have put a FIFO there (an SFTP server opening it would
        hang) or a link. Anything else is named once in the task log and read as empty.
        """
        sftp = self.ssh.sftp()
        if sftp is None:
            request = {"name": name, "offset": offset, "size": size}
            return self.run(
                "read",
                handle.run_id,
                request,
                handle=handle,
                timeout=self.ssh.io_timeout,
                on_warning=lambda warning: self._not_read_once(handle, name, warning),
            )
        path = f"{handle.run_dir}/{CONTROL_DIR}/{name}"
        try:
            mode = sftp.lstat(path).st_mode or 0
        except FileNotFoundError:
            return b""
        if not stat.S_ISREG(mode):
            self._not_read_once(handle, name, f"{path} is {file_kind(mode)}, not a regular file")
            return b""
        try:
            with sftp.open(path, "rb") as stream:
                stream.seek(offset)
                data: bytes = stream.read(size)
                return data
        except FileNotFoundError:
            return b""

    def _not_read_once(self, handle: SSHHandle, name: str, why: str) -> None:
        if (handle.run_id, name) not in self._not_read:
            self._not_read.add((handle.run_id, name))
            log.warning("Host %s: the run's file %s: it is not read, and counts as empty.", self.host, why)
