"""Taking a snapshot: scan, check limits, hash what changed, store what is missing, write the manifest."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import posixpath
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import blake3

from airflow_amlrun import progress
from airflow_amlrun.snapshot.batch import BlobBatch
from airflow_amlrun.snapshot.errors import (
    BlobCorruptError,
    ExcludedFileError,
    SizeOffender,
    SnapshotTooLargeError,
    SourceChangedError,
    SourceUnreadableError,
)
from airflow_amlrun.snapshot.ignore import AMLIGNORE, ignore_line_for
from airflow_amlrun.snapshot.manifest import MANIFEST_VERSION, Snapshot, SnapshotEntry, is_digest
from airflow_amlrun.snapshot.statcache import StatCache, StatKey
from airflow_amlrun.snapshot.store import BlobStore
from airflow_amlrun.snapshot.walk import ScannedFile, ScanResult, find_exclusion, normalize_mode, scan_tree

log = logging.getLogger(__name__)

DEFAULT_MAX_TOTAL_BYTES = 300 * 1024 * 1024
DEFAULT_MAX_FILES = 2000
# Below this size a file is hashed from one read; from the second threshold BLAKE3 also goes
# multi-threaded inside the file.
_ONE_READ_THRESHOLD = 1 << 20
_READ_CHUNK = 4 << 20
_PARALLEL_HASH_THRESHOLD = 16 << 20
_REPORTED_OFFENDERS = 5
_CHANGE_RETRIES = 3
_REMOTE_WRITERS = 16
_FILES_PER_TASK = 16


@dataclass(frozen=True)
class SnapshotResult:
    """What :func:`take_snapshot` did: the snapshot, and what it cost to store."""

    snapshot: Snapshot
    bytes_written: int
    blobs_written: int
    warnings: tuple[str, ...]
    files_hashed: int
    manifest_bytes: int


def default_workers() -> int:
    """Threads for hashing and copying: BLAKE3 and file copies release the GIL, one per core is enough."""
    return max(2, min(8, os.cpu_count() or 1))


def hash_file(path: str | os.PathLike[str]) -> str:
    """The BLAKE3 hex digest of a file's content."""
    with open(path, "rb") as f:
        return hash_fd(f.fileno(), os.fstat(f.fileno()).st_size)


def hash_fd(fd: int, size: int) -> str:
    """The BLAKE3 hex digest of an open file of ``size`` bytes, read from offset 0."""
    if size < _ONE_READ_THRESHOLD:
        return blake3.blake3(os.pread(fd, size + 1, 0)).hexdigest()
    # Plain reads rather than mmap: a file truncated by another process while mapped would kill
    # this process with SIGBUS.
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= _PARALLEL_HASH_THRESHOLD else 1)
    offset = 0
    while True:
        chunk = os.pread(fd, _READ_CHUNK, offset)
        if not chunk:
            return hasher.hexdigest()
        hasher.update(chunk)
        offset += len(chunk)


