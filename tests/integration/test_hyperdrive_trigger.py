"""The trigger of a deferred sweep, driven as the triggerer drives it (its `run()` in an event loop), on real local
runs and a real run history, with the task's side as HyperDriveOperator.execute_complete does it:
moved between triggerers, judging by the policy, killed. test_hyperdrive_airflow.py runs it under a real
triggerer."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.config import Settings
from airflow_amlrun.history import RunStatus
from airflow_amlrun.hyperdrive import (
    BanditPolicy,
    GridParameterSampling,
    HyperDriveConfig,
    HyperDriveRun,
    choice,
)
from airflow_amlrun.hyperdrive.takeover import SweepState, Unstopped, end_sweep
from airflow_amlrun.run import FollowState
from airflow_amlrun.targets import registry
from airflow_amlrun.targets.base import TargetStatus
from airflow_amlrun.targets.handles import LocalHandle
from airflow_amlrun.targets.local import LocalTarget
from airflow_amlrun.triggers.hyperdrive import ERROR, FOLLOWED, KILLED, HyperDriveTrigger
from tests.conftest import write_script

pytestmark = pytest.mark.usefixtures("amlrun_home")

SCRIPT = """
import argparse, time
from airflow_amlrun.run_context import Run
parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float)
parser.add_argument("--steps", type=int)
args = parser.parse_args()
run = Run.get_context()
for step in range(args.steps):
    run.log("loss", args.alpha, step=step)
    time.sleep(0.2 if args.alpha < 5 or step < 2 else 1)
