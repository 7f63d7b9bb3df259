"""Writing a snapshot back out of the store: a verified restore, or a fast run-directory materialize.

Both refuse unsafe manifests up front (see :func:`manifest.validate_entries`), create every file with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and create symlinks only after all files are written, so no write can
go through a link the restore itself made. Files are copy-on-write clones (FICLONE) where the file
system shares extents (btrfs, XFS with reflink, bcachefs), else copies; never hard links: a run, possibly
as root (whom the blobs' read-only mode does not stop), must not be able to modify the store through its
run directory.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import TypeVar

from airflow_amlrun import progress
from airflow_amlrun.snapshot.copying import clone_or_copy, create_file
from airflow_amlrun.snapshot.diskio import clone_file, process_umask
from airflow_amlrun.snapshot.errors import (
    BlobCorruptError,
    BlobMissingError,
    DestinationNotEmptyError,
    SnapshotError,
)
from airflow_amlrun.snapshot.manifest import Snapshot, SnapshotEntry, validate_entries
from airflow_amlrun.snapshot.snapshot import default_workers
from airflow_amlrun.snapshot.store import BlobStore

T = TypeVar("T")

_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def restore_snapshot(
    store: BlobStore,
    snapshot_id: str,
    dest: str | os.PathLike[str],
    *,
    max_workers: int | None = None,
) -> Snapshot:
    """Restore snapshot ``snapshot_id`` into ``dest`` (empty or absent), checking every blob's hash.

    :raises UnsafeManifestError: an entry would escape ``dest``; nothing is written.
    :raises BlobMissingError, BlobCorruptError: naming the file path and digest.
    """
    snapshot = store.get_manifest(snapshot_id)
    _write_tree(store, snapshot, os.fspath(dest), verify=True, max_workers=max_workers, report=True)
    return snapshot


def materialize(
    store: BlobStore,
    snapshot: Snapshot | str,
    dest: str | os.PathLike[str],
    *,
    max_workers: int | None = None,
) -> Snapshot:
    """Build a run directory at ``dest`` from the store (never from the live source tree), fast.

    A local store is cloned where the file system can (no data copied), else copied in the kernel
    (``copy_file_range``), and checked by size only; a remote store is downloaded and hash-checked (the
    bytes pass through Python anyway).
    """
    if isinstance(snapshot, str):
        snapshot = store.get_manifest(snapshot)
    _write_tree(store, snapshot, os.fspath(dest), verify=not store.is_local, max_workers=max_workers)
    return snapshot


def _write_tree(
    store: BlobStore,
    snapshot: Snapshot,
    dest: str,
    *,
    verify: bool,
    max_workers: int | None,
    report: bool = False,
) -> None:
    """:param report: report the files written as a step of progress (a restore the user asked for)."""
    validate_entries(snapshot.entries)
    _prepare_destination(dest)
    by_folder: dict[str, list[SnapshotEntry]] = {}  # the files, by folder (a folder of links only too)
    links: list[SnapshotEntry] = []
    for entry in snapshot.entries:
        in_folder = by_folder.setdefault(entry.path.rpartition("/")[0], [])
        if entry.link is None:
            in_folder.append(entry)
        else:
            links.append(entry)
    for folder in sorted(by_folder):
        # Sorted order creates parents first; exist_ok=False would trip on parents made implicitly.
        if folder:
            os.makedirs(os.path.join(dest, *folder.split("/")), exist_ok=True)
    mask = process_umask()

    def chmod(entry: SnapshotEntry) -> bool:
        # Files are created with their mode; only bits the umask took away need a chmod (an inode update
        # per file otherwise).
        return mask is None or bool(entry.mode & mask)

    if store.is_local and not verify and max_workers is None:
        _write_local(store, by_folder, dest, chmod)
    else:
        files = [entry for entries in by_folder.values() for entry in entries]

        def write_one(entry: SnapshotEntry, failed: threading.Event) -> None:
            _write_file(store, entry, dest, verify=verify, chmod=chmod(entry))

        # A restore the user asked for is reported file by file; a run directory is not.
        step = progress.step(f"Writing {len(files)} files to {dest}", total=len(files), unit="files")
        with step if report else contextlib.nullcontext(lambda amount=1: None) as advance:
            _in_threads(max_workers or default_workers(), write_one, files, advance)
    for entry in links:
        assert entry.link is not None
        os.symlink(entry.link, os.path.join(dest, *entry.path.split("/")))


def _write_local(
    store: BlobStore,
    by_folder: dict[str, list[SnapshotEntry]],
    dest: str,
    chmod: Callable[[SnapshotEntry], bool],
) -> None:
    """Write a run directory's files, ``by_folder``, from a local store: clones, else copies in the kernel.

    Each folder's files are created through the folder's open descriptor (no path looked up per file), and
    each blob is opened in its store folder, kept open. With clones, these few system calls are all a file
    costs (see ``floor_s`` in benchmarks/snapshot.py), and the calling thread writes them all: two threads,
    taking turns at the interpreter and at the file system's locks, were 1.6 times slower on XFS. Copies move
    the data too, and creating a file takes its folder's lock, so there the folders are shared out among
    the threads: two threads writing 48 folders halve the time of one on ext4 (2,000 files of 300 MB there
    take about as long as 2,000 files of 1 byte), where two writing one folder gain nothing. The first
    file, written before the others in the calling thread, tells which of the two applies.
    """

    def write_folder(files: tuple[str, list[SnapshotEntry]], failed: threading.Event) -> bool:
        """Write a folder's files; whether each was a clone."""
        folder, entries = files
        cloned = True
        folder_fd = os.open(os.path.join(dest, *folder.split("/")), _FOLDER_FLAGS)
        try:
            at = folder_fd, os.fstat(folder_fd).st_dev
            for entry in entries:
                if failed.is_set():
                    break
                cloned &= _write_file(
                    store, entry, dest, verify=False, chmod=chmod(entry), at=at, open_blob=open_blob
                )
        finally:
            os.close(folder_fd)
        return cloned

    folders = [(folder, entries) for folder, entries in by_folder.items() if entries]
    if not folders:
        return
    (folder, entries), *rest = folders
    with store.local_blobs() as open_blob:
        failed = threading.Event()
        rest.insert(0, (folder, entries[1:]))
        if write_folder((folder, entries[:1]), failed):
            # Clones: all in this thread, which a pool would wake as each folder is done.
            for files in rest:
                write_folder(files, failed)
        else:
            _in_threads(min(len(rest), default_workers()), write_folder, rest)


