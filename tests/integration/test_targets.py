"""What a DAG author sees on every compute target alike: each scenario once, run on the worker's own
processes, in a container of the local Docker Engine, and on the SSH test host.

What only one target does (a container's image, the host's blob cache, a relative runs folder) is tested in
that target's own module.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, ScriptRunOperator, Workspace
from airflow_amlrun.errors import RunTimeoutError
from airflow_amlrun.operators.script_run import KILLED
from airflow_amlrun.submission import AirflowTask
from tests.conftest import (
    ENDS_WHEN_TOLD,
    dag_source,
    ended_on_its_own_first,
    newest_run,
    wait_until_running,
    worker_dies_mid_run,
    write_script,
)
from tests.integration.conftest import Target
from tests.integration.orphans import (
    OUTLIVES_STOPS,
    task_killed_as_its_run_is_prepared,
    task_killed_outright_as_it_stops_the_run,
    wait_for_file,
)

pytestmark = pytest.mark.usefixtures("airflow_db")
# The targets of the `target` fixture; a scenario a Spark application fits adds "spark".
ALL_TARGETS = ["local", "docker", "ssh"]
pytest_plugins = ["tests.integration.docker_engine"]

# A script that starts a child of its own (in the run's process group, as anything the script starts), says
# both pids in a file of its run directory and in its log, then trains for good.
# The pids file appears once both lines are printed: a test that acts on it finds them in the run's log.
TRAINS_FOR_GOOD = """
import os, subprocess, time
child = subprocess.Popen(["sleep", "300"])
print(f"pids {os.getpid()} {child.pid}", flush=True)
print("training forever", flush=True)
with open("pids.tmp", "w") as out:
    out.write(f"{os.getpid()} {child.pid}")
os.rename("pids.tmp", "pids")
time.sleep(300)
"""


def _retry(source: Path, target: Target, limit: float | None = None, **wait: Any) -> Any:
    """Try 2 of task retrain.train (see conftest.worker_dies_mid_run), followed to its end here."""
    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
    config = ScriptRunConfig(
        str(source), script="train.py", compute_target=target.name, max_run_duration_seconds=limit
    )
    return (
        Experiment(Workspace.get(), "reattach").submit(config, airflow_task=task).wait_for_completion(**wait)
    )


def _in_order(log: str, lines: list[str]) -> bool:
    position = 0
    for line in lines:
        position = log.find(line, position)
        if position < 0:
            return False
        position += len(line)
    return True


@pytest.mark.parametrize("target", [*ALL_TARGETS, "spark"], indirect=True)
def test_a_training_dag_comes_back_with_its_metrics_outputs_log_and_xcom(run_dag, tmp_path, target):
    token = secrets.token_hex(4)
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os, sys
        from airflow_amlrun.run_context import Run

        run = Run.get_context()
        print("working in", os.getcwd(), "with", sys.executable)
        for epoch in range(3):
            run.log("loss", 1.0 / (epoch + 1), step=epoch)
            print(f"epoch {epoch} done", flush=True)
        print("warming up the GPU that is not there", file=sys.stderr, flush=True)
        run.tag("stage", "nightly")
        os.makedirs("outputs", exist_ok=True)
        open("outputs/model.txt", "w").write("weights of TOKEN")
        print("model written")
        """.replace("TOKEN", token),
    )

    result = run_dag(dag_source(tmp_path / "src", target=target.name))

    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    assert summary["status"] == "Completed"
    assert summary["target"] == target.name
    assert summary["metrics"] == {"loss": pytest.approx(1 / 3)}
    # The script ran on the target, in its run directory there, under the target's interpreter.
    assert f"working in {target.script_dir(summary['run_id'])} with {target.python}" in result.log
    assert _in_order(result.log, ["epoch 0 done", "epoch 1 done", "epoch 2 done", "model written"])
    assert "warming up the GPU that is not there" in result.log
    assert Path(summary["outputs_uri"], "model.txt").read_text() == f"weights of {token}"

    run = Workspace.get().get_run(summary["run_id"])
    assert run.tags == {"stage": "nightly"}
    assert [p.step for p in Workspace.get().history.get_metrics(run.id, "loss")] == [0, 1, 2]
    std_log = Path(run.logs_uri, "std_log.txt").read_text()
    assert "epoch 2 done" in std_log and "warming up the GPU that is not there" in std_log
    # cleanup=on_success: nothing of the run is left on the target.
    assert not (target.runs / run.id).exists()
    assert target.containers(run.id) == []


