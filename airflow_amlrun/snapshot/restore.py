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
from airflow_amlrun.snapshot.diskio import process_umask
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
    with store.folders_kept_open():
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
    files = [e for e in snapshot.entries if e.link is None]
    links = [e for e in snapshot.entries if e.link is not None]
    dirs = {os.path.dirname(e.path) for e in snapshot.entries} - {""}
    for d in sorted(dirs):
        # Sorted order creates parents first; exist_ok=False would trip on parents made implicitly.
        os.makedirs(os.path.join(dest, *d.split("/")), exist_ok=True)
    mask = process_umask()

    def chmod(entry: SnapshotEntry) -> bool:
        # Files are created with their mode; only bits the umask took away need a chmod (an inode update
        # per file otherwise).
        return mask is None or bool(entry.mode & mask)

    if store.is_local and not verify and max_workers is None:
        # In-kernel copies (or clones) from a local store. Creating a file takes its folder's lock, and it is
        # most of the cost (ext4 here: 2,000 files of 300 MB take about as long as 2,000 files of 1 byte), so
        # the folders, not the files, are shared out among the threads: two threads writing 48 folders halve
        # the time of one, where two writing one folder gain nothing. Each writes its folder's files through
        # the folder's descriptor, so no path is looked up per file.
        by_folder: dict[str, list[SnapshotEntry]] = {}
        for entry in files:
            by_folder.setdefault(os.path.dirname(entry.path), []).append(entry)

        def write_folder(folder: str, failed: threading.Event) -> None:
            folder_fd = os.open(os.path.join(dest, *folder.split("/")), _FOLDER_FLAGS)
            try:
                device = os.fstat(folder_fd).st_dev
                for entry in by_folder[folder]:
                    if failed.is_set():
                        return
                    _write_file(store, entry, dest, verify=False, chmod=chmod(entry), at=(folder_fd, device))
            finally:
                os.close(folder_fd)

        _in_threads(min(len(by_folder), default_workers()), write_folder, by_folder)
    else:

        def write_one(entry: SnapshotEntry, failed: threading.Event) -> None:
            _write_file(store, entry, dest, verify=verify, chmod=chmod(entry))

        # A restore the user asked for is reported file by file; a run directory is not.
        step = progress.step(f"Writing {len(files)} files to {dest}", total=len(files), unit="files")
        with step if report else contextlib.nullcontext(lambda amount=1: None) as advance:
            _in_threads(max_workers or default_workers(), write_one, files, advance)
    for entry in links:
        assert entry.link is not None
        os.symlink(entry.link, os.path.join(dest, *entry.path.split("/")))


def _in_threads(
    workers: int,
    write: Callable[[T, threading.Event], None],
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
) -> None:
    """Write one file of the tree; ``at`` is its folder's open descriptor and device, if kept open."""
    assert entry.digest is not None
    folder_fd, device = at if at is not None else (None, None)
    try:
        copied = store.copy_to(
            entry.digest,
            # In a folder kept open, the file's own name: no path is joined and looked up per file.
            _path_in(dest, entry) if at is None else entry.path.rpartition("/")[2],
            verify=verify,
            exclusive=True,
            mode=entry.mode,
            chmod=chmod,
            dir_fd=folder_fd,
            dest_device=device,
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


def _path_in(dest: str, entry: SnapshotEntry) -> str:
    """Where ``entry`` is written beneath ``dest``."""
    return os.path.join(dest, *entry.path.split("/"))
