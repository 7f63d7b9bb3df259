"""A sweep's live runs are stopped all at once, not one after another: each stop waits for its run to end, up to
the target's grace period, and a task Airflow kills has 5 seconds before the SIGKILL.

Each run's script here traps SIGTERM and, once stopped, waits (within the grace period) for the other run to be
stopped too, and says whether it saw that. Stopped one after another, the first run's wait ends before the second
run is stopped: it never sees it.
"""

from __future__ import annotations

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
            break
        time.sleep(0.05)
    sys.exit(3)

signal.signal(signal.SIGTERM, stopped)
(marks / f"{me}.started").touch()
while True:
    time.sleep(0.1)
"""


def sweep_of_two(tmp_path: Path) -> tuple[HyperDriveRun, Path]:
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


def test_a_followed_sweep_stopped_from_outside_its_loop_stops_its_runs_at_once(tmp_path: Path) -> None:
    # As the task's on_kill stops the sweep its own loop follows.
    sweep, marks = sweep_of_two(tmp_path)
    ended: list[object] = []
    loop = threading.Thread(target=lambda: ended.append(sweep.wait_for_completion()))
    loop.start()
    wait_for_marks(marks, "1.started", "2.started")

    sweep.stop("Canceled: the task was killed.")
    loop.join(60)

    assert not loop.is_alive()
    assert ended and ended[0].status is RunStatus.CANCELED  # type: ignore[attr-defined]
    assert_stopped_at_once(sweep.id, marks)