"""


def sweep_config(tmp_path: Path, steps: int, alphas: list[float], policy: Any = None) -> HyperDriveConfig:
    write_script(tmp_path / "src", "train.py", SCRIPT)
    return HyperDriveConfig(
        run_config=ScriptRunConfig(
            str(tmp_path / "src"), script="train.py", arguments=["--steps", str(steps)]
        ),
        hyperparameter_sampling=GridParameterSampling({"--alpha": choice(*alphas)}),
        policy=policy,
        primary_metric_name="loss",
        primary_metric_goal="minimize",
        max_total_runs=len(alphas),
        max_concurrent_runs=2,
    )


def deferred(config: HyperDriveConfig, **when: str) -> tuple[HyperDriveRun, HyperDriveTrigger]:
    """A sweep with its first runs started and handed over, as a deferring task hands it over."""
    sweep = Experiment(Workspace.get(), "deferred").submit(config)
    assert sweep.advance() is None
    state = sweep.hand_over()
    assert config.policy is not None
    trigger = HyperDriveTrigger(
        sweep.id, state.to_json(), config.policy.to_dict(), "loss", config.goal, **when
    )
    return sweep, trigger


async def first_event(trigger: HyperDriveTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return dict(event.payload)
    raise AssertionError("the trigger ended without an event")


def rebuilt(trigger: HyperDriveTrigger) -> HyperDriveTrigger:
    """The trigger as another triggerer makes it again, from what Airflow stored."""
    return HyperDriveTrigger(**trigger.serialize()[1])


def following(run_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"amlrun-heartbeat-{run_id}" and t.is_alive()]


def taken_back(config: HyperDriveConfig, event: dict[str, Any]) -> HyperDriveRun:
    """What execute_complete does with the event, up to starting the next runs."""
    sweep = HyperDriveRun.resumed(
        Workspace.get(), event["sweep_run_id"], config, state=SweepState.from_json(event["state"])
    )
    ended = {k: TargetStatus(running=False, **v) for k, v in event["ended"].items()}
    sweep.take_back(ended, event["stops"])
    return sweep


def test_a_trigger_that_cannot_take_the_sweep_over_hands_it_back_as_it_was_and_no_sooner_than_it_may_fire() -> (
    None
):
    # The sweep's state names a run the history does not have: the trigger cannot take it over. It hands the
    # state back untouched, with why, at not_before (a deferred task's trigger that fires sooner has its task
    # failed by the scheduler: FIRST_EVENT_AFTER_SECONDS).
    state = SweepState({"runs_1_deadbeef": FollowState(0, 0, 0)}, {}, {}).to_json()
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    trigger = HyperDriveTrigger(
        "sweeps_1_deadbeef",
        state,
        BanditPolicy(slack_factor=0.2).to_dict(),
        "loss",
        "minimize",
        not_before=soon,
    )

    event = asyncio.run(first_event(trigger))

    assert datetime.now(UTC) >= datetime.fromisoformat(soon)
    assert (event["status"], event["state"]) == (ERROR, state), event
    assert "runs_1_deadbeef" in event["message"], event


def test_a_moved_trigger_lets_go_and_the_next_one_hands_the_sweep_back_when_the_policy_stops_a_run(
    tmp_path: Path,
) -> None:
    config = sweep_config(
        tmp_path, steps=30, alphas=[1, 10], policy=BanditPolicy(slack_factor=0.2, delay_evaluation=2)
    )
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    sweep, trigger = deferred(config, not_before=soon)
    good, bad = [c.id for c in sweep.get_children()]

    async def cancelled_midway() -> None:
        task = asyncio.ensure_future(first_event(trigger))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_midway())
    time.sleep(0.3)
    assert following(good) == following(bad) == following(sweep.id) == []  # let go of, and going on

    started = time.monotonic()
    event = asyncio.run(first_event(rebuilt(trigger)))

    # Not before not_before, and then at once: the policy stops the worse run at its third report.
    assert datetime.now(UTC) >= datetime.fromisoformat(soon) and time.monotonic() - started < 20
    assert (event["status"], event["ended"], list(event["stops"])) == (FOLLOWED, {}, [bad])
    assert event["stops"][bad].startswith("Canceled by BanditPolicy at report 3")
    assert set(event["state"]["children"]) == {good, bad} and event["state"]["looked_at"][good] >= 3
    assert following(sweep.id) == []

    again = taken_back(config, event)
    stopped = Workspace.get().get_run(bad)
    assert (stopped.status, stopped.error) == (RunStatus.CANCELED, event["stops"][bad])
    assert Workspace.get().get_run(good).status is RunStatus.RUNNING
    state = again.hand_over()  # as the task defers again
    assert list(state.children) == [good] and state.looked_at[good] == event["state"]["looked_at"][good]
    end_sweep(Workspace.get(), sweep.id, RunStatus.CANCELED, "Done.", "Canceled: done.", state.children)


def test_a_trigger_hands_back_the_runs_that_ended_for_the_task_to_record(tmp_path: Path) -> None:
    config = sweep_config(tmp_path, steps=3, alphas=[1, 2, 3])
    _, trigger = deferred(config)

    event = asyncio.run(first_event(trigger))

    assert event["status"] == FOLLOWED and event["ended"]
    assert all(fields["exit_code"] == 0 for fields in event["ended"].values())
    again = taken_back(config, event)
    for run_id in event["ended"]:
        record = Workspace.get().get_run(run_id)
        assert record.status is RunStatus.COMPLETED and len(Workspace.get().history.get_metrics(run_id)) == 3
    # The task goes on from there: the last run starts in a freed slot, and the sweep ends.
    record = again.wait_for_completion()
    assert record.status is RunStatus.COMPLETED
    assert [c.status for c in again.get_children()] == [RunStatus.COMPLETED] * 3


def test_killing_a_deferred_sweep_cancels_its_runs_and_the_sweep(tmp_path: Path) -> None:
    config = sweep_config(tmp_path, steps=500, alphas=[1, 2, 3])
    sweep, trigger = deferred(config)

    async def killed() -> None:
        task = asyncio.ensure_future(first_event(trigger))
        await asyncio.sleep(1.0)
        task.cancel()  # the triggerer cancels the trigger, then calls on_kill for a user's kill
        with pytest.raises(asyncio.CancelledError):
            await task
        await trigger.on_kill()

    asyncio.run(killed())

    children = sweep.get_children()
    assert len(children) == 2
    assert [(c.status, c.error) for c in children] == [(RunStatus.CANCELED, KILLED)] * 2
    parent = Workspace.get().get_run(sweep.id)
    assert (parent.status, parent.error) == (RunStatus.CANCELED, KILLED)
    assert [following(c.id) for c in children] == [[], []] and following(sweep.id) == []


class OnceUnstoppableLocalTarget(LocalTarget):
    """The local target, whose first stop of each run fails (a connection that drops), in whichever process asks:
    the runs are real, only the stop that fails is the test's."""

    refused: ClassVar[set[str]] = set()

    @classmethod
    def from_connection(
        cls, name: str, conn: Any, settings: Settings, cache_dir: Path
    ) -> OnceUnstoppableLocalTarget:
        return cls(settings, cache_dir, name)

    def cancel(self, handle: LocalHandle) -> bool:
        if handle.run_dir not in self.refused:
            self.refused.add(handle.run_dir)
            raise OSError(f"the target did not answer while stopping the run of pid {handle.pid}")
        return super().cancel(handle)