def take_snapshot(
    source_dir: str | os.PathLike[str],
    store: BlobStore,
    *,
    stat_cache_path: str | os.PathLike[str] | None = None,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    max_workers: int | None = None,
    required: Mapping[str, str] | None = None,
) -> SnapshotResult:
    """Snapshot ``source_dir`` into ``store``, writing only blobs the store lacks.

    :param source_dir: the directory to snapshot; ``.amlignore`` / ``.gitignore`` rules apply.
    :param store: where blobs and the manifest go.
    :param stat_cache_path: a SQLite file remembering digests by (path, size, mtime, inode), so
        unchanged files are not re-read next time. ``None`` hashes every file.
    :param max_total_bytes: fail (before storing anything) if the included files are larger.
    :param max_files: fail (before storing anything) if more files are included.
    :param max_workers: threads for hashing; defaults to the CPU count (2 to 8).
    :param required: paths (relative to ``source_dir``) the snapshot must hold, each with what it is for
        the message (``{"train.py": "the run's script"}``); checked before anything is read or stored.
    :raises ExcludedFileError: a required path is left out, naming the ignore line that excludes it.
    :raises SnapshotTooLargeError: a limit is exceeded; the message names what to exclude.
    :raises SourceUnreadableError: a listed file vanished or cannot be read; the message names it.
    """
    started_ns = time.time_ns()
    scan = scan_tree(source_dir)
    for path, what in (required or {}).items():
        check_included(scan, path, what)
    check_limits(scan, max_total_bytes=max_total_bytes, max_files=max_files)
    warnings = list(scan.warnings)
    cache = StatCache(stat_cache_path, scan.root) if stat_cache_path is not None else None
    workers = max_workers or default_workers()

    files = list(scan.files)
    digests: list[str | None] = [None] * len(files)
    if cache is not None:
        for i, f in enumerate(files):
            digests[i] = cache.get(f.path, _stat_key(f))
    to_hash = [i for i, d in enumerate(digests) if d is None]
    if cache is not None and not to_hash and cache.last is not None:
        unchanged = _last_snapshot(scan, files, digests, cache.last, store)
        if unchanged is not None:
            _log_snapshot(unchanged, scan, 0, 0, 0)
            return SnapshotResult(
                snapshot=unchanged,
                bytes_written=0,
                blobs_written=0,
                warnings=tuple(warnings),
                files_hashed=0,
                manifest_bytes=0,
            )
    # Each digest is stored once, by the first file that claims it.
    claimed: set[str] = set()
    claim_lock = threading.Lock()

    def claim(digest: str) -> bool:
        with claim_lock:
            if digest in claimed:
                return False
            claimed.add(digest)
            return True

    local = store.is_local

    def hash_one(i: int) -> tuple[int, ScannedFile, str, int | None]:
        with _open_source(files[i], scan) as src:
            try:
                scanned, digest = _hash_stable(files[i], src.fileno())
            except OSError as exc:
                raise _unreadable(files[i], scan, exc) from None
            # A local blob is copied at once through the descriptor just hashed, its pages still in the
            # cache: one open and one read of each file.
            written = (
                _store_blob(store, digest, scanned, scan, batch, src) if local and claim(digest) else None
            )
        return i, scanned, digest, written

    def hash_some(chunk: list[int]) -> list[tuple[int, ScannedFile, str, int | None]]:
        return [hash_one(i) for i in chunk]

    def store_one(digest: str, f: ScannedFile) -> int | None:
        return _store_blob(store, digest, f, scan, batch)

    # A remote store is latency-bound, so its uploads get a pool of their own with many in flight; a
    # local one is written by the hashing threads (one per core: more only contend for the disk).
    results: list[int | None] = []
    blob_futures: list[Future[int | None]] = []
    tree_bytes = 0
    with (
        store.batch() as batch,
        ThreadPoolExecutor(max_workers=workers) as pool,
        ThreadPoolExecutor(max_workers=_REMOTE_WRITERS) as upload_pool,
        progress.step(f"Snapshot of {scan.root}", total=len(to_hash), unit="files") as advance,
    ):
        writers = pool if local else upload_pool
        # Files go to the threads a few at a time: per file, a task costs about what its hashing does.
        chunks = [to_hash[k : k + _FILES_PER_TASK] for k in range(0, len(to_hash), _FILES_PER_TASK)]
        for i, scanned, digest, written in itertools.chain.from_iterable(pool.map(hash_some, chunks)):
            files[i] = scanned
            digests[i] = digest
            advance(1)
            if local:
                results.append(written)
            elif claim(digest):
                blob_futures.append(upload_pool.submit(store_one, digest, scanned))
        known = [d for d in digests if d is not None]
        assert len(known) == len(files)

        entries = [
            SnapshotEntry(path=f.path, mode=f.mode, size=f.size, digest=d)
            for f, d in zip(files, known, strict=True)
        ]
        entries += [SnapshotEntry(path=link.path, link=link.target) for link in scan.links]
        snapshot = Snapshot.from_entries(entries)

        # Blobs are stored before their manifest, so a stored manifest means every blob is there
        # and the files known from the stat cache need no lookup at all.
        manifest_stored = store.has_manifest(snapshot.id)
        if not manifest_stored:
            for f, d in zip(files, known, strict=True):
                if claim(d):
                    blob_futures.append(writers.submit(store_one, d, f))
        if blob_futures:
            with progress.step(
                f"Storing {len(blob_futures)} new files", total=len(blob_futures), unit="files"
            ) as stored:
                for future in blob_futures:
                    results.append(future.result())
                    stored(1)
        if not manifest_stored:
            tree_bytes = store.put_trees(snapshot, batch)
    # Leaving the batch made the blobs and directory nodes durable and gave them their names; the
    # manifest's root is named last.

    written_blobs = [w for w in results if w is not None]
    blobs_written = len(written_blobs)
    bytes_written = sum(written_blobs)
    manifest_bytes = 0 if manifest_stored else tree_bytes + store.put_manifest(snapshot)
    bytes_written += manifest_bytes

    if cache is not None:
        cache.save(
            ((f.path, _stat_key(f), d) for f, d in zip(files, known, strict=True)),
            now_ns=started_ns,
            last=(_fingerprint(files, known, scan), snapshot.id),
        )
        warnings.extend(cache.warnings)
    _log_snapshot(snapshot, scan, len(to_hash), blobs_written, bytes_written)
    return SnapshotResult(
        snapshot=snapshot,
        bytes_written=bytes_written,
        blobs_written=blobs_written,
        warnings=tuple(warnings),
        files_hashed=len(to_hash),
        manifest_bytes=manifest_bytes,
    )


