"""A resubmission of an unchanged tree: its last snapshot comes back without building its manifest again,
and any change the stat cache alone cannot see (a file gone, a link retargeted) still gives a new one."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from airflow_amlrun.snapshot import BlobStore, Snapshot, statcache, take_snapshot
from airflow_amlrun.snapshot import snapshot as snapshot_module

OLD = 1_600_000_000


@pytest.fixture(autouse=True)
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # Files written by the test are trusted from the stat cache at once; the window has tests of its own.
    monkeypatch.setattr(statcache, "RACY_WINDOW_NS", 0)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel, text in {"train.py": "print(1)\n", "lib/a.py": "A = 1\n", "lib/b.py": "B = 2\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        os.utime(root / rel, (OLD, OLD))
    os.symlink("a.py", root / "lib" / "current.py")
    return root


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(str(tmp_path / "store"))


def rebuilt(result_snapshot: Snapshot) -> Snapshot:
    """The snapshot a full build gives for the same entries."""
    return Snapshot.from_entries(result_snapshot.entries)


def test_an_unchanged_tree_gives_its_last_snapshot_without_building_it(
    source: Path, store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache.sqlite"
    first = take_snapshot(source, store, stat_cache_path=cache)

    def no_build(*args: object, **kwargs: object) -> Snapshot:
        raise AssertionError("the manifest of an unchanged tree was built again")

    monkeypatch.setattr(snapshot_module.Snapshot, "from_entries", no_build)
    again = take_snapshot(source, store, stat_cache_path=cache)
    monkeypatch.undo()
    assert again.snapshot.id == first.snapshot.id
    assert again.snapshot.entries == first.snapshot.entries
    assert rebuilt(again.snapshot).id == again.snapshot.id
    assert (again.files_hashed, again.bytes_written, again.manifest_bytes) == (0, 0, 0)


def test_a_deleted_file_gives_a_new_snapshot(source: Path, store: BlobStore, tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    first = take_snapshot(source, store, stat_cache_path=cache)
    (source / "lib" / "b.py").unlink()
    second = take_snapshot(source, store, stat_cache_path=cache)
    assert second.files_hashed == 0  # every remaining digest came from the cache
    assert second.snapshot.id != first.snapshot.id
    assert "lib/b.py" not in {e.path for e in second.snapshot.entries}
    assert rebuilt(second.snapshot).id == second.snapshot.id
    assert store.has_manifest(second.snapshot.id)


def test_a_retargeted_link_gives_a_new_snapshot(source: Path, store: BlobStore, tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    first = take_snapshot(source, store, stat_cache_path=cache)
    (source / "lib" / "current.py").unlink()
    os.symlink("b.py", source / "lib" / "current.py")
    second = take_snapshot(source, store, stat_cache_path=cache)
    assert second.snapshot.id != first.snapshot.id
    link = next(e for e in second.snapshot.entries if e.path == "lib/current.py")
    assert link.link == "b.py"
    assert store.has_manifest(second.snapshot.id)


def test_a_store_that_lost_the_manifest_gets_it_written_again(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    cache = tmp_path / "cache.sqlite"
    first = take_snapshot(source, store, stat_cache_path=cache)
    (tmp_path / "store" / store.manifest_key(first.snapshot.id)).unlink()
    again = take_snapshot(source, store, stat_cache_path=cache)
    assert again.snapshot.id == first.snapshot.id
    assert again.manifest_bytes > 0
    assert store.has_manifest(first.snapshot.id)


def test_racily_recent_files_leave_no_last_snapshot_to_vouch_for_them(
    source: Path, store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statcache, "RACY_WINDOW_NS", 10**18)  # every file counts as just written
    cache = tmp_path / "cache.sqlite"
    take_snapshot(source, store, stat_cache_path=cache)
    with sqlite3.connect(cache) as conn:
        assert conn.execute("SELECT count(*) FROM last_snapshot").fetchone() == (0,)
    assert take_snapshot(source, store, stat_cache_path=cache).files_hashed == 3


def test_a_stat_cache_written_before_it_remembered_snapshots_still_serves(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    cache = tmp_path / "cache.sqlite"
    first = take_snapshot(source, store, stat_cache_path=cache)
    with sqlite3.connect(cache) as conn:
        conn.execute("DROP TABLE last_snapshot")
    again = take_snapshot(source, store, stat_cache_path=cache)
    assert (again.snapshot.id, again.files_hashed) == (first.snapshot.id, 0)
    with sqlite3.connect(cache) as conn:
        assert conn.execute("SELECT snapshot_id FROM last_snapshot").fetchall() == [(first.snapshot.id,)]


def test_a_last_snapshot_row_naming_no_valid_id_is_not_trusted(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    cache = tmp_path / "cache.sqlite"
    first = take_snapshot(source, store, stat_cache_path=cache)
    with sqlite3.connect(cache) as conn:
        conn.execute("UPDATE last_snapshot SET snapshot_id = '../../etc'")
    again = take_snapshot(source, store, stat_cache_path=cache)
    assert again.snapshot.id == first.snapshot.id == rebuilt(again.snapshot).id


def test_a_digest_the_cache_changed_is_not_covered_by_the_last_snapshot(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    # The cache now says lib/a.py holds what lib/b.py holds (as if the file changed within its stat data):
    # the entries differ from those the last snapshot was built from, so it is built anew, from them.
    cache = tmp_path / "cache.sqlite"
    first = take_snapshot(source, store, stat_cache_path=cache)
    digest_b = next(e.digest for e in first.snapshot.entries if e.path == "lib/b.py")
    with sqlite3.connect(cache) as conn:
        conn.execute("UPDATE stat_cache SET digest = ? WHERE path = 'lib/a.py'", (digest_b,))
    second = take_snapshot(source, store, stat_cache_path=cache)
    assert second.files_hashed == 0
    assert second.snapshot.id != first.snapshot.id == rebuilt(first.snapshot).id
    assert next(e.digest for e in second.snapshot.entries if e.path == "lib/a.py") == digest_b
    assert rebuilt(second.snapshot).id == second.snapshot.id


def test_a_last_snapshot_written_to_another_store_is_complete(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    cache = tmp_path / "cache.sqlite"
    take_snapshot(source, store, stat_cache_path=cache)
    unchanged = take_snapshot(source, store, stat_cache_path=cache).snapshot
    other = BlobStore(str(tmp_path / "other"))
    for entry in unchanged.entries:
        if entry.digest is not None:
            other.put_bytes(store.get_bytes(entry.digest))
    other.put_manifest(unchanged)
    assert other.get_manifest(unchanged.id).entries == unchanged.entries