def test_a_deferrable_task_defers_what_a_triggerer_can_reach_and_says_why_it_keeps_the_rest(
    run_dag, tmp_path, target
):
    # dag.test runs the trigger inline, in this process, and no triggerer of this Airflow runs on the machine:
    # a run only this machine reaches (local, the local Docker socket) stays with the task; an SSH run is
    # handed to the trigger. tests/integration/test_deferrable.py has a real triggerer.
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os
        from airflow_amlrun.run_context import Run

        run = Run.get_context()
        for step in range(3):
            run.log("acc", step / 10, step=step)
            print(f"step {step} printed", flush=True)
        os.makedirs("outputs", exist_ok=True)
        open("outputs/result.txt", "w").write("deferred or not")
        """,
    )

    result = run_dag(dag_source(tmp_path / "src", target=target.name, options={"deferrable": True}))

    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    assert (summary["status"], summary["metrics"]) == ("Completed", {"acc": pytest.approx(0.2)})
    assert Path(summary["outputs_uri"], "result.txt").read_text() == "deferred or not"
    assert [p.step for p in Workspace.get().history.get_metrics(summary["run_id"], "acc")] == [0, 1, 2]
    assert _in_order(result.log, ["step 0 printed", "step 1 printed", "step 2 printed"])
    kept = f"is followed in this worker, not deferred: runs on {target.name} can be followed only on this machine"
    if target.kind == "ssh":
        assert "the worker slot is freed" in result.log
        assert kept not in result.log
    else:
        # No triggerer of the suite's Airflow runs here (another Airflow's on the machine does not count).
        assert kept in result.log
        assert "the worker slot is freed" not in result.log
    assert target.containers(summary["run_id"]) == []


def test_a_failing_script_fails_the_task_with_its_exit_code_and_last_lines(run_dag, tmp_path, target):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import sys
        print("loading data", flush=True)
        print("something is wrong with column 'age'", file=sys.stderr, flush=True)
        sys.exit(3)
        """,
    )

    result = run_dag(dag_source(tmp_path / "src", target=target.name))

    assert result.state == "failed"
    [run] = Workspace.get().list_runs()
    assert run.status == "Failed"
    assert "exit code 3" in run.error
    # The task log says why, with the last lines of the script's output.
    assert "RunFailedError" in result.log
    assert "exit code 3" in result.log
    assert "loading data" in result.log and "something is wrong with column 'age'" in result.log
    assert target.containers(run.id) == []
    tail = (
        f"Run {run.id} failed: {run.error}\nLast lines of its output:\n"
        "  | loading data\n  | something is wrong with column 'age'"
    )
    assert tail in result.log


def test_a_run_past_its_max_duration_is_stopped_on_the_target_with_all_it_started(
    run_dag, tmp_path, target, monkeypatch
):
    # The task looks at its own deadline only between waits, and a wait ends early only when the run does:
    # with waits this long, whatever stops the run at its limit is the target's supervisor.
    monkeypatch.setenv("AIRFLOW__AMLRUN__POLL_INTERVAL_SECONDS", "120")
    write_script(tmp_path / "src", "train.py", TRAINS_FOR_GOOD)

    result = run_dag(dag_source(tmp_path / "src", target=target.name, limit=2))

    assert result.state == "failed"
    [run] = Workspace.get().list_runs()
    assert run.status == "Failed"
    assert run.error == "Exceeded max_run_duration_seconds=2; the run was stopped."
    assert "training forever" in result.log
    assert (
        "amlrun: the run exceeded max_run_duration_seconds=2; stopping it (SIGTERM, then SIGKILL after 5 s)"
        in result.log
    )
    pids = re.search(r"pids (\d+) (\d+)", result.log)
    assert pids, result.log
    # The script's child ended too (in a container: the container did).
    assert target.still_running(run.id, [int(pid) for pid in pids.groups()]) == []
    assert target.containers(run.id) == []


