"""`amlrun reconcile`: runs whose task died, and that no retry re-attached to, are settled with the reason."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.config import Settings
from airflow_amlrun.history import RunStatus
from airflow_amlrun.reconcile import SETTLED_BY_TAG, reconcile
from airflow_amlrun.run import ScriptRun
from airflow_amlrun.run.state import STOP_REQUESTED_TAG
from airflow_amlrun.targets import registry
from airflow_amlrun.targets.docker import LABEL_RUN_ID, LABEL_TRANSFER, container_name
from airflow_amlrun.targets.handles import LocalHandle
from airflow_amlrun.targets.local import LocalTarget
from tests.conftest import (
    ENDS_WHEN_TOLD,
    dag_source,
    ended_on_its_own_first,
    worker_dies_mid_run,
    write_script,
)
from tests.integration.docker_engine import containers_of
from tests.integration.orphans import (
    OUTLIVES_STOPS,
    task_killed_as_its_run_is_prepared,
    task_killed_outright_as_it_stops_the_run,
    wait_for_file,
)

pytest_plugins = ["tests.integration.docker_engine"]

AMLRUN = str(Path(sys.executable).parent / "amlrun")
# Runs nobody reported on for this long are orphans here; following tasks report every RECONCILE_AFTER / 4.
RECONCILE_AFTER = 2.0


@pytest.fixture(autouse=True)
def short_reconcile_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """A short [amlrun] reconcile_after_seconds for the tests, the workers they start and the CLI."""
    monkeypatch.setenv("AIRFLOW__AMLRUN__RECONCILE_AFTER_SECONDS", str(RECONCILE_AFTER))


def until_orphaned() -> None:
    """Let the time pass after which a run whose task died counts as orphaned."""
    time.sleep(RECONCILE_AFTER + 0.5)


def amlrun(*args: str) -> subprocess.CompletedProcess[str]:
    """The amlrun command line, as a user runs it (wide output, so long run ids stay on one line)."""
    return subprocess.run(
        [AMLRUN, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"}, timeout=300
    )


def wait_for_exit(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"process {pid} still runs"


def _alive(pid: int) -> bool:
    """Whether the process runs (one that exited but is not reaped yet, by this process that started it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_run_that_ended_after_its_worker_died_is_recorded_with_its_outputs(target, tmp_path):
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
    orphan = worker_dies_mid_run(source, target.name)
    assert wait_for_file(target.run_dir(orphan.id) / ".amlrun" / "exit_code").strip() == "0"
    group = None if target.kind == "docker" else orphan.handle["pid"]  # the run's supervisor leads its group
    deadline = time.monotonic() + 30
    while target.still_running(orphan.id, group=group) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.still_running(orphan.id, group=group) == []
    assert Workspace.get().get_run(orphan.id).status == "Running"  # nobody recorded its end
    until_orphaned()

    done = amlrun("reconcile")

    assert done.returncode == 0, done.stderr
    assert orphan.id in done.stdout and "Completed" in done.stdout, done.stdout
    run = Workspace.get().get_run(orphan.id)
    assert run.status == "Completed"
    assert run.metrics == {"accuracy": 0.93}
    assert run.tags[SETTLED_BY_TAG] == "reconcile"
    assert (Path(run.outputs_uri) / "model.txt").read_text() == "weights"
    assert "done training" in (Path(run.logs_uri) / "std_log.txt").read_text()
    assert target.containers(orphan.id) == []
    # A second pass finds nothing left to do.
    assert "Nothing to settle" in amlrun("reconcile").stdout


def test_a_run_still_running_within_its_limit_is_left_to_its_retry(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\ntime.sleep(300)\n")
    orphan = worker_dies_mid_run(source)
    try:
        until_orphaned()
        done = amlrun("reconcile")

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
    until_orphaned()

    done = amlrun("reconcile")

    assert done.returncode == 0, done.stderr
    run = Workspace.get().get_run(orphan.id)
    assert run.status == "Failed"
    assert "max_run_duration_seconds=2" in run.error
    wait_for_exit(orphan.handle["pid"], timeout=30)  # its supervisor stopped it at the limit


def test_a_run_its_target_did_not_stop_at_its_limit_is_stopped_by_reconcile(amlrun_home, tmp_path):
    # A run whose target did not enforce the limit (started by an older version): the row holds a limit
    # that nothing on the target knows of.
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\nprint('epoch 1', flush=True)\ntime.sleep(300)\n")
    orphan = worker_dies_mid_run(source)
    Workspace.get().history.update_run(orphan.id, max_run_duration_seconds=1.0)
    until_orphaned()

    done = amlrun("reconcile")

    assert done.returncode == 0, done.stderr
    run = Workspace.get().get_run(orphan.id)
    assert run.status == "Failed"
    assert "max_run_duration_seconds=1.0" in run.error
    assert "epoch 1" in (Path(run.logs_uri) / "std_log.txt").read_text()
    wait_for_exit(orphan.handle["pid"], timeout=30)


def test_a_run_that_never_reached_its_target_is_recorded_lost(amlrun_home):
    ws = Workspace.get()
    ws.history.create_run(
        run_id="orphans_1_deadbeef", experiment="orphans", target="local", tags={"mine": "1"}
    )
    until_orphaned()

    dry = amlrun("reconcile", "--dry-run")

    assert "Failed" in dry.stdout
    assert ws.get_run("orphans_1_deadbeef").status == "Queued"  # a dry run changes nothing
    # Its log says what it would do, not what it did not.
    assert "orphans_1_deadbeef" in dry.stderr and "would be recorded Failed" in dry.stderr
    assert "is recorded" not in dry.stderr

    done = amlrun("reconcile")

    assert "orphans_1_deadbeef" in done.stdout
    assert "is recorded Failed" in done.stderr
    lost = ws.get_run("orphans_1_deadbeef")
    assert lost.status == "Failed" and lost.error.startswith("Lost")
    assert lost.end is not None
    assert lost.tags == {"mine": "1", SETTLED_BY_TAG: "reconcile"}


def test_a_run_whose_recorded_handle_cannot_be_read_is_recorded_lost_saying_why(amlrun_home):
    ws = Workspace.get()
    ws.history.create_run(run_id="orphans_1_cafef00d", experiment="orphans", target="local")
    ws.history.update_run("orphans_1_cafef00d", status="Running", handle={"pid": 4242})  # no run_dir
    until_orphaned()

    done = amlrun("reconcile")

    lost = ws.get_run("orphans_1_cafef00d")
    assert lost.status == "Failed", done.stdout + done.stderr
    assert lost.error.startswith("Lost") and "lacks run_dir" in lost.error


def test_a_run_its_task_still_follows_is_not_touched(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\ntime.sleep(8)\n")
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

        # Longer than reconcile_after: the task's own reports keep the run from looking orphaned.
        for _ in range(2):
            until_orphaned()
            assert "Nothing to settle" in amlrun("reconcile").stdout
        assert follower.wait(timeout=60) == 0
        assert Workspace.get().get_run(run.id).status == "Completed"
        assert SETTLED_BY_TAG not in Workspace.get().get_run(run.id).tags
    finally:
        follower.kill()


def test_several_reconcilers_at_once_settle_a_run_once(workspace_backend, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\ntime.sleep(1)\nprint('trained', flush=True)\n")
    orphan = worker_dies_mid_run(source)
    wait_for_exit(orphan.handle["pid"])
    until_orphaned()

    reconcilers = [
        subprocess.Popen(
            [AMLRUN, "reconcile"], stdout=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "300"}
        )
        for _ in range(3)
    ]
    outputs = [r.communicate(timeout=300)[0] for r in reconcilers]

    assert sum(orphan.id in out for out in outputs) == 1, outputs
    assert Workspace.get().get_run(orphan.id).status == "Completed"


def test_reconcile_refuses_a_wait_shorter_than_two_heartbeats(amlrun_home):
    done = amlrun("reconcile", "--after", "0.1")

    assert done.returncode == 2
    assert "--after 0.1 is shorter than two heartbeats" in done.stderr


def test_a_starting_task_settles_another_tasks_orphaned_run(amlrun_home, tmp_path, run_dag, monkeypatch):
    source = tmp_path / "src"
    write_script(source, "train.py", "print('orphan done', flush=True)\nimport time\ntime.sleep(1)\n")
    orphan = worker_dies_mid_run(source)
    wait_for_exit(orphan.handle["pid"])
    until_orphaned()
    write_script(tmp_path / "other", "train.py", "print('other task')\n")

    result = run_dag(dag_source(tmp_path / "other"))

    assert result.state == "success"
    settled = Workspace.get().get_run(orphan.id)
    assert settled.status == "Completed"
    assert f"Reconcile: run {orphan.id}" in result.log


def _rewrite_handle(run_id: str, **changes: object) -> None:
    history = Workspace.get().history
    history.update_run(run_id, handle={**history.get_run(run_id).handle, **changes})


def test_a_local_run_of_a_worker_that_restarted_is_recorded_lost(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\ntime.sleep(300)\n")
    orphan = worker_dies_mid_run(source)
    # The machine restarted since (its boot id changed), which ended the run's processes.
    os.killpg(orphan.handle["pid"], signal.SIGKILL)
    _rewrite_handle(orphan.id, boot_id="00000000-0000-0000-0000-000000000000")
    until_orphaned()

    done = amlrun("reconcile")

    run = Workspace.get().get_run(orphan.id)
    assert run.status == "Failed", done.stdout
    assert "restarted while the run ran" in run.error


def test_a_local_run_of_another_worker_is_left_until_past_its_limit_or_abandoned(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\ntime.sleep(300)\n")
    orphan = worker_dies_mid_run(source)
    os.killpg(orphan.handle["pid"], signal.SIGKILL)
    _rewrite_handle(orphan.id, host="worker-that-is-gone")
    until_orphaned()

    done = amlrun("reconcile")
    assert "cannot be reached from here" in done.stdout and "worker-that-is-gone" in done.stdout
    assert Workspace.get().get_run(orphan.id).status == "Running"

    # Past its limit (and reconcile_after), its own target stopped it: recorded without asking it.
    Workspace.get().history.update_run(orphan.id, max_run_duration_seconds=0.5)
    until_orphaned()
    amlrun("reconcile")
    run = Workspace.get().get_run(orphan.id)
    assert run.status == "Failed"
    assert "past its max_run_duration_seconds=0.5" in run.error


def test_abandon_unreachable_records_another_workers_runs_lost(amlrun_home, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\ntime.sleep(300)\n")
    orphan = worker_dies_mid_run(source)
    os.killpg(orphan.handle["pid"], signal.SIGKILL)
    _rewrite_handle(orphan.id, host="worker-that-is-gone")
    until_orphaned()

    amlrun("reconcile", "--abandon-unreachable")

    run = Workspace.get().get_run(orphan.id)
    assert run.status == "Failed" and "--abandon-unreachable" in run.error


def test_a_following_tasks_heartbeat_stops_when_it_makes_no_progress(amlrun_home):
    from airflow_amlrun.heartbeat import Heartbeat

    history = Workspace.get().history
    history.create_run(run_id="beats_1_deadbeef", experiment="beats", target="local")

    def heard() -> object:
        return history.get_run("beats_1_deadbeef").heartbeat_at

    beat = Heartbeat(history, "beats_1_deadbeef", interval=0.1)
    beat.start()
    try:
        first = heard()
        time.sleep(0.5)
        assert heard() != first  # it reports on its own, whatever the task is doing

        beat.watch(True)  # following the running run: reports need progress
        time.sleep(1.0)  # no tick for 10 beats
        silent = heard()
        time.sleep(0.5)
        assert heard() == silent

        beat.tick()
        time.sleep(0.5)
        assert heard() != silent
    finally:
        beat.stop()


def test_when_two_processes_follow_a_run_to_its_end_the_first_outcome_stands(workspace_backend):
    from datetime import UTC, datetime

    from airflow_amlrun.history import RunBookkeeper, RunStatus

    history = Workspace.get().history
    history.create_run(run_id="twice_1_deadbeef", experiment="twice", target="local")
    history.update_run("twice_1_deadbeef", status=RunStatus.RUNNING)
    retry, settler = RunBookkeeper(history, "twice_1_deadbeef"), RunBookkeeper(history, "twice_1_deadbeef")

    first = retry.finish(status=RunStatus.COMPLETED, end_time=datetime.now(UTC), error=None)
    second = settler.finish(
        tags={SETTLED_BY_TAG: "reconcile"}, status=RunStatus.FAILED, end_time=datetime.now(UTC), error="late"
    )

    assert first.status == "Completed" and not retry.superseded
    assert settler.superseded
    assert second.status == "Completed" and second.error is None
    stored = history.get_run("twice_1_deadbeef")
    assert stored.status == "Completed" and SETTLED_BY_TAG not in stored.tags


# The Docker target


DOCKER_TRAIN = """
import os, time
from airflow_amlrun.run_context import Run
run = Run.get_context()
time.sleep(1.5)
run.log("accuracy", 0.93)
open("outputs/model.txt", "w").write("weights")
print("done training", flush=True)
"""


def test_reconcile_leaves_a_container_created_but_not_started_until_it_records_the_run_lost(docker_home):
    # A task between creating its run's container and starting it: the row has no handle yet. (Here its
    # reports stopped too, so that reconcile looks at the run at all.)
    ws = Workspace.get()
    run_id = "starting_1_cafe"
    ws.history.create_run(run_id=run_id, experiment="starting", target="docker")
    docker_home.create_container(
        "amlrun-base:py3.11",
        command=["true"],
        name=container_name(run_id),
        labels={LABEL_RUN_ID: run_id, LABEL_TRANSFER: "bind"},
    )
    until_orphaned()

    dry = amlrun("reconcile", "--dry-run")

    assert dry.returncode == 0, dry.stderr
    assert run_id in dry.stdout and "Failed" in dry.stdout
    # Asking changed nothing: the container that task is about to start is still there.
    assert [c["State"] for c in containers_of(docker_home, run_id)] == ["created"]
    assert ws.get_run(run_id).status == "Queued"

    done = amlrun("reconcile")

    assert done.returncode == 0, done.stderr
    lost = ws.get_run(run_id)
    assert lost.status == "Failed" and lost.error.startswith("Lost")
    # Recorded lost by this reconcile alone: nothing will start that container any more.
    assert containers_of(docker_home, run_id) == []


@pytest.mark.parametrize("container", ["removed", "kept"])
def test_a_docker_run_whose_folder_was_removed_on_this_worker_says_so(docker_home, tmp_path, container):
    write_script(tmp_path / "src", "train.py", DOCKER_TRAIN)
    orphan = worker_dies_mid_run(tmp_path / "src", compute_target="docker")
    container_id = orphan.handle["container_id"]
    docker_home.wait(container_id, timeout=60)
    # Another process took the run's files away on this very worker (and, as cleanup does, its container).
    shutil.rmtree(orphan.handle["run_dir"])
    if container == "removed":
        docker_home.remove_container(container_id)
    until_orphaned()

    done = amlrun("reconcile")

    assert done.returncode == 0, done.stderr
    assert "reconcile on that machine" not in done.stdout and "not on this" not in done.stdout, done.stdout
    run = Workspace.get().get_run(orphan.id)
    assert run.status == "Failed"
    assert f"its run folder {orphan.handle['run_dir']} is gone from this worker" in run.error
    assert "already collected" in run.error and "by another process" in run.error
    if container == "kept":
        assert "exit code 0) and is kept" in run.error
        docker_home.remove_container(container_id)
    else:
        assert f"its container {container_name(orphan.id)} from unix:///var/run/docker.sock" in run.error


def test_a_starting_task_leaves_remote_orphans_to_amlrun_reconcile(amlrun_home, tmp_path, run_dag):
    # A run on a remote target: looking at it may take a network round trip, which a starting task does not
    # spend on other tasks' runs.
    Workspace.get().history.create_run(run_id="remote_1_deadbeef", experiment="remote", target="docker")
    until_orphaned()
    write_script(tmp_path / "other", "train.py", "print('other task')\n")

    result = run_dag(dag_source(tmp_path / "other"))

    assert result.state == "success"
    assert Workspace.get().get_run("remote_1_deadbeef").status == "Queued"
    assert "`amlrun reconcile` (e.g. run from cron) settles them" in result.log


def test_one_reconcile_settles_a_sweep_whose_task_died_after_its_runs(amlrun_home, tmp_path):
    from airflow_amlrun import ScriptRunConfig
    from airflow_amlrun.hyperdrive import GridParameterSampling, HyperDriveConfig, HyperDriveRun, choice

    write_script(tmp_path / "src", "train.py", "print('never started')\n")
    ws = Workspace.get()
    config = HyperDriveConfig(
        run_config=ScriptRunConfig(tmp_path / "src", script="train.py"),
        hyperparameter_sampling=GridParameterSampling({"--alpha": choice(1, 2)}),
        primary_metric_name="loss",
        primary_metric_goal="minimize",
        max_total_runs=2,
    )
    sweep = HyperDriveRun.submit(ws, "orphans", config)
    # Its task died as its first run was recorded, before the run reached its target.
    ws.history.create_run(
        run_id="orphans_2_0badf00d", experiment="orphans", target="local", parent_run_id=sweep.id
    )
    until_orphaned()

    done = amlrun("reconcile")

    assert ws.get_run("orphans_2_0badf00d").status == "Failed", done.stdout + done.stderr
    parent = ws.get_run(sweep.id)
    assert parent.status == "Failed", done.stdout + done.stderr
    assert parent.error == "Failed: the task running this sweep stopped reporting on it."


class HalfStoppingLocalTarget(LocalTarget):
    """The local target, whose stop of a run ends the run and then fails (a remote target's connection that drops
    once the signal went out)."""

    @classmethod
    def from_connection(
        cls, name: str, conn: Any, settings: Settings, cache_dir: Path
    ) -> HalfStoppingLocalTarget:
        return cls(settings, cache_dir, name)

    def cancel(self, handle: LocalHandle) -> bool:
        super().cancel(handle)
        raise OSError(f"the connection dropped after the stop of the run of pid {handle.pid} was sent")


class StopRefusingLocalTarget(HalfStoppingLocalTarget):
    """The local target, whose stops fail before anything is sent while `refusing` (a remote target's host that
    does not answer for a while)."""

    refusing = True

    def cancel(self, handle: LocalHandle) -> bool:
        if StopRefusingLocalTarget.refusing:
            raise OSError(f"no route to the host of the run of pid {handle.pid}; nothing was sent")
        return LocalTarget.cancel(self, handle)


POLICY_STOP = "Canceled by BanditPolicy at report 3: loss 40 is outside the slack of the best run's 1."


def stop_failed_then_follower_died(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    target_class: type[LocalTarget],
    failure: str,
    script: str = "import time\ntime.sleep(300)\n",
) -> ScriptRun:
    """A run of `script` on a target of `target_class` that a sweep's policy asked to stop, the stop raising
    `failure`; the sweep's process then dies before it looks at the run again, and nobody reports on it any
    more."""
    monkeypatch.setitem(registry.CONNECTION_KINDS, "amlrun_test_stops", f"{__name__}:{target_class.__name__}")
    monkeypatch.setenv("AIRFLOW_CONN_STOPS", json.dumps({"conn_type": "amlrun_test_stops"}))
    write_script(tmp_path / "src", "train.py", script)
    run = Experiment(Workspace.get(), "stops").submit(
        ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="stops")
    )
    with pytest.raises(OSError, match=failure):
        run.cancel(POLICY_STOP)
    run.abandon()
    until_orphaned()
    return run


def test_a_run_whose_stop_seemed_to_fail_before_its_follower_died_is_recorded_canceled_with_why(
    amlrun_home, tmp_path, monkeypatch
):
    # The stop ends the run but says it failed.
    run = stop_failed_then_follower_died(monkeypatch, tmp_path, HalfStoppingLocalTarget, "connection dropped")
    ws = Workspace.get()

    [settled] = reconcile(ws)

    record = ws.get_run(run.id)
    assert (record.status, record.error) == (RunStatus.CANCELED, POLICY_STOP), record.error
    assert (settled.run_id, settled.outcome) == (run.id, "Canceled")


def test_a_run_whose_task_was_killed_outright_as_it_was_prepared_is_recorded_canceled(amlrun_home, tmp_path):
    from airflow_amlrun.operators.script_run import KILLED

    write_script(tmp_path / "src", "train.py", "print('never runs')")
    left = task_killed_as_its_run_is_prepared(tmp_path / "src", "local", "in_the_task_process")
    assert (left.status, left.tags.get(STOP_REQUESTED_TAG)) == (RunStatus.PREPARING, KILLED)
    until_orphaned()
    ws = Workspace.get()

    [settled] = reconcile(ws)

    record = ws.get_run(left.id)
    assert (record.status, record.error, record.handle) == (RunStatus.CANCELED, KILLED, None)
    assert (settled.run_id, settled.outcome) == (left.id, "Canceled")


def test_a_run_whose_stop_was_asked_but_never_reached_it_is_stopped_and_recorded_canceled(
    amlrun_home, tmp_path, monkeypatch
):
    # The stop does not reach the host.
    monkeypatch.setattr(StopRefusingLocalTarget, "refusing", True)
    run = stop_failed_then_follower_died(monkeypatch, tmp_path, StopRefusingLocalTarget, "no route")
    assert isinstance(run.handle, LocalHandle)
    pid = run.handle.pid
    ws = Workspace.get()

    # While the host does not answer, reconcile records nothing and says why; the run goes on.
    [left] = reconcile(ws)
    assert (left.run_id, left.outcome) == (run.id, "left as it is")
    assert "stopping it on stops failed: no route to the host" in left.reason
    assert ws.get_run(run.id).status == RunStatus.RUNNING
    assert _alive(pid)

    # Once it answers, the next reconcile carries out the stop that was asked, and records why.
    monkeypatch.setattr(StopRefusingLocalTarget, "refusing", False)
    until_orphaned()
    [settled] = reconcile(ws)

    record = ws.get_run(run.id)
    assert (record.status, record.error) == (RunStatus.CANCELED, POLICY_STOP), record.error
    assert record.tags[SETTLED_BY_TAG] == "reconcile"
    assert (settled.run_id, settled.outcome) == (run.id, "Canceled")
    wait_for_exit(pid, timeout=30)


def test_a_run_that_ended_on_its_own_just_before_the_stop_asked_of_it_is_recorded_as_it_ended(
    amlrun_home, tmp_path, monkeypatch
):
    monkeypatch.setattr(StopRefusingLocalTarget, "refusing", True)
    run = stop_failed_then_follower_died(
        monkeypatch, tmp_path, StopRefusingLocalTarget, "no route", script=ENDS_WHEN_TOLD
    )
    assert isinstance(run.handle, LocalHandle)
    monkeypatch.setattr(StopRefusingLocalTarget, "refusing", False)
    ws = Workspace.get()
    # Reconcile finds the run going, with a stop asked of it; the run ends on its own before the stop reaches
    # it, while reconcile claims the run.
    ended_on_its_own_first(
        monkeypatch,
        ws.history,
        "claim_unheard_run",
        Path(run.handle.run_dir),
        lambda: not run.target.wait(run.handle, 0).running,
    )

    [settled] = reconcile(ws)

    record = ws.get_run(run.id)
    assert (record.status, record.error) == (RunStatus.COMPLETED, None), record.error
    assert (settled.run_id, settled.outcome) == (run.id, "Completed")
    assert record.tags[STOP_REQUESTED_TAG] == POLICY_STOP  # what was asked stays on the row
    assert "done" in (Path(record.logs_uri) / "std_log.txt").read_text()


def test_a_run_whose_task_is_killed_outright_while_it_stops_the_run_ends_all_the_same(target, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", OUTLIVES_STOPS)
    run_id, pid = task_killed_outright_as_it_stops_the_run(source, target)

    # The run's supervisor sees the stop through.
    deadline = time.monotonic() + 30
    while target.still_running(run_id, [pid]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert target.still_running(run_id, [pid]) == []
    # Nobody recorded its end (the task was killed first): reconcile records it Canceled, saying what it knows.
    ws = Workspace.get()
    assert ws.get_run(run_id).status == RunStatus.RUNNING
    until_orphaned()
    [settled] = reconcile(ws)
    record = ws.get_run(run_id)
    assert record.status == RunStatus.CANCELED, record.error
    assert "a stop (SIGTERM) reached the run on its target" in (record.error or "")
    assert (settled.run_id, settled.outcome) == (run_id, "Canceled")
