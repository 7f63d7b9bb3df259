"""Run directories written from the store: the run's files are its own, never the store's blobs."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun.snapshot import (
    BlobStore,
    Snapshot,
    hash_bytes,
    materialize,
    restore_snapshot,
    take_snapshot,
)
from airflow_amlrun.snapshot.errors import BlobCorruptError, BlobMissingError


def test_a_run_rewriting_its_materialized_files_leaves_the_store_intact(tmp_path: Path) -> None:
    # Tests run as root here, which file modes do not stop: only a copy (or a copy-on-write clone)
    # keeps a run's writes out of the store.
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_bytes(b"print('train')\n")
    (source / "run.sh").write_bytes(b"#!/bin/sh\n")
    (source / "run.sh").chmod(0o755)
    store = BlobStore(str(tmp_path / "store"))
    snapshot = take_snapshot(source, store).snapshot
    run_dir = tmp_path / "run"
    materialize(store, snapshot, run_dir)
    assert stat.S_IMODE((run_dir / "run.sh").stat().st_mode) == 0o755

    (run_dir / "train.py").chmod(0o644)
    with open(run_dir / "train.py", "r+b") as f:
        f.write(b"PWNED")
    os.truncate(run_dir / "run.sh", 0)

    for entry in snapshot.entries:
        assert entry.digest is not None
        assert hash_bytes(store.get_bytes(entry.digest, verify=False)) == entry.digest
    assert (source / "train.py").read_bytes() == b"print('train')\n"


def _store_with_planted_blob(tmp_path: Path, plant: Callable[[Path], None]) -> tuple[BlobStore, Snapshot]:
    """A snapshot of one file, whose blob someone else who can write the store replaced."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "loot.txt").write_bytes(b"x" * 12)
    store = BlobStore(str(tmp_path / "store"))
    snapshot = take_snapshot(source, store).snapshot
    [entry] = snapshot.entries
    assert entry.digest is not None
    blob = Path(store.uri_for(store.blob_key(entry.digest)))
    blob.chmod(0o644)
    blob.unlink()
    plant(blob)
    return store, snapshot


@pytest.mark.parametrize("through", ["blob", "folder"])
def test_a_link_planted_in_the_store_does_not_bring_a_file_from_elsewhere_into_a_run(
    tmp_path: Path, through: str
) -> None:
    secret = tmp_path / "worker-secret.txt"
    secret.write_bytes(b"TOP-SECRET!\n")  # the same size as the snapshot's file

    def plant(blob: Path) -> None:
        if through == "blob":
            blob.symlink_to(secret)
        else:  # the fan-out folder swapped for a link to a folder holding a file of the blob's name
            elsewhere = tmp_path / "elsewhere"
            elsewhere.mkdir()
            (elsewhere / blob.name).write_bytes(secret.read_bytes())
            for other in blob.parent.iterdir():
                other.unlink()
            blob.parent.rmdir()
            blob.parent.symlink_to(elsewhere)

    store, snapshot = _store_with_planted_blob(tmp_path, plant)

    with pytest.raises(BlobCorruptError, match="symbolic link"):
        materialize(store, snapshot, tmp_path / "run")
    assert (
        not (tmp_path / "run" / "loot.txt").exists()
        or b"SECRET" not in (tmp_path / "run" / "loot.txt").read_bytes()
    )


def test_a_fifo_planted_in_the_store_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    store, snapshot = _store_with_planted_blob(tmp_path, lambda blob: os.mkfifo(blob))

    with pytest.raises(BlobCorruptError, match="not a regular file"):
        materialize(store, snapshot, tmp_path / "run")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_materialized_files_keep_their_recorded_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    # Files are created with their recorded mode (executable or not, as git records it) and changed
    # afterwards only where the umask took bits away: under every umask the run directory's modes are the
    # snapshot's.
    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    modes = {"run.sh": 0o755, "train.py": 0o644, "pkg/secret.txt": 0o600, "pkg/tool": 0o775}
    for rel, mode in modes.items():
        (source / rel).write_bytes(rel.encode())
        (source / rel).chmod(mode)
    store = BlobStore(str(tmp_path / "store"))
    snapshot = take_snapshot(source, store).snapshot
    old = os.umask(umask)
    try:
        materialize(store, snapshot, tmp_path / "run")
    finally:
        os.umask(old)
    recorded = {e.path: e.mode for e in snapshot.entries}
    assert recorded == {"run.sh": 0o755, "train.py": 0o644, "pkg/secret.txt": 0o644, "pkg/tool": 0o755}
    assert {rel: stat.S_IMODE((tmp_path / "run" / rel).stat().st_mode) for rel in modes} == recorded
    assert {rel: (tmp_path / "run" / rel).read_bytes() for rel in modes} == {
        rel: rel.encode() for rel in modes
    }


def test_the_process_umask_is_read_without_changing_it() -> None:
    from airflow_amlrun.snapshot.diskio import process_umask

    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        assert process_umask() == 0o027
    finally:
        os.umask(old)