@pytest.mark.parametrize("target", [*ALL_TARGETS, "spark"], indirect=True)
def test_killing_the_task_cancels_the_run_and_stops_all_it_started(run_dag, tmp_path, target):
    write_script(tmp_path / "src", "train.py", TRAINS_FOR_GOOD)
    pids: list[int] = []

    def kill_task_once_the_script_runs() -> None:
        # What Airflow does to a task it stops: SIGTERM to the task process, whose handler calls on_kill.
        running = wait_until_running(also=lambda run: target.run_dir(run.id).joinpath("pids").exists())
        if running is not None:
            pids.extend(int(pid) for pid in target.run_dir(running.id).joinpath("pids").read_text().split())
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill_task_once_the_script_runs)
    killer.start()
    result = run_dag(dag_source(tmp_path / "src", target=target.name))
    killer.join()

    assert pids, "the script never ran"
    assert result.state == "failed"
    [run] = Workspace.get().list_runs()
    assert run.status == "Canceled"
    assert run.end is not None
    assert "training forever" in result.log
    assert target.still_running(run.id, pids) == []
    assert target.containers(run.id) == []


def test_a_task_killed_before_it_follows_its_run_logs_what_the_script_printed(tmp_path, target, capsys):
    write_script(tmp_path / "src", "train.py", TRAINS_FOR_GOOD)
    config = ScriptRunConfig(str(tmp_path / "src"), script="train.py", compute_target=target.name)
    operator = ScriptRunOperator(task_id="train", config=config)
    # The moment in execute between submitting the run and following it, when Airflow's SIGTERM handler
    # calls on_kill.
    operator._run = Experiment(Workspace.get(), "killed").submit(config)
    running = wait_until_running(also=lambda run: target.run_dir(run.id).joinpath("pids").exists())
    assert running is not None, "the script never ran"
    pids = [int(pid) for pid in target.run_dir(running.id).joinpath("pids").read_text().split()]

    capsys.readouterr()
    operator.on_kill()

    [run] = Workspace.get().list_runs()
    assert run.status == "Canceled"
    assert run.end is not None
    # The task log: the operator's lines, each its level, message and logger.
    logged = re.findall(r"\[(\w+) *\] (.*?) +\[airflow\.task\.operators\.", capsys.readouterr().out)
    assert logged == [
        ("info", f"Canceling run {run.id}"),
        ("info", "pids {} {}".format(*pids)),
        ("info", "training forever"),
    ]
    assert target.still_running(run.id, pids) == []
    assert target.containers(run.id) == []


def test_a_run_that_ended_on_its_own_just_before_the_killed_tasks_stop_is_recorded_as_it_ended(
    tmp_path, target, monkeypatch
):
    write_script(tmp_path / "src", "train.py", ENDS_WHEN_TOLD)
    config = ScriptRunConfig(str(tmp_path / "src"), script="train.py", compute_target=target.name)
    operator = ScriptRunOperator(task_id="train", config=config)
    # Killed between submitting the run and following it (as above). on_kill finds the run going and records
    # why it stops it; the run ends on its own in between, before the stop reaches it.
    run = operator._run = Experiment(Workspace.get(), "ended-first").submit(config)
    assert wait_until_running() is not None, "the run never started"
    ended_on_its_own_first(
        monkeypatch,
        run._book,
        "add_tags",
        target.run_dir(run.id),
        lambda: not run.target.wait(run.handle, 0).running,
    )

    operator.on_kill()

    record = Workspace.get().get_run(run.id)
    assert (record.status, record.error) == ("Completed", None)
    assert "done" in (Path(record.logs_uri) / "std_log.txt").read_text()
    assert target.containers(run.id) == []