# Raised whenever what a snapshot's entries are checked against changes (a stricter manifest validation),
# so that a tree last snapshotted by an older version is built and checked again.
_FINGERPRINT_VERSION = 1


def _fingerprint(files: list[ScannedFile], digests: list[str], scan: ScanResult) -> str:
    """A digest of every entry a snapshot is built from: path, mode, stat data and content digest of each
    file, path and target of each link, in scan order. Records are NUL-separated and begin with their kind,
    and no field holds a NUL, so two different listings never give the same text."""
    parts = [f"v{MANIFEST_VERSION}.{_FINGERPRINT_VERSION}"]
    parts += [
        f"F\0{f.path}\0{f.mode}\0{_stat_key(f).stamp()}\0{d}" for f, d in zip(files, digests, strict=True)
    ]
    parts += [f"L\0{link.path}\0{link.target}" for link in scan.links]
    return blake3.blake3("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def _last_snapshot(
    scan: ScanResult,
    files: list[ScannedFile],
    digests: list[str | None],
    last: tuple[str, str],
    store: BlobStore,
) -> Snapshot | None:
    """The root's last snapshot, when every file's digest came from the stat cache and the entries are those
    it was built from (and validated) last time, and the store still holds it; None otherwise.

    Its manifest is not built or validated again: the fingerprint vouches that the entries are the same.
    """
    known = [d for d in digests if d is not None]
    fingerprint, snapshot_id = last
    if len(known) != len(files) or not is_digest(snapshot_id) or not all(map(is_digest, known)):
        return None
    if _fingerprint(files, known, scan) != fingerprint or not store.has_manifest(snapshot_id):
        return None
    entries = [
        SnapshotEntry(path=f.path, mode=f.mode, size=f.size, digest=d)
        for f, d in zip(files, known, strict=True)
    ]
    entries += [SnapshotEntry(path=link.path, link=link.target) for link in scan.links]
    return Snapshot(id=snapshot_id, entries=tuple(sorted(entries, key=lambda e: e.path)))


def _log_snapshot(snapshot: Snapshot, scan: ScanResult, hashed: int, blobs: int, written: int) -> None:
    log.info(
        "Snapshot %s of %s: %d files, %d bytes; hashed %d files, wrote %d blobs (%d bytes).",
        snapshot.id,
        scan.root,
        snapshot.file_count,
        snapshot.total_bytes,
        hashed,
        blobs,
        written,
    )


def _stat_key(f: ScannedFile) -> StatKey:
    return StatKey(size=f.size, mtime_ns=f.mtime_ns, ctime_ns=f.ctime_ns, inode=f.inode)


def _with_stat(f: ScannedFile, st: os.stat_result) -> ScannedFile:
    return ScannedFile(
        path=f.path,
        source=f.source,
        size=st.st_size,
        mode=normalize_mode(st.st_mode),
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        inode=st.st_ino,
        device=st.st_dev,
    )


def _changed(f: ScannedFile) -> SourceChangedError:
    return SourceChangedError(
        f"File {f.path!r} kept changing while it was being snapshotted; stop the process writing to "
        "it (or exclude it in the ignore file) and retry."
    )


