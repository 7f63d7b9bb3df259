"""Run directories on a file system that can clone (XFS with reflink, on a loop image this test mounts):
materialized files share the store's blocks, take no space, and a write to one never reaches the store."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_amlrun.snapshot import BlobStore, hash_bytes, materialize, take_snapshot


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
