"""`amlrun reconcile`: runs whose task died, and that no retry re-attached to, are settled with the reason."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from airflow_amlrun import Workspace
from airflow_amlrun.reconcile import SETTLED_BY_TAG
from tests.conftest import worker_dies_mid_run, write_script

AMLRUN = str(Path(sys.executable).parent / "amlrun")


def amlrun(*args: str) -> subprocess.CompletedProcess[str]:
    """The amlrun command line, as a user runs it (wide output, so long run ids stay on one line)."""
    return subprocess.run(
        [AMLRUN, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"}, timeout=300
    )


def wait_for_exit(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), f"process {pid} still runs"


def test_a_run_that_ended_after_its_worker_died_is_recorded_with_its_outputs(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        """
        import os, time
        from airflow_amlrun.run_context import Run
        run = Run.get_context()
        time.sleep(1.5)
        run.log("accuracy", 0.93)
        os.makedirs("outputs", exist_ok=True)
        open("outputs/model.txt", "w").write("weights")
        print("done training", flush=True)
    """,
    )
    orphan = worker_dies_mid_run(source)
    wait_for_exit(orphan.handle["pid"])
    assert Workspace.get().get_run(orphan.id).status == "Running"  # nobody recorded its end

    done = amlrun("reconcile", "--after", "0")

    assert done.returncode == 0, done.stderr
    assert orphan.id in done.stdout and "Completed" in done.stdout
    run = Workspace.get().get_run(orphan.id)
    assert run.status == "Completed"
    assert run.metrics == {"accuracy": 0.93}
    assert run.tags[SETTLED_BY_TAG] == "reconcile"
    assert (Path(run.outputs_uri) / "model.txt").read_text() == "weights"
    assert "done training" in (Path(run.logs_uri) / "std_log.txt").read_text()
    # A second pass finds nothing left to do.
    assert "Nothing to settle" in amlrun("reconcile", "--after", "0").stdout


def test_a_run_still_running_within_its_limit_is_left_to_its_retry(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\ntime.sleep(300)\n")
    orphan = worker_dies_mid_run(source)
    try:
        done = amlrun("reconcile", "--after", "0")

        assert done.returncode == 0, done.stderr
        assert orphan.id in done.stdout and "left as it is" in done.stdout
        assert "still runs on its target" in done.stdout
        assert Workspace.get().get_run(orphan.id).status == "Running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(orphan.handle["pid"], signal.SIGKILL)


def test_a_run_past_its_limit_is_stopped_and_recorded_failed_with_the_limit(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\nprint('epoch 1', flush=True)\ntime.sleep(300)\n")
    orphan = worker_dies_mid_run(source, max_run_duration_seconds=2)
    time.sleep(2.5)

    done = amlrun("reconcile", "--after", "0")

    assert done.returncode == 0, done.stderr
    run = Workspace.get().get_run(orphan.id)
    assert run.status == "Failed"
    assert "max_run_duration_seconds=2" in run.error
    wait_for_exit(orphan.handle["pid"], timeout=30)  # stopped on its target, whoever stopped it


def test_a_run_that_never_reached_its_target_is_recorded_lost(amlrun_home):
    ws = Workspace.get()
    ws.history.create_run(run_id="orphans_1_deadbeef", experiment="orphans", target="local")

    assert "Failed" in amlrun("reconcile", "--after", "0", "--dry-run").stdout
    assert ws.get_run("orphans_1_deadbeef").status == "Queued"  # a dry run changes nothing

    done = amlrun("reconcile", "--after", "0")

    assert "orphans_1_deadbeef" in done.stdout
    lost = ws.get_run("orphans_1_deadbeef")
    assert lost.status == "Failed" and lost.error.startswith("Lost")
    assert lost.end is not None


def test_a_run_its_task_still_follows_is_not_touched(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\ntime.sleep(4)\n")
    follower = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom airflow_amlrun import Experiment, ScriptRunConfig, Workspace\n"
            "Experiment(Workspace.get(), 'followed').submit(ScriptRunConfig(sys.argv[1], script='train.py'))"
            ".wait_for_completion(show_output=False)",
            str(source),
        ],
    )
    try:
        deadline = time.monotonic() + 60
        while not Workspace.get().list_runs(status="Running") and time.monotonic() < deadline:
            time.sleep(0.05)
        [run] = Workspace.get().list_runs(status="Running")

        done = amlrun("reconcile", "--after", "60")

        assert "Nothing to settle" in done.stdout
        assert follower.wait(timeout=60) == 0
        assert Workspace.get().get_run(run.id).status == "Completed"
        assert SETTLED_BY_TAG not in Workspace.get().get_run(run.id).tags
    finally:
        follower.kill()


def test_only_one_of_several_reconcilers_claims_a_run(workspace_backend):
    from datetime import UTC, datetime, timedelta

    ws = Workspace.get()
    ws.history.create_run(run_id="orphans_2_deadbeef", experiment="orphans", target="local")
    later = datetime.now(UTC) + timedelta(seconds=1)

    assert ws.history.claim_unheard_run("orphans_2_deadbeef", heard_before=later) is True
    # Claimed: it was just reported on, so a second reconciler with the same view leaves it.
    assert (
        ws.history.claim_unheard_run("orphans_2_deadbeef", heard_before=later - timedelta(seconds=1)) is False
    )


def test_a_starting_task_settles_another_tasks_orphaned_run(amlrun_home, tmp_path, run_dag, monkeypatch):
    source = tmp_path / "src"
    write_script(source, "train.py", "print('orphan done', flush=True)\nimport time\ntime.sleep(1)\n")
    orphan = worker_dies_mid_run(source)
    wait_for_exit(orphan.handle["pid"])
    monkeypatch.setenv("AIRFLOW__AMLRUN__RECONCILE_AFTER_SECONDS", "0")
    write_script(tmp_path / "other", "train.py", "print('other task')\n")

    result = run_dag(
        f"""
        import pendulum
        from airflow.sdk import DAG
        from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

        with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
            ScriptRunOperator(task_id="train", config=ScriptRunConfig({str(tmp_path / "other")!r}, script="train.py"))
        """
    )

    assert result.state == "success"
    settled = Workspace.get().get_run(orphan.id)
    assert settled.status == "Completed"
    assert f"Reconcile: run {orphan.id}" in result.log
