"""Tree manifests: what a one-file change writes, reading back old flat manifests, and refusing bad nodes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_amlrun.snapshot import (
    BlobCorruptError,
    BlobMissingError,
    BlobStore,
    Snapshot,
    SnapshotEntry,
    UnsafeManifestError,
    hash_bytes,
    restore_snapshot,
    take_snapshot,
)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def age(root: Path) -> None:
    """Date every file back, past the stat cache's racy window, so the cache trusts them."""
    past = time.time_ns() - 10_000_000_000
    for path in root.rglob("*"):
        os.utime(path, ns=(past, past), follow_symlinks=False)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(str(tmp_path / "store"))


def test_changing_one_file_writes_it_and_only_the_manifest_nodes_on_its_path(
    tmp_path: Path, store: BlobStore
) -> None:
    source = tmp_path / "src"
    write_tree(
        source,
        {
            f"pkg{p}/sub{s}/mod{i}.py": f"X = {p}{s}{i}\n".encode() * 40
            for p in range(4)
            for s in range(4)
            for i in range(20)
        },
    )
    age(source)
    cache = tmp_path / "cache.sqlite"
    first = take_snapshot(source, store, stat_cache_path=cache, max_files=10_000)
    flat_manifest = len(json.dumps([e.to_dict() for e in first.snapshot.entries]))
    edited = b"X = 'edited'\n"
    (source / "pkg2/sub1/mod7.py").write_bytes(edited)
    second = take_snapshot(source, store, stat_cache_path=cache, max_files=10_000)
    # The file, its directory's node (20 entries), pkg2's node (4 entries) and the root (4 entries).
    assert second.blobs_written == 1
    assert second.bytes_written == len(edited) + second.manifest_bytes
    assert second.manifest_bytes < flat_manifest / 10
    restored = tmp_path / "restored"
    restore_snapshot(store, second.snapshot.id, restored)
    assert files_of(restored) == files_of(source)
    # The first snapshot shares every other node, and reads back whole.
    assert store.get_manifest(first.snapshot.id) == first.snapshot


def test_a_snapshot_taken_with_a_flat_manifest_still_restores(tmp_path: Path, store: BlobStore) -> None:
    # Snapshots taken before manifests were trees: one JSON list of every path, hashed whole.
    files = {"train.py": b"print('hi')\n", "lib/util.py": b"def f(): ...\n", "lib/deep/data.json": b"{}"}
    entries = []
    for rel, data in files.items():
        entries.append({"path": rel, "mode": 0o644, "size": len(data), "hash": store.put_bytes(data)})
    entries.append({"path": "lib/alias.py", "link": "util.py"})
    entries.sort(key=lambda e: str(e["path"]))
    manifest = json.dumps({"version": 1, "entries": entries}, sort_keys=True, separators=(",", ":")).encode()
    snapshot_id = hash_bytes(manifest)
    store.put_object(f"snapshots/{snapshot_id}.json", manifest)

    snapshot = store.get_manifest(snapshot_id)
    assert (snapshot.id, snapshot.version, snapshot.to_json().encode()) == (snapshot_id, 1, manifest)
    dest = tmp_path / "restored"
    restore_snapshot(store, snapshot_id, dest)
    assert files_of(dest) == {**files, "lib/alias.py": files["lib/util.py"]}
    assert os.readlink(dest / "lib/alias.py") == "util.py"


def test_a_missing_or_corrupt_directory_node_is_named(tmp_path: Path, store: BlobStore) -> None:
    source = tmp_path / "src"
    write_tree(source, {"train.py": b"x", "lib/util.py": b"y"})
    snapshot = take_snapshot(source, store).snapshot
    [node] = snapshot.trees
    path = Path(store.uri_for(store.tree_key(node)))
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data.replace(b'"util.py"', b'"UTIL.py"'))
    with pytest.raises(BlobCorruptError, match=f"Directory node {node} of snapshot {snapshot.id}"):
        store.get_manifest(snapshot.id)
    path.unlink()
    with pytest.raises(BlobMissingError, match=f"Directory node {node} of snapshot {snapshot.id}"):
        restore_snapshot(store, snapshot.id, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../etc"])
def test_a_directory_node_naming_a_path_rather_than_a_name_is_refused(
    tmp_path: Path, store: BlobStore, name: str
) -> None:
    digest = store.put_bytes(b"evil")
    node = json.dumps(
        {"version": 2, "entries": [{"name": name, "mode": 420, "size": 4, "hash": digest}]},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    node_digest = hash_bytes(node)
    store.put_object(store.tree_key(node_digest), node)
    root = json.dumps(
        {"version": 2, "entries": [{"name": "d", "tree": node_digest}]}, sort_keys=True, separators=(",", ":")
    ).encode()
    snapshot_id = hash_bytes(root)
    store.put_object(store.manifest_key(snapshot_id), root)
    with pytest.raises(UnsafeManifestError, match="not a plain name"):
        restore_snapshot(store, snapshot_id, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


_names = st.sampled_from(["a", "b", "c.py", "d.json", "é", "sub"])


@settings(max_examples=60)
@given(st.lists(st.lists(_names, min_size=1, max_size=4).map("/".join), min_size=1, max_size=30, unique=True))
def test_a_tree_manifest_reads_back_to_the_same_entries(paths: list[str]) -> None:
    # A path cannot be both a file and a directory: keep those that are not a prefix of another.
    files = [p for p in paths if not any(q.startswith(p + "/") for q in paths)]
    snapshot = Snapshot.from_entries(
        SnapshotEntry(path=p, mode=0o644, size=len(p), digest=hash_bytes(p.encode())) for p in files
    )
    nodes = {hash_bytes(data): data for data in snapshot.trees.values()}
    assert nodes == dict(snapshot.trees)
    assert Snapshot.from_json(snapshot.to_json(), nodes.__getitem__) == snapshot
    assert snapshot.id == hash_bytes(snapshot.to_json().encode())


def test_identical_folders_share_one_node_which_is_read_once() -> None:
    # Copies of one folder (a vendored package, fixtures per experiment) cost one node read, not one each;
    # a manifest repeating a node cannot make the reader fetch it over and over either.
    entries = [
        SnapshotEntry(path=f"{copy}/{name}", mode=0o644, size=1, digest=hash_bytes(name.encode()))
        for copy in ("exp1", "exp2", "exp3")
        for name in ("a.py", "b.py")
    ]
    snapshot = Snapshot.from_entries(entries)
    assert len(snapshot.trees) == 1
    reads: list[str] = []

    def load(digest: str) -> bytes:
        reads.append(digest)
        return snapshot.trees[digest]

    assert Snapshot.from_json(snapshot.to_json(), load) == snapshot
    assert reads == list(snapshot.trees)
