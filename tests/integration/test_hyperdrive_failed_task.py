"""A sweep whose task fails for good is ended at once, under dag.test: when Airflow does not retry the task (its last
try, no retries), the sweep's live runs are stopped and the sweep is recorded Failed with the task's error, rather
than left Running (or Queued) for `amlrun reconcile`; when it retries the task, the try leaves the sweep and its
live runs as they are, and the retry goes on with the sweep (unless resume_on_retry=False: the try ends it).

Most sweeps here defer (dag.test runs the trigger inline, in this process), on the local target as a target reached
over the network is: its runs may be followed by a triggerer anywhere.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from airflow_amlrun import Workspace
from airflow_amlrun.config import Settings
from airflow_amlrun.history import RunRecord, RunStatus
from airflow_amlrun.operators.hyperdrive import KILLED
from airflow_amlrun.targets import registry
from airflow_amlrun.targets.base import TargetStatus
from airflow_amlrun.targets.handles import LocalHandle
from airflow_amlrun.targets.local import LocalTarget
from tests.conftest import write_script
from tests.integration.conftest import alive
from tests.integration.private_postgres import PrivatePostgres

pytestmark = pytest.mark.usefixtures("airflow_db", "amlrun_home")


class FollowedAnywhereLocalTarget(LocalTarget):
    """The local target, deferred as a target reached over the network is (SSH, a Docker daemon over TCP)."""

    followed_only_here = False

    @classmethod
    def from_connection(
        cls, name: str, conn: Any, settings: Settings, cache_dir: Path
    ) -> FollowedAnywhereLocalTarget:
        return cls(settings, cache_dir, name)


class ConnectionLostOnceLocalTarget(FollowedAnywhereLocalTarget):
    """As above, whose connection cannot be read the second time a process asks for it, as when Airflow's API
    server does not answer for a moment: the task reads it as it records the sweep, then again to decide whether
    the sweep's runs may be deferred, before any run starts."""

    reads: ClassVar[dict[str, int]] = {}
    # The run history's server, when the worker loses its network (the history stops answering too) rather than
    # the API server one request.
    history_server: ClassVar[PrivatePostgres | None] = None

    @classmethod
    def from_connection(
        cls, name: str, conn: Any, settings: Settings, cache_dir: Path
    ) -> FollowedAnywhereLocalTarget:
        cls.reads[name] = cls.reads.get(name, 0) + 1
        if cls.reads[name] == 2:
            if cls.history_server is not None:
                cls.history_server.stop()
            raise ConnectionError(f"Airflow's API server did not answer while reading connection {name!r}")
        return super().from_connection(name, conn, settings, cache_dir)


