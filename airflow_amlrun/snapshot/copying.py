"""Copying and hashing file contents between descriptors: in the kernel where possible, checked on the way.

These are the byte-moving primitives of the store, and the new file a copy out of it lands in; what a blob
is, is :mod:`airflow_amlrun.snapshot.store`'s business, and when it is published,
:mod:`airflow_amlrun.snapshot.batch`'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from typing import Any, BinaryIO

import blake3

from airflow_amlrun.snapshot.diskio import clone_file, start_writeback
from airflow_amlrun.snapshot.errors import BlobCorruptError

CHUNK = 1 << 20


def pread_all(fd: int) -> bytes:
    """The whole content of an open file from offset 0, however far it reaches now."""
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size - offset, CHUNK), offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def copy_fd(
    src: int, dst: int, expected: str | None, *, offset: int | None = None, known: str | None = None
) -> int:
    """Copy ``src`` (from ``offset``, or its current position) to ``dst``.

    In the kernel (``copy_file_range``) when no hash is needed, else read-hash-write.

    :param expected: refuse the copy (:class:`BlobCorruptError`) unless the content hashes to this.
    :param known: the digest the content should have: checked too if the copy falls back to user space,
        where hashing the bytes on their way costs little.
    """
    total = 0
    start = offset if offset is not None else os.lseek(src, 0, os.SEEK_CUR)
    if expected is None:
        try:
            while True:
                if offset is None:
                    n = os.copy_file_range(src, dst, 1 << 30)
                else:
                    n = os.copy_file_range(src, dst, 1 << 30, offset + total)
                if n == 0:
                    return total
                total += n
        except OSError as exc:
            # Old kernels, exotic or special file systems (/proc, FUSE): fall back to a user-space copy
            # from where we stopped.
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
        expected = known
    hasher = blake3.blake3() if expected is not None else None
    if hasher is not None and total:
        # Part of the file went through the kernel already: hash that part from the source too.
        hash_range(src, start, total, hasher)
    with os.fdopen(os.dup(src), "rb") as f:
        f.seek(start + total)
        return total + copy_stream(f, dst, expected, hasher)


def hash_range(fd: int, start: int, length: int, hasher: Any) -> None:
    """Feed ``length`` bytes of ``fd`` from ``start`` to ``hasher`` (fewer if the file is shorter)."""
    done = 0
    while done < length:
        chunk = os.pread(fd, min(CHUNK, length - done), start + done)
        if not chunk:
            return
        hasher.update(chunk)
        done += len(chunk)


def check_hash(fd: int, size: int, expected: str) -> None:
    """Raise :class:`BlobCorruptError` unless the first ``size`` bytes of ``fd`` hash to ``expected``."""
    hasher = blake3.blake3()
    hash_range(fd, 0, size, hasher)
    if hasher.hexdigest() != expected:
        raise BlobCorruptError(f"Content does not hash to {expected} (got {hasher.hexdigest()}).")


def copy_stream(src: BinaryIO, dst: int, expected: str | None, hasher: Any = None) -> int:
    """Copy a file object to ``dst`` through user space, hashing on the way when a digest is expected."""
    if expected is not None and hasher is None:
        hasher = blake3.blake3()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        n = src.readinto(view)  # type: ignore[attr-defined]
        if not n:
            break
        chunk = view[:n]
        if hasher is not None:
            hasher.update(chunk)
        while chunk:
            chunk = chunk[os.write(dst, chunk) :]
        total += n
    if hasher is not None and hasher.hexdigest() != expected:
        raise BlobCorruptError(f"Content does not hash to {expected} (got {hasher.hexdigest()}).")
    return total


def hash_stream(read_at: Callable[[int], bytes]) -> str:
    """The BLAKE3 digest of what ``read_at(offset)`` returns, chunk after chunk, until it returns nothing."""
    hasher, offset = blake3.blake3(), 0
    while chunk := read_at(offset):
        hasher.update(chunk)
        offset += len(chunk)
    return str(hasher.hexdigest())


def create_file(
    target: str, mode: int, fill: Callable[[int], int], *, chmod: bool, dir_fd: int | None
) -> int:
    """Create ``target`` (never through a link, never over anything), write it with ``fill``; returns the
    bytes written. A failure removes what was created."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, mode, dir_fd=dir_fd)
    try:
        try:
            written = fill(fd)
            if chmod:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target, dir_fd=dir_fd)
        raise
    return written


def clone_or_copy(
    src: int,
    src_stat: os.stat_result,
    dst: int,
    expected: str | None,
    *,
    known: str,
    dest_device: int | None = None,
) -> int:
    """Give ``dst`` the content of the local file ``src``: a copy-on-write clone where the file systems allow
    one, else a copy (see :func:`copy_fd`); returns the bytes it holds."""
    if clone_file(src, dst, src_stat.st_dev, dest_device):
        # Copy-on-write: no data is copied, and a write to the run's file never reaches the blob. A clone
        # is the whole file as it is now, which need not be what src_stat measured.
        size = os.fstat(dst).st_size
        if expected is not None:
            check_hash(src, size, expected)
        return size
    copied = copy_fd(src, dst, expected, offset=0, known=known)
    # Start the copy's writeback now, as the store does for its blobs: left to the kernel, a few thousand
    # files' dirty pages are written out together later, and a process that needs them on disk (or the
    # memory back) waits for all of them at once.
    start_writeback(dst)
    return copied
