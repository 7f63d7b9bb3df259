"""A sweep of 12 runs, 3 at a time, on local and docker, where a bandit policy stops the worse runs early."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.config import Settings
from airflow_amlrun.history import RunStatus
from airflow_amlrun.hyperdrive import BanditPolicy, GridParameterSampling, HyperDriveConfig, choice
from airflow_amlrun.targets import registry
from airflow_amlrun.targets.handles import LocalHandle
from airflow_amlrun.targets.local import LocalTarget
from tests.conftest import write_script

pytest_plugins = ["tests.integration.docker_engine"]

STEPS = 10
# The three good values come first: every later run is compared with their whole series.
ALPHAS = [1, 1.05, 1.1, 40, 2, 30, 50, 3, 20, 60, 4, 10]


def write_alpha_script(folder: Path, *, worse_step_seconds: float) -> None:
    """train.py: logs a loss that grows with --alpha for STEPS steps. A worse run (alpha above 1.2) goes on
    slowly once a policy may stop it: a policy that does not stop it fails the test by far, and one that does
    never races the clock."""
    write_script(
        folder,
        "train.py",
        f"""
        import argparse, time
        from airflow_amlrun.run_context import Run
        parser = argparse.ArgumentParser()
        parser.add_argument("--alpha", type=float)
        alpha = parser.parse_args().alpha
        run = Run.get_context()
        for step in range({STEPS}):
            run.log("loss", alpha * (1 + 1 / (step + 1)), step=step)
            time.sleep(0.3 if alpha <= 1.2 or step < 2 else {worse_step_seconds})
        """,
    )


@pytest.mark.parametrize("target", ["local", "docker"], indirect=True)
def test_a_bandit_policy_stops_the_worse_runs_of_a_sweep_early(target, tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_alpha_script(tmp_path / "src", worse_step_seconds=3)
    config = HyperDriveConfig(
        run_config=ScriptRunConfig(tmp_path / "src", script="train.py", compute_target=target.name),
        hyperparameter_sampling=GridParameterSampling({"--alpha": choice(*ALPHAS)}),
        policy=BanditPolicy(slack_factor=0.2, delay_evaluation=2),
        primary_metric_name="loss",
        primary_metric_goal="minimize",
        max_total_runs=12,
        max_concurrent_runs=3,
    )
    ws = Workspace.get()
    sweep = Experiment(ws, "sweeps").submit(config)
    parent = sweep.wait_for_completion()

    children = sweep.get_children()
    assert len(children) == 12 and all(c.parent_run_id == sweep.id for c in children)
    alpha = {c.id: json.loads(c.tags["hyperparameters"])["--alpha"] for c in children}
    assert sorted(alpha.values()) == sorted(ALPHAS)
    completed = {alpha[c.id] for c in children if c.status is RunStatus.COMPLETED}
    assert completed == {1, 1.05, 1.1}
    for child in children:
        if alpha[child.id] in completed:
            continue
        # Stopped by the policy, early: well before its last report, with the policy's reason.
        assert child.status is RunStatus.CANCELED, (alpha[child.id], child.status, child.error)
        assert child.error.startswith("Canceled by BanditPolicy at report "), child.error
        points = [p for p in ws.history.get_metrics(child.id) if p.name == "loss"]
        assert len(points) < STEPS - 3, (alpha[child.id], len(points))

    best = sweep.get_best_run_by_primary_metric()
    assert best is not None and alpha[best.id] == 1
    assert ws.get_run(best.id).tags["best_run"] == "true"
    assert parent.status is RunStatus.COMPLETED
    assert (parent.target, parent.tags["best_run_id"]) == ("hyperdrive", best.id)
    ranked = sweep.get_children_sorted_by_primary_metric()
    assert [row["hyperparameters"]["--alpha"] for row in ranked[:3]] == [1, 1.05, 1.1]
    assert parent.config["hyperdrive"]["policy"]["policy"] == "BanditPolicy"
    # What HyperDriveOperator returns as its XCom: the best run's summary, every run's id and metrics.
    summary = sweep.summary()
    assert summary["sweep_run_id"] == sweep.id
    assert summary["best_run"]["run_id"] == best.id and summary["best_run"]["tags"]["best_run"] == "true"
    assert summary["children"] == ranked
    assert {row["run_id"]: row["metrics"] for row in ranked} == {
        c.id: ws.get_run(c.id).metrics for c in children
    }
    assert all(row["metrics"]["loss"] == row["loss"] for row in ranked)


class UnsteadyLocalTarget(LocalTarget):
    """The local target, whose stop of a run fails the first `failures` times it is asked (as a remote target's
    does when its connection drops): the runs are real, only the moment the stop fails is the test's."""

    failures = 1

    @classmethod
    def from_connection(
        cls, name: str, conn: Any, settings: Settings, cache_dir: Path
    ) -> UnsteadyLocalTarget:
        return cls(settings, cache_dir, name)

    def cancel(self, handle: LocalHandle) -> bool:
        if self.failures > 0:
            self.failures -= 1
            raise OSError(f"the target did not answer while stopping the run of pid {handle.pid}")
        return super().cancel(handle)