# A task that Airflow kills before it submits its run: its SIGTERM handler runs on_kill and returns.
KILLED_BEFORE_IT_SUBMITS = """
class KilledBeforeItSubmits(ScriptRunOperator):
    def pre_execute(self, context):
        self.on_kill()

"""


def test_a_task_killed_before_it_submits_its_run_starts_none(run_dag, tmp_path):
    write_script(tmp_path / "src", "train.py", TRAINS_FOR_GOOD)
    dag = dag_source(tmp_path / "src")
    dag = dag.replace("with DAG(", KILLED_BEFORE_IT_SUBMITS + "with DAG(").replace(
        "    ScriptRunOperator(", "    KilledBeforeItSubmits("
    )

    result = run_dag(dag)

    assert result.state == "failed"
    assert "Task 'train' was killed before it submitted its run: none started." in result.log
    assert Workspace.get().list_runs() == []


# Where Airflow's SIGTERM handler (on_kill, which returns) lands as the task submits its run: before the run is
# recorded (as its code is snapshotted: on_kill finds no run yet), right after, once the target prepared its run
# directory, or once the target started it (before the run knew its handle); and once the target started it,
# whose start then fails as if its answer had been lost (the run is looked for by its id, found and stopped).
KILLED_AS_IT_SUBMITS = """
class KilledAsItSubmits(ScriptRunOperator):
    def _hold(self, run):
        if STEP == "snapshot":
            self.on_kill()
        super()._hold(run)
        if STEP == "snapshot":
            return
        if STEP == "recorded":
            self.on_kill()
            return
        fails = STEP == "submit_fails"
        name = "submit" if fails else STEP
        step = getattr(run.target, name)

        def then_killed(*args):
            try:
                done = step(*args)
            finally:
                self.on_kill()
            if fails:
                raise RuntimeError("the target's answer was lost")
            return done

        setattr(run.target, name, then_killed)

"""


@pytest.mark.parametrize("step", ["snapshot", "recorded", "prepare", "submit", "submit_fails"])
def test_a_task_killed_as_it_submits_starts_its_run_only_if_the_target_had_already(
    run_dag, tmp_path, target, step
):
    write_script(tmp_path / "src", "train.py", TRAINS_FOR_GOOD)
    dag = dag_source(tmp_path / "src", target=target.name)
    dag = dag.replace("with DAG(", KILLED_AS_IT_SUBMITS.replace("STEP", repr(step)) + "with DAG(").replace(
        "    ScriptRunOperator(", "    KilledAsItSubmits("
    )

    result = run_dag(dag)

    assert result.state == "failed"
    [run] = Workspace.get().list_runs()
    assert (run.status, run.error, run.end is not None) == (
        "Canceled",
        "Canceled: its Airflow task was killed.",
        True,
    )
    assert target.containers(run.id) == []
    pids = target.run_dir(run.id) / "pids"
    if step.startswith("submit"):
        # Started on its target before the kill: stopped there, with all it started (the supervisor leads the
        # run's process group; the script's pids, if it got as far as writing them). A start that failed after
        # it was never recorded Running.
        assert run.handle is not None and (run.start is not None) == (step == "submit")
        started = [int(pid) for pid in pids.read_text().split()] if pids.exists() else []
        assert target.still_running(run.id, started, group=run.handle.get("pid")) == []
    else:
        # Never started: no handle, no start, and the script never ran.
        assert (run.handle, run.start) == (None, None)
        assert not pids.exists()
        assert "training forever" not in result.log
        if step in ("snapshot", "recorded"):
            assert not target.run_dir(run.id).exists()


# A retry that Airflow kills before it submits: the run its earlier try left (the worker died mid-run) is
# waiting for it to re-attach.
KILLED_AFTER_AN_EARLIER_TRY_DIED = """
from pathlib import Path
from tests.conftest import worker_dies_mid_run
from tests.integration.orphans import OUTLIVES_STOPS, task_killed_outright_as_it_stops_the_run, wait_for_file

class KilledAfterAnEarlierTryDied(ScriptRunOperator):
    def pre_execute(self, context):
        ti = context["ti"]
        orphan = worker_dies_mid_run(Path(SOURCE), TARGET, task=(ti.dag_id, ti.task_id, ti.run_id))
        wait_for_file(Path(PIDS.replace("RUN_ID", orphan.id)))
        self.on_kill()

"""


