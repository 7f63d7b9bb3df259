"""What differs between two snapshots: files added, removed and changed, and a unified diff of a text file."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from airflow_amlrun.snapshot.manifest import Snapshot, SnapshotEntry

# A file is shown as text, and diffed, up to this size.
TEXT_LIMIT = 1 << 20


@dataclass(frozen=True)
class SnapshotDiff:
    """Paths only in the second snapshot (added), only in the first (removed), and in both but different."""

    added: list[str]
    removed: list[str]
    changed: list[str]


def compare(a: Snapshot, b: Snapshot) -> SnapshotDiff:
    """The paths by which snapshot `b` differs from `a` (content, mode or link target), each list sorted."""
    old = {e.path: e for e in a.entries}
    new = {e.path: e for e in b.entries}
    return SnapshotDiff(
        added=sorted(new.keys() - old.keys()),
        removed=sorted(old.keys() - new.keys()),
        changed=sorted(p for p in old.keys() & new.keys() if _key(old[p]) != _key(new[p])),
    )


def _key(entry: SnapshotEntry) -> tuple[str | None, str | None, int]:
    return entry.digest, entry.link, entry.mode


def as_text(data: bytes) -> str | None:
    """The bytes as text if they are UTF-8 without NUL bytes and at most TEXT_LIMIT long, else None."""
    if len(data) > TEXT_LIMIT or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def unified(path: str, old: str | None, new: str | None, *, context: int = 3) -> str:
    """A unified diff of one file between two snapshots; a file absent on one side diffs against nothing."""
    return "".join(
        difflib.unified_diff(
            (old or "").splitlines(keepends=True),
            (new or "").splitlines(keepends=True),
            fromfile=f"a/{path}" if old is not None else "/dev/null",
            tofile=f"b/{path}" if new is not None else "/dev/null",
            n=context,
        )
    )