class UnstoppableLocalTarget(UnsteadyLocalTarget):
    failures = 1_000_000


class HalfStoppingLocalTarget(UnsteadyLocalTarget):
    """The local target, whose stop of a run ends the run and then fails (a remote target's connection that drops
    once the signal went out): whoever looks next finds the run ended."""

    def cancel(self, handle: LocalHandle) -> bool:
        LocalTarget.cancel(self, handle)
        raise OSError(f"the target did not answer while stopping the run of pid {handle.pid}")


class LogLosingLocalTarget(UnsteadyLocalTarget):
    """The local target, whose log of a run cannot be read right after its stop went through (a connection that
    drops then): the sweep cannot record the run's end at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped: set[int] = set()

    def cancel(self, handle: LocalHandle) -> bool:
        stopped = LocalTarget.cancel(self, handle)
        self.stopped.add(handle.pid)
        return stopped

    def read_log(self, handle: LocalHandle, offset: int, final: bool = False) -> Any:
        if handle.pid in self.stopped:
            self.stopped.discard(handle.pid)
            raise OSError(f"the target did not answer while stopping the run of pid {handle.pid}")
        return super().read_log(handle, offset, final)


@pytest.mark.parametrize(
    "target_class",
    [UnsteadyLocalTarget, UnstoppableLocalTarget, HalfStoppingLocalTarget, LogLosingLocalTarget],
)
def test_a_run_the_policy_fails_to_stop_goes_on_and_the_sweep_ends_with_every_run_recorded(  # type: ignore[no-untyped-def]
    amlrun_home, tmp_path, monkeypatch, caplog, target_class
) -> None:
    monkeypatch.setitem(registry.CONNECTION_KINDS, "amlrun_unsteady", f"{__name__}:{target_class.__name__}")
    monkeypatch.setenv("AIRFLOW_CONN_UNSTEADY", json.dumps({"conn_type": "amlrun_unsteady"}))
    write_alpha_script(tmp_path / "src", worse_step_seconds=1.5)
    config = HyperDriveConfig(
        run_config=ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="unsteady"),
        hyperparameter_sampling=GridParameterSampling({"--alpha": choice(1, 1.05, 40, 50)}),
        policy=BanditPolicy(slack_factor=0.2, delay_evaluation=2),
        primary_metric_name="loss",
        primary_metric_goal="minimize",
        max_total_runs=4,
        max_concurrent_runs=2,
    )
    ws = Workspace.get()
    sweep = Experiment(ws, "sweeps").submit(config)
    with caplog.at_level(logging.WARNING, logger="airflow_amlrun.hyperdrive.sweep"):
        parent = sweep.wait_for_completion()

    assert (parent.status, parent.error) == (RunStatus.COMPLETED, None)
    children = sweep.get_children()
    alpha = {c.id: json.loads(c.tags["hyperparameters"])["--alpha"] for c in children}
    assert all(c.status.is_terminal for c in children), [(alpha[c.id], c.status) for c in children]
    worse = [c for c in children if alpha[c.id] >= 40]
    for child in worse:
        # Its stop failed: the task log says which run and why, and the sweep went on.
        assert any(
            child.id in r.getMessage()
            and "the target did not answer while stopping the run" in r.getMessage()
            for r in caplog.records
        ), caplog.text
        points = [p for p in ws.history.get_metrics(child.id) if p.name == "loss"]
        if target_class is UnstoppableLocalTarget:
            # Never stopped: followed to its own end, and recorded as it ended.
            assert child.status is RunStatus.COMPLETED, (child.status, child.error)
            assert len(points) == STEPS
        else:
            # Stopped again a little later, or found ended by the stop that seemed to fail: with the policy's
            # reason either way.
            assert child.status is RunStatus.CANCELED, (child.status, child.error)
            assert child.error.startswith("Canceled by BanditPolicy at report "), child.error
            assert len(points) < STEPS
    best = sweep.get_best_run_by_primary_metric()
    assert best is not None and alpha[best.id] == 1


def test_a_run_whose_stop_failed_and_that_then_fails_on_its_own_is_recorded_failed_with_its_exit_code(  # type: ignore[no-untyped-def]
    amlrun_home, tmp_path, monkeypatch
) -> None:
    # Asked to stop (as a sweep's policy asks), the stop did not reach it; the run then fails by itself: the
    # record says how it really ended, not that the stop ended it.
    monkeypatch.setitem(registry.CONNECTION_KINDS, "amlrun_unsteady", f"{__name__}:UnstoppableLocalTarget")
    monkeypatch.setenv("AIRFLOW_CONN_UNSTEADY", json.dumps({"conn_type": "amlrun_unsteady"}))
    started = tmp_path / "started"
    write_script(
        tmp_path / "src",
        "train.py",
        f"""
        import pathlib, sys, time
        pathlib.Path({str(started)!r}).touch()
        time.sleep(2)
        print("diverged", flush=True)
        sys.exit(3)
        """,
    )
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="unsteady")
    run = Experiment(Workspace.get(), "stops").submit(config)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, "the script never started"
        time.sleep(0.05)
    with pytest.raises(OSError, match="the target did not answer while stopping"):
        run.cancel("Canceled by BanditPolicy at report 3")
    record = run.wait_for_completion(show_output=False, raise_on_error=False)

    assert record.status is RunStatus.FAILED, (record.status, record.error)
    assert record.error == "The script failed (exit code 3).", record.error


def test_a_sweep_as_a_dag_task_returns_its_best_run(amlrun_home, run_dag) -> None:  # type: ignore[no-untyped-def]
    source = """
        import pendulum
        from airflow.sdk import DAG
        from airflow_amlrun import ScriptRunConfig
        from airflow_amlrun.hyperdrive import GridParameterSampling, HyperDriveConfig, choice
        from airflow_amlrun.operators.hyperdrive import HyperDriveOperator

        with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
            HyperDriveOperator(
                task_id="tune",
                experiment="sweeps",
                config=HyperDriveConfig(
                    run_config=ScriptRunConfig("src", script="train.py", arguments=["--base", "3"]),
                    hyperparameter_sampling=GridParameterSampling({"--alpha": choice(4, 1, 3, 2)}),
                    primary_metric_name="score",
                    primary_metric_goal="maximize",
                    max_total_runs=4,
                    max_concurrent_runs=2,
                ),
            )
    """
    script = """
        import argparse
        from airflow_amlrun.run_context import Run
        parser = argparse.ArgumentParser()
        parser.add_argument("--alpha", type=float)
        parser.add_argument("--base", type=float)
        args = parser.parse_args()
        Run.get_context().log("score", args.base - abs(args.alpha - 2))
    """
    result = run_dag(source, beside={"src/train.py": script})
    assert result.state == "success", result.log
    summary = result.xcoms["tune"]
    ws = Workspace.get()
    parent = ws.get_run(summary["sweep_run_id"])
    assert (parent.status, parent.target, parent.task_id) == (RunStatus.COMPLETED, "hyperdrive", "tune")
    assert summary["best_run"]["metrics"] == {"score": 3.0}
    assert [row["hyperparameters"]["--alpha"] for row in summary["children"]] in ([2, 1, 3, 4], [2, 3, 1, 4])
    # Every run's id and metrics, as the history holds them.
    children = {c.id: c for c in ws.history.child_runs(parent.id)}
    assert {row["run_id"] for row in summary["children"]} == set(children)
    assert all(
        row["metrics"] == children[row["run_id"]].metrics == {"score": row["score"]}
        for row in summary["children"]
    )
    best = ws.get_run(summary["best_run"]["run_id"])
    assert best.arguments == ["--base", "3", "--alpha", "2"] and best.tags["best_run"] == "true"
    assert all(ws.get_run(row["run_id"]).dag_id == result.dag_id for row in summary["children"])
    assert f"Sweep {parent.id}: best run {best.id}, score 3.0" in result.log


def sleeper(tmp_path):  # type: ignore[no-untyped-def]
    """Runs that log their loss and sleep, until stopped; what stops one reads its last words in its log."""
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import argparse, os, signal, time
        parser = argparse.ArgumentParser()
        parser.add_argument("--alpha", type=float)
        alpha = parser.parse_args().alpha
        def stopped(signum, frame):
            print(f"stopped with alpha {alpha}", flush=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        signal.signal(signal.SIGTERM, stopped)
        from airflow_amlrun.run_context import Run
        Run.get_context().log("loss", alpha)
        time.sleep(120)
        """,
    )
    return ScriptRunConfig(tmp_path / "src", script="train.py")