class LookLostOnceLocalTarget(FollowedAnywhereLocalTarget):
    """The local target, one of whose looks at a run fails once, as when the connection to a remote target drops for
    a moment: the first look at a live run after a run of the sweep ended (and was recorded) raises. Each look at a
    run after that by another follower (a retry that took the run over, a new run) touches `release`, the file the
    sweep's long run waits for: that run ends once followed from there, and not before; or, with
    `released_as_the_look_fails`, it is released by the look that fails, which waits for its end before it raises.
    The look that fails waits first for both runs' scripts to have started (their marks in `marks`): a run stopped
    while its interpreter still starts up leaves no mark, and the test could not tell it ran.
    """

    armed: ClassVar[bool] = False
    failed: ClassVar[bool] = False
    release: ClassVar[Path | None] = None
    marks: ClassVar[Path | None] = None
    released_as_the_look_fails: ClassVar[bool] = False
    # Whether the look that failed was this follower's.
    lost_a_look = False

    def cleanup(self, handle: LocalHandle, *, remove_files: bool) -> None:
        super().cleanup(handle, remove_files=remove_files)
        LookLostOnceLocalTarget.armed = True

    def wait(self, handle: LocalHandle, timeout: float) -> TargetStatus:
        cls = LookLostOnceLocalTarget
        if cls.armed and not cls.failed:
            cls.failed = self.lost_a_look = True
            deadline = time.monotonic() + 60
            while (
                cls.marks is not None and len(list(cls.marks.iterdir())) < 2 and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            assert cls.marks is None or len(list(cls.marks.iterdir())) >= 2, (
                "the sweep's scripts did not start"
            )
            if cls.released_as_the_look_fails and cls.release is not None:
                cls.release.touch()
                assert not super().wait(handle, 60).running
            raise ConnectionError(f"the target did not answer a look at the run in {handle.run_dir}")
        if cls.failed and not self.lost_a_look and cls.release is not None:
            cls.release.touch()
        return super().wait(handle, timeout)


@pytest.fixture
def targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection `anywhere` of FollowedAnywhereLocalTarget; `flaky_once` and `flaky_retried` of
    ConnectionLostOnceLocalTarget; `look_lost_once` of LookLostOnceLocalTarget."""
    for kind, cls in (
        ("amlrun_anywhere", FollowedAnywhereLocalTarget),
        ("amlrun_connection_lost_once", ConnectionLostOnceLocalTarget),
        ("amlrun_look_lost_once", LookLostOnceLocalTarget),
    ):
        monkeypatch.setitem(registry.CONNECTION_KINDS, kind, f"{__name__}:{cls.__name__}")
    monkeypatch.setattr(ConnectionLostOnceLocalTarget, "reads", {})
    monkeypatch.setattr(ConnectionLostOnceLocalTarget, "history_server", None)
    for name, value in (
        ("armed", False),
        ("failed", False),
        ("release", None),
        ("marks", None),
        ("released_as_the_look_fails", False),
    ):
        monkeypatch.setattr(LookLostOnceLocalTarget, name, value)
    monkeypatch.setenv("AIRFLOW_CONN_ANYWHERE", json.dumps({"conn_type": "amlrun_anywhere"}))
    monkeypatch.setenv("AIRFLOW_CONN_LOOK_LOST_ONCE", json.dumps({"conn_type": "amlrun_look_lost_once"}))
    for conn_id in ("FLAKY_ONCE", "FLAKY_RETRIED"):
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id}", json.dumps({"conn_type": "amlrun_connection_lost_once"})
        )


# Run 1 waits until both runs started (the task then reads the source folder no more until the trigger hands the
# sweep back), moves the DAG's source folder away, as a deploy replacing the DAG folder would, and ends; run 2
# trains on, until something stops it. Each run leaves a mark named by its alpha and pid.
MOVING_SCRIPT = """
    import argparse, os, time
    from pathlib import Path
    from airflow_amlrun.run_context import Run
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--marks")
    parser.add_argument("--source")
    args = parser.parse_args()
    Path(args.marks, f"{args.alpha:g}-{os.getpid()}").touch()
    Run.get_context().log("loss", args.alpha)
    if args.alpha == 1:
        while len(os.listdir(args.marks)) < 2:
            time.sleep(0.05)
        os.rename(args.source, args.source + "-moved")
    else:
        time.sleep(600)
"""

QUICK_SCRIPT = """
    import argparse
    from airflow_amlrun.run_context import Run
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float)
    Run.get_context().log("loss", parser.parse_args().alpha)
"""


def sweep_dag(tasks: str) -> str:
    return f"""
        import datetime
        import pendulum
        from airflow.sdk import DAG
        from airflow_amlrun import ScriptRunConfig
        from airflow_amlrun.hyperdrive import GridParameterSampling, HyperDriveConfig, choice
        from airflow_amlrun.operators.hyperdrive import HyperDriveOperator


        def sweep(source, target, arguments=()):
            return HyperDriveConfig(
                run_config=ScriptRunConfig(source, script="train.py", compute_target=target, arguments=list(arguments)),
                hyperparameter_sampling=GridParameterSampling({{"--alpha": choice(1, 2)}}),
                primary_metric_name="loss",
                primary_metric_goal="minimize",
                max_total_runs=2,
                max_concurrent_runs=2,
            )


        with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
{tasks}
    """


def moving_sweep_task(source: Path, marks: Path, retries: int) -> str:
    arguments = ["--marks", str(marks), "--source", str(source)]
    return f"""
            HyperDriveOperator(
                task_id="tune",
                config=sweep({str(source)!r}, "anywhere", {arguments!r}),
                deferrable=True,
                retries={retries},
                retry_delay=datetime.timedelta(seconds=1),
            )
    """


def sweep_of(dag_id: str, task_id: str) -> tuple[RunRecord, list[RunRecord]]:
    """The task's one sweep and its runs, in the order of their alpha."""
    history = Workspace.get().history
    [parent] = [r for r in history.list_runs(dag_id=dag_id, task_id=task_id) if r.target == "hyperdrive"]
    return parent, sorted(
        history.child_runs(parent.id), key=lambda c: json.loads(c.tags["hyperparameters"])["--alpha"]
    )


