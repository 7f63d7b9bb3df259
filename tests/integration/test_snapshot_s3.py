"""Snapshots in an S3 store, against moto's standalone S3-compatible server on a free local port."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun.snapshot import (
    BlobCorruptError,
    BlobStore,
    hash_bytes,
    materialize,
    restore_snapshot,
    take_snapshot,
)

pytestmark = pytest.mark.s3

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# ---------------------------------------------------------------- the moto server fixture


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server (subprocess) on 127.0.0.1, with dummy credentials in the environment."""
    port = _free_port()
    moto_server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in DUMMY_CREDENTIALS.items():
            mp.setenv(name, value)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(endpoint + "/", timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                    time.sleep(0.1)
            yield endpoint
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def storage_options(endpoint: str) -> dict[str, Any]:
    # skip_instance_cache: each store gets its own client, as separate processes would.
    return {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}


@pytest.fixture
def bucket_url(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    import s3fs

    name = "snap-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    fs = s3fs.S3FileSystem(**storage_options(s3_endpoint))
    fs.mkdir(name)
    return f"s3://{name}/workspace"


def s3_store(bucket_url: str, endpoint: str) -> BlobStore:
    return BlobStore(bucket_url, storage_options=storage_options(endpoint))


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, (1_600_000_000, 1_600_000_000))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write_tree(
        root,
        {
            "train.py": b"print('hello from s3')\n",
            "pkg/model.py": b"class Model: ...\n",
            "data/weights.bin": os.urandom(7 * 1024 * 1024),  # above s3fs's multipart threshold
            "empty.txt": b"",
        },
    )
    return root


# ---------------------------------------------------------------- the user's story


def test_resubmitting_to_s3_uploads_nothing_and_one_change_uploads_one_blob(
    source: Path, bucket_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    store = s3_store(bucket_url, s3_endpoint)
    cache = tmp_path / "cache.sqlite"
    first = take_snapshot(source, store, stat_cache_path=cache)
    assert first.blobs_written == 4
    assert first.bytes_written == first.snapshot.total_bytes + first.manifest_bytes

    again = take_snapshot(source, s3_store(bucket_url, s3_endpoint), stat_cache_path=cache)
    assert (again.snapshot.id, again.bytes_written, again.blobs_written) == (first.snapshot.id, 0, 0)

    (source / "train.py").write_bytes(b"print('v2')\n")
    changed = take_snapshot(source, s3_store(bucket_url, s3_endpoint), stat_cache_path=cache)
    assert changed.blobs_written == 1
    assert changed.bytes_written == len(b"print('v2')\n") + changed.manifest_bytes


def test_a_snapshot_restores_from_s3_byte_for_byte(
    source: Path, bucket_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    snap = take_snapshot(source, s3_store(bucket_url, s3_endpoint)).snapshot
    reader = s3_store(bucket_url, s3_endpoint)
    restore_snapshot(reader, snap.id, tmp_path / "restored")
    assert tree_bytes(tmp_path / "restored") == tree_bytes(source)
    materialize(reader, snap.id, tmp_path / "run")
    assert tree_bytes(tmp_path / "run") == tree_bytes(source)

    import s3fs

    fs = s3fs.S3FileSystem(**storage_options(s3_endpoint))
    blobs = fs.find(bucket_url + "/blobs")
    assert len(blobs) == 4
    for key in blobs:
        assert hash_bytes(fs.cat_file(key)) == key.rsplit("/", 1)[1]


def test_a_tampered_s3_blob_is_caught_on_restore(
    source: Path, bucket_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    store = s3_store(bucket_url, s3_endpoint)
    snap = take_snapshot(source, store).snapshot
    digest = hash_bytes(b"print('hello from s3')\n")
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options(s3_endpoint))
    fs.pipe_file(store.uri_for(store.blob_key(digest)), b"print('tampered')\n")
    with pytest.raises(BlobCorruptError) as caught:
        restore_snapshot(s3_store(bucket_url, s3_endpoint), snap.id, tmp_path / "r")
    assert "'train.py'" in str(caught.value) and digest in str(caught.value)


def test_run_outputs_go_to_s3_and_come_back(bucket_url: str, s3_endpoint: str, tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    write_tree(outputs, {"model.pkl": b"\x80\x04", "plots/loss.png": b"png"})
    store = s3_store(bucket_url, s3_endpoint)
    uri = store.upload_dir(outputs, "runs/r1/outputs")
    assert uri == f"{bucket_url}/runs/r1/outputs"
    assert store.list("runs/r1/outputs") == ["model.pkl", "plots/loss.png"]
    store.download_dir("runs/r1/outputs", tmp_path / "back")
    assert tree_bytes(tmp_path / "back") == tree_bytes(outputs)
    store.put_object("runs/r1/summary.json", b"{}")
    assert store.get_object("runs/r1/summary.json") == b"{}"
    assert store.exists("runs/r1/summary.json")


def _snapshot_to_s3(source: str, url: str, endpoint: str) -> str:
    return take_snapshot(source, s3_store(url, endpoint)).snapshot.id


def test_two_processes_snapshotting_to_s3_agree(
    source: Path, bucket_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        ids = pool.starmap(_snapshot_to_s3, [(str(source), bucket_url, s3_endpoint)] * 2)
    assert ids[0] == ids[1]
    restore_snapshot(s3_store(bucket_url, s3_endpoint), ids[0], tmp_path / "r")
    assert tree_bytes(tmp_path / "r") == tree_bytes(source)


def test_a_run_on_a_workspace_whose_store_is_s3(
    bucket_url: str, s3_endpoint: str, tmp_path: Path, amlrun_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import s3fs

    from airflow_amlrun import Experiment, ScriptRunConfig, Workspace

    monkeypatch.setenv(
        "AIRFLOW_CONN_AMLRUN_DEFAULT",
        json.dumps(
            {
                "conn_type": "amlrun",
                "extra": {
                    "database_url": f"sqlite:///{tmp_path}/history.db",
                    "store_url": bucket_url,
                    "storage_options": storage_options(s3_endpoint),
                },
            }
        ),
    )
    src = tmp_path / "train"
    write_tree(
        src,
        {
            "train.py": b"import os\nos.makedirs('outputs', exist_ok=True)\n"
            b"open('outputs/model.txt', 'w').write('weights')\nprint('trained from', os.getcwd())\n",
        },
    )
    ws = Workspace.get()
    record = (
        Experiment(ws, "s3_runs")
        .submit(ScriptRunConfig(src, script="train.py"))
        .wait_for_completion(show_output=False)
    )

    assert record.status == "Completed"
    assert record.outputs_uri.startswith(bucket_url)
    fs = s3fs.S3FileSystem(**storage_options(s3_endpoint))
    assert fs.cat(record.outputs_uri + "/model.txt") == b"weights"
    assert fs.exists(f"{bucket_url}/snapshots/{record.snapshot_id}.json")
    assert "trained from" in fs.cat(record.logs_uri + "/std_log.txt").decode()
