"""A persistent stat cache so an unchanged file is not re-read: (path, size, mtime, ctime, inode) -> digest.

The ctime is part of the key because a process can put a file's old mtime back after changing it
(``touch -d``, ``os.utime``, an unpacking tool), but nothing can set the ctime: any such change moves it.

SQLite in WAL mode makes the cache safe to share between processes; each snapshot replaces its root's
rows in one transaction. Beside the digests, the cache remembers the root's last snapshot: its id and a
fingerprint of every entry it was built from (path, mode, stat data, digest, link target), so that an
unchanged tree is known to give that same snapshot without building and validating its manifest again.

The cache is advisory: if it cannot be opened or written, snapshots still work (every file is hashed) and a
warning says why. It is trusted as the store is: it lives in the workspace's cache folder, which only the
worker's user writes, and what it says of a file (its digest) or of a tree (its last snapshot) is taken
without reading the files again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A file modified within this window of being hashed may change again within the same timestamp tick
# without its stat data changing ("racy git"); such entries are not trusted on the next snapshot. Both
# times count: a change of content with the old mtime put back leaves only a recent ctime.
RACY_WINDOW_NS = 1_000_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stat_cache (
    root TEXT NOT NULL,
    path TEXT NOT NULL,
    stamp TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (root, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_snapshot (
    root TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    snapshot_id TEXT NOT NULL
) WITHOUT ROWID
"""


@dataclass(frozen=True)
class StatKey:
    """The stat data a cached digest is valid for."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    def stamp(self) -> str:
        """The key as stored (text, since inode numbers may exceed SQLite's signed 64-bit integers)."""
        return f"{self.size}:{self.mtime_ns}:{self.ctime_ns}:{self.inode}"

    @property
    def changed_ns(self) -> int:
        """When the file last changed, by either of its times."""
        return max(self.mtime_ns, self.ctime_ns)


class StatCache:
    """Digests of files under one source root, remembered between snapshots in a SQLite file."""

    def __init__(self, path: str | os.PathLike[str], root: str) -> None:
        self.path = os.fspath(path)
        self.root = root
        self.warnings: list[str] = []
        self._entries: dict[str, tuple[str, str]] = {}
        # (fingerprint, snapshot id) of the root's last snapshot.
        self.last: tuple[str, str] | None = None
        try:
            with contextlib.closing(self._connect()) as conn:
                rows = conn.execute(
                    "SELECT path, stamp, digest FROM stat_cache WHERE root = ?", (root,)
                ).fetchall()
                last = conn.execute(
                    "SELECT fingerprint, snapshot_id FROM last_snapshot WHERE root = ?", (root,)
                ).fetchone()
            self._entries = {p: (stamp, digest) for p, stamp, digest in rows}
            self.last = (str(last[0]), str(last[1])) if last is not None else None
        except sqlite3.Error as exc:
            self._warn(f"Stat cache {self.path!r} cannot be read ({exc}); every file will be hashed.")

    def get(self, rel_path: str, key: StatKey) -> str | None:
        """The cached digest of ``rel_path`` if its stat data still match ``key``."""
        hit = self._entries.get(rel_path)
        if hit is not None and hit[0] == key.stamp():
            return hit[1]
        return None

    def save(
        self,
        entries: Iterable[tuple[str, StatKey, str]],
        *,
        now_ns: int | None = None,
        last: tuple[str, str] | None = None,
    ) -> None:
        """Replace this root's rows with ``(path, stat key, digest)``, skipping racily-recent files.

        :param last: the snapshot just taken, as (fingerprint, snapshot id); remembered only when every
            entry could be kept (none racily recent), so that a match vouches for all of them.
        """
        cutoff = (time.time_ns() if now_ns is None else now_ns) - RACY_WINDOW_NS
        listed = [(p, k, d) for p, k, d in entries]
        rows = [(self.root, p, k.stamp(), d) for p, k, d in listed if k.changed_ns < cutoff]
        if len(rows) < len(listed):
            last = None
        if (
            last == self.last
            and len(rows) == len(self._entries)
            and all(self._entries.get(p) == (k, d) for _, p, k, d in rows)
        ):
            return  # what is stored already: an unchanged tree writes nothing
        try:
            with contextlib.closing(self._connect()) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("DELETE FROM stat_cache WHERE root = ?", (self.root,))
                conn.executemany("INSERT INTO stat_cache VALUES (?, ?, ?, ?)", rows)
                conn.execute("DELETE FROM last_snapshot WHERE root = ?", (self.root,))
                if last is not None:
                    conn.execute("INSERT INTO last_snapshot VALUES (?, ?, ?)", (self.root, *last))
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._warn(f"Stat cache {self.path!r} cannot be written ({exc}); the next snapshot re-hashes.")

    def _connect(self) -> sqlite3.Connection:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # The cache is advisory; an fsync here would make ext4 flush every blob just written.
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(_SCHEMA)
        return conn

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message)
