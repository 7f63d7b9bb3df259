"""Trigger that follows a deferred sweep's live runs in the triggerer, judging them by the sweep's policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_amlrun.triggers.script_run import (
    STEP_WAIT_SECONDS,
    TRIGGER_POLL_SECONDS,
    describe,
    handed_back,
    seconds_until,
    wait_until,
)

if TYPE_CHECKING:
    from airflow_amlrun.heartbeat import Heartbeat
    from airflow_amlrun.hyperdrive.takeover import Unstopped
    from airflow_amlrun.hyperdrive.watch import PolicyWatch
    from airflow_amlrun.run import ScriptRun
    from airflow_amlrun.targets.base import TargetStatus
    from airflow_amlrun.workspace import Workspace

# The event's status: the task has something to do (FOLLOWED), or must follow the sweep itself (ERROR).
FOLLOWED = "followed"
ERROR = "error"
KILLED = "Canceled: its deferred task was killed."
# The trigger fires no sooner than FIRST_EVENT_AFTER_SECONDS after the task deferred (see ScriptRunTrigger's): a
# sweep defers many times, and a run ending or stopped within seconds is common. Runs that end meanwhile are
# handed back together.


@dataclass
class _Followed:
    """What the trigger holds while it follows the sweep: its live runs, the policy's view, the heartbeat."""

    workspace: Workspace
    runs: dict[str, ScriptRun]
    watch: PolicyWatch
    heartbeat: Heartbeat
    poll_interval: float
    # Runs recorded ended by another process meanwhile: nothing to follow, a slot to fill.
    gone: list[str]
    # Runs the policy stopped whose stop failed in the task, with why and when to try again: handed back for the
    # task to stop again once that time came.
    unstopped: dict[str, Unstopped]

    def due_stops(self) -> dict[str, str]:
        """The runs whose stop is to be tried again now, with why."""
        now = time.time()
        return {run_id: u.reason for run_id, u in self.unstopped.items() if u.again_at <= now}

    def let_go(self) -> None:
        self.heartbeat.stop()
        for run in self.runs.values():
            run.let_go()