def pids_of(marks: Path) -> dict[str, int]:
    """Each run's script's pid, by its alpha."""
    return {alpha: int(pid) for alpha, pid in (mark.name.split("-") for mark in marks.iterdir())}


def stop_what_is_left(marks: Path) -> None:
    """The test's own clean-up, after its verdict: a script left running would train on for minutes."""
    for pid in pids_of(marks).values() if marks.exists() else ():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_deferred_sweep_whose_task_fails_for_good_stops_its_runs_and_is_recorded_failed(
    run_dag: Any, targets: None, tmp_path: Path
) -> None:
    source, marks = tmp_path / "src", tmp_path / "marks"
    write_script(source, "train.py", MOVING_SCRIPT)
    marks.mkdir()
    try:
        result = run_dag(sweep_dag(moving_sweep_task(source, marks, retries=0)))
        parent, children = sweep_of(result.dag_id, "tune")
        pids = pids_of(marks)
    finally:
        stop_what_is_left(marks)

    # The task came back from the trigger to start the next runs, and could not read its source folder: it failed,
    # with its own error.
    assert (result.state, result.task_states) == ("failed", {"tune": "failed"}), result.log
    assert "are followed by the triggerer from here" in result.log
    missing = f"source_directory '{source}' does not exist"
    assert missing in result.log
    # The sweep is ended with that error, not left Running for reconcile.
    assert parent.status is RunStatus.FAILED, (parent.status, parent.error)
    assert parent.error is not None and parent.error.startswith(f"The sweep failed: {missing}"), parent.error
    assert parent.end is not None
    assert f"Sweep {parent.id} was recorded Failed and its live runs were stopped" in result.log
    # Run 1 had ended on its own, and is recorded as it ended; run 2, still training, was stopped.
    first, second = children
    assert (first.status, first.metrics) == (RunStatus.COMPLETED, {"loss": 1.0})
    assert (second.status, second.error) == (RunStatus.CANCELED, f"Canceled: {parent.error}")
    assert not alive(pids["2"]), "run 2's script still runs"


def test_a_sweep_left_for_a_retry_that_fails_too_is_ended_by_the_last_try(
    run_dag: Any, targets: None, tmp_path: Path
) -> None:
    source, marks = tmp_path / "src", tmp_path / "marks"
    write_script(source, "train.py", MOVING_SCRIPT)
    marks.mkdir()
    try:
        result = run_dag(sweep_dag(moving_sweep_task(source, marks, retries=1)))
        parent, children = sweep_of(result.dag_id, "tune")
        pids = pids_of(marks)
    finally:
        stop_what_is_left(marks)

    assert (result.state, result.task_states) == ("failed", {"tune": "failed"}), result.log
    missing = f"source_directory '{source}' does not exist"
    ended = f"Sweep {parent.id} was recorded Failed and its live runs were stopped"
    assert parent.status is RunStatus.FAILED, (parent.status, parent.error)
    assert parent.error is not None and parent.error.startswith(f"The sweep failed: {missing}"), parent.error
    # The first try failed as it took the sweep back, and left it for the retry; the retry failed as it began, and,
    # the last try, ended it.
    assert result.log.count(ended) == 1, result.log
    assert result.log.index(missing) < result.log.index(ended), result.log
    first, second = children
    assert (first.status, first.metrics) == (RunStatus.COMPLETED, {"loss": 1.0})
    assert len(Workspace.get().history.get_metrics(first.id, "loss")) == 1
    assert (second.status, second.error) == (RunStatus.CANCELED, f"Canceled: {parent.error}")
    assert not alive(pids["2"]), "run 2's script still runs"


def flaky_sweep_task(source: Path, task_id: str, retries: int) -> str:
    """A task whose target's connection (`flaky_<task_id>`) cannot be read once the sweep is recorded."""
    return f"""
            HyperDriveOperator(
                task_id={task_id!r},
                config=sweep({str(source)!r}, {f"flaky_{task_id}"!r}),
                deferrable=True,
                retries={retries},
                retry_delay=datetime.timedelta(seconds=1),
            )
    """


