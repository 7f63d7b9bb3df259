"""The store's batches: blobs are named only once the whole batch is durable, and never after an error."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from airflow_amlrun.snapshot import BlobStore, hash_bytes
from airflow_amlrun.snapshot import batch as batch_module
from airflow_amlrun.snapshot.batch import BlobBatch


def stored_files(store_dir: Path) -> list[str]:
    return sorted(p.relative_to(store_dir).as_posix() for p in store_dir.rglob("*") if p.is_file())


def test_blobs_written_in_a_batch_get_their_names_when_it_ends(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path / "store"))
    source = tmp_path / "train.py"
    source.write_bytes(b"print('train')\n")
    digest = hash_bytes(source.read_bytes())
    with store.batch() as batch:
        assert store.put_file(digest, source, batch=batch) == len(source.read_bytes())
        assert not store.has(digest)
    assert store.has(digest)
    assert store.get_bytes(digest) == source.read_bytes()
    assert stored_files(tmp_path / "store") == [store.blob_key(digest)]


def test_a_batch_ended_by_an_error_names_nothing_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path / "store"))
    source = tmp_path / "train.py"
    source.write_bytes(b"print('train')\n")
    digest = hash_bytes(source.read_bytes())

    def interrupted_snapshot() -> None:
        with store.batch() as batch:
            store.put_file(digest, source, batch=batch)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_snapshot()
    assert not store.has(digest)
    assert stored_files(tmp_path / "store") == []


def test_a_batch_flushes_every_file_system_its_blobs_were_written_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # blobs/ or trees/ may be a mount of their own: naming a blob there before that file system is flushed
    # could leave a name over data a crash loses.
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same file system as the temporary folder here")
    flushed: list[int] = []
    monkeypatch.setattr(batch_module, "sync_filesystem", lambda path: flushed.append(os.stat(path).st_dev))
    try:
        batch = BlobBatch(str(tmp_path))
        for number, folder in enumerate((tmp_path, other, tmp_path)):
            tmp = folder / f".amlrun-tmp-{number}"
            tmp.write_bytes(b"x")
            batch.add(str(tmp), str(folder / f"blob-{tmp.name}"))
        batch.publish()
        assert sorted(flushed) == sorted({os.stat(tmp_path).st_dev, os.stat(other).st_dev})
        assert len(list(other.glob("blob-*"))) == 1
    finally:
        shutil.rmtree(other)


@pytest.mark.parametrize("url", ["local", "memory://read-object"])
def test_a_piece_of_an_object_is_read_from_an_offset_and_ends_with_the_object(
    tmp_path: Path, url: str
) -> None:
    store = BlobStore(str(tmp_path / "store") if url == "local" else url)
    store.put_object("runs/r1/logs/std_log.txt", b"0123456789")
    assert store.read_object("runs/r1/logs/std_log.txt", 0, 4) == b"0123"
    assert store.read_object("runs/r1/logs/std_log.txt", 8, 4) == b"89"
    assert store.read_object("runs/r1/logs/std_log.txt", 10, 4) == b""
    with pytest.raises(FileNotFoundError):
        store.read_object("runs/r2/logs/std_log.txt", 0, 4)
