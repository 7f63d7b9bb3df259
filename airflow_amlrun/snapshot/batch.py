"""When a local write becomes durable, and when it gets its name: the flush modes and :class:`BlobBatch`.

On a local folder, content-addressed objects (blobs, manifest nodes) are durable before they get their
names: "already there" is all a later snapshot checks, so a name must never hold bytes that a power
loss could take back. A snapshot's blobs are flushed together (one ``syncfs`` for the batch), a lone blob
with ``fdatasync``, and a manifest is named only after everything it refers to is durable. Generic objects
are not flushed: they are plain files, and nothing trusts them by name.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Literal

from airflow_amlrun.snapshot.diskio import sync_filesystem

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
