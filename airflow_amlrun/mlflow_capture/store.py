"""The MLflow tracking store of a run: MLflow's calls recorded through run_context.

What MLflow logs goes where the run history keeps it:
- a metric (``log_metric``, ``log_metrics``, autolog's) is a metric of the run, with its step;
- a param is a tag ``param.<key>`` (the history has no params of its own; MLflow's rule that a param keeps
  its first value holds here too);
- a tag is a tag, but for MLflow's bookkeeping tags that restate the run's own record (user, source, git,
  parent run);
- an artifact is a file in the run's ``outputs/``, and a logged model a folder there
  (``outputs/<model name>/``, recorded as the tag ``model.<model name>``), collected with the run.

The first MLflow run the script starts is the run itself (its MLflow id is the run's id). Any other MLflow
run (a nested one, or one started after the first ended) is recorded in the same run, everything it logs
named ``<its run name>/<key>`` and its artifacts in ``outputs/<its run name>/``.

Everything MLflow may ask back (``get_run``, ``get_metric_history``, ``search_runs``) is answered from
what this process logged: the run history is written, not read, from inside a run.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import (
    Experiment,
    LifecycleStage,
    Metric,
    Param,
    Run,
    RunData,
    RunInfo,
    RunInputs,
    RunOutputs,
    RunStatus,
    RunTag,
    ViewType,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
)
from mlflow.store.entities import PagedList
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.utils.search_utils import SearchExperimentsUtils, SearchUtils

from airflow_amlrun import run_context

DEFAULT_EXPERIMENT_ID = "0"
PARAM_PREFIX = "param."
MODEL_TAG_PREFIX = "model."
# MLflow's tags that restate what the run's record already holds (or, for the parent, how it is named).
UNRECORDED_TAGS = frozenset(
    {
        "mlflow.user",
        "mlflow.source.name",
        "mlflow.source.type",
        "mlflow.source.git.commit",
        "mlflow.source.git.branch",
        "mlflow.source.git.repoURL",
        "mlflow.parentRunId",
        "mlflow.log-model.history",
    }
)
RUN_NAME_TAG = "mlflow.runName"
PARENT_TAG = "mlflow.parentRunId"
# MLflow's own rule for a run id.
_RUN_ID = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _missing(what: str, key: str) -> MlflowException:
    return MlflowException(
        f"{what} {key!r} does not exist in this run's MLflow store", RESOURCE_DOES_NOT_EXIST
    )


@dataclass
class _Run:
    """One MLflow run of this process, and where what it logs is recorded."""

    info: RunInfo
    prefix: str  # "" for the run itself, "<run name>/" for any other
    folder: Path  # its artifacts
    metrics: dict[str, list[Metric]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    datasets: list[Any] = field(default_factory=list)
    model_inputs: list[Any] = field(default_factory=list)
    model_outputs: list[Any] = field(default_factory=list)

    def entity(self) -> Run:
        latest = [max(points, key=lambda m: (m.step, m.timestamp)) for points in self.metrics.values()]
        return Run(
            run_info=self.info,
            run_data=RunData(
                metrics=latest,
                params=[Param(k, v) for k, v in self.params.items()],
                tags=[RunTag(k, v) for k, v in self.tags.items()],
            ),
            run_inputs=RunInputs(dataset_inputs=list(self.datasets), model_inputs=list(self.model_inputs)),
            run_outputs=RunOutputs(model_outputs=list(self.model_outputs)),
        )


class _Capture:
    """What this process logged through MLflow: one for the process, whatever number of stores MLflow builds."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.context = run_context.Run.get_context()
        self.outputs = Path(os.path.abspath(self.context.outputs_dir))
        name = self.context.experiment_name or "Default"
        self.experiments: dict[str, Experiment] = {
            DEFAULT_EXPERIMENT_ID: Experiment(
                DEFAULT_EXPERIMENT_ID,
                name,
                self.outputs.as_uri(),
                LifecycleStage.ACTIVE,
                [],
                _now_ms(),
                _now_ms(),
            )
        }
        self.runs: dict[str, _Run] = {}
        self.main: str | None = None
        self.folders: set[str] = set()  # names taken under outputs/ by other runs and by models
        self.models: dict[str, Any] = {}

    def emit_metric(self, run: _Run, metric: Metric) -> None:
        self.context.log(run.prefix + metric.key, metric.value, step=metric.step)

    def emit_tag(self, run: _Run, key: str, value: str) -> None:
        name = run.prefix + key
        if name.startswith(run_context.RESERVED_TAG_PREFIX):
            # MLflow's tag is kept in its run (search, get_run); the history keeps such names for the provider's own.
            print(
                f"amlrun: WARNING: mlflow tag {name!r} is not recorded in the run history: names starting with "
                f"{run_context.RESERVED_TAG_PREFIX!r} are the provider's own. Rename the tag to keep it there.",
                file=sys.stderr,
                flush=True,
            )
            return
        self.context.tag(name, value)

    def free_folder(self, parent: Path, wanted: str) -> Path:
        """A folder under parent named after wanted, not yet used by another MLflow run or model."""
        base = _UNSAFE.sub("_", wanted).strip("._") or "mlflow"
        name, n = base, 1
        while str(parent / name) in self.folders or (parent / name).exists():
            n += 1
            name = f"{base}-{n}"
        self.folders.add(str(parent / name))
        return parent / name


