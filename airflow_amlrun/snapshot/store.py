"""The content-addressed blob store, :class:`BlobStore`: blobs, manifests and generic objects, on a local
folder or any fsspec URL.

Layout under the store root::

    blobs/<first 2 hex>/<full hex>     one blob per distinct file content (BLAKE3)
    snapshots/<snapshot id>.json       manifests: the root node of each snapshot's tree
    trees/<digest>.json                the other directory nodes of the manifests
    <any other prefix>/...             generic objects (run outputs, logs) via put_object / upload_dir

No final name ever holds a partial object, even with several processes writing the same blob, and a blob
already present is never rewritten. Each backend keeps those promises its own way, in its own module:
:mod:`~airflow_amlrun.snapshot.local_backend` for a local folder,
:mod:`~airflow_amlrun.snapshot.remote_backend` for an fsspec URL; :mod:`~airflow_amlrun.snapshot.batch`
says when a local write is durable and gets its name.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow_amlrun.snapshot.batch import BlobBatch, Flush
from airflow_amlrun.snapshot.confined import confined_files
from airflow_amlrun.snapshot.copying import (
    CHUNK,
    clone_or_copy,
    copy_fd,
    copy_stream,
    create_file,
    hash_stream,
    pread_all,
)
from airflow_amlrun.snapshot.errors import (
    BlobCorruptError,
    BlobMissingError,
    SnapshotNotFoundError,
    SourceChangedError,
)
from airflow_amlrun.snapshot.keys import check_key, tmp_name
from airflow_amlrun.snapshot.local_backend import LocalBackend
from airflow_amlrun.snapshot.manifest import Snapshot, check_digest, hash_bytes
from airflow_amlrun.snapshot.remote_backend import RemoteBackend

log = logging.getLogger(__name__)


class BlobStore:
    """A snapshot and artifact store at ``url``: a local folder or any fsspec URL (s3://, gs://, ...).

    :param url: a folder path (or ``file://`` URL) for the local fast path, or an fsspec URL.
    :param storage_options: passed to fsspec for remote URLs (credentials, ``client_kwargs``, ...).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        local = url[len("file://") :] if url.startswith("file://") else (None if "://" in url else url)
        self._backend: LocalBackend | RemoteBackend
        if local is not None:
            self._backend = LocalBackend(os.path.abspath(os.path.expanduser(local)), url)
        else:
            self._backend = RemoteBackend(url, self.storage_options)

    def __repr__(self) -> str:
        return f"BlobStore({self.url!r})"

    @property
    def is_local(self) -> bool:
        """Whether the store is a local folder (fast path with os calls)."""
        return isinstance(self._backend, LocalBackend)

    @property
    def local_root(self) -> str | None:
        """The store folder for a local store, else ``None``."""
        return self._backend.root if isinstance(self._backend, LocalBackend) else None

    # ----------------------------------------------------------------- keys and paths

    @staticmethod
    def blob_key(digest: str) -> str:
        """The key of a blob: ``blobs/<first 2 hex>/<full hex>``."""
        return "/".join((*_blob_folder(digest), digest))

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
        key = check_key(key, allow_empty=True)
        if isinstance(self._backend, LocalBackend):
            return self._backend.path(key) if key else self._backend.root
        return self.url.rstrip("/") + ("/" + key if key else "")

    @contextlib.contextmanager
    def local_blobs(self) -> Iterator[Callable[[str], tuple[int, os.stat_result]]]:
        """Within it, ``open_blob(digest)`` for a local store: a descriptor of the blob (the caller closes it)
        and its stat, in one open and one stat, the store's folders kept open for all calls (from any
        thread). A run directory of thousands of blobs costs no more.

        ``open_blob`` raises :class:`BlobMissingError` for a blob the store lacks, and
        :class:`BlobCorruptError` for a link or anything but a regular file at its name.
        """
        backend = self._backend
        if not isinstance(backend, LocalBackend):
            raise TypeError(f"Store {self.url!r} is not local: read its blobs with get_bytes or copy_to.")

        with backend.folders_kept_open() as open_stat_in:

            def open_blob(digest: str) -> tuple[int, os.stat_result]:
                try:
                    return open_stat_in(_blob_folder(digest), digest)
                except FileNotFoundError:
                    raise BlobMissingError(f"Blob {digest} is not in store {self.url!r}.") from None

            yield open_blob

    # ----------------------------------------------------------------- blobs

    def has(self, digest: str) -> bool:
        """Whether the blob ``digest`` is in the store."""
        return self.exists(self.blob_key(digest))

    def missing(self, digests: Iterable[str], *, max_workers: int = 16) -> set[str]:
        """The subset of ``digests`` not in the store (remote lookups run in parallel)."""
        unique = sorted(set(digests))
        if self.is_local or len(unique) < 2:
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
        backend = self._backend
        if isinstance(backend, RemoteBackend):
            data = pread_all(fd)
            _check_size(digest, len(data), size)
            if hash_bytes(data) != digest:
                raise BlobCorruptError(
                    f"Content does not hash to {digest}; the file changed since it was hashed."
                )
            if before_publish is not None:
                before_publish()
            return backend.put_bytes(key, data)

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

        return backend.write(
            key, write, read_only=True, flush="file" if batch is None else "batch", batch=batch
        )

    def blob_of_object(self, key: str) -> tuple[str, int]:
        """Store the content of the object at ``key`` (a run's output) as a blob; returns (digest, size).

        Streams: the object is hashed in chunks and copied (in the kernel, for a local store), never held whole
        in memory. A remote object is spooled to a temporary file on the way.
        """
        import tempfile

        import blake3

        key = check_key(key)
        backend = self._backend
        if isinstance(backend, LocalBackend):
            fd = backend.open_fd(key)
            try:
                size = os.fstat(fd).st_size
                digest = hash_stream(lambda offset: os.pread(fd, CHUNK, offset))
                self.put_fd(digest, fd, size=size)
            finally:
                os.close(fd)
            return digest, size
        with tempfile.TemporaryFile() as spool, backend.open_read(key) as src:
            hasher = blake3.blake3()
            while chunk := src.read(CHUNK):
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
        batch = BlobBatch(self.local_root)
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
    ) -> int:
        """Copy blob ``digest`` to the local file ``dest_path``; returns the bytes copied.

        :param verify: hash while copying; a mismatch removes the partial file and raises.
        :param exclusive: create ``dest_path`` itself, failing if anything (even a symlink) is there;
            otherwise write a temporary name beside it and rename it over ``dest_path``.
        :param mode: permission bits for the new file.
        :param chmod: set ``mode`` after creating the file; ``False`` where the caller knows the process's
            umask clears none of its bits (a chmod costs every file an inode update).
        """
        dest = os.fspath(dest_path)
        target = dest if exclusive else tmp_name(dest)
        expected = digest if verify else None
        key = self.blob_key(digest)
        new_file = functools.partial(
            create_file,
            target,
            0o600 if mode is None else mode,
            chmod=mode is not None and chmod,
            dir_fd=None,
        )
        backend = self._backend
        if isinstance(backend, LocalBackend):
            with self.local_blobs() as open_blob:
                src_fd, src_stat = open_blob(digest)
            try:
                copied = new_file(lambda fd: clone_or_copy(src_fd, src_stat, fd, expected, known=digest))
            finally:
                os.close(src_fd)
        else:
            with contextlib.ExitStack() as stack:
                try:
                    src = stack.enter_context(backend.open_read(key))
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
        return self._backend.exists(check_key(key))

    def put_object(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically, replacing any previous object."""
        self._put_object_bytes(check_key(key), data, read_only=False)

    def get_object(self, key: str) -> bytes:
        """The bytes of object ``key``; raises ``FileNotFoundError`` if absent."""
        return self._backend.get(check_key(key))

    def read_object(self, key: str, offset: int, size: int) -> bytes:
        """At most ``size`` bytes of object ``key`` from byte ``offset`` (fewer at its end, none past it);
        raises ``FileNotFoundError`` if absent."""
        return self._backend.read(check_key(key), offset, size)

    def list(self, prefix: str = "") -> list[str]:
        """Keys of all objects under ``prefix`` (recursive), relative to it, sorted."""
        return self._backend.list(check_key(prefix, allow_empty=True))

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
        prefix = check_key(prefix)
        for rel, fd in confined_files(local_dir, warn or _log_warning):
            self._backend.put_fd(check_key(f"{prefix}/{rel}"), fd)
        return self.uri_for(prefix)

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> builtins.list[str]:
        """Copy every object under ``prefix`` into ``local_dir``; returns the relative keys copied."""
        prefix = check_key(prefix)
        keys = self.list(prefix)
        for rel in keys:
            check_key(rel)
            dest = os.path.join(os.fspath(local_dir), *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with self._backend.open_read(f"{prefix}/{rel}") as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
        return keys

    # ----------------------------------------------------------------- internals

    def _put_object_bytes(
        self, key: str, data: bytes, *, read_only: bool, flush: Flush = "none", batch: BlobBatch | None = None
    ) -> None:
        if isinstance(self._backend, LocalBackend):
            self._backend.put_bytes(key, data, read_only=read_only, flush=flush, batch=batch)
        else:
            self._backend.put_bytes(key, data)


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


def _blob_folder(digest: str) -> tuple[str, str]:
    """The folder of blob ``digest`` (checked, as it names folders), as key components."""
    check_digest(digest)
    return "blobs", digest[:2]
