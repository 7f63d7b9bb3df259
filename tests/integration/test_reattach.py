"""A retry follows the run its earlier try left behind instead of starting a second one, and never
mistakes another process, or another machine's run, for it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.run import STOP_REQUESTED_TAG
from airflow_amlrun.submission import AirflowTask
from tests.conftest import worker_dies_mid_run, write_script
from tests.integration.orphans import (
    retry_in_process,
    wait_for_file,
)


@pytest.fixture
def runs_dir_through_a_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A relative local_runs_dir whose folder is reached through a symlink (what the kernel reports as a
    process's cwd differs from both); the folder it names."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AIRFLOW__AMLRUN__LOCAL_RUNS_DIR", "link/runs")
    return tmp_path / "real" / "runs"


# The same scenario on the default runs folder, on every target: test_targets.py.
def test_retry_reattaches_to_a_script_whose_relative_runs_dir_is_reached_through_a_symlink(
    amlrun_home, tmp_path, runs_dir_through_a_symlink
):
    source = tmp_path / "src"
    starts = tmp_path / "starts.txt"
    write_script(
        source,
        "train.py",
        f"""
        import time
        from airflow_amlrun.run_context import Run
        open({str(starts)!r}, "a").write("started\\n")
        run = Run.get_context()
        for epoch in range(6):
            print(f"epoch {{epoch}}", flush=True)
            run.log("loss", 1 / (epoch + 1), step=epoch)
            time.sleep(0.5)
    """,
    )
    # Try 1: a worker that submits the run, then dies hard while the script runs.
    orphan = worker_dies_mid_run(source, settle=0.6)
    assert orphan.status == "Running"

    # Try 2: the same task instance submits again.
    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
    lines: list[str] = []
    run = Experiment(Workspace.get(), "reattach").submit(
        ScriptRunConfig(source, script="train.py"), airflow_task=task
    )
    record = run.wait_for_completion(output=lines.append)

    assert record.id == orphan.id
    assert record.status == "Completed"
    assert record.try_number == 2
    assert [line for line in lines if line.startswith("epoch")] == [f"epoch {n}" for n in range(6)]
    assert [p.step for p in Workspace.get().history.get_metrics(record.id, "loss")] == list(range(6))
    assert starts.read_text() == "started\n"  # the script ran once
    assert len(Workspace.get().list_runs()) == 1
    assert Path(record.handle["run_dir"]).parent == runs_dir_through_a_symlink


def test_retry_records_a_run_that_never_started_as_lost_and_submits_anew(amlrun_home, train_dir):
    ws = Workspace.get()
    ws.history.create_run(
        run_id="reattach_1_deadbeef",
        experiment="reattach",
        target="local",
        dag_id="retrain",
        task_id="train",
        airflow_run_id="manual_1",
        try_number=1,
    )
    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)

    record = (
        Experiment(ws, "reattach")
        .submit(ScriptRunConfig(train_dir, script="train.py"), airflow_task=task)
        .wait_for_completion(show_output=False)
    )

    assert record.status == "Completed" and record.id != "reattach_1_deadbeef"
    lost = ws.get_run("reattach_1_deadbeef")
    assert lost.status == "Failed"
    assert "Lost" in lost.error


@pytest.fixture
def stranger() -> Any:
    """A process of another user, in a process group of its own: what a run's pid may belong to later."""
    process = subprocess.Popen(["sleep", "300"], user=65534, group=65534, start_new_session=True, cwd="/")
    yield process
    process.kill()
    process.wait()


def _finished_orphan(tmp_path: Path) -> Any:
    """A run left Running by a dead worker, which then finished on its own with nobody following it."""
    source = tmp_path / "src"
    write_script(
        source, "train.py", "import time\nprint('training', flush=True)\ntime.sleep(1)\nprint('done')\n"
    )
    orphan = worker_dies_mid_run(source)
    assert wait_for_file(Path(orphan.handle["run_dir"]) / ".amlrun" / "exit_code").strip() == "0"
    return orphan


