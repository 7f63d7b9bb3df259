"""Copying and hashing file contents between descriptors: in the kernel where possible, checked on the way.

These are the byte-moving primitives of the store; what a blob is, and when it is published, is
:mod:`airflow_amlrun.snapshot.store`'s business.
"""

from __future__ import annotations

import errno
import os
from typing import Any, BinaryIO

import blake3

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
