"""A content-addressed blob store on a local folder or any fsspec URL, written atomically.

Layout under the store root::

    blobs/<first 2 hex>/<full hex>     one blob per distinct file content (BLAKE3)
    snapshots/<snapshot id>.json       manifests: the root node of each snapshot's tree
    trees/<digest>.json                the other directory nodes of the manifests
    <any other prefix>/...             generic objects (run outputs, logs) via put_object / upload_dir

Every write lands under a temporary name in the destination directory and is renamed into place, so a
final name never holds a partial object, even with several processes writing the same blob. Object
stores (S3, GCS, Azure) publish an object only when its single or multipart upload completes, so they
are written directly. A blob already present is never rewritten.

On a local folder, content-addressed objects (blobs, manifest nodes) are durable before they get their
names: "already there" is all a later snapshot checks, so a name must never hold bytes that a power
loss could take back. A snapshot's blobs are flushed together (one ``syncfs`` for the batch, see
:class:`BlobBatch`), a lone blob with ``fdatasync``, and a manifest is named only after everything it
refers to is durable. Generic objects are not flushed: they are plain files, and nothing trusts them
by name.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import logging
import os
import posixpath
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Literal

from airflow_amlrun.snapshot.confined import confined_files
from airflow_amlrun.snapshot.copying import check_hash, copy_fd, copy_stream, pread_all
from airflow_amlrun.snapshot.diskio import clone_file, start_writeback, sync_directory, sync_filesystem
from airflow_amlrun.snapshot.errors import (
    BlobCorruptError,
    BlobMissingError,
    InvalidKeyError,
    SnapshotNotFoundError,
    SourceChangedError,
    StoreFullError,
)
from airflow_amlrun.snapshot.manifest import Snapshot, check_digest, hash_bytes

log = logging.getLogger(__name__)

_TMP_PREFIX = ".amlrun-tmp-"
# Write errors that mean the store has no room (or takes no writes), rather than a fault of what is written.
_STORE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted at a name must not wait for a writer; a regular file ignores it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Protocols whose single PUT (or completed multipart upload) is atomic: no temp-name-and-rename needed.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "memory"})

# How a local write is made durable before its final name appears: not at all (generic objects), by its
# own fdatasync (a lone blob), with the rest of its batch (see BlobBatch), or by a flush of the whole file
# system (a manifest: what it names must be durable before it is).
Flush = Literal["none", "file", "batch", "filesystem"]


class BlobBatch:
    """Blobs written under temporary names, made durable by one flush, then given their names together.

    An ``fsync`` per blob makes the journal commit once per file; one ``syncfs`` for the batch commits
    once. Each blob's writeback starts as soon as it is written, so the flush mostly waits for disk
    writes already under way. A batch that is discarded (an error, or the process dies) leaves only
    temporary names, which no reader takes for objects.
    """

    def __init__(self, root: str | None) -> None:
        self._root = root
        self._pending: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def add(self, tmp: str, final: str) -> None:
        """Publish ``tmp`` as ``final`` when the batch is."""
        with self._lock:
            self._pending.append((tmp, final))

    def publish(self) -> None:
        """Flush the file system, then rename every blob to its final name."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        assert self._root is not None
        try:
            # One flush per file system the blobs were written to: a store's blobs/ or trees/ may be a
            # mount of its own, which a flush of the store's root would not reach.
            folders = {os.path.dirname(tmp) for tmp, _final in pending}
            filesystems = {os.stat(folder).st_dev: folder for folder in sorted(folders)}
            for folder in filesystems.values():
                sync_filesystem(folder)
        except BaseException:
            self._discard(pending)
            raise
        for tmp, final in pending:
            os.replace(tmp, final)

    def discard(self) -> None:
        """Remove the temporary files of blobs not yet published."""
        with self._lock:
            pending, self._pending = self._pending, []
        self._discard(pending)

    @staticmethod
    def _discard(pending: list[tuple[str, str]]) -> None:
        for tmp, _final in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class BlobStore:
    """A snapshot and artifact store at ``url``: a local folder or any fsspec URL (s3://, gs://, ...).

    :param url: a folder path (or ``file://`` URL) for the local fast path, or an fsspec URL.
    :param storage_options: passed to fsspec for remote URLs (credentials, ``client_kwargs``, ...).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self._made_dirs: set[str] = set()
        # Folders kept open for local reads while some caller is inside `folders_kept_open`.
        self._folders_lock = threading.Lock()
        self._folders_users = 0
        self._folder_fds: dict[tuple[str, ...], int] = {}
        local = url[len("file://") :] if url.startswith("file://") else (None if "://" in url else url)
        if local is not None:
            self._local_root: str | None = os.path.abspath(os.path.expanduser(local))
            self._fs: Any = None
            self._root = self._local_root
            self._atomic_put = False
        else:
            import fsspec.core  # deferred: remote stores are the less common, heavier path

            self._local_root = None
            self._fs, self._root = fsspec.core.url_to_fs(url, **self.storage_options)
            protocols = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
            self._atomic_put = any(p in _ATOMIC_PUT_PROTOCOLS for p in protocols)
            self._root = self._root.rstrip("/")

    def __repr__(self) -> str:
        return f"BlobStore({self.url!r})"

    @property
    def is_local(self) -> bool:
        """Whether the store is a local folder (fast path with os calls)."""
        return self._local_root is not None

    @property
    def local_root(self) -> str | None:
        """The store folder for a local store, else ``None``."""
        return self._local_root

    # ----------------------------------------------------------------- keys and paths

    @staticmethod
    def blob_key(digest: str) -> str:
        """The key of a blob: ``blobs/<first 2 hex>/<full hex>``."""
        check_digest(digest)
        return f"blobs/{digest[:2]}/{digest}"

    @staticmethod
    def manifest_key(snapshot_id: str) -> str:
        """The key of a manifest: ``snapshots/<id>.json``."""
        check_digest(snapshot_id)
        return f"snapshots/{snapshot_id}.json"

    @staticmethod
    def tree_key(digest: str) -> str:
        """The key of a manifest's directory node: ``trees/<digest>.json``."""
        check_digest(digest)
        return f"trees/{digest}.json"

    def uri_for(self, key: str = "") -> str:
        """The full URL (or local path) of ``key`` (a file or a prefix) in this store."""
        key = _check_key(key, allow_empty=True)
        if self._local_root is not None:
            return os.path.join(self._local_root, *key.split("/")) if key else self._local_root
        return self.url.rstrip("/") + ("/" + key if key else "")

    def _path(self, key: str) -> str:
        if self._local_root is not None:
            return os.path.join(self._local_root, *key.split("/"))
        return f"{self._root}/{key}"

    @contextlib.contextmanager
    def folders_kept_open(self) -> Iterator[None]:
        """Within it, the store's folders opened for local reads stay open: a run directory of thousands of
        blobs costs one open per blob, not one per folder on its path too."""
        with self._folders_lock:
            self._folders_users += 1
        try:
            yield
        finally:
            with self._folders_lock:
                self._folders_users -= 1
                if self._folders_users == 0:
                    for fd in self._folder_fds.values():
                        os.close(fd)
                    self._folder_fds.clear()

    def _open_folder(self, folders: tuple[str, ...]) -> int:
        """A descriptor of ``folders`` beneath the store's folder, opened without following a link."""
        assert self._local_root is not None
        fd = os.open(self._local_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for folder in folders:
                parent, fd = fd, os.open(folder, _DIR_FLAGS, dir_fd=fd)
                os.close(parent)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_local(self, key: str) -> int:
        """A descriptor of the regular file at ``key`` beneath the local store's folder (see ``_open_stat``)."""
        return self._open_stat(key)[0]

    def _open_stat(self, key: str) -> tuple[int, os.stat_result]:
        """A descriptor of the regular file at ``key`` beneath the local store's folder, and its stat.

        Whoever else can write the store must not make a reader copy a file from elsewhere into a run (a
        link planted at a blob's name, whose size a manifest states) or wait forever (a FIFO): no link is
        followed beneath the store's folder, and anything but a regular file is refused.
        """
        assert self._local_root is not None
        *path, name = key.split("/")
        folders = tuple(path)
        try:
            with self._folders_lock:
                kept = self._folder_fds.get(folders) if self._folders_users else None
                if kept is None and self._folders_users:
                    kept = self._folder_fds[folders] = self._open_folder(folders)
                if kept is not None:
                    # Under the lock: the folder cannot be closed (and its number reused) meanwhile.
                    fd = os.open(name, _READ_FLAGS, dir_fd=kept)
            if kept is None:
                folder = self._open_folder(folders)
                try:
                    fd = os.open(name, _READ_FLAGS, dir_fd=folder)
                finally:
                    os.close(folder)
        except OSError as err:
            # ELOOP: the file is a link; ENOTDIR: a folder on its path is a link (or a file).
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise BlobCorruptError(
                    f"{key} in store {self.url!r} is a symbolic link or lies beneath one (or beneath a file), "
                    "which this library never writes: someone else changed the store. Remove it; it is "
                    "written again when needed."
                ) from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise BlobCorruptError(
                f"{key} in store {self.url!r} is not a regular file (a FIFO, socket, device or folder), which "
                "this library never writes: someone else changed the store. Remove it."
            )
        return fd, st

    # ----------------------------------------------------------------- blobs

    def has(self, digest: str) -> bool:
        """Whether the blob ``digest`` is in the store."""
        return self.exists(self.blob_key(digest))

    def missing(self, digests: Iterable[str], *, max_workers: int = 16) -> set[str]:
        """The subset of ``digests`` not in the store (remote lookups run in parallel)."""
        unique = sorted(set(digests))
        if self._local_root is not None or len(unique) < 2:
            return {d for d in unique if not self.has(d)}
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            present = list(pool.map(self.has, unique))
        return {d for d, ok in zip(unique, present, strict=True) if not ok}

    def put_file(
        self,
        digest: str,
        path: str | os.PathLike[str],
        *,
        verify: bool = False,
        size: int | None = None,
        before_publish: Callable[[], None] | None = None,
        batch: BlobBatch | None = None,
    ) -> int:
        """Store the content of ``path`` as blob ``digest``; returns bytes written (0 if already present).

        :param verify: hash the content while copying and refuse it if it does not match ``digest``.
            Uploads to a remote store, and copies that pass through user space anyway, are always verified.
        :param size: the size the caller saw when it hashed the content; a copy of another length is
            refused (:class:`SourceChangedError`) and never published.
        :param before_publish: called after the copy and before the blob gets its final name; raising
            there discards the copy (the snapshot uses it to check that the source did not change).
        :param batch: publish the blob with this batch (see :meth:`batch`) rather than on its own.
        """
        with open(path, "rb") as src:
            return self.put_fd(
                digest, src.fileno(), verify=verify, size=size, before_publish=before_publish, batch=batch
            )

    def put_fd(
        self,
        digest: str,
        fd: int,
        *,
        verify: bool = False,
        size: int | None = None,
        before_publish: Callable[[], None] | None = None,
        batch: BlobBatch | None = None,
    ) -> int:
        """Like :meth:`put_file`, from an open file descriptor (its content from offset 0).

        Lets a caller that hashed a file through ``fd`` store exactly the bytes it hashed.
        """
        key = self.blob_key(digest)
        if self.exists(key):
            return 0
        if self._local_root is None:
            data = pread_all(fd)
            _check_size(digest, len(data), size)
            if hash_bytes(data) != digest:
                raise BlobCorruptError(
                    f"Content does not hash to {digest}; the file changed since it was hashed."
                )
            if before_publish is not None:
                before_publish()
            return self._put_remote_bytes(key, data)

        def write(out: int) -> int:
            # The kernel copies without the bytes passing through here; should it fall back to a
            # user-space copy, the bytes are hashed on the way, since that costs nothing more.
            try:
                written = copy_fd(fd, out, digest if verify else None, offset=0, known=digest)
            except BlobCorruptError:
                if verify:
                    raise
                raise _differs(digest, "the bytes read hash differently") from None
            _check_size(digest, written, size)
            if before_publish is not None:
                before_publish()
            return written

        return self._write_local(
            key, write, read_only=True, flush="file" if batch is None else "batch", batch=batch
        )

    def blob_of_object(self, key: str) -> tuple[str, int]:
        """Store the content of the object at ``key`` (a run's output) as a blob; returns (digest, size).

        Streams: the object is hashed in chunks and copied (in the kernel, for a local store), never held whole
        in memory. A remote object is spooled to a temporary file on the way.
        """
        import tempfile

        import blake3

        key = _check_key(key)
        if self._local_root is not None:
            fd = self._open_local(key)
            try:
                size = os.fstat(fd).st_size
                digest = _hash_stream(lambda offset: os.pread(fd, _CHUNK, offset))
                self.put_fd(digest, fd, size=size)
            finally:
                os.close(fd)
            return digest, size
        with tempfile.TemporaryFile() as spool, self._open_read(key) as src:
            hasher = blake3.blake3()
            while chunk := src.read(_CHUNK):
                hasher.update(chunk)
                spool.write(chunk)
            spool.flush()
            digest, size = hasher.hexdigest(), spool.tell()
            self.put_fd(digest, spool.fileno(), size=size)
        return digest, size

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` as a blob (e.g. a git diff) and return its digest."""
        digest = hash_bytes(data)
        key = self.blob_key(digest)
        if not self.exists(key):
            self._put_object_bytes(key, data, read_only=True, flush="file")
        return digest

    @contextlib.contextmanager
    def batch(self) -> Iterator[BlobBatch]:
        """Write blobs and manifest nodes as one batch: durable and published together on exit.

        Objects written with the batch are not visible until the block ends without an error; after
        an error they are removed.
        """
        batch = BlobBatch(self._local_root)
        try:
            yield batch
        except BaseException:
            batch.discard()
            raise
        batch.publish()

    def get_bytes(self, digest: str, *, verify: bool = True) -> bytes:
        """The content of blob ``digest``, hash-checked unless ``verify=False``."""
        key = self.blob_key(digest)
        try:
            data = self.get_object(key)
        except FileNotFoundError:
            raise BlobMissingError(
                f"Blob {digest} is not in store {self.url!r}; the store was pruned or is a different one."
            ) from None
        if verify and hash_bytes(data) != digest:
            raise BlobCorruptError(
                f"Blob {digest} in store {self.url!r} is corrupt (its content hash differs)."
            )
        return data

    def copy_to(
        self,
        digest: str,
        dest_path: str | os.PathLike[str],
        *,
        verify: bool = True,
        exclusive: bool = False,
        mode: int | None = None,
        chmod: bool = True,
        dir_fd: int | None = None,
        dest_device: int | None = None,
    ) -> int:
        """Copy blob ``digest`` to the local file ``dest_path``; returns the bytes copied.

        :param verify: hash while copying; a mismatch removes the partial file and raises.
        :param exclusive: create ``dest_path`` itself, failing if anything (even a symlink) is there;
            otherwise write a temporary name beside it and rename it over ``dest_path``.
        :param mode: permission bits for the new file.
        :param chmod: set ``mode`` after creating the file; ``False`` where the caller knows the process's
            umask clears none of its bits (a chmod costs every file an inode update).
        :param dir_fd: ``dest_path`` is a name in this folder (a run directory's folders are kept open
            while it is written, so no path is looked up again per file); needs ``exclusive``.
        :param dest_device: the st_dev of the folder ``dest_path`` is created in, when the caller has it.
        """
        if dir_fd is not None and not exclusive:
            raise ValueError("copy_to with dir_fd creates the file itself: pass exclusive=True")
        dest = os.fspath(dest_path)
        target = dest if exclusive else _tmp_name(dest)
        expected = digest if verify else None
        key = self.blob_key(digest)
        new_file = functools.partial(
            _create_file,
            target,
            0o600 if mode is None else mode,
            chmod=mode is not None and chmod,
            dir_fd=dir_fd,
        )
        if self._local_root is not None:
            # The common case, a run directory from a local store, kept to a few system calls per file.
            try:
                src_fd, src_stat = self._open_stat(key)
            except FileNotFoundError:
                raise BlobMissingError(f"Blob {digest} is not in store {self.url!r}.") from None
            try:
                copied = new_file(
                    lambda fd: _copy_local(
                        src_fd, src_stat, fd, expected, known=digest, dest_device=dest_device
                    )
                )
            finally:
                os.close(src_fd)
        else:
            with contextlib.ExitStack() as stack:
                try:
                    src = stack.enter_context(self._open_read(key))
                except FileNotFoundError:
                    raise BlobMissingError(f"Blob {digest} is not in store {self.url!r}.") from None
                copied = new_file(lambda fd: copy_stream(src, fd, expected))
        if not exclusive:
            os.replace(target, dest)
        return copied

    # ----------------------------------------------------------------- manifests

    def has_manifest(self, snapshot_id: str) -> bool:
        """Whether the manifest ``snapshot_id`` is stored (then all its blobs are too: they go first)."""
        return self.exists(self.manifest_key(snapshot_id))

    def put_trees(self, snapshot: Snapshot, batch: BlobBatch | None = None) -> int:
        """Store the directory nodes of a snapshot's manifest the store lacks; returns bytes written."""
        written = 0
        for digest, data in snapshot.nodes().items():
            key = self.tree_key(digest)
            if not self.exists(key):
                self._put_object_bytes(
                    key, data, read_only=True, flush="file" if batch is None else "batch", batch=batch
                )
                written += len(data)
        return written

    def put_manifest(self, snapshot: Snapshot) -> int:
        """Store a snapshot's manifest (root and directory nodes); returns bytes written (0 if present).

        The blobs it names must be stored already: the root gets its name last, once everything it
        refers to is durable, so a stored manifest always means a complete snapshot.
        """
        key = self.manifest_key(snapshot.id)
        if self.exists(key):
            return 0
        with self.batch() as batch:
            written = self.put_trees(snapshot, batch)
        data = snapshot.to_json().encode("utf-8")
        self._put_object_bytes(key, data, read_only=True, flush="filesystem")
        return written + len(data)

    def get_manifest(self, snapshot_id: str) -> Snapshot:
        """Load and check the manifest ``snapshot_id`` (hash of the bytes, canonical form, safe entries)."""
        try:
            data = self.get_object(self.manifest_key(snapshot_id))
        except FileNotFoundError:
            raise SnapshotNotFoundError(
                f"Snapshot {snapshot_id} is not in store {self.url!r}; "
                "check the snapshot id and the store URL."
            ) from None
        if hash_bytes(data) != snapshot_id:
            raise BlobCorruptError(
                f"Manifest {snapshot_id} in store {self.url!r} is corrupt (its content hash differs)."
            )

        def load_tree(digest: str) -> bytes:
            try:
                node = self.get_object(self.tree_key(digest))
            except FileNotFoundError:
                raise BlobMissingError(
                    f"Directory node {digest} of snapshot {snapshot_id} is not in store {self.url!r}; "
                    "the store was pruned or copied in part. Take the snapshot again."
                ) from None
            if hash_bytes(node) != digest:
                raise BlobCorruptError(
                    f"Directory node {digest} of snapshot {snapshot_id} in store {self.url!r} is corrupt "
                    "(its content hash differs). Delete it and take the snapshot again."
                )
            return node

        snapshot = Snapshot.from_json(data, load_tree)
        if snapshot.id != snapshot_id:
            raise BlobCorruptError(
                f"Manifest {snapshot_id} in store {self.url!r} is not in canonical form; "
                "it was not written by this library."
            )
        return snapshot

    # ----------------------------------------------------------------- generic objects

    def exists(self, key: str) -> bool:
        """Whether the object ``key`` exists."""
        path = self._path(_check_key(key))
        if self._local_root is not None:
            return os.path.exists(path)
        return bool(self._fs.exists(path))

    def put_object(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically, replacing any previous object."""
        self._put_object_bytes(_check_key(key), data, read_only=False)

    def get_object(self, key: str) -> bytes:
        """The bytes of object ``key``; raises ``FileNotFoundError`` if absent."""
        key = _check_key(key)
        if self._local_root is not None:
            with open(self._open_local(key), "rb") as f:
                return f.read()
        return bytes(self._fs.cat_file(self._path(key)))

    def read_object(self, key: str, offset: int, size: int) -> bytes:
        """At most ``size`` bytes of object ``key`` from byte ``offset`` (fewer at its end, none past it);
        raises ``FileNotFoundError`` if absent."""
        key = _check_key(key)
        if self._local_root is not None:
            with open(self._open_local(key), "rb") as f:
                return os.pread(f.fileno(), size, offset)
        with self._fs.open(self._path(key), "rb") as f:
            f.seek(offset)
            return bytes(f.read(size))

    def list(self, prefix: str = "") -> list[str]:
        """Keys of all objects under ``prefix`` (recursive), relative to it, sorted."""
        prefix = _check_key(prefix, allow_empty=True)
        base = self._path(prefix) if prefix else (self._root or "")
        if self._local_root is not None:
            found = []
            for dirpath, _dirs, files in os.walk(base):
                rel_dir = os.path.relpath(dirpath, base)
                for name in files:
                    if not name.startswith(_TMP_PREFIX):
                        rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                        found.append(rel.replace(os.sep, "/"))
            return sorted(found)
        try:
            paths = self._fs.find(base)
        except FileNotFoundError:
            return []
        strip = base.rstrip("/") + "/"
        return sorted(
            p[len(strip) :]
            for p in paths
            if p.startswith(strip) and not posixpath.basename(p).startswith(_TMP_PREFIX)
        )

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        prefix: str,
        *,
        warn: Callable[[str], None] | None = None,
    ) -> str:
        """Copy every regular file under ``local_dir`` to ``prefix`` (each atomically); returns the prefix URI.

        The folder is read as something a run wrote: no symlink is followed out of it, and a link to a file
        inside it is stored as that file's content (see :mod:`airflow_amlrun.snapshot.confined`).

        :param warn: receives a message for each link or special file left out; default: this module's
            logger, at warning level.
        """
        prefix = _check_key(prefix)
        for rel, fd in confined_files(local_dir, warn or _log_warning):
            key = _check_key(f"{prefix}/{rel}")
            if self._local_root is None:
                self._put_remote_fd(key, fd)
            else:
                self._write_local(key, _fd_copier(fd), read_only=False)
        return self.uri_for(prefix)

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> builtins.list[str]:
        """Copy every object under ``prefix`` into ``local_dir``; returns the relative keys copied."""
        prefix = _check_key(prefix)
        keys = self.list(prefix)
        for rel in keys:
            _check_key(rel)
            dest = os.path.join(os.fspath(local_dir), *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with self._open_read(f"{prefix}/{rel}") as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
        return keys

    # ----------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _open_read(self, key: str) -> Iterator[BinaryIO]:
        if self._local_root is not None:
            with open(self._open_local(key), "rb") as f:
                yield f
        else:
            with self._fs.open(self._path(key), "rb", block_size=8 * _CHUNK) as f:
                yield f

    def _put_object_bytes(
        self, key: str, data: bytes, *, read_only: bool, flush: Flush = "none", batch: BlobBatch | None = None
    ) -> None:
        if self._local_root is None:
            self._put_remote_bytes(key, data)
            return

        def write(fd: int) -> int:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            return len(data)

        self._write_local(key, write, read_only=read_only, flush=flush, batch=batch)

    def _write_local(
        self,
        key: str,
        writer: Callable[[int], int],
        *,
        read_only: bool,
        flush: Flush = "none",
        batch: BlobBatch | None = None,
    ) -> int:
        try:
            return self._write_local_file(key, writer, read_only=read_only, flush=flush, batch=batch)
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

    def _write_local_file(
        self,
        key: str,
        writer: Callable[[int], int],
        *,
        read_only: bool,
        flush: Flush,
        batch: BlobBatch | None,
    ) -> int:
        final = self._path(key)
        parent = os.path.dirname(final)
        if parent not in self._made_dirs:
            os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)
        tmp = _tmp_name(final)
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

    def _put_remote_fd(self, key: str, fd: int) -> None:
        final = self._path(key)
        with os.fdopen(os.dup(fd), "rb") as src:
            if self._atomic_put:
                with self._fs.open(final, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            else:
                tmp = _tmp_name(final)
                self._fs.makedirs(posixpath.dirname(final), exist_ok=True)
                with self._fs.open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                self._fs.mv(tmp, final)

    def _put_remote_bytes(self, key: str, data: bytes) -> int:
        final = self._path(key)
        if self._atomic_put:
            self._fs.pipe_file(final, data)
        else:
            tmp = _tmp_name(final)
            self._fs.makedirs(posixpath.dirname(final), exist_ok=True)
            self._fs.pipe_file(tmp, data)
            self._fs.mv(tmp, final)
        return len(data)


def _check_key(key: str, *, allow_empty: bool = False) -> str:
    key = key.strip("/") if allow_empty else key
    if not key and allow_empty:
        return ""
    parts = key.split("/")
    if not key or key.startswith("/") or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise InvalidKeyError(
            f"Store key {key!r} must be a relative path without '.', '..' or empty components."
        )
    return key


def _create_file(
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


def _copy_local(
    src: int, src_stat: os.stat_result, dst: int, expected: str | None, *, known: str, dest_device: int | None
) -> int:
    if clone_file(src, dst, src_stat.st_dev, dest_device):
        # Copy-on-write: no data is copied, and a write to the run's file never reaches the blob. A clone
        # is the whole file.
        if expected is not None:
            check_hash(src, src_stat.st_size, expected)
        return src_stat.st_size
    copied = copy_fd(src, dst, expected, offset=0, known=known)
    # Start the copy's writeback now, as the store does for its blobs: left to the kernel, a few thousand
    # files' dirty pages are written out together later, and a process that needs them on disk (or the
    # memory back) waits for all of them at once.
    start_writeback(dst)
    return copied


def _tmp_name(final: str) -> str:
    head, tail = os.path.split(final)
    return os.path.join(head, f"{_TMP_PREFIX}{secrets.token_hex(8)}-{tail}")


def _fd_copier(source: int) -> Callable[[int], int]:
    def write(fd: int) -> int:
        return copy_fd(source, fd, None, offset=0)

    return write


def _log_warning(message: str) -> None:
    log.warning("%s", message)


def _check_size(digest: str, written: int, size: int | None) -> None:
    if size is not None and written != size:
        raise _differs(digest, f"{written} bytes were read, but its size was {size} when it was hashed")


def _differs(digest: str, detail: str) -> SourceChangedError:
    return SourceChangedError(
        f"The content copied for blob {digest} is not the content that was hashed ({detail}): the file "
        "changed while it was being stored, or it is a special file (/proc, /sys, some FUSE file systems) "
        "whose size or content is not stable. Nothing was stored for it."
    )


def _hash_stream(read_at: Callable[[int], bytes]) -> str:
    import blake3

    hasher, offset = blake3.blake3(), 0
    while chunk := read_at(offset):
        hasher.update(chunk)
        offset += len(chunk)
    return str(hasher.hexdigest())