def _hash_stable(f: ScannedFile, fd: int) -> tuple[ScannedFile, str]:
    # The stat data recorded next to a digest must describe the bytes that were hashed, or the stat
    # cache would vouch for content it never saw. Everything goes through one descriptor: a file
    # replaced by rename meanwhile does not matter (we keep reading the old inode consistently);
    # an in-place write shows in fstat, and then we hash again.
    before = _with_stat(f, os.fstat(fd))
    for _ in range(_CHANGE_RETRIES):
        digest = hash_fd(fd, before.size)
        after = _with_stat(f, os.fstat(fd))
        if _stat_key(after) == _stat_key(before):
            return after, digest
        before = after
    raise _changed(f)


def _store_blob(
    store: BlobStore,
    digest: str,
    f: ScannedFile,
    scan: ScanResult,
    batch: BlobBatch,
    src: BinaryIO | None = None,
) -> int | None:
    """Store one blob unless present; the bytes written, or ``None`` if it was there.

    :param src: the source file, open already (as it was hashed); else it is opened here.
    """
    if store.has(digest):
        return None
    with contextlib.nullcontext(src) if src is not None else _open_source(f, scan) as source:
        fd = source.fileno()

        # The bytes copied must be the bytes hashed: same inode, size and times as when hashed,
        # both when the copy starts (a descriptor just hashed has just been checked) and when it is
        # about to be published.
        def unchanged() -> None:
            if _stat_key(_with_stat(f, os.fstat(fd))) != _stat_key(f):
                raise _changed(f)

        if src is None:
            unchanged()
        try:
            return store.put_fd(digest, fd, size=f.size, before_publish=unchanged, batch=batch)
        except (SourceChangedError, BlobCorruptError) as err:
            # The store refused a copy that differs from what was hashed (another length, other bytes):
            # say which file it was. The check above already names it.
            if isinstance(err, SourceChangedError) and err.args == _changed(f).args:
                raise
            raise SourceChangedError(
                f"File {f.path!r} in source directory {scan.root!r}: {err} Stop the process writing it, or "
                f'add "{ignore_line_for(f.path, False)}" to {_ignore_file(scan)} if the run does not need it; '
                "then submit again."
            ) from None


def _open_source(f: ScannedFile, scan: ScanResult) -> BinaryIO:
    """Open a scanned file for reading; one that vanished or cannot be read is an error naming it."""
    try:
        # Non-blocking: should a FIFO have replaced the file since the scan, opening it must not hang.
        return open(f.source, "rb", opener=_nonblocking)
    except OSError as exc:
        raise _unreadable(f, scan, exc) from None


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)


def _unreadable(f: ScannedFile, scan: ScanResult, exc: OSError) -> SourceUnreadableError:
    shown = f.path if f.source == os.path.join(scan.root, *f.path.split("/")) else f"{f.path} -> {f.source}"
    exclude = f'add "{ignore_line_for(f.path, False)}" to {_ignore_file(scan)}'
    if isinstance(exc, FileNotFoundError):
        problem = "was listed, then deleted or renamed before it could be read"
        fix = f"If a process writes or removes files there, stop it or {exclude}; then submit again."
    elif isinstance(exc, PermissionError):
        problem = f"cannot be read by this process (user id {os.getuid()}): permission denied"
        fix = f"Make it readable (chmod a+r), or {exclude} if the run does not need it."
    else:
        problem = f"cannot be read ({exc.strerror or exc})"
        fix = f"Check the file and its disk, or {exclude} if the run does not need it."
    return SourceUnreadableError(
        f"File {shown!r} in source directory {scan.root!r} {problem}. Nothing was recorded. {fix}"
    )


def _ignore_file(scan: ScanResult) -> str:
    return AMLIGNORE if scan.ignore_file == AMLIGNORE else "the root .gitignore"


