"""How a run's files cross between the worker and its container through the Docker API.

- ``daemon_sees``: whether the daemon can bind-mount the worker's runs folder (the ``bind`` transfer), found
  out once per process and daemon with a probe file and a container that is created, never started.
- ``run_dir_archive``: the run folder and the supervisor's folder as one tar, for ``put_archive`` (the
  ``archive`` transfer).
- ``send_and_close``: the supervisor's request, written to the container's attached stdin, which is closed
  after it (the request holds the secret variables: they never enter the container's configuration).
- ``LogFollower``: the container's log stream (``docker logs --follow``) copied into the worker's spool.
- ``EventsFollower``: the events file of a running container copied by offset into the worker's spool (only
  what is new crosses: the container's Python prints it, run with ``exec``), and what is left of it once the
  container ended, so that n bytes of metrics cost O(n).
- ``fetch_file``, ``fetch_folder``: a control file, ``outputs/`` or ``logs/`` of a container, running or not.

What comes back is unpacked with the rules of ``docker_files``: nothing in it reaches beside the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.targets.common import CONTROL_DIR, EVENTS, STD_LOG
from airflow_amlrun.targets.docker_files import copy_member_from, extract_folder, regular_member

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_amlrun.hooks.docker_daemon import DockerDaemon
    from airflow_amlrun.targets.handles import DockerHandle

log = logging.getLogger(__name__)

# Where a run lives in its container.
RUN_DIR = "/amlrun/run"
LIB_DIR = "/amlrun/lib"
PYLIB_DIR = f"{LIB_DIR}/pylib"
SUPERVISOR = f"{LIB_DIR}/supervisor.py"
EVENTS_PATH = f"{RUN_DIR}/{CONTROL_DIR}/{EVENTS}"
LABEL_MANAGED_BY = "amlrun.managed-by"
# In the worker's folder of a run: the container's run folder, and the spools of its log and events beside it.
WORK = "run"
LOG_SPOOL = STD_LOG
EVENTS_SPOOL = EVENTS
# How often a running container's events file is asked for news when the last ask found none.
EVENTS_INTERVAL_SECONDS = 1.0
# Most bytes one exec brings back: a follower that fell behind catches up in pieces of this size.
EXEC_READ_CAP = 4 << 20

# Run with the container's own Python (exec): prints "R" and up to LIMIT bytes of the regular file PATH
# from OFFSET, "N" when there is no such file, "X" when it is no regular file.
_READ_FROM = """\
import os, stat, sys
path, offset, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = sys.stdout.buffer
try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
except FileNotFoundError:
    out.write(b"N"); sys.exit(0)
except OSError:
    out.write(b"X"); sys.exit(0)
if not stat.S_ISREG(os.fstat(fd).st_mode):
    out.write(b"X"); sys.exit(0)
os.lseek(fd, offset, 0)
out.write(b"R")
while limit > 0:
    data = os.read(fd, min(limit, 1 << 16))
    if not data:
        break
    out.write(data)
    limit -= len(data)