_capture: _Capture | None = None
_capture_lock = threading.Lock()


def _state() -> _Capture:
    global _capture
    with _capture_lock:
        if _capture is None:
            _capture = _Capture()
        return _capture


class AmlrunTrackingStore(AbstractStore):  # type: ignore[misc]
    """MLflow's tracking store for ``amlrun:``: see the module's docstring."""

    def __init__(self, store_uri: str | None = None) -> None:
        super().__init__()
        self.store_uri = store_uri
        self._s = _state()

    # experiments

    def search_experiments(
        self,
        view_type: int = ViewType.ACTIVE_ONLY,
        max_results: int = 1000,
        filter_string: str | None = None,
        order_by: list[str] | None = None,
        page_token: str | None = None,
    ) -> PagedList:
        with self._s.lock:
            found = [
                e
                for e in self._s.experiments.values()
                if LifecycleStage.matches_view_type(view_type, e.lifecycle_stage)
            ]
        found = SearchExperimentsUtils.filter(found, filter_string)
        found = SearchExperimentsUtils.sort(found, order_by or ["creation_time DESC", "experiment_id ASC"])
        page, token = SearchExperimentsUtils.paginate(found, page_token, max_results)
        return PagedList(page, token)

    def create_experiment(self, name: str, artifact_location: str | None = None, tags: Any = None) -> str:
        with self._s.lock:
            if any(e.name == name for e in self._s.experiments.values()):
                raise MlflowException(f"Experiment {name!r} already exists.", RESOURCE_ALREADY_EXISTS)
            experiment_id = str(len(self._s.experiments))
            self._s.experiments[experiment_id] = Experiment(
                experiment_id,
                name,
                self._s.outputs.as_uri(),
                LifecycleStage.ACTIVE,
                list(tags or []),
                _now_ms(),
                _now_ms(),
            )
            return experiment_id

    def get_experiment(self, experiment_id: str) -> Experiment:
        with self._s.lock:
            found = self._s.experiments.get(str(experiment_id))
        if found is None:
            raise _missing("Experiment", str(experiment_id))
        return found

    def get_experiment_by_name(self, experiment_name: str) -> Experiment | None:
        with self._s.lock:
            return next((e for e in self._s.experiments.values() if e.name == experiment_name), None)

    def _set_stage(self, experiment_id: str, stage: str) -> None:
        experiment = self.get_experiment(experiment_id)
        experiment._lifecycle_stage = stage

    def delete_experiment(self, experiment_id: str) -> None:
        self._set_stage(experiment_id, LifecycleStage.DELETED)

    def restore_experiment(self, experiment_id: str) -> None:
        self._set_stage(experiment_id, LifecycleStage.ACTIVE)

    def rename_experiment(self, experiment_id: str, new_name: str) -> None:
        self.get_experiment(experiment_id)._name = new_name

    def set_experiment_tag(self, experiment_id: str, tag: Any) -> None:
        self.get_experiment(experiment_id)._add_tag(tag)

    # runs

    def create_run(
        self, experiment_id: str | None, user_id: str, start_time: int | None, tags: Any, run_name: str | None
    ) -> Run:
        s = self._s
        experiment = self.get_experiment(str(experiment_id or DEFAULT_EXPERIMENT_ID))
        if experiment.lifecycle_stage != LifecycleStage.ACTIVE:
            raise MlflowException(
                f"Experiment {experiment.name!r} is deleted: no run can start in it.", INVALID_STATE
            )
        given = {t.key: t.value for t in tags or []}
        run_name = run_name or given.get(RUN_NAME_TAG)
        with s.lock:
            if s.main is None and PARENT_TAG not in given:
                run_id = s.context.id if _RUN_ID.match(s.context.id) else uuid.uuid4().hex
                name, prefix, folder = run_name or s.context.id, "", s.outputs
                s.main = run_id
            else:
                from mlflow.utils.name_utils import _generate_random_name

                run_id = uuid.uuid4().hex
                folder = s.free_folder(s.outputs, run_name or _generate_random_name())
                name = run_name or folder.name
                prefix = f"{folder.name}/"
                print(
                    f"amlrun: MLflow run {name!r} is recorded in run {s.context.id}: what it logs is named "
                    f"'{prefix}...', its artifacts are in outputs/{folder.name}/.",
                    file=sys.stderr,
                    flush=True,
                )
            info = RunInfo(
                run_id=run_id,
                experiment_id=experiment.experiment_id,
                user_id=user_id or "",
                status=RunStatus.to_string(RunStatus.RUNNING),
                start_time=start_time or _now_ms(),
                end_time=None,
                lifecycle_stage=LifecycleStage.ACTIVE,
                artifact_uri=folder.as_uri(),
                run_name=name,
            )
            run = s.runs[run_id] = _Run(info=info, prefix=prefix, folder=folder)
            if run_name:
                given[RUN_NAME_TAG] = run_name
            if experiment.experiment_id != DEFAULT_EXPERIMENT_ID and not prefix:
                given["mlflow.experimentName"] = experiment.name
            # Another run's name is said by its prefix already.
            self._set_tags(run, given, quiet={RUN_NAME_TAG} if folder.name == run_name else set())
            return run.entity()

    def _run(self, run_id: str) -> _Run:
        run = self._s.runs.get(run_id)
        if run is None:
            raise _missing("Run", run_id)
        return run

    def get_run(self, run_id: str) -> Run:
        with self._s.lock:
            return self._run(run_id).entity()

    def update_run_info(
        self, run_id: str, run_status: Any, end_time: int | None, run_name: str | None
    ) -> RunInfo:
        with self._s.lock:
            run = self._run(run_id)
            status = run_status if isinstance(run_status, str) else RunStatus.to_string(run_status)
            run.info._status = status
            run.info._end_time = end_time
            if run_name and run_name != run.info.run_name:
                run.info._run_name = run_name
                self._set_tags(run, {RUN_NAME_TAG: run_name})
            return run.info

    def delete_run(self, run_id: str) -> None:
        with self._s.lock:
            self._run(run_id).info._lifecycle_stage = LifecycleStage.DELETED

    def restore_run(self, run_id: str) -> None:
        with self._s.lock:
            self._run(run_id).info._lifecycle_stage = LifecycleStage.ACTIVE

    def _search_runs(
        self,
        experiment_ids: list[str],
        filter_string: str | None,
        run_view_type: int,
        max_results: int,
        order_by: list[str] | None,
        page_token: str | None,
    ) -> tuple[list[Run], str | None]:
        wanted = {str(e) for e in experiment_ids}
        with self._s.lock:
            runs = [
                r.entity()
                for r in self._s.runs.values()
                if r.info.experiment_id in wanted
                and LifecycleStage.matches_view_type(run_view_type, r.info.lifecycle_stage)
            ]
        runs = SearchUtils.sort(SearchUtils.filter(runs, filter_string), order_by)
        page, token = SearchUtils.paginate(runs, page_token, max_results)
        return list(page), token

    # what a run logs

    def log_batch(self, run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        with self._s.lock:
            run = self._run(run_id)
            if run.info.lifecycle_stage != LifecycleStage.ACTIVE:
                raise MlflowException(
                    f"Run {run_id} is deleted: nothing more can be logged to it.", INVALID_STATE
                )
            for param in params or []:
                self._log_param(run, param.key, str(param.value))
            for metric in metrics or []:
                self._log_metric(run, metric)
            self._set_tags(run, {t.key: str(t.value) for t in tags or []})

    def _log_param(self, run: _Run, key: str, value: str) -> None:
        known = run.params.get(key)
        if known is not None and known != value:
            raise MlflowException(
                f"Changing param values is not allowed. Param with key={key!r} was already logged with "
                f"value={known!r} for run ID={run.info.run_id!r}. Attempted logging new value {value!r}.",
                INVALID_PARAMETER_VALUE,
            )
        if known is None:
            run.params[key] = value
            self._s.emit_tag(run, PARAM_PREFIX + key, value)

    def _log_metric(self, run: _Run, metric: Metric) -> None:
        points = run.metrics.setdefault(metric.key, [])
        if metric.model_id is not None and any(
            (p.value, p.step, p.timestamp) == (metric.value, metric.step, metric.timestamp) for p in points
        ):
            return  # a point already logged, logged again to link it to a model (MLflow's log_model does)
        points.append(metric)
        self._s.emit_metric(run, metric)

    def _set_tags(
        self, run: _Run, tags: dict[str, str], quiet: set[str] | frozenset[str] = frozenset()
    ) -> None:
        for key, value in tags.items():
            if key == RUN_NAME_TAG:
                run.info._run_name = value
            run.tags[key] = value
            if key not in UNRECORDED_TAGS and key not in quiet:
                self._s.emit_tag(run, key, value)

    def delete_tag(self, run_id: str, key: str) -> None:
        with self._s.lock:
            run = self._run(run_id)
            if key not in run.tags:
                raise MlflowException(f"No tag with name {key!r} in run {run_id}.", RESOURCE_DOES_NOT_EXIST)
            # The history keeps what was logged; the tag is emptied there.
            del run.tags[key]
            self._s.emit_tag(run, key, "")

    def get_metric_history(
        self, run_id: str, metric_key: str, max_results: int | None = None, page_token: str | None = None
    ) -> PagedList:
        with self._s.lock:
            points = list(self._run(run_id).metrics.get(metric_key, []))
        return PagedList(points[:max_results] if max_results else points, None)

    def log_inputs(self, run_id: str, datasets: Any = None, models: Any = None) -> None:
        with self._s.lock:
            run = self._run(run_id)
            run.datasets.extend(datasets or [])
            run.model_inputs.extend(models or [])

    def log_outputs(self, run_id: str, models: Any) -> None:
        with self._s.lock:
            self._run(run_id).model_outputs.extend(models or [])

    def record_logged_model(self, run_id: str, mlflow_model: Any) -> None:
        """MLflow 2's record of a model in a run's tags: the model's folder in outputs/ records it here."""

    def link_traces_to_run(self, trace_ids: list[str], run_id: str) -> None:
        """Traces are not kept by the run history."""

    # logged models (MLflow 3): files in the run's outputs/

    def create_logged_model(
        self,
        experiment_id: str,
        name: str | None = None,
        source_run_id: str | None = None,
        tags: Any = None,
        params: Any = None,
        model_type: str | None = None,
    ) -> Any:
        from mlflow.entities import LoggedModel

        s = self._s
        with s.lock:
            run = s.runs.get(source_run_id or "") or (s.runs.get(s.main) if s.main else None)
            folder = s.free_folder(run.folder if run else s.outputs, name or "model")
            model_id = f"m-{uuid.uuid4().hex}"
            model = LoggedModel(
                experiment_id=str(experiment_id),
                model_id=model_id,
                name=name or folder.name,
                artifact_location=folder.as_uri(),
                creation_timestamp=_now_ms(),
                last_updated_timestamp=_now_ms(),
                model_type=model_type,
                source_run_id=source_run_id,
                tags={t.key: t.value for t in tags or []},
                params={p.key: p.value for p in params or []},
            )
            s.models[model_id] = model
            if run is not None:
                where = folder.relative_to(s.outputs).as_posix()
                key = MODEL_TAG_PREFIX + (name or folder.name)
                run.tags[key] = f"outputs/{where}"
                s.emit_tag(run, key, f"outputs/{where}")
            return model

    def get_logged_model(self, model_id: str, allow_deleted: bool = False) -> Any:
        with self._s.lock:
            model = self._s.models.get(model_id)
        if model is None:
            raise _missing("Logged model", model_id)
        return model

    def finalize_logged_model(self, model_id: str, status: Any) -> Any:
        model = self.get_logged_model(model_id)
        model.status = status
        model.last_updated_timestamp = _now_ms()
        return model

    def set_logged_model_tags(self, model_id: str, tags: Any) -> None:
        self.get_logged_model(model_id)._tags.update({t.key: t.value for t in tags or []})

    def delete_logged_model_tag(self, model_id: str, key: str) -> None:
        self.get_logged_model(model_id)._tags.pop(key, None)

    def delete_logged_model(self, model_id: str) -> None:
        with self._s.lock:
            self._s.models.pop(model_id, None)

    def search_logged_models(
        self,
        experiment_ids: list[str],
        filter_string: str | None = None,
        datasets: Any = None,
        max_results: int | None = None,
        order_by: Any = None,
        page_token: str | None = None,
    ) -> PagedList:
        from mlflow.utils.search_utils import SearchLoggedModelsUtils

        wanted = {str(e) for e in experiment_ids}
        with self._s.lock:
            models = [m for m in self._s.models.values() if m.experiment_id in wanted]
        models = SearchLoggedModelsUtils.filter_logged_models(models, filter_string, datasets)
        models.sort(key=lambda m: m.creation_timestamp, reverse=True)
        return PagedList(models[:max_results] if max_results else models, None)