def check_included(scan: ScanResult, path: str, what: str) -> None:
    """Raise :class:`ExcludedFileError` unless the scan holds ``path`` (as a file, or through a link).

    :param scan: the scan of the source directory.
    :param path: the path relative to the scanned root.
    :param what: what the path is for, as the message names it (``"the run's script"``).
    """
    rel = posixpath.normpath(path.replace(os.sep, "/"))
    if _holds(scan, rel):
        return
    exclusion = find_exclusion(scan.root, rel)
    if exclusion is None:
        related = [w for w in scan.warnings if any(part in w for part in _prefixes(rel))]
        detail = f" The scan said: {' '.join(related)}" if related else ""
        raise ExcludedFileError(
            f"{what.capitalize()} {rel!r} is not in the snapshot of {scan.root!r}, so the run would not "
            f"find it.{detail} Nothing was stored or recorded."
        )
    if exclusion.rule is not None:
        if exclusion.is_dir:
            fix = (
                f"Remove or narrow that line, or re-include the folder with "
                f'"!{ignore_line_for(exclusion.path, True)}" after it in {exclusion.rule.source} (git cannot '
                "re-include a file inside an excluded folder)."
            )
        else:
            fix = (
                f'Remove or narrow that line, or re-include the file with "!{ignore_line_for(rel, False)}" '
                f"after it in {exclusion.rule.source}."
            )
    else:
        fix = (
            f"Move it out of {exclusion.path + '/'!r}, or re-include that folder with "
            f'"!{ignore_line_for(exclusion.path, True)}" in {_ignore_file(scan)}.'
        )
    raise ExcludedFileError(
        f"{what.capitalize()} {rel!r} is excluded from the snapshot of {scan.root!r} by "
        f"{exclusion.describe()}, so the run would not find it. Nothing was stored or recorded. {fix}"
    )


def _holds(scan: ScanResult, rel: str) -> bool:
    files = {f.path for f in scan.files}
    links = {link.path: link.target for link in scan.links}
    # A path through links kept as links: follow them as the run directory will (bounded, like the OS).
    for _ in range(40):
        if rel in files:
            return True
        if rel in links:
            rel = posixpath.normpath(posixpath.join(posixpath.dirname(rel), links[rel]))
            continue
        parts = rel.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in links:
                target = posixpath.join(posixpath.dirname(prefix), links[prefix], *parts[i:])
                rel = posixpath.normpath(target)
                break
        else:
            return False
    return False


def _prefixes(rel: str) -> list[str]:
    parts = rel.split("/")
    return [repr("/".join(parts[: i + 1])) for i in range(len(parts))]


def check_limits(scan: ScanResult, *, max_total_bytes: int, max_files: int) -> None:
    """Raise :class:`SnapshotTooLargeError` if the scanned files exceed a limit; do nothing otherwise."""
    total = scan.total_bytes
    count = len(scan.files)
    if total <= max_total_bytes and count <= max_files:
        return
    by_count = total <= max_total_bytes  # only the file count is over: rank by count
    dir_sizes: dict[str, int] = defaultdict(int)
    dir_counts: dict[str, int] = defaultdict(int)
    for f in scan.files:
        parent = posixpath.dirname(f.path)
        while parent:
            dir_sizes[parent] += f.size
            dir_counts[parent] += 1
            parent = posixpath.dirname(parent)

    def rank(path: str) -> tuple[int, int, str]:
        primary, secondary = (dir_counts[path], dir_sizes[path]) if by_count else (dir_sizes[path], 0)
        return (-primary, -secondary, path)

    chosen: list[str] = []
    for path in sorted(dir_sizes, key=rank):
        # "a" and "a/b" with the same content say the same thing; keep the shallower one.
        if any(
            _is_ancestor(c, path) and (dir_sizes[c], dir_counts[c]) == (dir_sizes[path], dir_counts[path])
            for c in chosen
        ):
            continue
        chosen.append(path)
        if len(chosen) == _REPORTED_OFFENDERS:
            break
    largest_dirs = [
        SizeOffender(p, dir_sizes[p], dir_counts[p], True, ignore_line_for(p, True)) for p in chosen
    ]
    largest_files = [
        SizeOffender(f.path, f.size, 1, False, ignore_line_for(f.path, False))
        for f in sorted(scan.files, key=lambda f: (-f.size, f.path))[:_REPORTED_OFFENDERS]
    ]
    raise SnapshotTooLargeError(
        source_dir=scan.root,
        total_bytes=total,
        file_count=count,
        max_total_bytes=max_total_bytes,
        max_files=max_files,
        largest_files=largest_files,
        largest_dirs=largest_dirs,
        ignore_file=AMLIGNORE if scan.ignore_file == AMLIGNORE else "the root .gitignore",
    )


def _is_ancestor(parent: str, path: str) -> bool:
    return path.startswith(parent + "/")