def test_a_retry_killed_before_it_submits_stops_the_run_an_earlier_try_left(run_dag, tmp_path, target):
    write_script(tmp_path / "src", "train.py", TRAINS_FOR_GOOD)
    operator = KILLED_AFTER_AN_EARLIER_TRY_DIED.replace("SOURCE", repr(str(tmp_path / "src")))
    operator = operator.replace("TARGET", repr(target.name)).replace(
        "PIDS", repr(str(target.run_dir("RUN_ID") / "pids"))
    )
    dag = dag_source(tmp_path / "src", target=target.name)
    dag = dag.replace("with DAG(", operator + "with DAG(").replace(
        "    ScriptRunOperator(", "    KilledAfterAnEarlierTryDied("
    )

    result = run_dag(dag)

    [orphan] = Workspace.get().list_runs()
    assert result.state == "failed"
    assert (
        f"Task 'train' was killed before it submitted its run: none started; run {orphan.id}, left by an earlier "
        "try, was stopped." in result.log
    )
    assert (orphan.status, orphan.error) == ("Canceled", "Canceled: its Airflow task was killed.")
    pids = [int(pid) for pid in target.run_dir(orphan.id).joinpath("pids").read_text().split()]
    assert target.still_running(orphan.id, pids) == []
    assert target.containers(orphan.id) == []


def test_a_task_killed_as_it_submits_its_run_stops_the_run_once_it_exists(run_dag, tmp_path, target):
    write_script(tmp_path / "src", "train.py", TRAINS_FOR_GOOD)

    def kill_task_once_the_run_is_recorded() -> None:
        # The row is written before the run is started on its target (a container created, a host reached):
        # SIGTERM lands while the task submits, or right after.
        deadline = time.monotonic() + 60
        while newest_run() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill_task_once_the_run_is_recorded)
    killer.start()
    result = run_dag(dag_source(tmp_path / "src", target=target.name))
    killer.join()

    assert result.state == "failed"
    [run] = Workspace.get().list_runs()
    assert (run.status, run.end is not None) == ("Canceled", True)
    assert f"Canceling run {run.id}" in result.log
    assert target.containers(run.id) == []
    pids = target.run_dir(run.id) / "pids"
    if pids.exists():  # the script got as far as to start its child before it was stopped
        assert target.still_running(run.id, [int(pid) for pid in pids.read_text().split()]) == []


def test_a_retry_records_canceled_the_run_its_killed_try_stopped_without_recording_and_starts_anew(
    tmp_path, target
):
    from airflow_amlrun.run import FollowState, ScriptRun
    from airflow_amlrun.run.state import STOP_REQUESTED_TAG

    source = tmp_path / "src"
    write_script(source, "train.py", TRAINS_FOR_GOOD)
    orphan = worker_dies_mid_run(source, target.name)
    wait_for_file(target.run_dir(orphan.id) / "pids")
    # Try 1 is killed: its stop reaches the run, and the SIGKILL comes before it records the end (as `cancel` does
    # up to its recording).
    killed = ScriptRun.resumed(Workspace.get(), orphan.id, FollowState())
    killed._book.add_tags({STOP_REQUESTED_TAG: "Canceled: its Airflow task was killed."})
    killed.target.cancel(killed.handle)
    killed.abandon()
    # The script as the retry snapshots it: its run ends at once.
    write_script(source, "train.py", "print('second run')")

    lines: list[str] = []
    record = _retry(source, target, output=lines.append)

    assert record.id != orphan.id and record.status == "Completed", (record.status, record.error)
    assert lines == ["second run"]
    stopped = Workspace.get().get_run(orphan.id)
    assert (stopped.status, stopped.error) == ("Canceled", "Canceled: its Airflow task was killed.")
    assert sorted(run.id for run in Workspace.get().list_runs()) == sorted([orphan.id, record.id])


