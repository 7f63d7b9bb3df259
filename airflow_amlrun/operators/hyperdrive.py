"""HyperDriveOperator: a hyperparameter sweep as one task, returning the best run's summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.log import mask_secret

from airflow_amlrun.environment.paths import PathBase
from airflow_amlrun.errors import AmlRunError, ConfigurationError, shown
from airflow_amlrun.links import RUN_ID_XCOM_KEY, AmlRunLink
from airflow_amlrun.workspace import check_connection_id

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_amlrun.hyperdrive import HyperDriveConfig, HyperDriveRun
    from airflow_amlrun.workspace import Workspace


class HyperDriveOperator(BaseOperator):
    """Run a sweep (a HyperDriveConfig) on its compute target; return the best run's summary and every run's id,
    parameters and primary metric as the XCom: ``{"sweep_run_id", "best_run", "children"}``.

    The best run gets the tag ``best_run=true``. The task fails when no run Completed with the primary metric.
    A relative source_directory starts at the DAG file's folder. A retry after the worker died stops what the
    earlier try's sweep left running (recorded Failed) and starts the sweep anew; resuming it is not done yet.

    :param config: the sweep.
    :param experiment: experiment its runs belong to (templated); defaults to the DAG id.
    :param tags: tags recorded on the sweep's parent run (templated).
    :param workspace_conn_id: `amlrun` connection of the workspace (default: as ScriptRunOperator).
    """

    template_fields: Sequence[str] = ("experiment", "tags")
    operator_extra_links = (AmlRunLink(),)
    ui_color = "#d5f5e3"

    def __init__(
        self,
        *,
        config: HyperDriveConfig,
        experiment: str | None = None,
        tags: dict[str, Any] | None = None,
        workspace_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        from airflow_amlrun.hyperdrive import HyperDriveConfig

        super().__init__(**kwargs)
        where = f"HyperDriveOperator {self.task_id!r}"
        if not isinstance(config, HyperDriveConfig):
            raise ConfigurationError(f"{where}: config must be a HyperDriveConfig, not {shown(config)}.")
        check_connection_id(workspace_conn_id, f"{where}: workspace_conn_id")
        self.config = config
        self.experiment = experiment
        self.tags = tags
        self.workspace_conn_id = workspace_conn_id
        self.amlrun_run_id: str | None = None
        self._sweep: HyperDriveRun | None = None

    def on_kill(self) -> None:
        """Stop the sweep's live runs now; the sweep is recorded Canceled."""
        if self._sweep is not None:
            self._sweep.stop("Canceled: the Airflow task running the sweep was stopped.")

    @cached_property
    def workspace(self) -> Workspace:
        from airflow_amlrun.workspace import Workspace

        return Workspace.get(self.workspace_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_amlrun.environment.resolve import index_secrets
        from airflow_amlrun.experiment import Experiment, experiment_name_from
        from airflow_amlrun.history import RunStatus
        from airflow_amlrun.hyperdrive import HyperDriveRun
        from airflow_amlrun.submission import AirflowTask

        ti = context["ti"]
        dag_folder = PathBase.of_dag_file(context["dag"].fileloc)
        experiment = Experiment(self.workspace, self.experiment or experiment_name_from(ti.dag_id))
        task = AirflowTask.of(ti)
        # As ScriptRunOperator: whatever prints the index or workspace credentials shows them masked.
        for secret in [
            *index_secrets(self.workspace, self.config.run_config.environment),
            *self.workspace.credentials(),
        ]:
            mask_secret(secret)
        for earlier in HyperDriveRun.settle_earlier(self.workspace, task):
            self.log.warning(
                "Sweep %s of an earlier try was left unfinished: stopped, recorded Failed.", earlier
            )
        config = replace(self.config, run_config=self.config.run_config.resolved(dag_folder))
        self._sweep = HyperDriveRun.submit(
            self.workspace,
            experiment.name,
            config,
            tags={str(k): str(v) for k, v in (self.tags or {}).items()},
            base_dir=dag_folder,
            airflow_task=task,
        )
        ti.xcom_push(key=RUN_ID_XCOM_KEY, value=self._sweep.id)
        self.amlrun_run_id = self._sweep.id
        self.log.info(
            "Sweep %s: up to %d runs, %d at a time, on %s (experiment %s)",
            self._sweep.id,
            config.max_total_runs,
            config.max_concurrent_runs,
            config.run_config.compute_target,
            experiment.name,
        )
        sweep = self._sweep
        record = sweep.wait_for_completion()
        self._sweep = None
        summary: dict[str, Any] = sweep.summary()
        if record.status is not RunStatus.COMPLETED:
            raise AmlRunError(f"Sweep {record.id} {record.status}: {record.error}")
        best = summary["best_run"]
        self.log.info(
            "Sweep %s: best run %s, %s %s",
            record.id,
            best["run_id"],
            config.primary_metric_name,
            best["metrics"].get(config.primary_metric_name),
        )
        return summary
