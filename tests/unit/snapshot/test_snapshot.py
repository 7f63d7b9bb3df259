"""Snapshots as a user submitting code sees them: what gets stored, what it costs, what comes back."""

from __future__ import annotations

import importlib
import json
import logging
import os
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from airflow_amlrun.snapshot import (
    BlobCorruptError,
    BlobMissingError,
    BlobStore,
    DestinationNotEmptyError,
    ExcludedFileError,
    InvalidKeyError,
    Snapshot,
    SnapshotEntry,
    SnapshotTooLargeError,
    SourceChangedError,
    SourceDirectoryError,
    SourceUnreadableError,
    UnsafeManifestError,
    hash_bytes,
    materialize,
    restore_snapshot,
    take_snapshot,
)

OLD = 1_600_000_000  # an mtime well outside the stat cache's "racy" window


def write_tree(root: Path, files: dict[str, bytes | str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
        os.utime(path, (OLD, OLD))


def past_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take this test's snapshots as if the stat cache's racy window had passed since its files were written.

    A file's ctime cannot be set back like its mtime: a tree written just now is trusted from the stat cache
    only once its ctimes are older than the window (a second). Rather than wait, the snapshots' clock reads a
    window and a tick ahead, which is all the cache sees of the wait (the test of a file rewritten within
    the same tick keeps the real clock).
    """
    from airflow_amlrun.snapshot.statcache import RACY_WINDOW_NS

    ahead = types.SimpleNamespace(time_ns=lambda: time.time_ns() + RACY_WINDOW_NS + 10_000_000)
    monkeypatch.setattr(importlib.import_module("airflow_amlrun.snapshot.snapshot"), "time", ahead)


def sample_tree(root: Path) -> None:
    write_tree(
        root,
        {
            "train.py": "print('train')\n",
            "conf/params.json": '{"lr": 0.1}',
            "lib/util.py": "def f():\n    return 1\n",
            "lib/same_as_util.py": "def f():\n    return 1\n",
            "data/weights.bin": os.urandom(300_000),
            "empty.txt": b"",
            ".gitignore": "*.tmp\n",
            "scratch.tmp": "ignored",
        },
    )
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    os.utime(root / "run.sh", (OLD, OLD))


def tree_contents(root: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """Every file and link under ``root``: kind, content or link target, normalized mode."""
    found: dict[str, tuple[str, bytes | str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path), 0)
            elif path.is_file():
                mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
                found[rel] = ("file", path.read_bytes(), mode)
    return found


def all_blobs_are_sound(store_dir: Path) -> int:
    count = 0
    for blob in (store_dir / "blobs").rglob("*"):
        if blob.is_file():
            assert not blob.name.startswith(".amlrun-tmp-"), f"temporary file left behind: {blob}"
            assert hash_bytes(blob.read_bytes()) == blob.name, f"blob {blob} does not match its name"
            assert blob.parent.name == blob.name[:2]
            count += 1
    return count


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    sample_tree(root)
    return root


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(str(tmp_path / "store"))


# ---------------------------------------------------------------- taking snapshots


def test_a_snapshot_records_every_included_file_with_its_hash(source: Path, store: BlobStore) -> None:
    result = take_snapshot(source, store)
    snap = result.snapshot
    paths = [e.path for e in snap.entries]
    assert paths == sorted(paths)
    assert "scratch.tmp" not in paths
    by_path = {e.path: e for e in snap.entries}
    assert by_path["train.py"].digest == hash_bytes(b"print('train')\n")
    assert by_path["run.sh"].mode == 0o755
    assert by_path["train.py"].mode == 0o644
    assert snap.file_count == 8
    files = [p for p in source.rglob("*") if p.is_file() and p.name != "scratch.tmp"]
    assert snap.total_bytes == sum(p.stat().st_size for p in files)
    # Identical files share one blob.
    assert result.blobs_written == 7
    assert snap.id == hash_bytes(snap.to_json().encode())
    assert store.get_manifest(snap.id) == snap


def test_the_snapshot_id_depends_only_on_content(tmp_path: Path, store: BlobStore) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    sample_tree(a)
    sample_tree(b)
    (b / "data/weights.bin").write_bytes((a / "data/weights.bin").read_bytes())
    assert take_snapshot(a, store).snapshot.id == take_snapshot(b, store).snapshot.id


def test_resubmitting_unchanged_code_writes_nothing(source: Path, store: BlobStore, tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    first = take_snapshot(source, store, stat_cache_path=cache)
    again = take_snapshot(source, store, stat_cache_path=cache)
    assert first.bytes_written > 0
    assert again.snapshot.id == first.snapshot.id
    assert (again.bytes_written, again.blobs_written, again.manifest_bytes) == (0, 0, 0)


def test_unchanged_files_are_not_read_again_with_a_stat_cache(
    source: Path, store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache.sqlite"
    past_racy_window(monkeypatch)
    assert take_snapshot(source, store, stat_cache_path=cache).files_hashed == 8
    assert take_snapshot(source, store, stat_cache_path=cache).files_hashed == 0
    # Without the cache every file is read, but the store still receives nothing new.
    uncached = take_snapshot(source, store)
    assert (uncached.files_hashed, uncached.bytes_written) == (8, 0)


def test_changing_one_file_writes_that_file_and_a_manifest(
    source: Path, store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache.sqlite"
    past_racy_window(monkeypatch)
    first = take_snapshot(source, store, stat_cache_path=cache)
    new_content = b"print('train v2')\n"
    (source / "train.py").write_bytes(new_content)
    second = take_snapshot(source, store, stat_cache_path=cache)
    assert second.snapshot.id != first.snapshot.id
    assert second.files_hashed == 1
    assert second.blobs_written == 1
    assert second.bytes_written == len(new_content) + second.manifest_bytes
    assert second.manifest_bytes == len(second.snapshot.to_json().encode())


def test_a_file_rewritten_with_the_same_size_and_mtime_tick_is_still_rehashed(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    # Files modified just before a snapshot are not trusted from the cache next time ("racy git").
    cache = tmp_path / "cache.sqlite"
    target = source / "train.py"
    target.write_text("version A\n")
    take_snapshot(source, store, stat_cache_path=cache)
    st = target.stat()
    target.write_text("version B\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = take_snapshot(source, store, stat_cache_path=cache)
    entry = next(e for e in second.snapshot.entries if e.path == "train.py")
    assert entry.digest == hash_bytes(b"version B\n")


def test_a_file_changed_with_its_old_mtime_put_back_is_rehashed(
    source: Path, store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An old, cached file rewritten with the same size and its mtime set back: only the ctime moved.
    cache = tmp_path / "cache.sqlite"
    past_racy_window(monkeypatch)
    take_snapshot(source, store, stat_cache_path=cache)
    target = source / "conf/params.json"
    target.write_text('{"lr": 0.9}')
    os.utime(target, (OLD, OLD))
    second = take_snapshot(source, store, stat_cache_path=cache)
    entry = next(e for e in second.snapshot.entries if e.path == "conf/params.json")
    assert entry.digest == hash_bytes(b'{"lr": 0.9}')
    assert second.files_hashed == 1


def test_a_missing_source_directory_is_reported(tmp_path: Path, store: BlobStore) -> None:
    with pytest.raises(SourceDirectoryError, match="does-not-exist"):
        take_snapshot(tmp_path / "does-not-exist", store)


def test_a_special_file_whose_size_says_nothing_is_refused_not_stored_corrupt(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    # /proc files report size 0 and read as more: the copy must not be published under the digest hashed.
    (source / "kernel.txt").symlink_to("/proc/version")
    with pytest.raises(SourceChangedError) as caught:
        take_snapshot(source, store)
    message = str(caught.value)
    assert "'kernel.txt'" in message and "special file" in message
    assert 'add "/kernel.txt" to the root .gitignore' in message
    all_blobs_are_sound(tmp_path / "store")


def test_the_store_refuses_a_copy_of_another_length_than_was_hashed(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"twelve bytes")
    digest = hash_bytes(b"twelve bytes")
    with pytest.raises(SourceChangedError, match="12 bytes were read, but its size was 13"):
        store.put_file(digest, src, size=13)
    assert not store.has(digest)
    assert list((tmp_path / "store").rglob("*.amlrun-tmp-*")) == [] == store.list("blobs")
    assert store.put_file(digest, src, size=12) == 12


def test_a_file_deleted_between_scan_and_hash_is_named(
    source: Path, store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import airflow_amlrun.snapshot.snapshot as snapshot_module

    real_scan = snapshot_module.scan_tree

    def scan_then_delete(root: str) -> object:
        scan = real_scan(root)
        (source / "lib/util.py").unlink()  # e.g. an editor's or a build's temporary file going away
        return scan

    monkeypatch.setattr(snapshot_module, "scan_tree", scan_then_delete)
    with pytest.raises(SourceUnreadableError) as caught:
        take_snapshot(source, store)
    message = str(caught.value)
    assert "'lib/util.py'" in message and "deleted or renamed" in message
    assert 'add "/lib/util.py" to the root .gitignore' in message


def test_an_unreadable_file_is_named_with_the_fix(source: Path, tmp_path: Path) -> None:
    # Root reads every file: the snapshot runs without the capabilities that bypass file permissions.
    secret = source / "conf" / "private.key"
    secret.write_text("key")
    secret.chmod(0)
    script = (
        "from airflow_amlrun.snapshot import BlobStore, take_snapshot\n"
        f"take_snapshot({str(source)!r}, BlobStore({str(tmp_path / 'store')!r}))\n"
    )
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    done = subprocess.run(
        [*drop, sys.executable, "-c", script],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("airflow_amlrun.snapshot.errors.SourceUnreadableError: File 'conf/private.key'")
    assert "permission denied" in last and "chmod a+r" in last
    assert 'add "/conf/private.key" to the root .gitignore' in last


# ---------------------------------------------------------------- the run's script


def test_a_script_excluded_by_an_ignore_line_is_refused_naming_that_line(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    write_tree(source, {"jobs/.gitignore": "# generated\n*.py\n!keep.py\n", "jobs/train_job.py": "x"})
    with pytest.raises(ExcludedFileError) as caught:
        take_snapshot(source, store, required={"jobs/train_job.py": "the run's script"})
    message = str(caught.value)
    assert "The run's script 'jobs/train_job.py' is excluded" in message
    assert "line 2 of jobs/.gitignore ('*.py')" in message
    assert '"!/jobs/train_job.py"' in message
    assert not (tmp_path / "store").exists()  # checked against the scan: nothing was stored


def test_a_script_in_an_excluded_folder_names_the_folder_rule(source: Path, store: BlobStore) -> None:
    write_tree(source, {".amlignore": "data/\nscripts/\n", "scripts/train.py": "x"})
    with pytest.raises(ExcludedFileError) as caught:
        take_snapshot(source, store, required={"scripts/train.py": "the run's script"})
    message = str(caught.value)
    assert "line 2 of .amlignore ('scripts/'), which matches 'scripts/'" in message
    assert '"!/scripts/"' in message


def test_a_script_in_a_default_excluded_folder_says_so(source: Path, store: BlobStore) -> None:
    write_tree(source, {"outputs/train.py": "x"})
    with pytest.raises(ExcludedFileError, match=r"the root's 'outputs/' folder is where a run writes"):
        take_snapshot(source, store, required={"outputs/train.py": "the run's script"})


def test_a_script_reached_through_a_link_inside_the_tree_is_included(source: Path, store: BlobStore) -> None:
    (source / "current").symlink_to("lib")
    result = take_snapshot(
        source, store, required={"current/util.py": "the run's script", "./train.py": "it"}
    )
    assert "current" in {e.path for e in result.snapshot.entries if e.is_link}


# ---------------------------------------------------------------- limits


def test_too_large_code_fails_before_storing_anything_and_says_what_to_exclude(
    source: Path, store: BlobStore
) -> None:
    write_tree(source, {"data/raw/big1.bin": b"x" * 200_000, "data/raw/big2.bin": b"y" * 150_000})
    with pytest.raises(SnapshotTooLargeError) as caught:
        take_snapshot(source, store, max_total_bytes=500_000)
    message = str(caught.value)
    assert "limit 488.3 KB" in message
    assert 'add "/data/" to the root .gitignore' in message
    assert 'add "/data/raw/big1.bin" to the root .gitignore' in message
    assert "data/raw/" not in [o.path for o in caught.value.largest_dirs]  # same totals as data/
    assert [f.path for f in caught.value.largest_files[:2]] == ["data/weights.bin", "data/raw/big1.bin"]
    assert "195.3 KB" in message
    assert not (Path(store.url) / "blobs").exists()


def test_too_many_files_names_the_crowded_directory_and_the_amlignore(source: Path, store: BlobStore) -> None:
    write_tree(source, {f"cache/item{i}.json": "{}" for i in range(30)})
    write_tree(source, {".amlignore": "*.tmp\n"})
    with pytest.raises(SnapshotTooLargeError) as caught:
        take_snapshot(source, store, max_files=20)
    message = str(caught.value)
    assert "39 files > limit 20" in message
    assert caught.value.largest_dirs[0].path == "cache"
    assert 'cache/  60 B in 30 files  -> add "/cache/" to .amlignore' in message
    assert not (Path(store.url) / "blobs").exists()


# ---------------------------------------------------------------- symlinks


def test_links_inside_the_tree_stay_links(source: Path, store: BlobStore, tmp_path: Path) -> None:
    (source / "conf" / "util_link.py").symlink_to("../lib/util.py")
    (source / "lib_alias").symlink_to("lib")
    (source / "conf" / "abs_link.py").symlink_to(source / "train.py")
    result = take_snapshot(source, store)
    by_path = {e.path: e for e in result.snapshot.entries}
    assert by_path["conf/util_link.py"].link == "../lib/util.py"
    assert by_path["lib_alias"].link == "lib"
    assert by_path["conf/abs_link.py"].link == "../train.py"  # made relative, so it survives a restore
    assert result.warnings == ()
    dest = tmp_path / "restored"
    restore_snapshot(store, result.snapshot.id, dest)
    assert (dest / "conf" / "util_link.py").read_text() == "def f():\n    return 1\n"
    assert os.readlink(dest / "conf" / "abs_link.py") == "../train.py"


def test_links_pointing_outside_are_copied_with_a_warning(
    source: Path, store: BlobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "shared"
    write_tree(shared, {"helpers.py": "H = 1\n", "pkg/mod.py": "M = 2\n"})
    (source / "helpers.py").symlink_to(shared / "helpers.py")
    (source / "shared_pkg").symlink_to(shared / "pkg")
    with caplog.at_level(logging.WARNING):
        result = take_snapshot(source, store)
    by_path = {e.path: e for e in result.snapshot.entries}
    assert by_path["helpers.py"].digest == hash_bytes(b"H = 1\n")
    assert by_path["shared_pkg/mod.py"].digest == hash_bytes(b"M = 2\n")
    assert any("'helpers.py'" in w and "outside" in w for w in result.warnings)
    assert any("'shared_pkg'" in w and "outside" in w for w in result.warnings)
    assert "'helpers.py' points outside" in caplog.text


def test_a_directory_link_cycle_is_skipped_with_a_warning(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    write_tree(outside, {"a.py": "A\n"})
    (outside / "again").symlink_to(outside)  # outside/again/again/... forever
    (source / "ext").symlink_to(outside)
    result = take_snapshot(source, store)
    paths = {e.path for e in result.snapshot.entries}
    assert "ext/a.py" in paths
    assert not any(p.startswith("ext/again") for p in paths)
    assert any("'ext/again'" in w and "cycle" in w for w in result.warnings)


def test_dangling_links_are_skipped_with_a_warning(source: Path, store: BlobStore) -> None:
    (source / "gone.py").symlink_to(source / "never-existed.py")
    (source / "loop").symlink_to("loop")
    result = take_snapshot(source, store)
    paths = {e.path for e in result.snapshot.entries}
    assert "gone.py" not in paths and "loop" not in paths
    assert any("'gone.py'" in w and "dangling" in w for w in result.warnings)
    assert any("'loop'" in w for w in result.warnings)


# ---------------------------------------------------------------- restore and materialize


def test_a_restored_snapshot_is_identical_byte_for_byte(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    (source / "lib_alias").symlink_to("lib")
    snap = take_snapshot(source, store).snapshot
    dest = tmp_path / "restored"
    restore_snapshot(store, snap.id, dest)
    expected = tree_contents(source)
    del expected["scratch.tmp"]
    assert tree_contents(dest) == expected


def test_a_run_directory_comes_from_the_store_not_the_live_tree(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    snap = take_snapshot(source, store).snapshot
    (source / "train.py").write_text("edited after submission\n")
    run_dir = tmp_path / "run"
    materialize(store, snap, run_dir)
    assert (run_dir / "train.py").read_text() == "print('train')\n"
    assert os.access(run_dir / "run.sh", os.X_OK)
    # A copy, not a hard link: a script editing its run directory cannot reach the store.
    assert (run_dir / "train.py").stat().st_nlink == 1
    (run_dir / "train.py").write_text("the run scribbles here\n")
    assert store.get_bytes(hash_bytes(b"print('train')\n")) == b"print('train')\n"


def test_restoring_into_a_non_empty_directory_is_refused(
    source: Path, store: BlobStore, tmp_path: Path
) -> None:
    snap = take_snapshot(source, store).snapshot
    dest = tmp_path / "busy"
    write_tree(dest, {"keep.txt": "mine"})
    with pytest.raises(DestinationNotEmptyError, match="busy"):
        restore_snapshot(store, snap.id, dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_a_missing_blob_names_the_file_and_digest(source: Path, store: BlobStore, tmp_path: Path) -> None:
    snap = take_snapshot(source, store).snapshot
    digest = hash_bytes(b"print('train')\n")
    os.unlink(store.uri_for(store.blob_key(digest)))
    with pytest.raises(BlobMissingError) as caught:
        restore_snapshot(store, snap.id, tmp_path / "r")
    assert "'train.py'" in str(caught.value) and digest in str(caught.value)


def test_a_corrupt_blob_is_caught_on_restore(source: Path, store: BlobStore, tmp_path: Path) -> None:
    snap = take_snapshot(source, store).snapshot
    digest = hash_bytes(b"print('train')\n")
    blob = Path(store.uri_for(store.blob_key(digest)))
    blob.chmod(0o644)
    blob.write_bytes(b"print('evil')\n")
    dest = tmp_path / "r"
    with pytest.raises(BlobCorruptError) as caught:
        restore_snapshot(store, snap.id, dest)
    assert "'train.py'" in str(caught.value) and digest in str(caught.value)
    assert not (dest / "train.py").exists()


def put_raw_manifest(store: BlobStore, entries: list[dict[str, object]]) -> str:
    """Store a hand-written manifest, as an attacker with write access to the store could."""
    data = json.dumps({"entries": entries, "version": 1}, sort_keys=True, separators=(",", ":")).encode()
    snapshot_id = hash_bytes(data)
    store.put_object(f"snapshots/{snapshot_id}.json", data)
    return snapshot_id


@pytest.mark.parametrize(
    ("entries", "named"),
    [
        ([{"path": "../escape.py", "hash": "H", "mode": 420, "size": 4}], "../escape.py"),
        ([{"path": "/etc/cron.d/x", "hash": "H", "mode": 420, "size": 4}], "/etc/cron.d/x"),
        ([{"path": "a/../../x", "hash": "H", "mode": 420, "size": 4}], "a/../../x"),
        ([{"path": "a//x", "hash": "H", "mode": 420, "size": 4}], "a//x"),
        ([{"path": "./x", "hash": "H", "mode": 420, "size": 4}], "./x"),
        (
            [{"path": "d", "link": "/tmp"}, {"path": "d/x", "hash": "H", "mode": 420, "size": 4}],
            "'d'",
        ),
        (
            [{"path": "d", "link": "sub"}, {"path": "d/x", "hash": "H", "mode": 420, "size": 4}],
            "d/x",
        ),
        ([{"path": "up", "link": ".."}], "'up'"),
        ([{"path": "a/up", "link": "../../etc"}], "a/up"),
        ([{"path": "a/sneaky", "link": "b/../../.."}], "a/sneaky"),
        ([{"path": "x", "hash": "../../../etc/passwd", "mode": 420, "size": 4}], "'x'"),
        ([{"path": "x", "hash": "H", "mode": 0o4755, "size": 4}], "'x'"),
        (
            [
                {"path": "x", "hash": "H", "mode": 420, "size": 4},
                {"path": "x/y", "hash": "H", "mode": 420, "size": 4},
            ],
            "x/y",
        ),
        (
            # Folders found clear on the walk up from one path are not walked again from the next.
            [
                {"path": "a/b/c.py", "hash": "H", "mode": 420, "size": 4},
                {"path": "a/b/d.py", "hash": "H", "mode": 420, "size": 4},
                {"path": "a/b/d.py/e/f", "hash": "H", "mode": 420, "size": 4},
            ],
            "a/b/d.py/e/f",
        ),
    ],
)
def test_a_manifest_that_escapes_the_destination_is_refused(
    store: BlobStore, tmp_path: Path, entries: list[dict[str, object]], named: str
) -> None:
    digest = store.put_bytes(b"evil")
    for e in entries:
        if e.get("hash") == "H":
            e["hash"] = digest
    snapshot_id = put_raw_manifest(store, entries)
    dest = tmp_path / "sandbox" / "dest"
    with pytest.raises(UnsafeManifestError) as caught:
        restore_snapshot(store, snapshot_id, dest)
    assert named in str(caught.value)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_safe_hand_written_manifest_with_links_restores(store: BlobStore, tmp_path: Path) -> None:
    digest = store.put_bytes(b"code")
    snapshot_id = put_raw_manifest(
        store,
        [
            {"path": "a/b/c.py", "hash": digest, "mode": 420, "size": 4},
            {"path": "a/b/up", "link": "../.."},
            {"path": "top", "link": "a/b/up/a/b/c.py"},
        ],
    )
    dest = tmp_path / "dest"
    restore_snapshot(store, snapshot_id, dest)
    assert (dest / "top").read_bytes() == b"code"


# ---------------------------------------------------------------- the store


def test_the_store_never_rewrites_a_blob_and_refuses_bad_keys(store: BlobStore, tmp_path: Path) -> None:
    digest = store.put_bytes(b"diff --git a b")
    blob = Path(store.uri_for(store.blob_key(digest)))
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    mtime = blob.stat().st_mtime_ns
    src = tmp_path / "f"
    src.write_bytes(b"diff --git a b")
    assert store.put_file(digest, src) == 0
    assert blob.stat().st_mtime_ns == mtime
    assert store.get_bytes(digest) == b"diff --git a b"
    with pytest.raises(InvalidKeyError):
        store.has("../../etc/passwd")
    with pytest.raises(InvalidKeyError):
        store.put_object("runs/../../x", b"")


def test_put_file_with_verify_refuses_content_that_does_not_match(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"actual")
    with pytest.raises(BlobCorruptError):
        store.put_file(hash_bytes(b"claimed"), src, verify=True)
    assert not store.has(hash_bytes(b"claimed"))
    assert store.list("blobs") == []


def test_run_outputs_round_trip_through_generic_objects(store: BlobStore, tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    write_tree(outputs, {"model.pkl": b"\x00\x01", "plots/loss.png": b"png", "metrics.json": "{}"})
    uri = store.upload_dir(outputs, "runs/r1/outputs")
    assert uri == store.uri_for("runs/r1/outputs")
    assert store.list("runs/r1/outputs") == ["metrics.json", "model.pkl", "plots/loss.png"]
    back = tmp_path / "back"
    store.download_dir("runs/r1/outputs", back)
    assert (back / "plots/loss.png").read_bytes() == b"png"
    store.put_object("runs/r1/status", b"Completed")
    assert store.get_object("runs/r1/status") == b"Completed"


def test_collecting_run_outputs_never_follows_a_link_out_of_the_folder(
    store: BlobStore, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("worker secret")
    run = tmp_path / "run"
    outputs = run / "outputs"
    write_tree(outputs, {"model.bin": b"weights", "sub/inner.txt": "inner"})
    (run / "private.txt").write_text("run-dir secret")
    (outputs / "leak").symlink_to(secret)  # absolute, outside
    (outputs / "up").symlink_to("../private.txt")  # relative, climbing out
    (outputs / "sub" / "deep").symlink_to("../../../secret.txt")
    (outputs / "best.bin").symlink_to("model.bin")  # inside: stored as the file it names
    (outputs / "latest").symlink_to("sub")  # a folder link: not descended
    (outputs / "gone").symlink_to("nothing-here")
    os.mkfifo(outputs / "pipe")
    warnings: list[str] = []

    store.upload_dir(outputs, "runs/r1/outputs", warn=warnings.append)

    assert store.list("runs/r1/outputs") == ["best.bin", "model.bin", "sub/inner.txt"]
    assert store.get_object("runs/r1/outputs/best.bin") == b"weights"
    stored = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert b"secret" not in stored
    said = "\n".join(warnings)
    assert f"'outputs/leak' is a symlink to {str(secret)!r}, outside outputs/" in said
    assert "'outputs/up' is a symlink to '../private.txt', outside outputs/" in said
    assert "'outputs/sub/deep' is a symlink to '../../../secret.txt', outside outputs/" in said
    assert "'outputs/latest' is a symlink to 'sub', a folder: not followed" in said
    assert "'outputs/gone' is a symlink to 'nothing-here', which does not exist" in said
    assert "'outputs/pipe' is not a regular file" in said


def test_collecting_refuses_a_file_swapped_for_a_link_after_it_was_listed(tmp_path: Path) -> None:
    from airflow_amlrun.snapshot.confined import confined_files

    secret = tmp_path / "secret.txt"
    secret.write_text("worker secret")
    outputs = tmp_path / "outputs"
    write_tree(outputs, {"a.txt": "a", "b.txt": "b", "c.txt": "c"})
    warnings: list[str] = []
    read: dict[str, bytes] = {}
    for rel, fd in confined_files(outputs, warnings.append):
        read[rel] = os.pread(fd, 100, 0)
        if rel == "a.txt":
            # The run's code swaps the files the worker listed but has not opened yet.
            (outputs / "b.txt").unlink()
            (outputs / "b.txt").symlink_to(secret)
            (outputs / "c.txt").unlink()
            os.link(secret, outputs / "c.txt")
    assert read == {"a.txt": b"a"}
    assert "'outputs/b.txt' changed while it was collected" in warnings[0]
    assert "'outputs/c.txt' was replaced while it was collected" in warnings[1]


def test_an_outputs_folder_that_is_itself_a_link_is_not_read(store: BlobStore, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    write_tree(elsewhere, {"id_rsa": "key"})
    (tmp_path / "outputs").symlink_to(elsewhere)
    warnings: list[str] = []
    store.upload_dir(tmp_path / "outputs", "runs/r1/outputs", warn=warnings.append)
    assert store.list("runs/r1/outputs") == []
    assert f"outputs/ is a symlink to {str(elsewhere)!r}" in warnings[0]


def test_manifests_round_trip_through_the_store(source: Path, store: BlobStore) -> None:
    snap = take_snapshot(source, store).snapshot
    assert store.get_manifest(snap.id) == snap
    assert store.has_manifest(snap.id)
    entry = SnapshotEntry(path="x", digest=hash_bytes(b""), size=0)
    assert Snapshot.from_entries([entry]).entries == (entry,)


# ---------------------------------------------------------------- concurrency


SNAPSHOT_IN_CHILD = """
import sys
from airflow_amlrun.snapshot import BlobStore, take_snapshot
print(take_snapshot(sys.argv[1], BlobStore(sys.argv[2]), stat_cache_path=sys.argv[3]).snapshot.id)
"""


def test_concurrent_snapshots_of_the_same_tree_leave_a_consistent_store(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_tree(source, {f"pkg/m{i}.py": f"X = {i}\n" * (i * 50) for i in range(120)})
    write_tree(source, {"data/big.bin": os.urandom(4_000_000)})
    store_dir = tmp_path / "store"
    cache = tmp_path / "cache.sqlite"
    # Four processes at once, as four workers submitting the same code (a pool's children would import
    # pytest and this module first, each).
    children = [
        subprocess.Popen(
            [sys.executable, "-c", SNAPSHOT_IN_CHILD, str(source), str(store_dir), str(cache)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        ids = [child.communicate(timeout=120)[0].strip() for child in children]
    finally:
        for child in children:  # those still running when one failed to finish
            child.kill()
            child.wait()
    assert [child.returncode for child in children] == [0] * 4
    assert len(set(ids)) == 1
    assert all_blobs_are_sound(store_dir) == 121
    dest = tmp_path / "restored"
    restore_snapshot(BlobStore(str(store_dir)), ids[0], dest)
    assert tree_contents(dest) == tree_contents(source)