@pytest.mark.parametrize("build", ["in_a_child_process", "in_the_task_process"])
def test_a_run_whose_task_is_killed_as_it_is_prepared_is_recorded_canceled_and_a_retry_starts_anew(
    tmp_path, target, build
):
    from airflow_amlrun.run.state import STOP_REQUESTED_TAG

    source = tmp_path / "src"
    write_script(source, "train.py", "print('second run')")
    left = task_killed_as_its_run_is_prepared(source, target.name, build)
    if build == "in_a_child_process":
        # The build's process got the stop too, and the preparing failed with it: the task recorded the run
        # Canceled before it was killed outright.
        assert (left.status, left.error, left.handle, left.start) == ("Canceled", KILLED, None, None)
    else:
        # Killed outright with the preparing under way: the row says a stop was asked.
        assert (left.status, left.handle, left.tags.get(STOP_REQUESTED_TAG)) == ("Preparing", None, KILLED)

    lines: list[str] = []
    record = _retry(source, target, output=lines.append)

    assert record.id != left.id and record.status == "Completed", (record.status, record.error)
    assert lines == ["second run"]
    stopped = Workspace.get().get_run(left.id)
    assert (stopped.status, stopped.error, stopped.handle, stopped.start) == ("Canceled", KILLED, None, None)


def test_a_retry_after_its_try_was_killed_outright_as_it_stopped_the_run_records_it_canceled_and_starts_anew(
    tmp_path, target
):
    source = tmp_path / "src"
    write_script(source, "train.py", OUTLIVES_STOPS)
    stopped, pid = task_killed_outright_as_it_stops_the_run(source, target)
    # The retry comes once the stop's grace period is over (Airflow's retry_delay is minutes).
    _wait_for(lambda: target.still_running(stopped, [pid]) == [], timeout=30)
    assert target.still_running(stopped, [pid]) == [], "the stopped run went on"
    write_script(source, "train.py", "print('trained again', flush=True)\n")

    retried = _retry(source, target)

    record = Workspace.get().get_run(stopped)
    assert record.status == "Canceled", record.error
    assert "a stop (SIGTERM) reached the run on its target" in (record.error or "")
    assert retried.id != stopped
    assert retried.status == "Completed", retried.error
    assert "trained again" in (Path(retried.logs_uri) / "std_log.txt").read_text()


def test_a_retry_after_the_worker_died_reattaches_to_the_running_script(tmp_path, target):
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        """
        import os, time
        from airflow_amlrun.run_context import Run
        os.makedirs("outputs", exist_ok=True)
        open("outputs/starts.txt", "a").write("started\\n")
        run = Run.get_context()
        for epoch in range(8):
            print(f"epoch {epoch}", flush=True)
            run.log("loss", 1 / (epoch + 1), step=epoch)
            time.sleep(0.5)
        print("finished")
        """,
    )
    # Try 1: a worker that submits the run, then dies hard while the script runs.
    orphan = worker_dies_mid_run(source, target.name, settle=1.0)
    assert orphan.status == "Running"

    # Try 2: the same task instance submits again, and follows the run it finds.
    lines: list[str] = []
    record = _retry(source, target, output=lines.append)

    assert record.id == orphan.id
    assert record.status == "Completed" and record.try_number == 2
    assert lines == [f"epoch {n}" for n in range(8)] + ["finished"]  # the whole log, from the start
    assert [p.step for p in Workspace.get().history.get_metrics(record.id, "loss")] == list(range(8))
    assert Path(record.outputs_uri, "starts.txt").read_text() == "started\n"  # the script ran once
    assert [run.id for run in Workspace.get().list_runs()] == [orphan.id]
    assert target.containers(record.id) == []