def _retry(source: Path) -> Any:
    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
    return (
        Experiment(Workspace.get(), "reattach")
        .submit(ScriptRunConfig(source, script="train.py"), airflow_task=task)
        .wait_for_completion(show_output=False, raise_on_error=False)
    )


def test_a_retry_never_signals_a_process_that_now_has_the_runs_pid(amlrun_home, tmp_path, stranger):
    orphan = _finished_orphan(tmp_path)
    # The run's pid has since been given to another process (made so here: the handle is pointed at it).
    handle = {**orphan.handle, "pid": stranger.pid}
    Workspace.get().history.update_run(orphan.id, handle=handle)

    record = _retry(tmp_path / "src")

    assert record.id == orphan.id and record.status == "Completed"
    assert stranger.poll() is None  # neither followed nor killed


def test_a_retry_does_not_follow_another_users_process_with_an_old_handles_pid(
    amlrun_home, tmp_path, stranger
):
    orphan = _finished_orphan(tmp_path)
    # A row written by an earlier version (no start time, no machine), whose pid another user's process
    # has since been given; the retry may not look into that process (no CAP_SYS_PTRACE).
    legacy = {k: orphan.handle[k] for k in ("pid", "run_dir", "std_log", "events", "exit_code", "python")}
    Workspace.get().history.update_run(orphan.id, handle={**legacy, "pid": stranger.pid})

    outcome = retry_in_process(tmp_path / "src", prefix=("setpriv", "--bounding-set=-all"), timeout=120)
    assert outcome == {"id": orphan.id, "status": "Completed", "error": None}
    assert stranger.poll() is None


def test_a_retry_on_another_host_fails_the_local_run_over_and_starts_anew(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\nprint('training', flush=True)\ntime.sleep(3)\n")
    orphan = worker_dies_mid_run(source)
    here = os.uname().nodename

    # Try 2 on another worker: a process in a UTS namespace of its own, with another host name.
    uts = ("unshare", "--uts", "sh", "-c", 'hostname other-worker && exec "$@"', "retry")
    new = retry_in_process(source, prefix=uts)

    assert new["status"] == "Completed" and new["id"] != orphan.id
    lost = Workspace.get().get_run(orphan.id)
    assert lost.status == "Failed"
    assert lost.error == (
        f"Lost: this retry cannot reach it (it runs on worker {here!r} as a local process, and this retry runs "
        "on worker 'other-worker'; a local run can be followed only on the machine it runs on); a new run was "
        "started."
    )
    assert Workspace.get().get_run(new["id"]).status == "Completed"
    # The earlier run was left alone on its machine (this one): it ends by itself.
    assert wait_for_file(Path(orphan.handle["run_dir"]) / ".amlrun" / "exit_code").strip() == "0"


def test_a_worker_whose_run_never_runs_fails_the_test_saying_why(amlrun_home, tmp_path):
    # The tests above rely on the worker's run being Running when the worker is killed.
    write_script(tmp_path / "src", "other.py", "print('not the script')\n")
    with pytest.raises(pytest.fail.Exception) as failed:
        worker_dies_mid_run(tmp_path / "src")
    message = str(failed.value)
    assert message.startswith(
        "The worker's run on 'local' did not reach Running (the worker ended with status 1"
    )
    assert "train.py" in message  # the worker's own error, which says what is missing


def test_a_retry_that_reattaches_drops_a_stop_its_dead_try_asked_and_follows_the_run_to_its_end(
    amlrun_home, tmp_path
):
    source = tmp_path / "src"
    write_script(
        source, "train.py", "import time\nprint('training', flush=True)\ntime.sleep(3)\nprint('done')\n"
    )
    orphan = worker_dies_mid_run(source)
    # Try 1 was killed, asked its run to stop on the way, and the stop never reached it.
    Workspace.get().history.update_run(
        orphan.id, add_tags={STOP_REQUESTED_TAG: "Canceled: its task was killed."}
    )

    record = _retry(source)

    # Try 2 follows the run to its end: nobody (reconcile, should try 2 die as well) is to stop it for try 1.
    assert (record.id, record.status, record.error) == (orphan.id, "Completed", None)
    assert STOP_REQUESTED_TAG not in Workspace.get().get_run(orphan.id).tags
