"""Sensor that waits for a run in the run history to end, e.g. one submitted by another DAG."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.configuration import conf

from airflow_amlrun.errors import AmlRunError, ConfigurationError, shown
from airflow_amlrun.operators.script_run import rendered_later
from airflow_amlrun.workspace import check_connection_id

if TYPE_CHECKING:
    from airflow.sdk import Context


class RunStatusSensor(BaseSensorOperator):
    """Wait until a run ends; succeed if it Completed, fail otherwise. Returns the run summary.

    :param run_id: the run to wait for (templated), e.g. ``{{ ti.xcom_pull('train')['run_id'] }}``.
    :param workspace_conn_id: `amlrun` connection of the workspace (None: the default workspace).
    :param deferrable: wait in the triggerer instead of occupying a worker slot (default ``[operators]
        default_deferrable``).
    """

    template_fields: Sequence[str] = ("run_id",)

    def __init__(
        self,
        *,
        run_id: str,
        workspace_conn_id: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        where = f"RunStatusSensor {self.task_id!r}"
        if not isinstance(deferrable, bool):
            raise ConfigurationError(f"{where}: deferrable={shown(deferrable)} must be True or False.")
        check_connection_id(workspace_conn_id, f"{where}: workspace_conn_id")
        if not rendered_later(run_id):
            _check_run_id(run_id, where)
        self.run_id = run_id
        self.workspace_conn_id = workspace_conn_id
        self.deferrable = deferrable

    def execute(self, context: Context) -> Any:
        _check_run_id(self.run_id, f"RunStatusSensor {self.task_id!r}, as rendered")
        if not self.deferrable:
            return super().execute(context)
        from airflow_amlrun.triggers.run_status import RunStatusTrigger

        self.defer(
            trigger=RunStatusTrigger(self.run_id, self.workspace_conn_id, poll_interval=self.poke_interval),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout) if self.timeout else None,
        )

    def poke(self, context: Context) -> bool:
        from airflow_amlrun.workspace import Workspace

        record = Workspace.get(self.workspace_conn_id).get_run(self.run_id)
        if not record.status.is_terminal:
            self.log.info("Run %s is %s", self.run_id, record.status)
            return False
        self._check(str(record.status), record.error)
        context["ti"].xcom_push(key="return_value", value=record.summary())
        return True

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") == "error":
            raise AmlRunError(event.get("message", "the run could not be found"))
        self._check(event["status"], event["run"].get("error"))
        return dict(event["run"])

    def _check(self, status: str, error: str | None) -> None:
        if status != "Completed":
            raise AmlRunError(f"Run {self.run_id} ended {status}: {error or 'no error recorded'}")


# Run ids are `<experiment>_<unix time>_<8 hex>`; the history keeps at most this many characters.
_RUN_ID_MAX = 128


def _check_run_id(run_id: object, where: str) -> None:
    if (
        not isinstance(run_id, str)
        or not run_id.strip()
        or "\0" in run_id
        or len(run_id) > _RUN_ID_MAX
        or run_id != run_id.strip()
    ):
        raise ConfigurationError(
            f"{where}: run_id={shown(run_id)} is not a run id: give the id of a run, such as "
            "'diabetes_ridge_1795700859_0852cf59', or a template that renders to one, e.g. "
            "\"{{ ti.xcom_pull(task_ids='train')['run_id'] }}\"."
        )
