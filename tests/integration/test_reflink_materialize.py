"""Run directories on a file system that can clone (XFS with reflink, on a loop image this test mounts):
materialized files share the store's blocks, take no space, and a write to one never reaches the store."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun.snapshot import BlobStore, hash_bytes, materialize, restore, take_snapshot
from airflow_amlrun.snapshot.diskio import clone_file
from airflow_amlrun.snapshot.errors import BlobCorruptError, BlobMissingError
from airflow_amlrun.snapshot.snapshot import default_workers


@pytest.fixture(scope="module")
def xfs() -> Iterator[Path]:
    """A 512 MB XFS file system with reflink, mounted from an image in the temp folder (needs root)."""
    work = Path(tempfile.mkdtemp(prefix="amlrun-xfs-"))
    image, mount = work / "xfs.img", work / "mnt"
    mount.mkdir()
    with image.open("wb") as out:
        out.truncate(512 * 1024 * 1024)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        image.unlink()
        mount.rmdir()
        work.rmdir()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_materialized_run_directory_shares_the_stores_blocks(xfs: Path) -> None:
    source = xfs / "src"
    (source / "data").mkdir(parents=True)
    files = {f"data/part{i}.bin": os.urandom(4 * 1024 * 1024) for i in range(20)}
    files["train.py"] = b"print('train')\n"
    for rel, data in files.items():
        (source / rel).write_bytes(data)
    store = BlobStore(str(xfs / "store"))
    snapshot = take_snapshot(source, store).snapshot
    os.sync()

    before = free_bytes(xfs)
    materialize(store, snapshot, xfs / "run")
    os.sync()
    # 80 MB of files, and the file system lost at most a few MB (inodes, the run directory's metadata).
    assert before - free_bytes(xfs) < 8 * 1024 * 1024
    for rel, data in files.items():
        assert (xfs / "run" / rel).read_bytes() == data

    # The run rewrites one of its files in place: the store's blob keeps its content.
    with open(xfs / "run" / "data" / "part0.bin", "r+b") as f:
        f.write(b"overwritten by the run")
    blob = next((xfs / "store" / "blobs").rglob(hash_bytes(files["data/part0.bin"])))
    assert hash_bytes(blob.read_bytes()) == blob.name


def _clones(where: Path) -> bool:
    """Whether files in ``where`` can be cloned (the temp folder is ext4 here, but could be btrfs)."""
    (where / "probe-a").write_bytes(b"probe")
    with open(where / "probe-a", "rb") as a, open(where / "probe-b", "wb") as b:
        return clone_file(a.fileno(), b.fileno())


def _tree(root: Path, folders: int = 6, per_folder: int = 40) -> dict[str, bytes]:
    files = {
        f"pkg{f}/mod{i}.py": f"# {f} {i}\n".encode() * (i + 1)
        for f in range(folders)
        for i in range(per_folder)
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_clones_are_written_by_one_thread_copies_by_several(
    xfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Clones cost only metadata work, which two threads taking turns made slower; copies move data, which
    # two threads halve. The first file tells which applies; the run directory is whole either way.
    pools: list[int] = []
    real = restore._in_threads

    def counted(count: int, *args: Any) -> None:
        pools.append(count)
        real(count, *args)

    monkeypatch.setattr(restore, "_in_threads", counted)
    # Six folders: the first's files after its first, then five more, shared among the threads.
    copies = [] if _clones(tmp_path) else [min(6, default_workers())]
    for where, expected in [(xfs, []), (tmp_path, copies)]:
        source = where / "threads-src"
        files = _tree(source)
        store = BlobStore(str(where / "threads-store"))
        snapshot = take_snapshot(source, store).snapshot
        materialize(store, snapshot, where / "threads-run")
        assert pools == expected, where
        pools.clear()
        assert {rel: (where / "threads-run" / rel).read_bytes() for rel in files} == files


@pytest.mark.parametrize("defect", ["missing", "cut-short", "too-long"])
def test_a_damaged_blob_fails_a_cloned_run_directory_naming_the_file_and_leaves_no_part_of_it(
    xfs: Path, defect: str
) -> None:
    source = xfs / f"{defect}-src"
    files = _tree(source)
    store = BlobStore(str(xfs / f"{defect}-store"))
    snapshot = take_snapshot(source, store).snapshot
    damaged = "pkg3/mod7.py"
    blob = Path(store.uri_for(store.blob_key(hash_bytes(files[damaged]))))
    blob.chmod(0o644)
    blob.unlink()
    if defect == "cut-short":
        blob.write_bytes(files[damaged][:5])
    elif defect == "too-long":
        blob.write_bytes(files[damaged] + b"import os; os.system('evil')\n")
    run = xfs / f"{defect}-run"

    error = BlobMissingError if defect == "missing" else BlobCorruptError
    with pytest.raises(error, match=rf"Cannot restore {damaged!r}: blob"):
        materialize(store, snapshot, run)
    assert not (run / damaged).exists()


def test_cloned_files_keep_their_recorded_modes_under_a_strict_umask(xfs: Path) -> None:
    source = xfs / "modes-src"
    source.mkdir()
    modes = {"run.sh": 0o755, "train.py": 0o644}
    for rel, mode in modes.items():
        (source / rel).write_bytes(rel.encode())
        (source / rel).chmod(mode)
    store = BlobStore(str(xfs / "modes-store"))
    snapshot = take_snapshot(source, store).snapshot
    old = os.umask(0o077)
    try:
        materialize(store, snapshot, xfs / "modes-run")
    finally:
        os.umask(old)
    assert {rel: stat.S_IMODE((xfs / "modes-run" / rel).stat().st_mode) for rel in modes} == modes
