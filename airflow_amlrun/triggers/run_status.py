"""Trigger that waits, in the triggerer, for a run in the history to reach a final status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class RunStatusTrigger(BaseTrigger):
    """Fires once the run ends (Completed, Failed or Canceled), carrying its summary.

    :param run_id: the run to wait for.
    :param workspace_conn_id: `amlrun` connection of the workspace (None: the default workspace).
    :param poll_interval: seconds between two looks at the run history.
    """

    def __init__(self, run_id: str, workspace_conn_id: str | None = None, poll_interval: float = 5.0) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.run_id = run_id
        self.workspace_conn_id = workspace_conn_id
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_amlrun.triggers.run_status.RunStatusTrigger",
            {
                "run_id": self.run_id,
                "workspace_conn_id": self.workspace_conn_id,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_amlrun.history import RunNotFoundError
        from airflow_amlrun.workspace import Workspace

        try:
            workspace = await asyncio.to_thread(Workspace.get, self.workspace_conn_id)
            while True:
                record = await asyncio.to_thread(workspace.get_run, self.run_id)
                if record.status.is_terminal:
                    yield TriggerEvent({"status": str(record.status), "run": record.summary()})  # type: ignore[no-untyped-call]
                    return
                await asyncio.sleep(self.poll_interval)
        except RunNotFoundError as err:
            yield TriggerEvent({"status": "error", "message": str(err)})  # type: ignore[no-untyped-call]