def sweep_of(run_config, **limits):  # type: ignore[no-untyped-def]
    return HyperDriveConfig(
        run_config=run_config,
        hyperparameter_sampling=GridParameterSampling({"--alpha": choice(1, 2, 3, 4)}),
        primary_metric_name="loss",
        primary_metric_goal="minimize",
        max_total_runs=4,
        max_concurrent_runs=2,
        **limits,
    )


def test_a_sweep_past_its_time_limit_cancels_its_runs_and_says_why(amlrun_home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sweep = Experiment(Workspace.get(), "sweeps").submit(
        sweep_of(sleeper(tmp_path), max_duration_minutes=0.05)
    )
    lines: list[str] = []
    parent = sweep.wait_for_completion(output=lines.append)
    children = sweep.get_children()
    assert len(children) == 2  # the limit came before any run ended
    # What each run printed as it was stopped is passed on with the rest of its output (a run that logged its
    # loss had its handler of SIGTERM set; on a loaded machine, the limit may come before a run got so far).
    assert sorted(lines) == sorted(f"stopped with alpha {c.metrics['loss']}" for c in children if c.metrics)
    for child in children:
        assert child.status is RunStatus.CANCELED
        assert child.error == "Canceled: the sweep's max_duration_minutes (0.05) was reached."
    assert parent.status is RunStatus.FAILED
    assert parent.error == "No run of the sweep Completed with the primary metric 'loss'."


def test_a_stopped_sweep_stops_its_runs_and_is_recorded_canceled(amlrun_home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time

    sweep = Experiment(Workspace.get(), "sweeps").submit(sweep_of(sleeper(tmp_path)))
    stopper = threading.Thread(target=lambda: (time.sleep(3), sweep.stop("Canceled: stopped by the test.")))
    stopper.start()
    started = time.monotonic()
    parent = sweep.wait_for_completion()
    stopper.join()
    assert time.monotonic() - started < 60
    assert (parent.status, parent.error) == (RunStatus.CANCELED, "Canceled: stopped by the test.")
    assert [c.status for c in sweep.get_children()] == [RunStatus.CANCELED, RunStatus.CANCELED]


def test_an_interruption_as_a_run_of_the_sweep_has_just_started_stops_that_run_too(
    amlrun_home, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import sys

    from airflow_amlrun.run import ScriptRun
    from tests.integration.conftest import alive

    sweep = Experiment(Workspace.get(), "sweeps").submit(sweep_of(sleeper(tmp_path)))
    submit = ScriptRun.submit.__func__.__code__  # type: ignore[attr-defined]
    started = []

    def ctrl_c_as_the_second_run_is_handed_to_the_sweep(frame, event, arg):  # type: ignore[no-untyped-def]
        # Ctrl-C, or the task's execution_timeout, landing at one exact moment: the second run started, and
        # ScriptRun.submit returns it.
        def on_return(frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "return" and isinstance(arg, ScriptRun):
                started.append(arg.id)
                if len(started) == 2:
                    sys.settrace(None)
                    raise KeyboardInterrupt
            return on_return

        return on_return if event == "call" and frame.f_code is submit else None

    sys.settrace(ctrl_c_as_the_second_run_is_handed_to_the_sweep)
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep.wait_for_completion()
    finally:
        sys.settrace(None)
        children = sweep.get_children()
        left_running = [c.id for c in children if c.handle is not None and alive(c.handle["pid"])]
        for child in children:
            if child.id in left_running:
                os.killpg(
                    child.handle["pid"], signal.SIGKILL
                )  # the test's own clean-up, after the verdict below

    assert left_running == []
    parent = Workspace.get().get_run(sweep.id)
    assert (parent.status, parent.error) == (
        RunStatus.CANCELED,
        "Canceled: the sweep was interrupted (KeyboardInterrupt).",
    )
    assert [c.id for c in children] == started
    assert [(c.status, c.error) for c in children] == [
        (RunStatus.CANCELED, "Canceled: the sweep was interrupted (KeyboardInterrupt).")
    ] * 2


def test_an_interruption_between_recording_a_run_and_starting_it_ends_that_run_too(  # type: ignore[no-untyped-def]
    amlrun_home, tmp_path
) -> None:
    import sys

    from airflow_amlrun.run import ScriptRun

    sweep = Experiment(Workspace.get(), "sweeps").submit(sweep_of(sleeper(tmp_path)))
    start = ScriptRun._start.__code__
    calls = []

    def ctrl_c_as_the_second_run_is_about_to_start(frame, event, arg):  # type: ignore[no-untyped-def]
        # The second run is recorded, and held by the sweep; it is not started yet.
        if event == "call" and frame.f_code is start:
            calls.append(frame)
            if len(calls) == 2:
                sys.settrace(None)
                raise KeyboardInterrupt
        return None

    sys.settrace(ctrl_c_as_the_second_run_is_about_to_start)
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep.wait_for_completion()
    finally:
        sys.settrace(None)

    children = sweep.get_children()
    assert len(children) == 2
    # The never-started run ends with the rest, rather than stay Queued for reconcile to call it Failed.
    assert [(c.status, c.error) for c in children] == [
        (RunStatus.CANCELED, "Canceled: the sweep was interrupted (KeyboardInterrupt).")
    ] * 2
    assert [c.handle is None for c in children] == [False, True]


def test_a_sweep_interrupted_before_it_runs_is_recorded_canceled_at_once(amlrun_home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sweep = Experiment(Workspace.get(), "sweeps").submit(sweep_of(sleeper(tmp_path)))
    with pytest.raises(KeyboardInterrupt), sweep.guarded():
        raise KeyboardInterrupt  # Ctrl-C while the caller names the sweep, before wait_for_completion

    parent = Workspace.get().get_run(sweep.id)
    assert (parent.status, parent.error) == (
        RunStatus.CANCELED,
        "Canceled: the sweep was interrupted (KeyboardInterrupt).",
    )
    assert parent.end is not None and sweep.get_children() == []


def test_a_sweep_that_cannot_run_is_refused_before_it_is_recorded(amlrun_home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from airflow_amlrun.errors import UnknownComputeTargetError

    run_config = ScriptRunConfig(sleeper(tmp_path).source_directory, script="train.py", compute_target="nope")
    with pytest.raises(UnknownComputeTargetError, match="'nope'"):
        Experiment(Workspace.get(), "sweeps").submit(sweep_of(run_config))
    assert Workspace.get().list_runs(experiment="sweeps") == []


def test_a_retry_finds_its_tasks_sweep_behind_its_many_runs(amlrun_home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from airflow_amlrun.hyperdrive import HyperDriveRun
    from airflow_amlrun.hyperdrive.takeover import earlier_sweeps, settle_earlier_sweeps
    from airflow_amlrun.submission import AirflowTask

    ws = Workspace.get()
    task = AirflowTask("tuning", "tune", "manual__1", None, 1)
    sweep = HyperDriveRun.submit(ws, "sweeps", sweep_of(sleeper(tmp_path)), airflow_task=task)
    # A long sweep's runs record the same task as its parent, and come after it, newest first.
    for n in range(120):
        ws.history.create_run(
            run_id=f"sweeps_child_{n:03d}",
            experiment="sweeps",
            target="local",
            parent_run_id=sweep.id,
            **task.row_fields(),
        )
        ws.history.update_run(f"sweeps_child_{n:03d}", status=RunStatus.COMPLETED)
    assert [r.id for r in earlier_sweeps(ws, task)] == [sweep.id]
    assert settle_earlier_sweeps(ws, task, "started anew") == [sweep.id]
    assert ws.get_run(sweep.id).status is RunStatus.FAILED
