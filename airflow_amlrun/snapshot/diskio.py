"""File-system calls the standard library lacks: syncfs, early writeback and copy-on-write clones.

Each degrades to what any POSIX system has (``os.sync``, nothing, a plain copy) where the call is missing
or the file system refuses it, so callers need not care where they run.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import threading
from typing import Any

# From <linux/fs.h>: _IOW(0x94, 9, int), clone all of the source file's extents into the destination.
_FICLONE = 0x40049409
_SYNC_FILE_RANGE_WRITE = 2
# A clone fails this way where the file system cannot share extents (ext4, tmpfs) or across two of them.
_NO_CLONE = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM})

# Pairs of file systems (st_dev of source, destination) found unable to clone.
_unclonable: set[tuple[int, int]] = set()
_unclonable_lock = threading.Lock()


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@functools.cache
def _libc_function(name: str, *argtypes: Any) -> Any:
    libc = _libc()
    function = getattr(libc, name, None) if libc is not None else None
    if function is not None:
        function.argtypes = list(argtypes)
        function.restype = ctypes.c_int
    return function


def sync_filesystem(path: str) -> None:
    """Make everything written to the file system holding ``path`` durable (``syncfs``; else ``sync``).

    One flush for a batch of files costs about what a single ``fsync`` does: the journal commits once.
    """
    syncfs = _libc_function("syncfs", ctypes.c_int)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", path)
    finally:
        os.close(fd)


def sync_directory(path: str) -> None:
    """Make the names in directory ``path`` durable (a rename into it survives a crash)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk without waiting, so a later flush finds less to do."""
    sync_file_range = _libc_function(
        "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
    )
    if sync_file_range is not None:
        # Advisory: a failure only means the later flush does all the work.
        sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def clone_file(src: int, dst: int, src_device: int | None = None, dst_device: int | None = None) -> bool:
    """Make ``dst`` share ``src``'s data copy-on-write (FICLONE); ``False`` where the file system cannot.

    A clone costs no data copy and no space, and a write to either file later lands on new blocks: the
    other never sees it. Pairs of file systems found unable to clone are not asked again.

    :param src_device, dst_device: the files' st_dev, when the caller has them already.
    """
    devices = (
        os.fstat(src).st_dev if src_device is None else src_device,
        os.fstat(dst).st_dev if dst_device is None else dst_device,
    )
    if devices in _unclonable:
        return False
    try:
        fcntl.ioctl(dst, _FICLONE, src)
    except OSError as exc:
        if exc.errno not in _NO_CLONE:
            raise
        if exc.errno != errno.EXDEV or devices[0] != devices[1]:
            # Two mounts of one file system (a bind mount) share st_dev, and older kernels refuse to clone
            # across them (EXDEV) where they clone within either: not a property of the file system.
            with _unclonable_lock:
                _unclonable.add(devices)
        return False
    return True


def process_umask() -> int | None:
    """This process's file-mode creation mask, read without changing it (``None`` where Linux does not tell).

    ``os.umask`` can only be read by setting it, which for a moment would give files other threads create
    the wrong mode.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None