def test_a_sweep_whose_task_fails_before_any_run_started_is_failed_at_once_or_resumed_by_the_retry(
    run_dag: Any, targets: None, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    write_script(source, "train.py", QUICK_SCRIPT)
    tasks = flaky_sweep_task(source, "once", retries=0) + flaky_sweep_task(source, "retried", retries=1)
    result = run_dag(sweep_dag(tasks))

    assert result.task_states == {"once": "failed", "retried": "success"}, result.log
    # No retry: the sweep recorded a moment before is Failed with the task's error, not left Queued.
    failed, runs = sweep_of(result.dag_id, "once")
    lost = "Airflow's API server did not answer while reading connection 'flaky_once'"
    assert lost in result.log
    assert (failed.status, failed.error, runs) == (RunStatus.FAILED, f"The sweep failed: {lost}", [])
    assert failed.end is not None
    assert f"Sweep {failed.id} was recorded Failed and its live runs were stopped" in result.log
    # A retry: the sweep is left Queued for it, and it goes on with that sweep (the only one of its task).
    resumed, runs = sweep_of(result.dag_id, "retried")
    assert (resumed.status, resumed.try_number) == (RunStatus.COMPLETED, 2)
    assert [r.status for r in runs] == [RunStatus.COMPLETED] * 2
    assert f"Resuming sweep {resumed.id}, left unfinished by try 1 of this task" in result.log
    assert f"Sweep {resumed.id} was recorded" not in result.log


def test_a_sweep_that_cannot_be_ended_either_is_left_for_reconcile_and_the_task_fails_with_its_own_error(
    run_dag: Any,
    targets: None,
    own_postgres: PrivatePostgres,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker loses its network once the sweep is recorded: the connection cannot be read, and the run history
    # (this test's own PostgreSQL server) does not answer the task's attempt to record the sweep Failed either.
    monkeypatch.setattr(ConnectionLostOnceLocalTarget, "history_server", own_postgres)
    source = tmp_path / "src"
    write_script(source, "train.py", QUICK_SCRIPT)
    try:
        result = run_dag(sweep_dag(flaky_sweep_task(source, "once", retries=0)))
    finally:
        own_postgres.start()

    assert result.task_states == {"once": "failed"}, result.log
    sweep, runs = sweep_of(result.dag_id, "once")
    assert (sweep.status, runs) == (RunStatus.QUEUED, [])  # for `amlrun reconcile` to settle
    # The log says so, then the task fails with its own error, not the history's.
    left = f"ending its sweep {sweep.id} failed too: what is left unfinished is settled by `amlrun reconcile`"
    assert left in result.log
    lost = "ConnectionError: Airflow's API server did not answer while reading connection 'flaky_once'"
    assert result.log.index(left) < result.log.rindex(lost), result.log


# Run 1 ends at once; run 2 logs its loss, then trains on until `release` exists (see LookLostOnceLocalTarget), and
# logs its final loss. Each run leaves a mark named by its alpha and pid.
RELEASED_SCRIPT = """
    import argparse, os, sys, time
    from pathlib import Path
    from airflow_amlrun.run_context import Run
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--marks")
    parser.add_argument("--release")
    args = parser.parse_args()
    Path(args.marks, f"{args.alpha:g}-{os.getpid()}").touch()
    run = Run.get_context()
    run.log("loss", args.alpha)
    if args.alpha == 2:
        deadline = time.time() + 120
        while not Path(args.release).exists():
            if time.time() > deadline:
                sys.exit("never released")
            time.sleep(0.05)
        run.log("loss", args.alpha / 4)
"""


def look_lost_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resume_on_retry: bool
) -> tuple[str, Path]:
    """A DAG whose sweep (followed in the worker) loses a look at its live run 2 once run 1 ended, failing its
    first try; retried once. Returns the DAG and the runs' marks folder."""
    source, marks, release = tmp_path / "src", tmp_path / "marks", tmp_path / "release"
    write_script(source, "train.py", RELEASED_SCRIPT)
    marks.mkdir()
    monkeypatch.setattr(LookLostOnceLocalTarget, "release", release)
    monkeypatch.setattr(LookLostOnceLocalTarget, "marks", marks)
    arguments = ["--marks", str(marks), "--release", str(release)]
    return sweep_dag(
        f"""
            HyperDriveOperator(
                task_id="tune",
                config=sweep({str(source)!r}, "look_lost_once", {arguments!r}),
                deferrable=False,
                resume_on_retry={resume_on_retry},
                retries=1,
                retry_delay=datetime.timedelta(seconds=1),
            )
    """
    ), marks


def marks_of(marks: Path) -> list[str]:
    """The alpha of each run's script that ran, one mark per process."""
    return sorted(mark.name.split("-")[0] for mark in marks.iterdir())


@pytest.mark.parametrize("run_2_ends", ["followed by the retry", "while no one follows it"])
def test_a_try_that_fails_mid_sweep_leaves_the_sweep_to_its_retry_which_follows_the_live_run_to_its_end(
    run_dag: Any, targets: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_2_ends: str
) -> None:
    # Run 2 ends once the retry follows it; or as try 1 fails, so that the retry finds it ended on its target.
    monkeypatch.setattr(
        LookLostOnceLocalTarget, "released_as_the_look_fails", run_2_ends != "followed by the retry"
    )
    dag, marks = look_lost_sweep(tmp_path, monkeypatch, resume_on_retry=True)
    try:
        result = run_dag(dag)
        parent, children = sweep_of(result.dag_id, "tune")
        ran, pids = marks_of(marks), pids_of(marks)
    finally:
        stop_what_is_left(marks)

    assert (result.state, result.task_states) == ("success", {"tune": "success"}), result.log
    # Try 1 failed as it looked at run 2, once run 1 had ended, and left the sweep to the retry, saying so.
    assert "ConnectionError: the target did not answer a look at the run" in result.log
    left = f"Sweep {parent.id} is left as it is for the retry of this task to resume (resume_on_retry)"
    resumed = f"Resuming sweep {parent.id}, left unfinished by try 1 of this task"
    assert left in result.log and resumed in result.log, result.log
    assert result.log.index(left) < result.log.index(resumed)
    assert f"Sweep {parent.id} was recorded" not in result.log
    # Try 2 went on with the same sweep to its end: the one sweep of the task, and its result the task's XCom.
    assert (parent.status, parent.try_number) == (RunStatus.COMPLETED, 2), (parent.status, parent.error)
    assert result.xcoms["tune"]["sweep_run_id"] == parent.id
    # Run 1's result is kept (it ran once); run 2, live when try 1 failed, was followed to its end by try 2 (or found
    # ended), not started again: one process, its whole series recorded once, and the best run for its final loss.
    assert ran == ["1", "2"]
    first, second = children
    history = Workspace.get().history
    assert (first.status, first.metrics) == (RunStatus.COMPLETED, {"loss": 1.0})
    assert [p.value for p in history.get_metrics(first.id, "loss")] == [1.0]
    assert (second.status, second.error) == (RunStatus.COMPLETED, None)
    assert [p.value for p in history.get_metrics(second.id, "loss")] == [2.0, 0.5]
    assert result.xcoms["tune"]["best_run"]["run_id"] == second.id
    assert not alive(pids["2"])
    # Try 1 let go of run 2 as it failed (its heartbeat stopped, for the retry or reconcile to go by); nothing in this
    # process reports on the sweep or its runs any more.
    assert [t.name for t in threading.enumerate() if t.is_alive() and parent.id in t.name] == []
    assert [t.name for t in threading.enumerate() if t.is_alive() and second.id in t.name] == []


def test_a_try_that_fails_mid_sweep_without_resume_on_retry_ends_its_sweep_and_the_retry_starts_anew(
    run_dag: Any, targets: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dag, marks = look_lost_sweep(tmp_path, monkeypatch, resume_on_retry=False)
    try:
        result = run_dag(dag)
        history = Workspace.get().history
        ended, anew = sorted(
            (r for r in history.list_runs(dag_id=result.dag_id, task_id="tune") if r.target == "hyperdrive"),
            key=lambda r: r.try_number or 0,
        )
        first, second = sorted(
            history.child_runs(ended.id), key=lambda c: json.loads(c.tags["hyperparameters"])["--alpha"]
        )
        ran = marks_of(marks)
        running = [alpha for alpha, pid in (m.name.split("-") for m in marks.iterdir()) if alive(int(pid))]
    finally:
        stop_what_is_left(marks)

    assert (result.state, result.task_states) == ("success", {"tune": "success"}), result.log
    # Try 1 ended its sweep as it failed, and said so: run 2 stopped, the sweep recorded Failed with the error.
    lost = "the target did not answer a look at the run"
    assert (ended.status, ended.try_number) == (RunStatus.FAILED, 1), (ended.status, ended.error)
    assert ended.error is not None and ended.error.startswith(f"The sweep failed: {lost}"), ended.error
    assert (first.status, first.metrics) == (RunStatus.COMPLETED, {"loss": 1.0})
    assert (second.status, second.error) == (RunStatus.CANCELED, f"Canceled: {ended.error}")
    assert (
        f"Sweep {ended.id} was recorded Failed and its live runs were stopped. The task failed, and its retry "
        "starts a new sweep (resume_on_retry=False)."
    ) in result.log
    assert "is left as it is for the retry" not in result.log
    # Try 2 ran a sweep of its own, from the start.
    assert (anew.status, anew.try_number) == (RunStatus.COMPLETED, 2), (anew.status, anew.error)
    assert (ran, running) == (["1", "1", "2", "2"], [])


def test_a_sweep_whose_task_is_killed_as_it_submits_the_sweep_starts_no_run_and_is_recorded_canceled(
    run_dag: Any, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    write_script(source, "train.py", QUICK_SCRIPT)
    # Airflow's SIGTERM handler runs on_kill and returns: here, before the sweep exists.
    tasks = f"""
            class KilledAsItSubmits(HyperDriveOperator):
                def pre_execute(self, context):
                    self.on_kill()

            KilledAsItSubmits(task_id="tune", config=sweep({str(source)!r}, "local"))
    """

    result = run_dag(sweep_dag(tasks))

    assert result.task_states == {"tune": "failed"}, result.log
    parent, runs = sweep_of(result.dag_id, "tune")
    assert (parent.status, parent.error, runs) == (
        RunStatus.CANCELED,
        "Canceled: the Airflow task running the sweep was stopped.",
        [],
    )
    assert parent.end is not None


# Where Airflow's SIGTERM handler (on_kill, which returns) lands as the sweep starts its first run: before the run
# is recorded (as it is drawn and its code snapshotted), or as its run directory is prepared on its target.
KILLED_AS_A_RUN_STARTS = {
    "before_it_is_recorded": """
                def execute(self, context):
                    original = ScriptRun.__dict__["submit"]
                    submit = ScriptRun.submit

                    def killed_then_submitted(*args, **kwargs):
                        self.on_kill()
                        return submit(*args, **kwargs)

                    ScriptRun.submit = killed_then_submitted
                    try:
                        return super().execute(context)
                    finally:
                        ScriptRun.submit = original
    """,
}

# Once the first run's directory is prepared on its target: the kill comes, and then (`AND_THEN`) the preparing
# goes on, or fails as the build's process is stopped with the task (Airflow signals the task's process group).
KILLED_AS_A_RUN_IS_PREPARED = """
                def execute(self, context):
                    import subprocess

                    start = ScriptRun._start

                    def prepared_then_killed(run, code, environment):
                        prepare = run.target.prepare

                        def then_killed(*args):
                            prepare(*args)
                            self.on_kill()
                            AND_THEN

                        run.target.prepare = then_killed
                        start(run, code, environment)

                    ScriptRun._start = prepared_then_killed
                    try:
                        return super().execute(context)
                    finally:
                        ScriptRun._start = start
"""
KILLED_AS_A_RUN_STARTS["once_it_is_prepared"] = KILLED_AS_A_RUN_IS_PREPARED.replace("AND_THEN", "pass")
KILLED_AS_A_RUN_STARTS["as_its_build_is_stopped"] = KILLED_AS_A_RUN_IS_PREPARED.replace(
    "AND_THEN", 'raise subprocess.CalledProcessError(-15, ["uv", "venv"])'
)


@pytest.mark.parametrize("when", KILLED_AS_A_RUN_STARTS)
def test_a_sweep_whose_task_is_killed_as_its_first_run_starts_never_starts_that_run(
    run_dag: Any, tmp_path: Path, when: str
) -> None:
    source, marks = tmp_path / "src", tmp_path / "marks"
    marks.mkdir()
    write_script(source, "train.py", SLEEPING_SCRIPT)
    tasks = f"""
            from airflow_amlrun.run import ScriptRun

            class KilledAsARunStarts(HyperDriveOperator):
{KILLED_AS_A_RUN_STARTS[when]}
            KilledAsARunStarts(
                task_id="tune", config=sweep({str(source)!r}, "local", ["--marks", {str(marks)!r}])
            )
    """

    try:
        result = run_dag(sweep_dag(tasks))
    finally:
        stop_what_is_left(marks)

    assert result.task_states == {"tune": "failed"}, result.log
    parent, runs = sweep_of(result.dag_id, "tune")
    assert (parent.status, parent.error) == (RunStatus.CANCELED, KILLED)
    # The first run was stopped before it started, and none other started.
    [run] = runs
    assert (run.status, run.error, run.handle, run.start) == (RunStatus.CANCELED, KILLED, None, None)
    assert list(marks.iterdir()) == []


# Each run leaves a mark named by its alpha and pid, then trains until something stops it.
SLEEPING_SCRIPT = """
    import argparse, os, time
    from pathlib import Path
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--marks")
    args = parser.parse_args()
    Path(args.marks, f"{args.alpha:g}-{os.getpid()}").touch()
    time.sleep(600)
"""

# Where Airflow's SIGTERM handler (on_kill, which returns) lands, once both runs' scripts run: as the task hands
# the live runs over (right after the hand-over), before it defers (between its first and last looks for a kill),
# or as it defers (after its last look, as the deferral is raised).
KILLS = {
    "as_it_hands_over": """
                def _hold(self, sweep):
                    held = super()._hold(sweep)
                    hand_over = held.hand_over

                    def killed_as_it_hands_over():
                        state = hand_over()
                        both_running(marks)
                        self.on_kill()
                        return state

                    held.hand_over = killed_as_it_hands_over
                    return held
    """,
    "before_it_defers": """
                def _trigger_for(self, *args):
                    trigger = super()._trigger_for(*args)
                    both_running(marks)
                    self.on_kill()
                    return trigger
    """,
    "as_it_defers": """
                def defer(self, **kwargs):
                    both_running(marks)
                    self.on_kill()
                    super().defer(**kwargs)
    """,
}


@pytest.mark.parametrize("when", sorted(KILLS))
def test_a_sweep_whose_task_is_killed_as_it_hands_its_runs_over_stops_them_and_is_recorded_canceled(
    run_dag: Any, targets: None, tmp_path: Path, when: str
) -> None:
    source, marks = tmp_path / "src", tmp_path / "marks"
    write_script(source, "train.py", SLEEPING_SCRIPT)
    marks.mkdir()
    tasks = f"""
            import os, time

            marks = {str(marks)!r}

            def both_running(marks):
                deadline = time.monotonic() + 60
                while len(os.listdir(marks)) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)

            class KilledAsItDefers(HyperDriveOperator):
{KILLS[when]}

            KilledAsItDefers(
                task_id="tune", config=sweep({str(source)!r}, "anywhere", ["--marks", marks]), deferrable=True
            )
    """
    try:
        result = run_dag(sweep_dag(tasks))
        parent, runs = sweep_of(result.dag_id, "tune")
        pids = pids_of(marks)
        running = [alpha for alpha, pid in pids.items() if alive(pid)]
    finally:
        stop_what_is_left(marks)

    assert result.task_states == {"tune": "failed"}, result.log
    # Only a kill after the task's last look lets the deferral through (the trigger then finds the sweep ended).
    assert ("Pausing task as DEFERRED" in result.log) == (when == "as_it_defers"), result.log
    killed = "Canceled: the Airflow task running the sweep was stopped."
    assert (parent.status, parent.error) == (RunStatus.CANCELED, killed), result.log
    assert parent.end is not None
    assert [(run.status, run.error) for run in runs] == [(RunStatus.CANCELED, killed)] * 2, result.log
    assert (sorted(pids), running) == (["1", "2"], [])
