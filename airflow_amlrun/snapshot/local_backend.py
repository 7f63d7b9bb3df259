"""The store on a local folder: reads that never follow a link beneath it, and writes renamed into place.

A reader opens each folder on a key's path, then the file, with ``O_NOFOLLOW`` from its parent's
descriptor, and refuses anything but a regular file: whoever else can write the store cannot make it copy
a file from elsewhere into a run, or wait forever on a FIFO. A write lands under a temporary name in its
destination folder, is made as durable as its :data:`~airflow_amlrun.snapshot.batch.Flush` asks, and is
renamed into place, so a final name never holds a partial object, even with several processes writing
the same blob.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from airflow_amlrun.snapshot.batch import BlobBatch, Flush
from airflow_amlrun.snapshot.copying import copy_fd
from airflow_amlrun.snapshot.diskio import start_writeback, sync_directory, sync_filesystem
from airflow_amlrun.snapshot.errors import BlobCorruptError, StoreFullError
from airflow_amlrun.snapshot.keys import TMP_PREFIX, tmp_name

# Write errors that mean the store has no room (or takes no writes), rather than a fault of what is written.
_STORE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted at a name must not wait for a writer; a regular file ignores it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LocalBackend:
    """The objects of the store ``url`` in the local folder ``root`` (keys are checked by the caller).

    :param root: the store's folder, an absolute path.
    :param url: the store's URL as the user gave it, for error messages.
    """

    def __init__(self, root: str, url: str) -> None:
        self.root = root
        self.url = url
        self._made_dirs: set[str] = set()
        # Folders kept open for reads while some caller is inside `folders_kept_open`.
        self._folders_lock = threading.Lock()
        self._folders_users = 0
        self._folder_fds: dict[tuple[str, ...], int] = {}

    def path(self, key: str) -> str:
        """The path of ``key`` in the folder."""
        return os.path.join(self.root, *key.split("/"))

    # ----------------------------------------------------------------- reads

    @contextlib.contextmanager
    def folders_kept_open(self) -> Iterator[Callable[[tuple[str, ...], str], tuple[int, os.stat_result]]]:
        """Within it, ``open_stat_in(folders, name)``: :meth:`open_stat` of the file ``name`` in the folder
        ``folders`` (a key's components), callable from any thread. The folders it opens stay open until the
        last caller leaves, so a run directory of thousands of blobs costs one open per blob, and no lock."""
        entered = False
        try:
            with self._folders_lock:
                self._folders_users += 1
                entered = True
            yield self._open_stat_kept
        finally:
            with self._folders_lock:
                if entered:
                    self._folders_users -= 1
                # Taken out one by one: an interruption (or a close that fails) leaves open descriptors only.
                while self._folders_users == 0 and self._folder_fds:
                    _, fd = self._folder_fds.popitem()
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _open_stat_kept(self, folders: tuple[str, ...], name: str) -> tuple[int, os.stat_result]:
        # No lock to read: a kept folder is closed only once no caller is within folders_kept_open, and this
        # one is.
        folder = self._folder_fds.get(folders)
        if folder is None:
            with self._folders_lock:
                if not self._folders_users:
                    # Called after its folders_kept_open ended (a thread left running by an interruption): what it
                    # opened would never be closed.
                    raise RuntimeError("open_stat_in was called outside folders_kept_open")
                folder = self._folder_fds.get(folders)
                if folder is None:
                    folder = self._folder_fds[folders] = self._open_folder(folders, name)
        return self._open_regular(folder, folders, name)

    def _open_folder(self, folders: tuple[str, ...], name: str) -> int:
        """A descriptor of ``folders`` beneath the store's folder, opened without following a link (``name``,
        the file looked for in it, names it in an error)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for folder in folders:
                parent, fd = fd, os.open(folder, _DIR_FLAGS, dir_fd=fd)
                os.close(parent)
        except OSError as err:
            os.close(fd)
            raise self._not_written_here(err, folders, name) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_regular(self, folder: int, folders: tuple[str, ...], name: str) -> tuple[int, os.stat_result]:
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=folder)
        except OSError as err:
            raise self._not_written_here(err, folders, name) from None
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            key = "/".join((*folders, name))
            raise BlobCorruptError(
                f"{key} in store {self.url!r} is not a regular file (a FIFO, socket, device or folder), which "
                "this library never writes: someone else changed the store. Remove it."
            )
        return fd, st

    def _not_written_here(self, err: OSError, folders: tuple[str, ...], name: str) -> Exception:
        """``err`` from opening the file ``name`` in ``folders``, or what it means if a link is in the way."""
        # ELOOP: the file is a link; ENOTDIR: a folder on its path is a link (or a file).
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            return err
        return BlobCorruptError(
            f"{'/'.join((*folders, name))} in store {self.url!r} is a symbolic link or lies beneath one (or "
            "beneath a file), which this library never writes: someone else changed the store. Remove it; it "
            "is written again when needed."
        )

    def open_fd(self, key: str) -> int:
        """A descriptor of the regular file at ``key`` beneath the store's folder (see :meth:`open_stat`)."""
        return self.open_stat(key)[0]

    def open_stat(self, key: str) -> tuple[int, os.stat_result]:
        """A descriptor of the regular file at ``key`` beneath the store's folder, and its stat.

        Whoever else can write the store must not make a reader copy a file from elsewhere into a run (a
        link planted at a blob's name, whose size a manifest states) or wait forever (a FIFO): no link is
        followed beneath the store's folder, and anything but a regular file is refused.
        """
        *path, name = key.split("/")
        folders = tuple(path)
        folder = self._open_folder(folders, name)
        try:
            return self._open_regular(folder, folders, name)
        finally:
            os.close(folder)

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        """The object ``key`` open for reading."""
        with open(self.open_fd(key), "rb") as f:
            yield f

    def exists(self, key: str) -> bool:
        """Whether the object ``key`` exists."""
        return os.path.exists(self.path(key))

    def get(self, key: str) -> bytes:
        """The bytes of object ``key``; raises ``FileNotFoundError`` if absent."""
        with open(self.open_fd(key), "rb") as f:
            return f.read()

    def read(self, key: str, offset: int, size: int) -> bytes:
        """At most ``size`` bytes of object ``key`` from byte ``offset``."""
        with open(self.open_fd(key), "rb") as f:
            return os.pread(f.fileno(), size, offset)

    def list(self, prefix: str) -> list[str]:
        """Keys of all objects under ``prefix`` (recursive, all when empty), relative to it, sorted."""
        base = self.path(prefix) if prefix else self.root
        found = []
        for dirpath, _dirs, files in os.walk(base):
            rel_dir = os.path.relpath(dirpath, base)
            for name in files:
                if not name.startswith(TMP_PREFIX):
                    rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                    found.append(rel.replace(os.sep, "/"))
        return sorted(found)

    # ----------------------------------------------------------------- writes

    def put_bytes(
        self, key: str, data: bytes, *, read_only: bool, flush: Flush = "none", batch: BlobBatch | None = None
    ) -> None:
        """Write ``data`` at ``key`` (see :meth:`write`)."""

        def write(fd: int) -> int:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            return len(data)

        self.write(key, write, read_only=read_only, flush=flush, batch=batch)

    def put_fd(self, key: str, source: int) -> None:
        """Write the content of the open file ``source`` (from offset 0) at ``key``, as a generic object."""

        def write(fd: int) -> int:
            return copy_fd(source, fd, None, offset=0)

        self.write(key, write, read_only=False)

    def write(
        self,
        key: str,
        writer: Callable[[int], int],
        *,
        read_only: bool,
        flush: Flush = "none",
        batch: BlobBatch | None = None,
    ) -> int:
        """Write ``key`` with ``writer`` under a temporary name, flush it as ``flush`` says, and rename it
        into place (with ``batch``, when the batch is published); returns the bytes ``writer`` wrote.

        A store with no room left raises :class:`StoreFullError`, and keeps nothing of the write.
        """
        try:
            return self._write_file(key, writer, read_only=read_only, flush=flush, batch=batch)
        except OSError as err:
            if err.errno not in _STORE_FULL or isinstance(err, StoreFullError):
                raise
            full = StoreFullError(
                f"The store {self.url} cannot take {key!r}: {err.strerror}. Nothing partial was kept. Free "
                "space on its disk (e.g. remove old runs' outputs), or point the workspace's store_url at a "
                "larger store."
            )
            full.errno = err.errno
            raise full from err

    def _write_file(
        self,
        key: str,
        writer: Callable[[int], int],
        *,
        read_only: bool,
        flush: Flush,
        batch: BlobBatch | None,
    ) -> int:
        final = self.path(key)
        parent = os.path.dirname(final)
        if parent not in self._made_dirs:
            os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)
        tmp = tmp_name(final)
        # Blobs are read-only so that a run cannot edit the store through a stray copy or link.
        mode = 0o444 if read_only else 0o644
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
        try:
            try:
                written = writer(fd)
                if flush == "batch":
                    start_writeback(fd)
                elif flush == "file":
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            if flush == "batch":
                assert batch is not None
                batch.add(tmp, final)
                return written
            if flush == "filesystem":
                sync_filesystem(parent)
            os.replace(tmp, final)
            if flush == "filesystem":
                sync_directory(parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return written