def _tree_missing_a_blob(tmp_path: Path, missing: str) -> tuple[BlobStore, Snapshot]:
    """A snapshot of a tree of two folders of 300 files (a/, b/) and 20 of 10 (c00/..c19/), the blob of `missing`
    removed from the store."""
    source = tmp_path / "src"
    for folder, count in [("a", 300), ("b", 300), *((f"c{n:02}", 10) for n in range(20))]:
        (source / folder).mkdir(parents=True)
        for index in range(count):
            (source / folder / f"m{index:03}.py").write_text(f"# {folder} {index}\n")
    store = BlobStore(str(tmp_path / "store"))
    snapshot = take_snapshot(source, store).snapshot
    [entry] = [e for e in snapshot.entries if e.path == missing]
    assert entry.digest is not None
    blob = Path(store.uri_for(store.blob_key(entry.digest)))
    blob.chmod(0o644)
    blob.unlink()
    return store, snapshot


@pytest.mark.parametrize(
    ("write", "missing", "bound"),
    [
        # The first file fails: hardly anything else is written.
        (materialize, "a/m000.py", 50),
        (restore_snapshot, "a/m000.py", 50),
        # A run directory's folders are written at once: folder a/ stops soon after b/ failed, not at its end.
        (materialize, "b/m000.py", 200),
    ],
    ids=["materialize-first-file", "restore-first-file", "materialize-beside-a-folder-being-written"],
)
def test_a_missing_blob_stops_the_writing_of_a_tree_at_once_naming_the_file(
    tmp_path: Path, write: Any, missing: str, bound: int
) -> None:
    # Folders (a run directory) or files (a restore) are written by several threads: the first failure must stop
    # them all, not wait for the rest of the tree to be written before the user hears of it.
    store, snapshot = _tree_missing_a_blob(tmp_path, missing)

    with pytest.raises(BlobMissingError, match=rf"Cannot restore {missing!r}: blob [0-9a-f]+ is missing"):
        write(store, snapshot if write is materialize else snapshot.id, tmp_path / "run")
    written = sum(1 for _ in (tmp_path / "run").rglob("*.py"))
    assert written < bound, f"{written} of the tree's 800 files were written though {missing} failed"


@pytest.mark.parametrize("where", ["first", "among-the-others"])
@pytest.mark.parametrize("defect", ["cut-short", "too-long"])
def test_a_blob_of_another_size_in_the_store_fails_the_run_directory_naming_the_file_and_leaves_no_part_of_it(
    tmp_path: Path, defect: str, where: str
) -> None:
    # Someone who can write the store changed a blob's size: materialize checks sizes only (no hash), and that
    # check must catch it, for the first file (written alone) as for the others (written by threads).
    source = tmp_path / "src"
    files = {f"pkg{f}/mod{i}.py": f"# {f} {i}\n".encode() * (i + 2) for f in range(4) for i in range(30)}
    for rel, data in files.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(data)
    store = BlobStore(str(tmp_path / "store"))
    snapshot = take_snapshot(source, store).snapshot
    damaged = snapshot.entries[0].path if where == "first" else "pkg2/mod17.py"
    blob = Path(store.uri_for(store.blob_key(hash_bytes(files[damaged]))))
    blob.chmod(0o644)
    content = (
        files[damaged][:5] if defect == "cut-short" else files[damaged] + b"import os; os.system('evil')\n"
    )
    blob.write_bytes(content)

    with pytest.raises(
        BlobCorruptError,
        match=rf"{damaged!r}: blob [0-9a-f]+ .* holds {len(content)} bytes, the manifest says {len(files[damaged])}",
    ):
        materialize(store, snapshot, tmp_path / "run")
    assert not (tmp_path / "run" / damaged).exists()


def test_run_directories_written_at_once_from_one_store_are_whole_and_leave_no_descriptor_open(
    tmp_path: Path,
) -> None:
    # The store's folders are kept open while any run directory is written from it, and closed once the last
    # one is done: a second writer must neither find a folder closed under it nor leave one open.
    source = tmp_path / "src"
    for folder in ("a", "b", "c"):
        (source / folder).mkdir(parents=True)
        for index in range(60):
            (source / folder / f"f{index}.txt").write_text(f"{folder}{index}\n" * (index + 1))
    store = BlobStore(str(tmp_path / "store"))
    snapshot = take_snapshot(source, store).snapshot
    expected = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*.txt")}
    # A second tree in the same store, one of whose blobs is missing: its run directories fail among the others.
    (source / "d").mkdir()
    (source / "d" / "gone.txt").write_text("gone\n")
    broken = take_snapshot(source, store).snapshot
    gone = Path(store.uri_for(store.blob_key(hash_bytes(b"gone\n"))))
    gone.chmod(0o644)
    gone.unlink()
    open_before = len(os.listdir("/proc/self/fd"))

    def write(n: int) -> str:
        try:
            materialize(store, broken if n % 3 == 2 else snapshot, tmp_path / f"run{n}")
        except BlobMissingError as err:
            return str(err)
        return "written"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(write, range(12)))

    assert [o == "written" for o in outcomes] == [n % 3 != 2 for n in range(12)], outcomes
    assert all("'d/gone.txt'" in o for o in outcomes if o != "written")
    for n in (n for n in range(12) if n % 3 != 2):
        written = {
            p.relative_to(tmp_path / f"run{n}").as_posix(): p.read_bytes()
            for p in (tmp_path / f"run{n}").rglob("*.txt")
        }
        assert written == expected
    assert len(os.listdir("/proc/self/fd")) == open_before
