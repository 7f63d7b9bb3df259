"""Reading a file of a folder that someone else controls (a run's script, its container), without being led
elsewhere: no symbolic link is followed on the way, only a regular file is opened, and nothing blocks.

Every target reads its runs' control files this way (the local one through ``common.read_control``, the
Docker one for a bind-mounted run folder); ``docker_files`` takes whole folders out with the same rules.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO

# Opens a folder, never through a link.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeFileError(Exception):
    """A file of the run folder that the worker will not open: a link, a folder, a FIFO, a device..."""

    def __init__(self, relative: str, why: str) -> None:
        super().__init__(f"{relative} {why}")
        self.relative = relative
        self.why = why


def read_beneath(root: Path, relative: str, offset: int = 0, limit: int = 1 << 20) -> bytes | None:
    """Up to ``limit`` bytes from ``offset`` of the regular file root/relative; None when it does not exist.

    No component of ``relative`` may be a symbolic link, and the file must be a regular file; otherwise
    ``UnsafeFileError`` says what it is. ``root`` itself is the worker's (the mount point, which a container
    cannot replace).
    """
    fd = _open_beneath(root, relative)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as stream:
        stream.seek(offset)
        return stream.read(limit)


def _open_beneath(root: Path, relative: str) -> int | None:
    parts = PurePosixPath(relative).parts
    if not parts or any(part in ("..", "/") for part in parts):
        raise ValueError(f"{relative!r} is not a path inside the run folder")
    folder = os.open(root, DIR_FLAGS)
    try:
        for index, part in enumerate(parts[:-1]):
            try:
                inner = os.open(part, DIR_FLAGS, dir_fd=folder)
            except OSError as err:
                if err.errno == errno.ENOENT:
                    return None
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeFileError(
                        "/".join(parts[: index + 1]), "is a symbolic link or not a folder"
                    ) from None
                raise
            os.close(folder)
            folder = inner
        try:
            return _open_regular(parts[-1], folder, relative)
        except FileNotFoundError:
            return None
    finally:
        os.close(folder)


def _open_regular(name: str, folder: int, relative: str) -> int:
    """A read descriptor of the regular file ``name`` in ``folder``, opened without side effects otherwise."""
    if hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd"):
        # O_PATH opens nothing (a FIFO does not block, a device is not touched): look first, then open the
        # very inode looked at, through /proc, so nothing can be swapped in between.
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
        try:
            _require_regular(os.fstat(handle).st_mode, relative)
            return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(handle)
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=folder
        )
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeFileError(relative, "is a symbolic link") from None
        raise
    try:
        _require_regular(os.fstat(fd).st_mode, relative)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_regular(mode: int, relative: str) -> None:
    if not stat.S_ISREG(mode):
        raise UnsafeFileError(relative, f"is {file_kind(mode)}, not a regular file")


def file_kind(mode: int) -> str:
    """What a file of the given mode is, in words."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    return "a special file"


def require_tar_data_filter() -> None:
    """Refuse to unpack what a run sent back without tarfile's "data" filter (Python 3.11.4 and later),
    which keeps links, devices and paths from reaching outside the folder it is unpacked into."""
    import sys
    import tarfile

    if not hasattr(tarfile, "data_filter"):
        from airflow_amlrun.errors import ConfigurationError

        raise ConfigurationError(
            f"Collecting a run's outputs needs Python 3.11.4 or later on the worker (for tarfile's data "
            f"filter, which keeps what a run sends back inside its folder); this worker runs "
            f"{sys.version.split()[0]}. Upgrade the worker's Python."
        )


def extract_tar_stream(stream: IO[bytes], dest: Path, skipped: Callable[[str, str], None]) -> None:
    """Unpack a tar stream into dest with tarfile's "data" filter. A member that cannot be written there
    (refused by the filter, or failing) is skipped and handed to ``skipped`` (its name, shortened; why) at
    once, so that one bad file costs neither the others nor the word about those skipped before it."""
    import tarfile

    require_tar_data_filter()
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            try:
                tar.extract(member, dest, filter="data")
            except (tarfile.TarError, OSError) as err:
                name = (
                    member.name if len(member.name) <= 203 else f"{member.name[:100]}...{member.name[-100:]}"
                )
                skipped(name, str(err.strerror if isinstance(err, OSError) and err.strerror else err))
