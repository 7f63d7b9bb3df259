"""The trigger of a deferred run, driven as the triggerer drives it (its `run()` in an event loop), on real
local runs and a real run history: moved between triggerers, killed, stopped at the task's timeout, or
given a run it cannot find. tests/integration/test_deferrable.py runs it under a real triggerer."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.run import FollowState, ScriptRun
from airflow_amlrun.targets.base import TargetStatus
from airflow_amlrun.triggers.script_run import ENDED, ERROR, ScriptRunTrigger
from tests.conftest import write_script

pytestmark = pytest.mark.usefixtures("amlrun_home")

SCRIPT = """
import sys, time
from airflow_amlrun.run_context import Run
run = Run.get_context()
for step in range(int(sys.argv[1])):
    run.log("loss", 1.0 / (step + 1), step=step)
    print(f"step {step}", flush=True)
    time.sleep(0.2)
"""


def started(tmp_path: Path, steps: int) -> tuple[ScriptRun, dict[str, Any]]:
    """A local run, started and handed over as a deferring task hands it over."""
    write_script(tmp_path / "src", "train.py", SCRIPT)
    config = ScriptRunConfig(str(tmp_path / "src"), script="train.py", arguments=[str(steps)])
    run = Experiment(Workspace.get(), "deferred").submit(config)
    return run, run.hand_over().to_json()


def rebuilt(trigger: ScriptRunTrigger) -> ScriptRunTrigger:
    """The trigger as another triggerer makes it again, from what Airflow stored."""
    _, kwargs = trigger.serialize()
    return ScriptRunTrigger(**kwargs)


async def first_event(trigger: ScriptRunTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return dict(event.payload)
    raise AssertionError("the trigger ended without an event")


def heartbeats(run_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"amlrun-heartbeat-{run_id}" and t.is_alive()]


def concluded(run_id: str, event: dict[str, Any]) -> Any:
    """What execute_complete does with the event: record the outcome from the worker."""
    run = ScriptRun.resumed(Workspace.get(), run_id, FollowState.from_json(event["state"]))
    status = TargetStatus(
        running=False, exit_code=event["exit_code"], reason=event["reason"], timed_out=event["timed_out"]
    )
    return run.conclude(status)


def test_a_trigger_moved_to_another_triggerer_lets_go_and_the_next_one_records_every_metric_once(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run, state = started(tmp_path, steps=40)
    trigger = ScriptRunTrigger(run.id, state)

    async def cancelled_midway() -> None:
        task = asyncio.ensure_future(first_event(trigger))
        await asyncio.sleep(1.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_midway())
    time.sleep(0.2)
    assert heartbeats(run.id) == []  # this triggerer let go of it...
    assert run.target.wait(run.handle, 0).running  # ...and the run goes on
    assert "step 1" in capfd.readouterr().out  # the trigger passed the output on to the task log

    event = asyncio.run(first_event(rebuilt(trigger)))

    assert (event["status"], event["exit_code"]) == (ENDED, 0)
    record = concluded(run.id, event)
    assert record.status == "Completed"
    assert [p.step for p in Workspace.get().history.get_metrics(run.id, "loss")] == list(range(40))
    assert heartbeats(run.id) == []


def test_killing_the_deferred_task_cancels_its_run_and_leaves_nothing_following_it(tmp_path: Path) -> None:
    run, state = started(tmp_path, steps=500)
    trigger = ScriptRunTrigger(run.id, state)

    async def killed() -> None:
        task = asyncio.ensure_future(first_event(trigger))
        await asyncio.sleep(1.0)
        task.cancel()  # the triggerer cancels the trigger, then calls on_kill for a user's kill
        with pytest.raises(asyncio.CancelledError):
            await task
        await trigger.on_kill()

    asyncio.run(killed())

    record = Workspace.get().get_run(run.id)
    assert record.status == "Canceled"
    assert record.error == "Canceled: its deferred task was killed."
    assert not run.target.wait(run.handle, 0).running
    assert heartbeats(run.id) == []


def test_a_kill_that_comes_after_the_run_ended_keeps_its_outcome(tmp_path: Path) -> None:
    run, state = started(tmp_path, steps=2)
    while run.target.wait(run.handle, 0.2).running:
        pass

    asyncio.run(ScriptRunTrigger(run.id, state).on_kill())

    assert Workspace.get().get_run(run.id).status == "Completed"


def test_the_tasks_execution_timeout_is_enforced_by_the_trigger(tmp_path: Path) -> None:
    run, state = started(tmp_path, steps=500)
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()

    event = asyncio.run(first_event(ScriptRunTrigger(run.id, state, stop_at=soon)))

    assert event["status"] == ENDED
    record = concluded(run.id, event)
    assert record.status == "Failed"
    assert record.error == "Stopped by the Airflow task's execution_timeout (while deferred)."


def test_a_run_the_trigger_cannot_find_comes_back_to_the_task_with_the_reason() -> None:
    event = asyncio.run(first_event(ScriptRunTrigger("deferred_1_00000000", FollowState().to_json())))

    assert event["status"] == ERROR
    assert event["message"].startswith("RunNotFoundError: ")
    assert "deferred_1_00000000" in event["message"]


def test_a_run_whose_output_is_not_shown_in_the_triggerer_is_shown_whole_by_the_task(tmp_path: Path) -> None:
    # A run with secret variables: the triggerer cannot mask them, so the task shows the output, masked.
    run, state = started(tmp_path, steps=5)

    event = asyncio.run(first_event(ScriptRunTrigger(run.id, state, show_output=False)))

    assert event["state"]["log_offset"] == state["log_offset"]
    assert event["state"]["events_offset"] > state["events_offset"]  # its metrics were recorded on the way
    shown: list[str] = []
    resumed = ScriptRun.resumed(Workspace.get(), run.id, FollowState.from_json(event["state"]))
    status = TargetStatus(running=False, exit_code=event["exit_code"])
    assert resumed.conclude(status, shown.append).status == "Completed"
    assert [line for line in shown if line.startswith("step")] == [f"step {n}" for n in range(5)]
