"""Trigger that follows a deferred task's run in the triggerer: its output, metrics, limits and end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from airflow_amlrun.run import FollowState, ScriptRun
    from airflow_amlrun.targets.base import TargetStatus

ENDED = "ended"
ERROR = "error"
# Longest wait between two looks at a run from the triggerer, whose threads every deferred run shares.
TRIGGER_POLL_SECONDS = 2.0
# How long one look may wait on the target: long enough for a target's own patience with a daemon or host
# that does not answer for a moment (a look of 0 s is a poll, which gives up at once).
STEP_WAIT_SECONDS = 0.5
# Between two tries to hand a run back when the history does not take what is pending.
HAND_BACK_RETRY_SECONDS = 5.0


# How long after the task deferred the trigger fires at the soonest. Airflow 3.3's scheduler fails a deferred task
# whose trigger fired before it took in the exit of the process that deferred (apache/airflow#67287, #72716):
# a run ending within seconds of the deferral would fail its task, outputs uncollected.
FIRST_EVENT_AFTER_SECONDS = 10.0


def seconds_until(when: str | None) -> float:
    """How long until the ISO time ``when`` (a trigger's ``not_before``): 0 once it has passed, or if it is None."""
    if when is None:
        return 0.0
    return max(0.0, (datetime.fromisoformat(when) - datetime.now(UTC)).total_seconds())


async def wait_until(when: str | None) -> None:
    """Sleep until the ISO time ``when`` (a trigger's ``not_before``) unless it has passed, or is None."""
    wait = seconds_until(when)
    if wait > 0:
        await asyncio.sleep(wait)


class ScriptRunTrigger(BaseTrigger):
    """Follows a run from where the task left it until it ends, then hands it back to the task.

    While the run goes on, its output reaches the task log (as the trigger's log lines), its metrics and tags
    reach the run history, its heartbeat is kept, and it is stopped past its max duration or the task's
    execution_timeout. Once it ended, the event carries its exit status and how far its output was read; the
    task (``execute_complete``) then collects its outputs and records the outcome, as a task that waited for
    it itself would. Nothing secret is held: the kwargs are the run id, offsets and flags.

    :param run_id: the run.
    :param state: how far the task followed it (``FollowState.to_json()``).
    :param workspace_conn_id: `amlrun` connection of the workspace (None: the default workspace).
    :param show_output: pass the script's output to the task log. The task turns it off for a run with
        secret variables: the triggerer does not know their values, so it could not mask them.
    :param stop_at: ISO time at which to stop the run (the task's execution_timeout), if any.
    :param not_before: ISO time before which the trigger does not fire (a run that ends sooner is handed back
        then): see ``FIRST_EVENT_AFTER_SECONDS``.
    """

    def __init__(
        self,
        run_id: str,
        state: dict[str, Any],
        workspace_conn_id: str | None = None,
        show_output: bool = True,
        stop_at: str | None = None,
        not_before: str | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.run_id = run_id
        self.state = dict(state)
        self.workspace_conn_id = workspace_conn_id
        self.show_output = show_output
        self.stop_at = stop_at
        self.not_before = not_before

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_amlrun.triggers.script_run.ScriptRunTrigger",
            {
                "run_id": self.run_id,
                "state": self.state,
                "workspace_conn_id": self.workspace_conn_id,
                "show_output": self.show_output,
                "stop_at": self.stop_at,
                "not_before": self.not_before,
            },
        )

    def _resume(self) -> ScriptRun:
        from airflow_amlrun.run import FollowState, ScriptRun
        from airflow_amlrun.run.outcome import DEFERRED_TIMED_OUT
        from airflow_amlrun.workspace import Workspace

        workspace = Workspace.get(self.workspace_conn_id)
        run = ScriptRun.resumed(workspace, self.run_id, FollowState.from_json(self.state))
        if self.stop_at is not None:
            run.stop_at(datetime.fromisoformat(self.stop_at), DEFERRED_TIMED_OUT)
        return run

    def _emit(self, line: str) -> None:
        from airflow_amlrun.run_output import log_output_line

        log_output_line(self.log, line)

    def _event(self, status: str, **fields: Any) -> TriggerEvent:
        return TriggerEvent({"run_id": self.run_id, "status": status, **fields})  # type: ignore[no-untyped-call]

    async def run(self) -> AsyncIterator[TriggerEvent]:
        resuming = asyncio.ensure_future(asyncio.to_thread(self._resume))
        try:
            run = await asyncio.shield(resuming)
        except asyncio.CancelledError:
            # Cancelled while taking the run over: once that is done, let go of it again (its heartbeat too).
            await _let_go_when_done(resuming)
            raise
        except Exception as err:
            # Nothing was done to the run: the task gets it back as it left it, and says why.
            await wait_until(self.not_before)
            yield self._event(ERROR, message=describe(err), state=self.state, stop_at=self.stop_at)
            return
        emit = self._emit if self.show_output else None
        poll = max(run.settings.poll_interval_seconds, 0.05)
        step: asyncio.Future[TargetStatus | None] | None = None
        try:
            while True:
                step = asyncio.ensure_future(asyncio.to_thread(run.step, emit, STEP_WAIT_SECONDS))
                status = await asyncio.shield(step)
                if status is not None:
                    break
                await asyncio.sleep(min(poll * 20, TRIGGER_POLL_SECONDS))
        except asyncio.CancelledError:
            # Moved to another triggerer, or this one stops (on_kill handles a user's kill): the run goes on.
            # Whoever follows next starts from the offsets this trigger was created with: the task log may
            # show some lines twice, while metrics are recorded once (by their sequence number).
            if step is not None:
                await asyncio.wait([step])  # one look is short; let it finish before letting go
            await asyncio.to_thread(run.let_go)
            raise
        except Exception as err:
            state = await self._hand_back(run)
            await wait_until(self.not_before)
            yield self._event(ERROR, message=describe(err), state=state, stop_at=self.stop_at)
            return
        state = await self._hand_back(run)
        await wait_until(self.not_before)
        yield self._event(
            ENDED, exit_code=status.exit_code, reason=status.reason, timed_out=status.timed_out, state=state
        )

    async def _hand_back(self, run: ScriptRun) -> dict[str, Any]:
        """Hand the run back to the task once what this trigger read is recorded; waits out a history outage."""
        state = (await handed_back(run, self.log)).to_json()
        if not self.show_output:
            # The output was not shown here: the task shows it, masked, from where it handed the run over.
            state["log_offset"] = self.state.get("log_offset", 0)
        return state

    async def on_kill(self) -> None:
        """The deferred task was killed (marked failed or succeeded, or cleared): stop its run, which ends
        Canceled, as ``on_kill`` of a task that waits in its worker does (a run that already ended keeps its
        own outcome)."""
        await asyncio.to_thread(self._cancel)

    def _cancel(self) -> None:
        from airflow_amlrun.run import RunEndedError

        try:
            run = self._resume()
        except RunEndedError:
            return
        except Exception as err:
            self.log.warning("Run %s was not stopped: %s", self.run_id, describe(err))
            return
        self.log.info("Canceling run %s", self.run_id)
        try:
            run.cancel(reason="Canceled: its deferred task was killed.")
        except Exception as err:
            self.log.warning("Run %s: stopping it failed: %s", self.run_id, describe(err))
        finally:
            run.let_go()


async def handed_back(run: ScriptRun, log: Any) -> FollowState:
    """Hand a run followed in the triggerer back, once what was read of it is recorded: waits out a history
    outage (a trigger cancelled meanwhile lets go of the run)."""
    from airflow_amlrun.history import HistoryUnavailableError

    while True:
        try:
            return await asyncio.to_thread(run.hand_over)
        except HistoryUnavailableError as err:
            log.warning("%s Trying again in %.0f s.", err, HAND_BACK_RETRY_SECONDS)
            try:
                await asyncio.sleep(HAND_BACK_RETRY_SECONDS)
            except asyncio.CancelledError:
                await asyncio.to_thread(run.abandon)  # its heartbeat must not outlive this trigger
                raise


async def _let_go_when_done(resuming: asyncio.Future[ScriptRun]) -> None:
    await asyncio.wait([resuming])
    if not resuming.cancelled() and resuming.exception() is None:
        await asyncio.to_thread(resuming.result().let_go)


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