"""


def daemon_sees(
    client: APIClient, base_url: str, folder: Path, probe_images: tuple[str | None, ...]
) -> bool | None:
    """Whether containers of this daemon see ``folder`` of this worker when they bind-mount it (cached per
    process, daemon and folder); None when the daemon has no image to probe with yet."""
    key = (os.getpid(), base_url, str(folder))
    with _PROBE_LOCK:
        if key in _PROBED:
            return _PROBED[key]
        image = next((i for i in probe_images if i and _has_image(client, i)), None)
        if image is None:
            found = client.images(quiet=True)
            image = str(found[0]) if found else None
        if image is None:
            return None
        _PROBED[key] = _probe(client, folder, image)
        return _PROBED[key]


def _has_image(client: APIClient, reference: str) -> bool:
    from docker.errors import NotFound

    try:
        client.inspect_image(reference)
    except NotFound:
        return False
    return True


_PROBED: dict[tuple[int, str, str], bool] = {}
_PROBE_LOCK = threading.Lock()


def _probe(client: APIClient, folder: Path, image: str) -> bool:
    """A file holding a random token is written under folder, and a container bind-mounting its folder is
    created (never started): the daemon sees the folder if that container holds the same token. (A daemon
    that cannot see the path at all refuses the bind mount; one that has another folder there shows
    another file, or none.)"""
    from docker.errors import APIError, NotFound
    from docker.types import Mount

    folder.mkdir(parents=True, exist_ok=True)
    probe = Path(tempfile.mkdtemp(prefix=".probe-", dir=folder))
    try:
        token = uuid.uuid4().hex.encode()
        (probe / "token").write_bytes(token)
        probe.chmod(0o755)
        try:
            container = client.create_container(
                image,
                command=["true"],
                labels={LABEL_MANAGED_BY: "airflow-amlrun"},
                host_config=client.create_host_config(
                    mounts=[Mount("/amlrun/probe", str(probe), type="bind", read_only=True)]
                ),
            )
        except APIError as err:
            if "bind source path does not exist" in str(err):
                return False
            raise
        try:
            return fetch_file(client, container["Id"], "/amlrun/probe/token") == token
        finally:
            with contextlib.suppress(NotFound):
                client.remove_container(container["Id"], force=True)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@contextlib.contextmanager
def run_dir_archive(work: Path, lib: Path, *, owner: tuple[int, int]) -> Iterator[IO[bytes]]:
    """A tar of the run folder (as RUN_DIR, owned by the container's user, ``owner``) and of the supervisor's
    folder (as LIB_DIR, owned by root, read-only to the run)."""
    run_prefix = RUN_DIR.lstrip("/")

    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        in_run = info.name == run_prefix or info.name.startswith(run_prefix + "/")
        info.uid, info.gid = owner if in_run else (0, 0)
        info.uname = info.gname = ""
        return info

    spool: IO[bytes]
    with tempfile.TemporaryFile() as spool:
        with tarfile.open(fileobj=spool, mode="w") as tar:
            tar.add(work, arcname=run_prefix, filter=owned)
            tar.add(lib, arcname=LIB_DIR.lstrip("/"), filter=owned)
        spool.seek(0)
        yield spool


def numeric_owner(user: str | None) -> tuple[int, int] | None:
    """(uid, gid) of a ``uid:gid`` user; None for one that names a user or group, or gives no gid."""
    if not user:
        return None
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or not gid.isdigit():
        return None
    return int(uid), int(gid)


# Largest /etc/passwd or /etc/group read from an image.
ACCOUNTS_CAP = 1 << 20


def user_ids(client: APIClient, image: str, user: str, *, where: str) -> tuple[int, int]:
    """The uid and gid the processes of a container of ``image`` get with the container user ``user``
    (``uid:gid``, or ``name``, ``uid``, ``name:group`` ...), as Docker finds them in the image's /etc/passwd
    and /etc/group (read from a container that is created, never started, and removed).

    :param where: where ``user`` comes from, for the error when the image has no such user or group.
    """
    found = numeric_owner(user)
    if found is not None:
        return found
    files = _image_files(client, image, ["/etc/passwd", "/etc/group"])
    return owner_in(files["/etc/passwd"], files["/etc/group"], user, image=image, where=where)


def owner_in(
    passwd: bytes | None, group: bytes | None, user: str, *, image: str, where: str
) -> tuple[int, int]:
    """The uid and gid of the container user ``user`` by an image's /etc/passwd and /etc/group (their text),
    as Docker resolves it: a name must be there; a number need not (a uid alone then has gid 0)."""
    name, _, group_name = (part.strip() for part in user.partition(":"))
    uid, gid = _lookup(passwd, name, user_field=True)
    if uid is None:
        raise ConfigurationError(
            f"The container user {user!r} ({where}) is not a user of the image {image!r}: its /etc/passwd has "
            f"no {name!r}. Give the user as uid:gid (e.g. '1000:1000'), or one that the image defines."
        )
    if group_name:
        gid = _lookup(group, group_name, user_field=False)[0]
        if gid is None:
            raise ConfigurationError(
                f"The container user {user!r} ({where}) names the group {group_name!r}, which the image "
                f"{image!r} does not define in /etc/group. Give the group as a number, or one that the image "
                "defines."
            )
    return uid, gid if gid is not None else 0


def _lookup(table: bytes | None, key: str, *, user_field: bool) -> tuple[int | None, int | None]:
    """(id, primary gid) of a user (``user_field``) or (gid, None) of a group, by name or number, in the text of
    /etc/passwd or /etc/group; a number that no line names is taken as it is, as Docker takes it."""
    for line in (table or b"").decode(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) < 4 or key not in (fields[0], fields[2]):
            continue
        try:
            return int(fields[2]), (int(fields[3]) if user_field else None)
        except ValueError:
            continue
    return (int(key), None) if key.isdigit() else (None, None)


def _image_files(client: APIClient, image: str, paths: list[str]) -> dict[str, bytes | None]:
    """Small regular files of an image, read from a container that is created, never started."""
    from docker.errors import NotFound

    container = client.create_container(image, command=["true"], labels={LABEL_MANAGED_BY: "airflow-amlrun"})
    try:
        return {path: fetch_file(client, container["Id"], path, ACCOUNTS_CAP) for path in paths}
    finally:
        with contextlib.suppress(NotFound):
            client.remove_container(container["Id"], force=True)


def send_and_close(stream: Any, data: bytes) -> None:
    """Write data to a container's attached stdin (``attach_socket``) and close it: the reader there sees
    its end."""
    raw = getattr(stream, "_sock", stream)
    raw.sendall(data)
    if hasattr(raw, "shutdown_write"):  # a paramiko channel (ssh:// daemons)
        raw.shutdown_write()
    else:
        raw.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        raw.close()


def path_stat(client: APIClient, container_id: str, path: str) -> dict[str, Any] | None:
    """What the daemon says of a path in a container (name, size, mode, linkTarget), without fetching it;
    None when there is nothing there."""
    from docker.utils import decode_json_header

    head = client.head(client._url("/containers/{0}/archive", container_id), params={"path": path})
    if head.status_code == 404:
        return None
    client._raise_for_status(head)
    header = head.headers.get("X-Docker-Container-Path-Stat")
    return dict(decode_json_header(header)) if header else {}


def fetch_file(client: APIClient, container_id: str, path: str, limit: int | None = None) -> bytes | None:
    """A regular file of a container (running or not); None when it is not there, no regular file, or
    larger than limit (its size is asked first: a file the container made huge is not fetched)."""
    from docker.errors import NotFound

    if limit is not None:
        stat = path_stat(client, container_id, path)
        if stat is None or int(stat.get("size", limit + 1)) > limit:
            return None
    try:
        stream, _ = client.get_archive(container_id, path)
    except NotFound:
        return None
    return regular_member(stream)


def fetch_folder(client: APIClient, container_id: str, path: str, dest: Path) -> list[str]:
    """The container's folder at path, as the new folder dest; returns what was left out (see
    ``docker_files.extract_folder``)."""
    from docker.errors import NotFound

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        stream, _ = client.get_archive(container_id, path)
    except NotFound:
        dest.mkdir()
        return []
    return extract_folder(stream, dest)


class LogFollower:
    """Copies a container's log stream into the worker's spool file, from its start, until the container ends."""

    def __init__(self, daemon: DockerDaemon, api_version: str, handle: DockerHandle, spool: Path) -> None:
        self.path = spool
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._daemon = daemon
        self._api_version = api_version
        self._container_id = str(handle.container_id)
        self._stopped = threading.Event()
        self._client: APIClient | None = None
        self._stream: Any = None
        threading.Thread(target=self._follow, name=f"amlrun-log-{handle.container}", daemon=True).start()

    def stop(self, timeout: float) -> bool:
        """Stop copying (the run goes on; another process follows it) and wait for the copy to end; False when
        it took longer than timeout."""
        self._stopped.set()
        stream = self._stream
        if stream is not None:
            stream.close()  # ends the blocking read of a stream that may stay quiet for hours
        client = self._client
        if client is not None:
            client.close()
        return self.done.wait(timeout)

    def _follow(self) -> None:
        try:
            # No timeout: a script may print nothing for hours. Its own client: streams hold a connection.
            client = self._daemon.connect(timeout=None, version=self._api_version)
            self._client = client
            if self._stopped.is_set():
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "wb") as out:
                    self._stream = client.logs(
                        self._container_id, stdout=True, stderr=True, stream=True, follow=True
                    )
                    if self._stopped.is_set():
                        return
                    for data in self._stream:
                        if self._stopped.is_set():
                            break
                        out.write(data)
                        out.flush()
            finally:
                client.close()
        except Exception as err:  # the waiter sees the stream end, and asks the daemon what happened
            self.error = err
            log.debug("Log stream of container %s ended: %s", self._container_id[:12], err)
        finally:
            self.done.set()


class EventsFollower:
    """Copies a container's events file into a spool file of the worker, by offset, until it ended.

    While the container runs, its own Python reads the file from the spool's length on (``exec``): only what
    is new crosses, at once while there is more, else once a second. Once the container ended, what the file
    holds past that offset is fetched once (``get_archive``, which sends the whole file: only when the run
    wrote events in its last moments). An events file that is not a regular file is not read; ``skipped``
    then says so.
    """

    def __init__(self, daemon: DockerDaemon, api_version: str, handle: DockerHandle, spool: Path) -> None:
        self.path = spool
        self.done = threading.Event()
        self.skipped: str | None = None
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._daemon = daemon
        self._api_version = api_version
        self._handle = handle
        threading.Thread(target=self._follow, name=f"amlrun-events-{handle.container}", daemon=True).start()

    def stop(self, timeout: float) -> bool:
        """Stop copying (the run goes on; another process follows it) and wait for the copy to end; False when
        it took longer than timeout."""
        self._stopped.set()
        self._wake.set()
        return self.done.wait(timeout)

    def finish(self, timeout: float) -> bool:
        """Ask for the end now (the container ended) and wait for it; False when it took longer than timeout."""
        self._wake.set()
        return self.done.wait(timeout)

    def _follow(self) -> None:
        try:
            client = self._daemon.connect(version=self._api_version)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "wb") as out:
                    offset = self._while_running(client, out)
                    if self.skipped is None and not self._stopped.is_set():
                        self._rest(client, out, offset)
            finally:
                client.close()
        except Exception as err:  # the run's outcome does not depend on its metrics
            log.warning("Reading the events of container %s failed: %s", self._handle.container, err)
        finally:
            self.done.set()

    def _while_running(self, client: APIClient, out: IO[bytes]) -> int:
        offset = 0
        while not self._stopped.is_set():
            data = self._read(client, offset)
            if data is None:
                return offset
            out.write(data)
            out.flush()
            offset += len(data)
            if len(data) < EXEC_READ_CAP:
                self._wake.wait(EVENTS_INTERVAL_SECONDS)
        return offset

    def _read(self, client: APIClient, offset: int) -> bytes | None:
        """What the file holds from offset on (up to EXEC_READ_CAP); None once the container stopped."""
        from docker.errors import APIError

        handle = self._handle
        try:
            exec_id = client.exec_create(
                handle.container_id,
                [handle.python, "-c", _READ_FROM, EVENTS_PATH, str(offset), str(EXEC_READ_CAP)],
                stdout=True,
                stderr=False,
                user=handle.user or "",
            )
            # Streamed and cut at the cap: the container's "python" may be anything its script made it.
            out = b""
            for data in client.exec_start(exec_id, stream=True):
                out += data
                if len(out) > EXEC_READ_CAP + 1:
                    self.skipped = f"reading {CONTROL_DIR}/{EVENTS} gave more than was asked for"
                    return None
        except APIError:
            return None  # the container is not running (any more)
        if out[:1] == b"X":
            self.skipped = f"{CONTROL_DIR}/{EVENTS} is not a regular file"
            return None
        return out[1:] if out[:1] == b"R" else b""

    def _rest(self, client: APIClient, out: IO[bytes], offset: int) -> None:
        from docker.errors import NotFound

        container_id = self._handle.container_id
        # Its size first: a file read to its end already is not sent again.
        stat = path_stat(client, container_id, EVENTS_PATH)
        if stat is None or int(stat.get("size", offset + 1)) <= offset:
            return
        try:
            stream, _ = client.get_archive(container_id, EVENTS_PATH)
        except NotFound:
            return
        if not copy_member_from(stream, offset, out):
            self.skipped = f"{CONTROL_DIR}/{EVENTS} is not a regular file"