def _in_threads(
    workers: int,
    write: Callable[[T, threading.Event], object],
    items: Iterable[T],
    advance: Callable[[int], object] = lambda amount: None,
) -> None:
    """Call ``write(item, failed)`` for each item in ``workers`` threads, ``advance(1)`` as each call ends. The
    first failure (or an interruption of this thread) is raised at once: the calls not yet begun are dropped, and
    those under way see ``failed`` set (one that writes many files stops before its next)."""
    failed = threading.Event()

    def guarded(item: T) -> bool:
        if failed.is_set():
            return False
        try:
            write(item, failed)
        except BaseException:
            failed.set()
            raise
        return True

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures: list[Future[bool]] = []
        try:
            futures.extend(pool.submit(guarded, item) for item in items)
            for future in as_completed(futures):
                if future.result():
                    advance(1)
        except BaseException:
            failed.set()
            for future in futures:
                future.cancel()
            raise


def _prepare_destination(dest: str) -> None:
    if os.path.lexists(dest):
        if not os.path.isdir(dest) or os.path.islink(dest):
            raise DestinationNotEmptyError(
                f"Destination {dest!r} exists and is not a directory; choose an empty or new directory."
            )
        if os.listdir(dest):
            raise DestinationNotEmptyError(
                f"Destination {dest!r} is not empty; restore into an empty or new directory."
            )
    else:
        os.makedirs(dest)


def _write_file(
    store: BlobStore,
    entry: SnapshotEntry,
    dest: str,
    *,
    verify: bool,
    chmod: bool,
    at: tuple[int, int] | None = None,
    open_blob: Callable[[str], tuple[int, os.stat_result]] | None = None,
) -> bool:
    """Write one file of the tree: with ``open_blob`` (see :meth:`BlobStore.local_blobs`), a local store's
    blob cloned into the folder ``at`` (its open descriptor and device); else by the store's ``copy_to``.
    Whether it was a clone."""
    assert entry.digest is not None
    cloned = False
    try:
        if open_blob is not None and at is not None:
            copied, cloned = _clone(open_blob, entry, at, chmod=chmod)
        else:
            copied = store.copy_to(
                entry.digest,
                _path_in(dest, entry),
                verify=verify,
                exclusive=True,
                mode=entry.mode,
                chmod=chmod,
            )
    except BlobMissingError:
        raise BlobMissingError(
            f"Cannot restore {entry.path!r}: blob {entry.digest} is missing from store {store.url!r}. "
            "The store was pruned or is not the one the snapshot was taken into."
        ) from None
    except BlobCorruptError as err:
        raise BlobCorruptError(
            f"Cannot restore {entry.path!r}: blob {entry.digest} in store {store.url!r} is corrupt ({err}). "
            "Delete that blob and take the snapshot again."
        ) from None
    except FileExistsError:
        raise SnapshotError(
            f"Cannot restore {entry.path!r}: something already exists at {_path_in(dest, entry)!r}; "
            "another process is writing into the destination."
        ) from None
    if copied != entry.size:
        os.unlink(_path_in(dest, entry))
        raise BlobCorruptError(
            f"Cannot restore {entry.path!r}: blob {entry.digest} in store {store.url!r} holds "
            f"{copied} bytes, the manifest says {entry.size}. Delete that blob and take the snapshot again."
        )
    return cloned


def _clone(
    open_blob: Callable[[str], tuple[int, os.stat_result]],
    entry: SnapshotEntry,
    at: tuple[int, int],
    *,
    chmod: bool,
) -> tuple[int, bool]:
    """Create ``entry``'s file by its own name in the open folder ``at`` and clone (else copy in the kernel)
    its blob into it; returns the bytes it holds, for the caller to check, and whether it is a clone."""
    digest = entry.digest
    assert digest is not None
    folder_fd, device = at
    cloned = False

    def fill(fd: int) -> int:
        nonlocal cloned
        cloned = clone_file(src, fd, src_stat.st_dev, device)
        if cloned:
            # What was cloned, not what the blob measured when it was opened: one written to in between (by
            # whoever else can write the store) fails the size check.
            return os.fstat(fd).st_size
        return clone_or_copy(src, src_stat, fd, None, known=digest, dest_device=device)

    src, src_stat = open_blob(digest)
    try:
        copied = create_file(entry.path.rpartition("/")[2], entry.mode, fill, chmod=chmod, dir_fd=folder_fd)
    finally:
        os.close(src)
    return copied, cloned


def _path_in(dest: str, entry: SnapshotEntry) -> str:
    """Where ``entry`` is written beneath ``dest``."""
    return os.path.join(dest, *entry.path.split("/"))
