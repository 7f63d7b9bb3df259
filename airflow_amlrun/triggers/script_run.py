"""Trigger that follows a deferred task's run in the triggerer: its output, metrics, limit and end."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from airflow_amlrun.run import ScriptRun
    from airflow_amlrun.targets.base import TargetStatus

ENDED = "ended"
ERROR = "error"


class ScriptRunTrigger(BaseTrigger):
    """Follows a run from where the task left it until it ends, then hands it back to the task.

    While the run goes on, its output reaches the task log (as the trigger's log lines), its metrics and tags
    reach the run history, its heartbeat is kept, and a run past its max duration is stopped. Once it ended,
    the event carries its exit status and how far its output was read; the task (``execute_complete``) then
    collects its outputs and records the outcome, as a task that waited for it itself would.

    :param run_id: the run.
    :param state: how far the task followed it (``FollowState.to_json()``).
    :param workspace_conn_id: `amlrun` connection of the workspace (None: the default workspace).
    :param show_output: pass the script's output to the task log.
    """

    def __init__(
        self,
        run_id: str,
        state: dict[str, Any],
        workspace_conn_id: str | None = None,
        show_output: bool = True,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.run_id = run_id
        self.state = dict(state)
        self.workspace_conn_id = workspace_conn_id
        self.show_output = show_output

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_amlrun.triggers.script_run.ScriptRunTrigger",
            {
                "run_id": self.run_id,
                "state": self.state,
                "workspace_conn_id": self.workspace_conn_id,
                "show_output": self.show_output,
            },
        )

    def _resume(self) -> ScriptRun:
        from airflow_amlrun.run import FollowState, ScriptRun
        from airflow_amlrun.workspace import Workspace

        workspace = Workspace.get(self.workspace_conn_id)
        return ScriptRun.resumed(workspace, self.run_id, FollowState.from_json(self.state))

    def _emit(self, line: str) -> None:
        self.log.info("%s", line)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            run = await asyncio.to_thread(self._resume)
        except Exception as err:
            # Nothing was done to the run: the task gets it back as it left it, and says why.
            yield TriggerEvent(
                {"run_id": self.run_id, "status": ERROR, "message": str(err), "state": self.state}
            )  # type: ignore[no-untyped-call]
            return
        emit = self._emit if self.show_output else None
        step: asyncio.Future[TargetStatus | None] | None = None
        try:
            while True:
                step = asyncio.ensure_future(asyncio.to_thread(run.step, emit))
                status = await asyncio.shield(step)
                if status is not None:
                    break
        except asyncio.CancelledError:
            # Moved to another triggerer, or this one stops (on_kill handles a user's kill): the run goes on.
            # Whoever follows next starts from the offsets this trigger was created with: the task log may
            # show some lines twice, while metrics are recorded once (by their sequence number).
            if step is not None:
                await asyncio.wait([step])  # a step is short (one poll interval); let it finish first
            await asyncio.to_thread(run.hand_over)
            raise
        except Exception as err:
            state = await asyncio.to_thread(run.hand_over)
            yield TriggerEvent(
                {"run_id": self.run_id, "status": ERROR, "message": str(err), "state": state.to_json()}
            )  # type: ignore[no-untyped-call]
            return
        state = await asyncio.to_thread(run.hand_over)
        yield TriggerEvent(  # type: ignore[no-untyped-call]
            {
                "run_id": self.run_id,
                "status": ENDED,
                "exit_code": status.exit_code,
                "reason": status.reason,
                "timed_out": status.timed_out,
                "state": state.to_json(),
            }
        )

    async def on_kill(self) -> None:
        """The deferred task was killed (marked failed or succeeded, or cleared): stop its run, which ends
        Canceled, as ``on_kill`` of a task that waits in its worker does."""
        await asyncio.to_thread(self._cancel)

    def _cancel(self) -> None:
        try:
            run = self._resume()
        except Exception as err:
            logging.getLogger(__name__).warning("Run %s was not stopped: %s", self.run_id, err)
            return
        self.log.info("Canceling run %s", self.run_id)
        run.cancel(reason="Canceled: its deferred task was killed.")