def test_a_run_whose_worker_died_still_stops_at_its_limit_and_the_retry_records_why(tmp_path, target):
    source = tmp_path / "src"
    write_script(source, "train.py", TRAINS_FOR_GOOD)
    orphan = worker_dies_mid_run(source, target.name, max_run_duration_seconds=2)

    # Nobody follows the run now; the supervisor on the target stops it on time all the same.
    control = target.run_dir(orphan.id) / ".amlrun"
    assert wait_for_file(control / "exit_code").strip() in (
        str(128 + signal.SIGTERM),
        str(128 + signal.SIGKILL),
    )
    assert json.loads((control / "ended_by").read_text()) == {"reason": "max_run_duration", "max_seconds": 2}
    pids = [int(pid) for pid in (target.run_dir(orphan.id) / "pids").read_text().split()]
    # Everything in the run's process group ends with it (its supervisor leads the group).
    group = None if target.kind == "docker" else orphan.handle["pid"]
    _wait_for(lambda: target.still_running(orphan.id, pids, group) == [])
    assert target.still_running(orphan.id, pids, group) == []

    lines: list[str] = []
    with pytest.raises(RunTimeoutError):
        _retry(source, target, limit=2, output=lines.append)

    [record] = Workspace.get().list_runs()
    assert record.id == orphan.id and record.try_number == 2
    assert record.status == "Failed"
    assert record.error == "Exceeded max_run_duration_seconds=2; the run was stopped."
    # The whole log, from the start, ending with what the supervisor on the target said as it stopped the run.
    assert lines[0].startswith("pids ") and lines[1:] == [
        "training forever",
        "amlrun: the run exceeded max_run_duration_seconds=2; stopping it (SIGTERM, then SIGKILL after 5 s)",
    ]
    assert target.containers(record.id) == []


def _wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("target", ["local", "ssh"], indirect=True)
def test_links_a_script_writes_in_its_outputs_never_bring_files_from_outside_the_run(
    run_dag, tmp_path, amlrun_home, target
):
    secret = target.outside / f"worker-secret-{secrets.token_hex(4)}.cfg"
    secret.write_text("sql_alchemy_conn = postgresql://airflow:hunter2-WORKER-SECRET@db/airflow\n")
    beside = target.runs / "something"  # what "../../something" from a run's outputs/ reaches
    beside.parent.mkdir(parents=True, exist_ok=True)
    beside.write_text("another run's RUNS-DIR-SECRET\n")
    write_script(
        tmp_path / "src",
        "train.py",
        f"""
        import os
        os.makedirs("outputs/sub", exist_ok=True)
        open("outputs/model.txt", "w").write("trained weights")
        open("outputs/sub/notes.txt", "w").write("notes")
        os.symlink({str(secret)!r}, "outputs/x")
        os.symlink("../../something", "outputs/y")
        os.symlink("model.txt", "outputs/best.txt")
        os.symlink("/etc", "outputs/etc")
        os.symlink("sub", "outputs/sub-again")
        os.mkfifo("outputs/pipe")
        os.symlink("/etc", "logs/etc")
        print("outputs written")
    """,
    )
    try:
        result = run_dag(dag_source(tmp_path / "src", target=target.name))
    finally:
        secret.unlink()
        beside.unlink()

    assert result.state == "success", result.log
    outputs = Path(result.xcoms["train"]["outputs_uri"])
    assert sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*")) == [
        "best.txt",
        "model.txt",
        "sub",
        "sub/notes.txt",
    ]
    assert (outputs / "best.txt").read_text() == "trained weights"
    for path in (amlrun_home / "store").rglob("*"):
        if path.is_file():
            assert b"SECRET" not in path.read_bytes(), path
    assert f"{target.says}'outputs/x' is a symlink to {str(secret)!r}, outside outputs/" in result.log
    assert f"{target.says}'outputs/y' is a symlink to '../../something', outside outputs/" in result.log
    assert f"{target.says}'outputs/etc' is a symlink to '/etc', outside outputs/" in result.log
    assert f"{target.says}'outputs/sub-again' is a symlink to 'sub', a folder: not followed" in result.log
    assert f"{target.says}'outputs/pipe' is not a regular file" in result.log
    assert f"{target.says}'logs/etc' is a symlink to '/etc', outside logs/" in result.log