def test_a_run_whose_stop_failed_before_the_sweep_deferred_again_is_stopped_by_the_next_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(
        registry.CONNECTION_KINDS, "amlrun_once_unstoppable", f"{__name__}:OnceUnstoppableLocalTarget"
    )
    monkeypatch.setenv("AIRFLOW_CONN_FLAKY", json.dumps({"conn_type": "amlrun_once_unstoppable"}))
    # The policy judges the worse run at its third report only, so it never names the run again: the task
    # that failed to stop it must hand that on.
    policy = BanditPolicy(slack_factor=0.2, delay_evaluation=2, evaluation_interval=100)
    config = sweep_config(tmp_path, steps=12, alphas=[1, 10], policy=policy)
    config = replace(config, run_config=replace(config.run_config, compute_target="flaky"))
    sweep, trigger = deferred(config)
    good, bad = [c.id for c in sweep.get_children()]

    # As HyperDriveOperator does: the trigger follows the runs, the task takes them back, stops those the policy
    # named, and defers again, until the sweep ended.
    with caplog.at_level(logging.WARNING, logger="airflow_amlrun.hyperdrive.sweep"):
        for _turn in range(20):
            event = asyncio.run(first_event(trigger))
            again = taken_back(config, event)
            record = again.advance()
            if record is not None:
                break
            state = again.hand_over()
            trigger = HyperDriveTrigger(sweep.id, state.to_json(), policy.to_dict(), "loss", config.goal)
        else:
            pytest.fail("the sweep did not end in 20 turns")

    assert any(f"stopping run {bad} failed" in r.getMessage() for r in caplog.records), caplog.text
    stopped = Workspace.get().get_run(bad)
    assert stopped.status is RunStatus.CANCELED, (stopped.status, stopped.error)
    assert stopped.error.startswith("Canceled by BanditPolicy at report 3"), stopped.error
    assert len(Workspace.get().history.get_metrics(bad)) < 12
    assert Workspace.get().get_run(good).status is RunStatus.COMPLETED
    assert (record.status, record.tags["best_run_id"]) == (RunStatus.COMPLETED, good)


def test_a_run_whose_stop_keeps_failing_wakes_the_task_only_when_its_retry_is_due(tmp_path: Path) -> None:
    # A stop that failed a few times waits minutes before the next: the trigger follows the run meanwhile,
    # rather than wake the deferred task (a worker slot each time) every few seconds to fail again. The policy
    # would name the worse run at every report: it is not judged again while its stop waits.
    policy = BanditPolicy(slack_factor=0.2, delay_evaluation=0)
    config = sweep_config(tmp_path, steps=40, alphas=[1, 10], policy=policy)
    sweep = Experiment(Workspace.get(), "deferred").submit(config)
    assert sweep.advance() is None
    state = sweep.hand_over()
    alpha = {c.id: json.loads(c.tags["hyperparameters"])["--alpha"] for c in sweep.get_children()}
    [bad] = [run_id for run_id in state.children if alpha[run_id] == 10]
    later = Unstopped("Canceled by BanditPolicy at report 3", time.time() + 3600, failures=6)
    soon = Unstopped("Canceled by BanditPolicy at report 3", time.time() + 1, failures=1)

    async def event_within(seconds: float, unstopped: dict[str, Unstopped]) -> dict[str, Any] | None:
        trigger = HyperDriveTrigger(
            sweep.id, replace(state, unstopped=unstopped).to_json(), policy.to_dict(), "loss", config.goal
        )
        try:
            return await asyncio.wait_for(first_event(trigger), seconds)
        except TimeoutError:
            return None

    try:
        assert asyncio.run(event_within(3, {bad: later})) is None
        event = asyncio.run(event_within(30, {bad: soon}))
        assert event is not None and event["stops"] == {bad: soon.reason}, event
        assert event["state"]["unstopped"][bad] == soon.to_json()  # the task stops it, and knows its count
    finally:
        end_sweep(
            Workspace.get(), sweep.id, RunStatus.CANCELED, "Stopped by the test.", "Stopped by the test."
        )