class HyperDriveTrigger(BaseTrigger):
    """Follows the live runs of a deferred sweep until its task has something to do: a run ended (its slot is
    free), the policy stops a run, or a time limit passed; then hands the runs back to the task.

    While they go on, each run's metrics and tags reach the history and its heartbeat is kept, as
    ScriptRunTrigger does for one run (``ScriptRun.step``), and the sweep's heartbeat too; the primary metric
    they stream is judged by the sweep's early termination policy here, as the sweep's own loop judges it
    (``PolicyWatch``), so a run is stopped within moments of the report that condemns it, without waking the
    task for every report. The trigger starts no run and records no outcome: starting a run needs what the DAG
    holds (the run config, its environment, its secrets), and collecting a run's outputs is heavy work for an
    event loop every deferred task shares. The task does both when it comes back, then defers again. Nothing
    secret is held: the kwargs are run ids, offsets, the policy and times.

    :param sweep_run_id: the sweep's parent run.
    :param state: the sweep's live runs (``SweepState.to_json()``).
    :param policy: the sweep's early termination policy (``to_dict()``).
    :param primary_metric_name: the metric the policy judges.
    :param goal: ``"maximize"`` or ``"minimize"``.
    :param workspace_conn_id: `amlrun` connection of the workspace (None: the default workspace).
    :param deadline: ISO time at which the sweep's max_duration_minutes ends it, if any.
    :param stop_at: ISO time at which the task's execution_timeout ends it, if any.
    :param not_before: ISO time before which the trigger does not fire (it follows and judges meanwhile): see
        ``FIRST_EVENT_AFTER_SECONDS``.
    """

    def __init__(
        self,
        sweep_run_id: str,
        state: dict[str, Any],
        policy: dict[str, Any],
        primary_metric_name: str,
        goal: str,
        workspace_conn_id: str | None = None,
        deadline: str | None = None,
        stop_at: str | None = None,
        not_before: str | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.sweep_run_id = sweep_run_id
        self.state = dict(state)
        self.policy = dict(policy)
        self.primary_metric_name = primary_metric_name
        self.goal = goal
        self.workspace_conn_id = workspace_conn_id
        self.deadline = deadline
        self.stop_at = stop_at
        self.not_before = not_before

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_amlrun.triggers.hyperdrive.HyperDriveTrigger",
            {
                "sweep_run_id": self.sweep_run_id,
                "state": self.state,
                "policy": self.policy,
                "primary_metric_name": self.primary_metric_name,
                "goal": self.goal,
                "workspace_conn_id": self.workspace_conn_id,
                "deadline": self.deadline,
                "stop_at": self.stop_at,
                "not_before": self.not_before,
            },
        )

    def _open(self) -> _Followed:
        from airflow_amlrun.config import load_settings
        from airflow_amlrun.heartbeat import Heartbeat, heartbeat_seconds
        from airflow_amlrun.hyperdrive.policies import policy_from_dict
        from airflow_amlrun.hyperdrive.takeover import SweepState
        from airflow_amlrun.hyperdrive.watch import PolicyWatch
        from airflow_amlrun.run import RunEndedError, ScriptRun
        from airflow_amlrun.workspace import Workspace

        workspace = Workspace.get(self.workspace_conn_id)
        state = SweepState.from_json(self.state)
        runs: dict[str, ScriptRun] = {}
        gone: list[str] = []
        try:
            for run_id, followed in state.children.items():
                try:
                    runs[run_id] = ScriptRun.resumed(workspace, run_id, followed)
                except RunEndedError:
                    gone.append(run_id)
            watch = PolicyWatch(
                workspace.history,
                policy_from_dict(self.policy),
                self.primary_metric_name,
                self.goal,
                state.looked_at,
            )
            if watch.judges:
                # The runs that ended are judged against too: their whole series.
                for child in workspace.history.child_runs(self.sweep_run_id):
                    if child.id not in runs:
                        watch.ended(child.id)
        except BaseException:
            for run in runs.values():
                run.let_go()
            raise
        settings = load_settings()
        heartbeat = Heartbeat(workspace.history, self.sweep_run_id, heartbeat_seconds(settings))
        heartbeat.start()
        unstopped = {run_id: u for run_id, u in state.unstopped.items() if run_id in runs}
        return _Followed(workspace, runs, watch, heartbeat, settings.poll_interval_seconds, gone, unstopped)

    def _due(self) -> dict[str, bool]:
        now = datetime.now(UTC)
        return {
            "expired": self.deadline is not None and now >= datetime.fromisoformat(self.deadline),
            "timed_out": self.stop_at is not None and now >= datetime.fromisoformat(self.stop_at),
        }

    def _event(self, status: str, **fields: Any) -> TriggerEvent:
        return TriggerEvent(  # type: ignore[no-untyped-call]
            {"sweep_run_id": self.sweep_run_id, "status": status, "stop_at": self.stop_at, **fields}
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        opening = asyncio.ensure_future(asyncio.to_thread(self._open))
        try:
            followed = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Cancelled while taking the runs over: once that is done, let go of them again.
            await asyncio.wait([opening])
            if not opening.cancelled() and opening.exception() is None:
                await asyncio.to_thread(opening.result().let_go)
            raise
        except Exception as err:
            # Nothing was done to the runs: the task gets them back as it left them, and says why (no sooner than
            # any other event: see FIRST_EVENT_AFTER_SECONDS).
            await wait_until(self.not_before)
            yield self._event(ERROR, message=describe(err), state=self.state)
            return
        ended: dict[str, TargetStatus] = {}
        # A run whose stop failed in the task is one the policy stops: the task is woken to stop it again, once
        # its retry is due (see below).
        stops: dict[str, str] = followed.due_stops()
        looking: list[asyncio.Future[Any]] = []
        pause = min(max(followed.poll_interval, 0.05) * 20, TRIGGER_POLL_SECONDS)
        try:
            while True:
                # The runs that ended are not looked at again; those the policy stops go on until the task
                # stops them (their metrics recorded meanwhile), and are not judged again.
                steps = {
                    run_id: asyncio.ensure_future(asyncio.to_thread(run.step, None, STEP_WAIT_SECONDS))
                    for run_id, run in followed.runs.items()
                    if run_id not in ended
                }
                looking = list(steps.values())
                await asyncio.shield(asyncio.gather(*looking))
                ended.update(
                    {run_id: status for run_id, s in steps.items() if (status := s.result()) is not None}
                )
                # Nor are the runs whose stop failed, due or not: the policy named them already (judged again, a
                # bad run is named at each report, and would wake the task before its retry is due).
                live = [
                    run_id
                    for run_id in followed.runs
                    if run_id not in ended and run_id not in stops and run_id not in followed.unstopped
                ]
                judging = asyncio.ensure_future(asyncio.to_thread(followed.watch.judge, live))
                looking = [judging]
                stops.update(await asyncio.shield(judging))
                stops.update(followed.due_stops())
                looking = []
                due = self._due()
                if (ended or stops or followed.gone or any(due.values())) and not seconds_until(
                    self.not_before
                ):
                    break
                await asyncio.sleep(pause)
        except asyncio.CancelledError:
            # Moved to another triggerer, or this one stops (on_kill handles a user's kill): the runs go on, and
            # whoever follows next starts from the offsets this trigger was given (metrics recorded once).
            if looking:
                await asyncio.wait(looking)
            await asyncio.to_thread(followed.let_go)
            raise
        except Exception as err:
            if looking:
                await asyncio.wait(looking)
            state = await self._hand_back(followed)
            await wait_until(self.not_before)
            yield self._event(ERROR, message=describe(err), state=state)
            return
        state = await self._hand_back(followed)
        yield self._event(
            FOLLOWED,
            state=state,
            ended={
                run_id: {"exit_code": s.exit_code, "reason": s.reason, "timed_out": s.timed_out}
                for run_id, s in ended.items()
            },
            stops=stops,
            **due,
        )

    async def _hand_back(self, followed: _Followed) -> dict[str, Any]:
        """The runs handed back to the task, once what this trigger read of them is recorded."""
        from airflow_amlrun.hyperdrive.takeover import SweepState

        try:
            states = {run_id: await handed_back(run, self.log) for run_id, run in followed.runs.items()}
        finally:
            # Off the event loop: stopping waits for a heartbeat being written.
            await asyncio.to_thread(followed.heartbeat.stop)
        looked_at = {k: v for k, v in followed.watch.looked_at.items() if k in states}
        unstopped = {k: v for k, v in followed.unstopped.items() if k in states}
        return SweepState(states, looked_at, unstopped).to_json()

    async def on_kill(self) -> None:
        """The deferred task was killed (marked failed or succeeded, or cleared): stop the sweep's runs, which
        end Canceled, and record the sweep Canceled, as ``on_kill`` of a task that waits in its worker does."""
        await asyncio.to_thread(self._cancel)

    def _cancel(self) -> None:
        from airflow_amlrun.history import RunStatus
        from airflow_amlrun.hyperdrive.takeover import SweepState, end_sweep
        from airflow_amlrun.workspace import Workspace

        try:
            workspace = Workspace.get(self.workspace_conn_id)
            self.log.info("Canceling sweep %s", self.sweep_run_id)
            states = SweepState.from_json(self.state).children
            end_sweep(workspace, self.sweep_run_id, RunStatus.CANCELED, KILLED, KILLED, states)
        except Exception as err:
            self.log.warning("Sweep %s was not stopped: %s", self.sweep_run_id, describe(err))
