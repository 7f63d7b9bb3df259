"""A store whose disk is full: a clear error naming the store, no partial blob, and the next run works once
there is room again. The store is a small tmpfs of its own (the suite runs as root)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.snapshot import StoreFullError
from tests.conftest import write_script

pytestmark = pytest.mark.usefixtures("airflow_db")

STORE_BYTES = 4 * 1024 * 1024


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "store-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_BYTES}", "tmpfs", str(mount)], check=True)
    try:
        yield mount / "store"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def workspace(tmp_path: Path, small_store: Path) -> Workspace:
    return Workspace(f"sqlite:///{tmp_path / 'history.db'}", str(small_store), cache_dir=tmp_path / "cache")


def assert_every_blob_whole(store: Path) -> None:
    """Every file in the store is published whole: named by its content's hash, no temporary file left."""
    for path in store.rglob("*"):
        if path.is_dir():
            continue
        assert not path.name.startswith(".amlrun-tmp-"), f"a temporary file was left: {path}"
        if path.parent.parent.name == "blobs" or path.parent.name == "blobs":
            assert blake3.blake3(path.read_bytes()).hexdigest() == path.name, f"partial blob {path}"


def test_a_snapshot_that_does_not_fit_fails_naming_the_store_and_the_next_run_works(
    workspace: Workspace, small_store: Path, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    write_script(source, "train.py", "print('trained')\n")
    (source / "data.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    config = ScriptRunConfig(str(source), script="train.py")

    with pytest.raises(StoreFullError) as raised:
        Experiment(workspace, "full_disk").submit(config)

    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert message.startswith(f"The store {small_store} cannot take ")
    assert "No space left on device" in message
    assert workspace.list_runs() == []
    assert_every_blob_whole(small_store)

    # Room again (the data moves out of the snapshot): the next run is stored and completes.
    (source / "data.bin").unlink()
    record = Experiment(workspace, "full_disk").submit(config).wait_for_completion()
    assert record.status == "Completed"
    assert_every_blob_whole(small_store)


def test_outputs_that_do_not_fit_fail_the_run_naming_the_store_without_partial_blobs(
    workspace: Workspace, small_store: Path, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        """
        import os
        os.makedirs("outputs", exist_ok=True)
        with open("outputs/model.bin", "wb") as out:
            out.write(os.urandom(6 * 1024 * 1024))
        print("model written", flush=True)
        """,
    )
    run = Experiment(workspace, "full_disk").submit(ScriptRunConfig(str(source), script="train.py"))

    record = run.wait_for_completion(raise_on_error=False)

    assert record.status == "Failed"
    assert "Collecting outputs failed" in (record.error or "")
    assert str(small_store) in (record.error or "")
    assert "No space left on device" in (record.error or "")
    assert_every_blob_whole(small_store)
    # The output that did not fit was not published in part; the run's log was kept (stored first).
    assert not (small_store / "runs" / record.id / "outputs" / "model.bin").exists()
    assert "model written" in Path(str(record.logs_uri), "std_log.txt").read_text()
    # Nothing is left Running, and a smaller run goes through.
    write_script(source, "train.py", "print('small run')\n")
    again = Experiment(workspace, "full_disk").submit(ScriptRunConfig(str(source), script="train.py"))
    assert again.wait_for_completion().status == "Completed"
    assert {str(r.status) for r in workspace.list_runs()} == {"Failed", "Completed"}
