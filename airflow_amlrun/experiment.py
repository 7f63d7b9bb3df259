"""Experiment: a named group of runs, and the entry point that submits one."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, overload

from airflow_amlrun.errors import ConfigurationError, shown

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

    from airflow_amlrun.estimator import Estimator
    from airflow_amlrun.hyperdrive import HyperDriveConfig, HyperDriveRun
    from airflow_amlrun.run import ScriptRun
    from airflow_amlrun.runconfig import ScriptRunConfig
    from airflow_amlrun.submission import AirflowTask
    from airflow_amlrun.workspace import Workspace

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{2,35}")


def check_experiment_name(name: Any) -> str:
    """Return the name if it follows the rules, else raise an error that says which rule it breaks."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"Invalid experiment name {shown(name)}: use 3-36 characters, letters, digits, '_' and '-', starting "
            "with a letter or digit (for example 'diabetes_ridge')."
        )
    return name


def experiment_name_from(text: str) -> str:
    """A valid experiment name derived from free text such as a DAG id (`my.dag` -> `my_dag`)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", text).lstrip("_-")[:36]
    if len(name) < 3:
        name = (name + "_runs")[:36]
    return check_experiment_name(name)


class Experiment:
    """A named group of runs in a workspace.

    :param workspace: where the runs are recorded.
    :param name: 3-36 characters, letters, digits, '_' and '-', starting with a letter or digit.
    """

    def __init__(self, workspace: Workspace, name: str) -> None:
        from airflow_amlrun.workspace import Workspace

        if not isinstance(workspace, Workspace):
            raise ConfigurationError(
                f"Experiment {shown(name)}: workspace must be a Workspace (e.g. Workspace.get()), not "
                f"{type(workspace).__name__} {shown(workspace)}."
            )
        self.workspace = workspace
        self.name = check_experiment_name(name)

    @overload
    def submit(
        self,
        config: ScriptRunConfig | Estimator,
        *,
        tags: dict[str, str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        airflow_task: AirflowTask | None = None,
        reattach_on_retry: bool = True,
        on_created: Callable[[ScriptRun], None] | None = None,
    ) -> ScriptRun: ...

    @overload
    def submit(
        self,
        config: HyperDriveConfig,
        *,
        tags: dict[str, str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        airflow_task: AirflowTask | None = None,
    ) -> HyperDriveRun: ...

    def submit(
        self,
        config: ScriptRunConfig | Estimator | HyperDriveConfig,
        *,
        tags: dict[str, str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        airflow_task: AirflowTask | None = None,
        reattach_on_retry: bool = True,
        on_created: Callable[[ScriptRun], None] | None = None,
    ) -> ScriptRun | HyperDriveRun:
        """Check the config, record a run, snapshot the code and start it on its compute target; or, for a
        HyperDriveConfig, record a sweep, whose runs start in its ``wait_for_completion``.

        :param config: what to run and where (a ScriptRunConfig, or an Estimator, which stands for one), or a
            sweep of it (a HyperDriveConfig).
        :param tags: tags recorded on the run.
        :param base_dir: folder a relative source_directory starts from (default: the current directory).
        :param airflow_task: the Airflow task instance submitting the run, recorded on the run row.
        :param reattach_on_retry: when an earlier try of that task left its run unfinished, follow that run
            (True) instead of starting a new one; False stops it (recorded Canceled) and starts afresh.
        :param on_created: called with a new run once it is recorded, before it starts on its target: whoever
            may have to stop it (a signal handler) holds it from then on. Stopped before it started there
            (``cancel``), it is recorded Canceled and never starts.
        """
        from airflow_amlrun.estimator import Estimator
        from airflow_amlrun.run import ScriptRun
        from airflow_amlrun.runconfig import ScriptRunConfig, render_tags

        if type(config).__name__ == "HyperDriveConfig":
            from airflow_amlrun.hyperdrive import HyperDriveConfig, HyperDriveRun

            if isinstance(config, HyperDriveConfig):
                return HyperDriveRun.submit(
                    self.workspace,
                    self.name,
                    config,
                    tags=render_tags(tags),
                    base_dir=base_dir,
                    airflow_task=airflow_task,
                )
        if isinstance(config, Estimator):
            config = config.run_config
        if not isinstance(config, ScriptRunConfig):
            raise ConfigurationError(
                f"Experiment {self.name!r}: submit needs a ScriptRunConfig (or an Estimator), not {type(config).__name__} "
                f"{shown(config)}; for a YAML file, pass ScriptRunConfig.from_yaml(path)."
            )
        if not isinstance(reattach_on_retry, bool):
            raise ConfigurationError(
                f"Experiment {self.name!r}: reattach_on_retry={shown(reattach_on_retry)} must be True or False."
            )
        return ScriptRun.submit(
            self.workspace,
            self.name,
            config,
            tags=render_tags(tags),
            base_dir=base_dir,
            airflow_task=airflow_task,
            reattach_on_retry=reattach_on_retry,
            on_created=on_created,
        )

    def list_runs(self, status: str | None = None, limit: int = 100) -> list[Any]:
        return self.workspace.list_runs(experiment=self.name, status=status, limit=limit)

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r}, workspace={self.workspace.name!r})"
