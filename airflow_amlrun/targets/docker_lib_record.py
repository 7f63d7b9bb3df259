"""Which Docker daemons may have a container mounting a supervisor's folder of the cache, and which of them did
not answer lately: the two files a cleanup of ``docker_lib`` reads before it removes a folder.

``<cache>/docker/lib-daemons`` holds one daemon a line, as a process that bind-mounts a folder through it
recorded it: its URL, then for a daemon reached with TLS the files to reach it with, as JSON (paths on this
machine; the record holds no secret), e.g. ``tcp://localhost:2376 {"ca_cert": "/certs/ca.pem",
"client_cert": ["/certs/cert.pem", "/certs/key.pem"], "verify": true}``. Its first line says when the record began
(``# since <ns since the epoch>``, the time of this machine's file system): the folders made before may be
mounted through daemons nobody recorded. A line is removed by hand once its daemon is gone for good.

``<cache>/docker/lib-unanswered.json`` holds, by daemon line, how many times in a row it did not answer, since when
and when last: it is not asked again before ``RETRY_AFTER_SECONDS`` after the last time, doubled for each failure
after the first (up to ``RETRY_AFTER_MAX_SECONDS``); meanwhile every folder is kept. Only cleanups write it, each
whole at once (a temporary file renamed over it); two cleanups writing together leave the last one's word, which at
worst asks a daemon once more.

Both files are made readable by every user (a cache another user made first still serves this one) and are never
opened through a link. A user who may not write the record leaves its daemon unrecorded, and a cleanup of its own
removes nothing; it is said once, in the task log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun.hooks.docker_daemon import DockerDaemon, DockerDaemonUnreachableError

if TYPE_CHECKING:
    from docker import TLSConfig

log = logging.getLogger(__name__)

DAEMONS = "lib-daemons"
UNANSWERED = "lib-unanswered.json"
# The cache's own files: every user may read them, only the one who made them write them.
SHARED_MODE = 0o644
SINCE = re.compile(r"# since (\d+)\b")
# How long a daemon that did not answer is left unasked, doubled for each failure after the first.
RETRY_AFTER_SECONDS = 600
RETRY_AFTER_MAX_SECONDS = 24 * 3600
# After so many failures in a row, the task log warns (before, it informs: a daemon restarting is no news).
WARN_AFTER_FAILURES = 3

# What this process said once already: (folder, what).
_said: set[tuple[Path, str]] = set()


@dataclass(frozen=True)
class Record:
    """The record of daemons: when it began (ns since the epoch), and one line a daemon."""

    since_ns: int
    lines: list[str]


def recorded(root: Path) -> Record | None:
    """The record of daemons of the cache's folder ``root``; None when there is none yet.

    :raises PermissionError: this user may not read it.
    """
    try:
        fd = os.open(root / DAEMONS, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as file:
        text = file.read()
        since = SINCE.search(text)
        # A record without its first line (made by an earlier version): it began no earlier than it last changed.
        since_ns = int(since.group(1)) if since else os.fstat(file.fileno()).st_mtime_ns
    lines = list(dict.fromkeys(line for line in text.splitlines() if line and not line.startswith("#")))
    return Record(since_ns=since_ns, lines=lines)


def begin_record(root: Path) -> Record:
    """The record of daemons, begun now if there is none.

    :raises PermissionError: this user may not read it, or not make it.
    """
    record = recorded(root)
    if record is not None:
        return record
    try:
        fd = os.open(
            root / DAEMONS, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, SHARED_MODE
        )
    except FileExistsError:  # another process began it meanwhile
        return begin_record(root)
    os.fchmod(fd, SHARED_MODE)
    with os.fdopen(fd, "a") as file:
        # The file system's time, which a folder made from now on has (or a later one).
        since_ns = os.fstat(fd).st_mtime_ns
        file.write(
            f"# since {since_ns} ({_utc(since_ns / 10**9)}): the Docker daemons whose containers may bind-mount the "
            "folders here, one a line. Remove the line of a daemon that is gone for good.\n"
        )
    return Record(since_ns=since_ns, lines=[])


def record_daemon(root: Path, daemon: DockerDaemon | None) -> None:
    """Begin the record if there is none, and add the daemon to it unless it is there: a daemon that will
    bind-mount a folder here. A user who may not write it leaves the daemon unrecorded, saying so once."""
    path = root / DAEMONS
    if daemon is None:
        with contextlib.suppress(PermissionError):  # then a cleanup of this user's says so
            begin_record(root)
        return
    try:
        line = daemon_line(daemon)
        if line in begin_record(root).lines:
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        with os.fdopen(fd, "a") as file:
            file.write(line + "\n")  # one short write in append mode: concurrent ones do not mix
    except PermissionError:
        warn_once(
            root,
            "record",
            "The Docker daemon %s is not recorded in %s, which this user (uid %d) may not write%s: a cleanup of the "
            "supervisor's folders there by another user does not ask it which folders its containers mount. Give "
            "the folder to the user that runs the tasks (sudo chown -R %d %s).",
            daemon.base_url,
            path,
            os.geteuid(),
            owned_by(path),
            os.geteuid(),
            root,
        )


def daemon_line(daemon: DockerDaemon) -> str:
    """The daemon as the record holds it: its URL, and how to reach it with TLS if it is."""
    tls = daemon.tls
    if tls is False:
        return daemon.base_url
    settings: dict[str, Any] = {}  # TLS with the system's certificate authorities
    if tls is not True:
        settings = {
            "ca_cert": tls.ca_cert,
            "client_cert": list(tls.cert) if tls.cert else None,
            "verify": tls.verify,
        }
    return f"{daemon.base_url} {json.dumps(settings, sort_keys=True)}"


def daemon_of_line(line: str) -> DockerDaemon:
    """The daemon a line of the record names, to ask it.

    :raises ValueError: the line is not one this module wrote (the daemon cannot be asked).
    """
    url, _, tls_text = line.partition(" ")
    if not tls_text:
        return DockerDaemon(base_url=url, source=f"recorded in {DAEMONS}")
    settings = json.loads(tls_text)
    if not isinstance(settings, dict):
        raise ValueError(f"{tls_text!r} is not the JSON object of a daemon's TLS files")
    tls: TLSConfig | bool = True
    if settings:
        from docker import TLSConfig

        cert = settings.get("client_cert")
        tls = TLSConfig(
            client_cert=(str(cert[0]), str(cert[1])) if cert else None,
            ca_cert=settings.get("ca_cert"),
            verify=settings.get("verify"),
        )
    return DockerDaemon(base_url=url, tls=tls, source=f"recorded in {DAEMONS}")


class Unanswered:
    """The daemons that did not answer lately, by the key a cleanup asks them under (their line in the record, or
    the URL of the run's own daemon): ``{"failures": n, "first": t, "last": t}``, times in seconds."""

    def __init__(self, failures: dict[str, dict[str, float]]) -> None:
        self.failures = failures

    @classmethod
    def read(cls, root: Path) -> Unanswered:
        try:
            fd = os.open(root / UNANSWERED, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return cls({})
        with os.fdopen(fd) as file:
            try:
                data = json.load(file)
            except ValueError:  # made unreadable by hand: every daemon is asked again
                return cls({})
        return cls(
            {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}
            if isinstance(data, dict)
            else {}
        )

    def retry_at(self, key: str) -> float:
        """When the daemon may be asked again (0: now)."""
        failure = self.failures.get(key)
        if failure is None:
            return 0
        doublings = min(max(0, int(failure.get("failures", 1)) - 1), 20)
        return float(failure.get("last", 0)) + min(
            RETRY_AFTER_SECONDS * 2.0**doublings, RETRY_AFTER_MAX_SECONDS
        )

    def waiting(self, keys: Iterable[str]) -> bool:
        """Whether one of these daemons did not answer lately and is not to be asked yet."""
        now = time.time()
        for key in keys:
            if self.retry_at(key) > now:
                log.debug(
                    "The supervisor's folders of other versions are kept: the Docker daemon %s did not answer "
                    "lately, and is asked again after %s",
                    key.partition(" ")[0],
                    _utc(self.retry_at(key)),
                )
                return True
        return False

    def update(self, root: Path, *, answered: Iterable[str], failed: Mapping[str, BaseException]) -> None:
        """Forget the daemons that answered, count a failure of those that did not (saying so), and write the file
        if anything changed."""
        now = time.time()
        changed = False
        for key in answered:
            changed |= self.failures.pop(key, None) is not None
        for key, err in failed.items():
            failure = self.failures.setdefault(key, {"failures": 0, "first": now})
            failure["failures"] = int(failure.get("failures", 0)) + 1
            failure["last"] = now
            changed = True
            self._say(root, key, err, failure)
        if changed:
            self._write(root)

    def _say(self, root: Path, key: str, err: BaseException, failure: dict[str, float]) -> None:
        url = key.partition(" ")[0]
        if isinstance(err, DockerDaemonUnreachableError) and err.__context__ is not None:
            err = err.__context__  # what went wrong; its advice (how to start a daemon) is not the point here
        detail = f" ({str(err).splitlines()[0]})" if str(err) else ""
        count = int(failure["failures"])
        again = _utc(self.retry_at(key))
        if count < WARN_AFTER_FAILURES:
            log.info(
                "The supervisor's folders of other versions in %s are kept: the Docker daemon at %s, whose containers "
                "may use one, does not answer%s. It is asked again after %s.",
                root,
                url,
                detail,
                again,
            )
            return
        log.warning(
            "The supervisor's folders of other versions in %s have been kept since %s: the Docker daemon at %s, "
            "recorded in %s as one whose containers may use one, did not answer %d times in a row%s. If that daemon "
            "is gone for good, remove its line from %s; if it runs, check that this user can reach it%s. It is "
            "asked again after %s.",
            root,
            _utc(float(failure.get("first", failure["last"]))),
            url,
            root / DAEMONS,
            count,
            detail,
            root / DAEMONS,
            " and read the TLS files its line names" if " " in key else "",
            again,
        )

    def _write(self, root: Path) -> None:
        tmp = root / f".{UNANSWERED}-{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, SHARED_MODE)
            os.fchmod(fd, SHARED_MODE)
            with os.fdopen(fd, "w") as file:
                json.dump(self.failures, file, indent=1, sort_keys=True)
            os.replace(tmp, root / UNANSWERED)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("Could not write %s: %s", root / UNANSWERED, err)


def warn_once(root: Path, what: str, message: str, *args: object) -> None:
    """Log a warning about the cache's folder ``root`` once in this process."""
    if (root, what) in _said:
        return
    _said.add((root, what))
    log.warning(message, *args)


def owned_by(path: Path) -> str:
    """Who owns a file, for a message: ``" (it belongs to uid N)"``, or nothing if it is not there."""
    try:
        return f" (it belongs to uid {os.lstat(path).st_uid})"
    except OSError:
        return ""


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
