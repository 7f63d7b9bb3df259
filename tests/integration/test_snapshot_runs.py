"""Runs take their code from a content-addressed snapshot, with git provenance, restorable later."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.history import RunNotFoundError
from airflow_amlrun.snapshot import ExcludedFileError, SnapshotTooLargeError
from tests.conftest import git, wait_until_running, write_script

AMLRUN = str(Path(sys.executable).parent / "amlrun")


def store_files(home: Path) -> dict[str, int]:
    blobs = home / "store" / "blobs"
    return {str(p.relative_to(blobs)): p.stat().st_size for p in blobs.rglob("*") if p.is_file()}


def submit(source: Path, experiment: str = "snapshots", **kwargs):  # type: ignore[no-untyped-def]
    run = Experiment(Workspace.get(), experiment).submit(ScriptRunConfig(source, script="train.py", **kwargs))
    return run.wait_for_completion(show_output=False)


def test_resubmitting_unchanged_code_stores_nothing_new(amlrun_home, train_dir):
    first = submit(train_dir)
    blobs_after_first = store_files(amlrun_home)
    second = submit(train_dir)

    assert second.snapshot_id == first.snapshot_id
    assert store_files(amlrun_home) == blobs_after_first

    (train_dir / "notes.md").write_text("a new file\n")
    third = submit(train_dir)
    new_blobs = set(store_files(amlrun_home)) - set(blobs_after_first)
    assert third.snapshot_id != first.snapshot_id
    assert len(new_blobs) == 1  # just the new file: the manifest is stored apart from the blobs


def test_a_file_edited_during_the_run_does_not_change_the_run(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        """
        import time
        time.sleep(1.5)
        print("config says:", open("config.txt").read().strip())
    """,
    )
    (source / "config.txt").write_text("alpha=0.1\n")

    def edit_while_running() -> None:
        if wait_until_running() is not None:
            (source / "config.txt").write_text("alpha=999\n")

    editor = threading.Thread(target=edit_while_running)
    editor.start()
    run = Experiment(Workspace.get(), "snapshots").submit(ScriptRunConfig(source, script="train.py"))
    lines: list[str] = []
    run.wait_for_completion(output=lines.append)
    editor.join()
    assert (source / "config.txt").read_text() == "alpha=999\n"
    assert lines == ["config says: alpha=0.1"]


def test_run_records_git_provenance_without_credentials(amlrun_home, train_dir):
    git(train_dir, "init", "-q", "-b", "main")
    git(train_dir, "remote", "add", "origin", "https://bot:s3cret@git.example.com/team/models.git")
    git(train_dir, "add", ".")
    git(train_dir, "commit", "-q", "-m", "train")
    commit = git(train_dir, "rev-parse", "HEAD")
    (train_dir / "train.py").write_text((train_dir / "train.py").read_text() + "\n# tuned\n")

    record = submit(train_dir)

    summary = record.summary()
    assert summary["git"]["commit"] == commit
    assert summary["git"]["branch"] == "main"
    assert summary["git"]["dirty"] is True
    assert summary["git"]["repository_uri"] == "https://git.example.com/team/models.git"
    diff = Workspace.get().store.get_bytes(record.git["diff_digest"]).decode()
    assert "+# tuned" in diff


def test_source_outside_git_records_no_provenance(amlrun_home, train_dir):
    assert submit(train_dir).git is None


def test_restore_gives_back_the_runs_code_byte_for_byte(amlrun_home, train_dir, tmp_path):
    (train_dir / "data").mkdir()
    (train_dir / "data" / "weights.bin").write_bytes(os.urandom(300_000))
    record = submit(train_dir)
    dest = tmp_path / "restored"

    done = subprocess.run(
        [AMLRUN, "snapshot", "restore", record.id, str(dest)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert done.returncode == 0, done.stderr
    assert f"Restored snapshot {record.snapshot_id}" in done.stdout
    comparison = filecmp.dircmp(train_dir, dest)
    assert comparison.left_only == comparison.right_only == comparison.diff_files == []
    assert filecmp.cmp(train_dir / "data" / "weights.bin", dest / "data" / "weights.bin", shallow=False)

    refused = subprocess.run(
        [AMLRUN, "snapshot", "restore", record.id, str(dest)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert refused.returncode == 2
    assert "not empty" in refused.stderr


def test_too_large_source_fails_before_anything_is_stored_or_recorded(amlrun_home, train_dir, monkeypatch):
    monkeypatch.setenv("AIRFLOW__AMLRUN__SNAPSHOT_MAX_SIZE_MB", "1")
    (train_dir / "data").mkdir()
    (train_dir / "data" / "big.parquet").write_bytes(b"x" * 2_000_000)

    with pytest.raises(SnapshotTooLargeError) as err:
        submit(train_dir)

    message = str(err.value)
    assert "data/big.parquet" in message
    assert ".gitignore" in message or ".amlignore" in message
    assert Workspace.get().list_runs() == []
    assert not (amlrun_home / "store" / "blobs").exists() or store_files(amlrun_home) == {}


def test_a_config_sets_its_own_file_count_limit(amlrun_home, train_dir):
    for n in range(5):
        (train_dir / f"part_{n}.csv").write_text("x\n")
    with pytest.raises(SnapshotTooLargeError, match="files"):
        submit(train_dir, snapshot_max_files=3)
    assert Workspace.get().list_runs() == []
    assert submit(train_dir, snapshot_max_files=10).status == "Completed"


def test_a_script_excluded_by_the_ignore_file_fails_before_anything_is_recorded(amlrun_home, train_dir):
    (train_dir / ".amlignore").write_text("# keep the data out\ndata/\n*.py\n!helpers.py\n")

    with pytest.raises(ExcludedFileError) as err:
        submit(train_dir)

    message = str(err.value)
    assert "The run's script 'train.py' is excluded" in message
    assert "line 3 of .amlignore ('*.py')" in message
    assert '"!/train.py"' in message
    assert Workspace.get().list_runs() == []
    assert not (amlrun_home / "store").exists()


def test_restoring_a_mistyped_id_says_no_such_run_or_snapshot(amlrun_home, train_dir, tmp_path):
    submit(train_dir)
    dest = tmp_path / "restored"

    done = subprocess.run(
        [AMLRUN, "snapshot", "restore", "nosuchrun", str(dest)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert done.returncode == 2
    assert "No run or snapshot 'nosuchrun'" in done.stderr
    assert str(amlrun_home / "store") in done.stderr and "amlrun runs list" in done.stderr
    assert "BLAKE3" not in done.stderr
    assert not dest.exists()

    unknown_snapshot = "0" * 64
    with pytest.raises(RunNotFoundError, match=f"No run or snapshot '{unknown_snapshot}'"):
        Workspace.get().restore_snapshot(unknown_snapshot, dest)


def test_restoring_a_sweep_says_it_has_no_snapshot_of_its_own_and_names_its_runs(amlrun_home, tmp_path):
    from airflow_amlrun.hyperdrive import GridParameterSampling, HyperDriveConfig, choice

    write_script(
        tmp_path / "src",
        "train.py",
        "import sys\nfrom airflow_amlrun.run_context import Run\nRun.get_context().log('loss', float(sys.argv[2]))\n",
    )
    sweep = Experiment(Workspace.get(), "snapshots").submit(
        HyperDriveConfig(
            run_config=ScriptRunConfig(tmp_path / "src", script="train.py"),
            hyperparameter_sampling=GridParameterSampling({"--alpha": choice(1, 2)}),
            primary_metric_name="loss",
            primary_metric_goal="minimize",
            max_total_runs=2,
        )
    )
    assert sweep.wait_for_completion().status == "Completed"
    runs = Workspace.get().history.child_runs(sweep.id)
    best = min(runs, key=lambda run: run.metrics["loss"])
    dest = tmp_path / "restored"

    done = subprocess.run(
        [AMLRUN, "snapshot", "restore", sweep.id, str(dest)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )

    assert done.returncode == 2, done.stdout + done.stderr
    assert " ".join(done.stderr.split()) == (
        f"error: Run {sweep.id} is a sweep: it runs no code of its own, so it has no snapshot. Each of its 2 runs "
        f"({runs[0].id}, {runs[1].id}) has one: restore one of them by its run id (its best run is {best.id})."
    )
    assert not dest.exists()
    # As it says: a run of the sweep restores.
    again = subprocess.run(
        [AMLRUN, "snapshot", "restore", runs[0].id, str(dest)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert again.returncode == 0, again.stderr
    assert (dest / "train.py").read_text() == (tmp_path / "src" / "train.py").read_text()
