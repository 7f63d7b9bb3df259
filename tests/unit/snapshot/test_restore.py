"""Run directories written from the store: the run's files are its own, never the store's blobs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from airflow_amlrun.snapshot import BlobStore, hash_bytes, materialize, take_snapshot


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
