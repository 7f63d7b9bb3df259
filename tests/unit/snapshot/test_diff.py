"""What differs between two runs' code: files added, removed and changed, and a text file's unified diff."""

from __future__ import annotations

from airflow_amlrun.snapshot import Snapshot, SnapshotEntry, hash_bytes
from airflow_amlrun.snapshot.diff import TEXT_LIMIT, as_text, compare, unified


def _snapshot(
    files: dict[str, bytes], links: dict[str, str] | None = None, modes: dict[str, int] | None = None
):
    entries = [
        SnapshotEntry(path, mode=(modes or {}).get(path, 0o644), size=len(data), digest=hash_bytes(data))
        for path, data in files.items()
    ]
    entries += [SnapshotEntry(path, link=target) for path, target in (links or {}).items()]
    return Snapshot.from_entries(entries)


def test_files_added_removed_and_changed_are_told_apart():
    a = _snapshot(
        {"train.py": b"a = 1\n", "old.txt": b"x", "same.txt": b"s", "run.sh": b"go"}, {"l": "same.txt"}
    )
    b = _snapshot(
        {"train.py": b"a = 2\n", "new.txt": b"y", "same.txt": b"s", "run.sh": b"go"},
        {"l": "train.py"},
        modes={"run.sh": 0o755},
    )
    found = compare(a, b)
    assert (found.added, found.removed, found.changed) == (
        ["new.txt"],
        ["old.txt"],
        ["l", "run.sh", "train.py"],
    )
    assert compare(a, a) == type(found)([], [], [])


def test_a_unified_diff_shows_the_changed_lines_and_a_new_file_against_nothing():
    assert unified("train.py", "a = 1\nb = 2\n", "a = 1\nb = 3\n") == (
        "--- a/train.py\n+++ b/train.py\n@@ -1,2 +1,2 @@\n a = 1\n-b = 2\n+b = 3\n"
    )
    assert unified("new.py", None, "x\n").startswith("--- /dev/null\n+++ b/new.py\n")
    assert unified("same.py", "x\n", "x\n") == ""


def test_only_utf8_text_within_the_limit_is_shown_as_text():
    assert as_text("naïve\n".encode()) == "naïve\n"
    assert as_text(b"\xff\xfe") is None
    assert as_text(b"a\0b") is None
    assert as_text(b"a" * (TEXT_LIMIT + 1)) is None
