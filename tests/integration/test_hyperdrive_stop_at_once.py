"""A sweep's live runs are stopped all at once, not one after another: each stop waits for its run to end, up to
the target's grace period, and a task Airflow kills has 5 seconds before the SIGKILL.

Each run's script here traps SIGTERM and, once stopped, waits (within the grace period) for the other run to be
stopped too, and says whether it saw that. Stopped one after another, the first run's wait ends before the second
run is stopped: it never sees it.
"""

from __future__ import annotations

import concurrent.futures.thread
import signal
import threading
import time
from pathlib import Path

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.history import RunStatus
from airflow_amlrun.hyperdrive import BanditPolicy, GridParameterSampling, HyperDriveConfig, choice
from airflow_amlrun.hyperdrive.sweep import HyperDriveRun
from airflow_amlrun.hyperdrive.takeover import end_sweep
from tests.conftest import write_script

pytestmark = pytest.mark.usefixtures("amlrun_home")

SCRIPT = """
import argparse, signal, sys, time
from pathlib import Path
parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float)
parser.add_argument("--marks")
args = parser.parse_args()
marks, me = Path(args.marks), str(int(args.alpha))
other = "2" if me == "1" else "1"

def stopped(signum, frame):
    (marks / f"{me}.stopped").touch()
    deadline = time.monotonic() + 4  # within the target's grace period of 5 s
    while time.monotonic() < deadline:
        if (marks / f"{other}.stopped").exists():
            (marks / f"{me}.saw-{other}").touch()
            print(f"{me} stopped, saw the other", flush=True)
            break
        time.sleep(0.05)
    sys.exit(3)

signal.signal(signal.SIGTERM, stopped)
(marks / f"{me}.started").touch()
while True:
    time.sleep(0.1)
"""


def sweep_of_two(tmp_path: Path, max_duration_minutes: float | None = None) -> tuple[HyperDriveRun, Path]:
    marks = tmp_path / "marks"
    marks.mkdir()
    write_script(tmp_path / "src", "train.py", SCRIPT)
    config = HyperDriveConfig(
        run_config=ScriptRunConfig(
            str(tmp_path / "src"), script="train.py", arguments=["--marks", str(marks)]
        ),
        hyperparameter_sampling=GridParameterSampling({"--alpha": choice(1, 2)}),
        policy=BanditPolicy(slack_factor=0.2),
        primary_metric_name="loss",
        primary_metric_goal="minimize",
        max_total_runs=2,
        max_concurrent_runs=2,
        max_duration_minutes=max_duration_minutes,
    )
    return Experiment(Workspace.get(), "stopped-at-once").submit(config), marks


def wait_for_marks(marks: Path, *names: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all((marks / name).exists() for name in names):
        assert time.monotonic() < deadline, f"no {names} in {sorted(p.name for p in marks.iterdir())}"
        time.sleep(0.05)


def assert_stopped_at_once(sweep_id: str, marks: Path) -> None:
    assert sorted(p.name for p in marks.iterdir() if "saw" in p.name) == ["1.saw-2", "2.saw-1"]
    runs = Workspace.get().history.child_runs(sweep_id)
    assert [r.status for r in runs] == [RunStatus.CANCELED] * 2, [(r.status, r.error) for r in runs]


def test_a_sweep_no_process_follows_is_ended_with_its_runs_stopped_at_once(tmp_path: Path) -> None:
    # As a killed task's on_kill, or its trigger, ends the sweep it handed over.
    sweep, marks = sweep_of_two(tmp_path)
    assert sweep.advance() is None
    state = sweep.hand_over()
    wait_for_marks(marks, "1.started", "2.started")

    end_sweep(Workspace.get(), sweep.id, RunStatus.CANCELED, "Killed.", "Canceled: killed.", state.children)

    assert_stopped_at_once(sweep.id, marks)
    assert [r.error for r in Workspace.get().history.child_runs(sweep.id)] == ["Canceled: killed."] * 2
    record = Workspace.get().get_run(sweep.id)
    assert (record.status, record.error) == (RunStatus.CANCELED, "Killed.")


def test_a_sweep_past_its_max_duration_stops_its_runs_at_once(tmp_path: Path) -> None:
    # The sweep's own loop stops its live runs (as at max_duration_minutes, a failure, Ctrl-C, the task's timeout).
    sweep, marks = sweep_of_two(tmp_path, max_duration_minutes=0.05)
    printed: list[str] = []

    record = sweep.wait_for_completion(output=printed.append)

    assert_stopped_at_once(sweep.id, marks)
    runs = Workspace.get().history.child_runs(sweep.id)
    assert [r.error for r in runs] == ["Canceled: the sweep's max_duration_minutes (0.05) was reached."] * 2
    # No run Completed: the sweep has no best run.
    assert record.status is RunStatus.FAILED
    # What each script printed as it was stopped reaches the output, from this thread.
    assert sorted(line for line in printed if line.endswith("stopped, saw the other")) == [
        "1 stopped, saw the other",
        "2 stopped, saw the other",
    ]


def test_a_killed_tasks_sweep_stops_its_runs_from_the_signal_handler_without_threads(tmp_path: Path) -> None:
    # on_kill runs in Airflow's SIGTERM handler, in the thread the signal interrupted, which may be inside a thread
    # pool's submit (taking a run's snapshot, writing its run directory), holding the lock every pool's submit
    # takes. A stop that started threads there would wait for that lock for good; the runs are stopped one after
    # another, and the sweep's loop records it Canceled.
    sweep, marks = sweep_of_two(tmp_path)
    loop = threading.Thread(target=sweep.wait_for_completion)
    loop.start()
    wait_for_marks(marks, "1.started", "2.started")

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("the stop waited for the lock its own thread holds")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with concurrent.futures.thread._global_shutdown_lock:  # type: ignore[attr-defined]
            sweep.stop("Canceled: the task was killed.")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    loop.join(60)

    assert not loop.is_alive()
    runs = Workspace.get().history.child_runs(sweep.id)
    assert [r.status for r in runs] == [RunStatus.CANCELED] * 2
    assert Workspace.get().get_run(sweep.id).status is RunStatus.CANCELED
