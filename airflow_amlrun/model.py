"""Registered models: versioned files from a completed run's outputs, stored content-addressed like code
snapshots, with tags, properties and labels (``production``), and the run they came from on record.

    model = Model.register(ws, run_id, "diabetes-ridge", "outputs/model.pkl", tags={"alpha": "0.1"})
    Model(ws, "diabetes-ridge", label="production").download("serving/")
"""

from __future__ import annotations

import builtins
import contextlib
import math
import os
import posixpath
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from airflow_amlrun.environment.sections import check_environment_name
from airflow_amlrun.errors import ConfigurationError, shown
from airflow_amlrun.history import RunRecord, RunStatus
from airflow_amlrun.history import model_registry as registry
from airflow_amlrun.history.model_registry import ModelNotFoundError, ModelRecord
from airflow_amlrun.runconfig import render_tags

if TYPE_CHECKING:
    from airflow_amlrun.workspace import Workspace

__all__ = ["Model", "ModelNotFoundError", "Promotion", "promote_if_better"]

OUTPUTS = "outputs"


class Model:
    """One registered version of a model: ``Model(ws, name)`` is the latest, ``version=`` or ``label=`` another.

    :param workspace: the workspace it is registered in.
    :param name: the model's name.
    :param version: a version number (1, 2, ...); default the latest.
    :param label: a label set with ``set_label`` (exclusive with version).
    :raises ModelNotFoundError: no such model, version or label; the message lists what there is.
    """

    def __init__(
        self, workspace: Workspace, name: str, version: int | None = None, *, label: str | None = None
    ) -> None:
        _check_workspace(workspace, "Model")
        check_environment_name(name, "Model name")
        if version is not None and label is not None:
            raise ConfigurationError(
                f"Model {name!r}: give a version ({version}) or a label ({label!r}), not both."
            )
        self.workspace = workspace
        self._record = registry.get_version(
            workspace.history, name, version=_version(name, version), label=_label(name, label)
        )

    @classmethod
    def _of(cls, workspace: Workspace, record: ModelRecord) -> Model:
        model = cls.__new__(cls)
        model.workspace, model._record = workspace, record
        return model

    # what it is

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def version(self) -> int:
        return self._record.version

    @property
    def run_id(self) -> str:
        """The run whose outputs the model's files are."""
        return self._record.run_id

    @property
    def path(self) -> str:
        """The path in the run's outputs it was registered from."""
        return self._record.path

    @property
    def tags(self) -> dict[str, Any]:
        return dict(self._record.tags)

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self._record.properties)

    @property
    def labels(self) -> list[str]:
        return list(self._record.labels)

    @property
    def run_info(self) -> dict[str, Any]:
        """The run as it was at registration: experiment, target, metrics, code snapshot, environment, git."""
        return dict(self._record.run_info)

    @property
    def snapshot_id(self) -> str:
        """The manifest of the model's files in the workspace store."""
        return self._record.snapshot_id

    @property
    def created_at(self) -> datetime:
        return self._record.created_at

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, version={self.version}, run_id={self.run_id!r})"

    # registering and finding

    @classmethod
    def register(
        cls,
        workspace: Workspace,
        run_id: str,
        model_name: str,
        model_path: str,
        *,
        tags: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
    ) -> Model:
        """Register the next version of ``model_name`` from a completed run's output file or folder.

        :param workspace: the workspace holding the run.
        :param run_id: the run.
        :param model_name: the model's name (letters, digits, '.', '_', '-').
        :param model_path: a file or folder of the run's outputs, ``outputs/model.pkl`` (or ``model.pkl``).
        :param tags: tags of this version (strings), which can be changed later.
        :param properties: properties of this version, fixed once registered.
        """
        _check_workspace(workspace, "Model.register")
        run = workspace.get_run(run_id)
        if run.status != RunStatus.COMPLETED:
            raise ConfigurationError(
                f"Run {run.id} is {run.status}: only a Completed run's outputs can be registered as a model"
                + ("; register it once the run has ended." if not run.status.is_terminal else ".")
            )
        return cls.from_outputs(workspace, run, model_name, model_path, tags=tags, properties=properties)

    @classmethod
    def from_outputs(
        cls,
        workspace: Workspace,
        run: RunRecord,
        model_name: str,
        model_path: str,
        *,
        tags: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
        once: bool = False,
    ) -> Model:
        """Register a model from the outputs the store holds of ``run``, whatever its recorded status (the
        follower of a run registers what its script asked for before it records the run Completed).

        :param once: a version of this name already registered from the same run and path is returned as it
            is (a retry finishing the run again registers nothing twice).
        """
        from airflow_amlrun.snapshot import Snapshot, SnapshotEntry

        check_environment_name(model_name, "Model name")
        tags, properties = _mapping(tags, "tags"), _mapping(properties, "properties")
        relative = _model_path(model_path)
        if once:
            existing = registry.version_from_run(
                workspace.history, model_name, run.id, f"{OUTPUTS}/{relative}"
            )
            if existing is not None:
                return cls._of(workspace, existing)
        prefix = f"runs/{run.id}/{OUTPUTS}"
        store = workspace.store
        outputs = store.list(prefix)
        chosen = [key for key in outputs if key == relative or key.startswith(relative + "/")]
        if not chosen:
            raise ConfigurationError(
                f"Run {run.id} has no output {model_path!r}. Its outputs: "
                f"{', '.join(f'{OUTPUTS}/{k}' for k in outputs[:20]) or 'none'}"
                f"{' ...' if len(outputs) > 20 else ''}."
            )
        # The model's files keep the name of what was registered: outputs/model.pkl -> model.pkl.
        base = posixpath.dirname(relative)
        entries = []
        for key in chosen:
            digest, size = store.blob_of_object(f"{prefix}/{key}")
            path = key[len(base) + 1 :] if base else key
            entries.append(SnapshotEntry(path=path, mode=0o644, size=size, digest=digest))
        files = Snapshot.from_entries(entries)
        store.put_manifest(files)
        run_info = {
            "experiment": run.experiment,
            "target": run.target,
            "metrics": dict(run.metrics),
            "snapshot_id": run.snapshot_id,
            "environment": run.environment,
            "git": run.git,
            "arguments": list(run.arguments),
        }
        record = registry.add_version(
            workspace.history,
            name=model_name,
            run_id=run.id,
            path=f"{OUTPUTS}/{relative}",
            snapshot_id=files.id,
            tags=tags,
            properties=properties,
            run_info=run_info,
        )
        return cls._of(workspace, record)

    @classmethod
    def list(cls, workspace: Workspace, name: str | None = None) -> builtins.list[Model]:
        """Every version of one model, newest first; without a name, the latest version of each model."""
        _check_workspace(workspace, "Model.list")
        if name is not None:
            check_environment_name(name, "Model name")
        return [cls._of(workspace, record) for record in registry.list_versions(workspace.history, name)]

    # using it

    def download(self, target_dir: str | os.PathLike[str] = ".", *, exist_ok: bool = False) -> str:
        """Write the model's files into ``target_dir``, each checked against its hash; returns the path of the
        model there (the file or folder registered).

        :param target_dir: the folder to write into (created if missing).
        :param exist_ok: replace nothing, but write into a folder that already holds other files.
        """
        from airflow_amlrun.snapshot import restore_snapshot

        target = os.fspath(target_dir)
        top = posixpath.basename(self.path)
        if os.path.lexists(os.path.join(target, top)):
            raise ConfigurationError(
                f"Model {self.name!r} version {self.version}: {os.path.join(target, top)!r} exists already; "
                "download into another folder, or remove it first."
            )
        if exist_ok and os.path.isdir(target) and os.listdir(target):
            # Restored beside, then moved in: a restore writes only into an empty folder.
            with tempfile.TemporaryDirectory(dir=target, prefix=".amlrun-model-") as staging:
                restore_snapshot(self.workspace.store, self.snapshot_id, staging)
                staged, final = os.path.join(staging, top), os.path.join(target, top)
                if os.path.isdir(staged):
                    os.rename(staged, final)  # refused onto a folder that has come to hold anything
                else:
                    os.link(staged, final)  # refused onto a file that has come to exist meanwhile
        else:
            created = not os.path.lexists(target)
            fresh = created or (os.path.isdir(target) and not os.listdir(target))
            try:
                restore_snapshot(self.workspace.store, self.snapshot_id, target)
            except BaseException:
                if fresh:
                    # The folder was empty: what it holds now is this download's, half written (a file that
                    # failed its hash check stops the restore), and is not left to be taken for the model.
                    _empty(target, remove=created)
                raise
        return os.path.join(target, top)

    def add_tags(self, tags: dict[str, Any]) -> None:
        """Set tags of this version (others are kept)."""
        self._record = registry.update_tags(
            self.workspace.history, self.name, self.version, add=_mapping(tags, "tags"), remove=[]
        )

    def remove_tags(self, keys: builtins.list[str]) -> None:
        """Remove tags of this version."""
        self._record = registry.update_tags(
            self.workspace.history, self.name, self.version, add={}, remove=[str(k) for k in keys]
        )

    def set_label(self, label: str) -> None:
        """Point ``label`` (e.g. ``production``) at this version; it moves here from another version."""
        registry.set_label(self.workspace.history, self.name, self.version, _label(self.name, label) or "")
        self._record = registry.get_version(self.workspace.history, self.name, version=self.version)


def _empty(folder: str, *, remove: bool) -> None:
    """Remove what a failed download wrote into ``folder`` (and the folder itself, if it made it)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        if remove:
            os.rmdir(folder)


def _check_workspace(workspace: object, call: str) -> None:
    if not hasattr(type(workspace), "history"):
        raise ConfigurationError(
            f"{call}: workspace must be a Workspace (e.g. Workspace.get()), not {type(workspace).__name__} "
            f"{shown(workspace)}."
        )


def _version(name: str, version: object) -> int | None:
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int | str) or not str(version).isdigit():
        raise ConfigurationError(
            f"Model {name!r}: version {shown(version)} must be a version number such as 2, or None for the latest."
        )
    return int(version)


def _label(name: str, label: object) -> str | None:
    if label is None:
        return None
    if not isinstance(label, str) or not label.strip() or len(label) > 64:
        raise ConfigurationError(
            f"Model {name!r}: label {shown(label)} must be a non-empty string of at most 64 characters, such as "
            "'production'."
        )
    return label


def _mapping(value: object, what: str) -> dict[str, Any]:
    if what == "tags":
        return render_tags(value, what, of_run=False)  # type: ignore[arg-type]
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigurationError(
            f"{what} must be a mapping such as {{'framework': 'sklearn'}}, not {shown(value)}."
        )
    return {str(k): v for k, v in value.items()}


def _model_path(model_path: object) -> str:
    """The path relative to the run's outputs folder, checked: ``outputs/model.pkl`` and ``model.pkl`` alike."""
    if not isinstance(model_path, str) or not model_path.strip():
        raise ConfigurationError(
            f"model_path {shown(model_path)} must name a file or folder of the run's outputs, e.g. "
            "'outputs/model.pkl'."
        )
    path = model_path.strip().rstrip("/")
    if path == OUTPUTS or path.startswith(OUTPUTS + "/"):
        path = path[len(OUTPUTS) + 1 :]
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\0" in path:
        raise ConfigurationError(
            f"model_path {model_path!r} must be a plain path inside the run's outputs, e.g. 'outputs/model.pkl' "
            "or 'outputs/model/' (no '..', no absolute path, not the whole outputs folder)."
        )
    return path


@dataclass(frozen=True)
class Promotion:
    """What ``promote_if_better`` decided, and why."""

    promoted: bool
    reason: str
    model: str
    # The version the label names afterwards (None: no version has it).
    version: int | None
    metric: str
    candidate: float
    incumbent: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def promote_if_better(
    workspace: Workspace,
    run_id: str,
    model_name: str,
    model_path: str,
    *,
    metric: str,
    goal: str = "minimize",
    label: str = "production",
    tags: dict[str, Any] | None = None,
) -> Promotion:
    """Register a run's model and point ``label`` at it, only if its ``metric`` beats the labelled version's.

    The first time (no version has the label yet) it is promoted. Otherwise the run's final value of the metric
    is compared with the one the labelled version's run had; a tie keeps the labelled version. Either way the
    decision and its reason are set on the run as the tag ``promotion``.

    :param workspace: the workspace.
    :param run_id: the candidate run (Completed).
    :param model_name: the model to register a version of.
    :param model_path: the model in the run's outputs, e.g. ``outputs/model.pkl``.
    :param metric: the primary metric, as the run logged it.
    :param goal: ``"minimize"`` or ``"maximize"``.
    :param label: the label that names the model in use.
    :param tags: tags of the version, if registered.
    """
    if goal not in ("minimize", "maximize"):
        raise ConfigurationError(f"goal={shown(goal)} must be 'minimize' or 'maximize'.")
    label = _label(model_name, label) or ""
    run = workspace.get_run(run_id)
    if run.status != RunStatus.COMPLETED:
        raise ConfigurationError(f"Run {run.id} is {run.status}: only a Completed run can be promoted.")
    candidate = run.metrics.get(metric)
    if isinstance(candidate, bool) or not isinstance(candidate, int | float) or not math.isfinite(candidate):
        raise ConfigurationError(
            f"Run {run.id} has no finite numeric metric {metric!r} to compare (its metrics: "
            f"{', '.join(sorted(run.metrics)) or 'none'}); log it with Run.get_context().log({metric!r}, value)."
        )
    model: Model | None = None
    # Another promotion may move the label between the comparison and the move: then compare again with the
    # version it moved to.
    for _attempt in range(5):
        try:
            current: Model | None = Model(workspace, model_name, label=label)
        except ModelNotFoundError:
            current = None
        recorded = current.run_info.get("metrics", {}).get(metric) if current is not None else None
        # An incumbent without a finite value (none recorded, or NaN) is beaten by any candidate.
        incumbent = (
            float(recorded)
            if isinstance(recorded, int | float)
            and not isinstance(recorded, bool)
            and math.isfinite(recorded)
            else None
        )
        if current is not None and incumbent is not None:
            better = candidate < incumbent if goal == "minimize" else candidate > incumbent
            if not better:
                reason = (
                    f"not promoted: {metric} {candidate:g} does not beat {incumbent:g} of {model_name} version "
                    f"{current.version} ({label}, from run {current.run_id}); goal: {goal}"
                )
                workspace.history.update_run(run.id, add_tags={"promotion": reason})
                return Promotion(
                    False, reason, model_name, current.version, metric, float(candidate), incumbent
                )
        if model is None:
            model = Model.register(workspace, run.id, model_name, model_path, tags=tags)
        if registry.move_label(
            workspace.history, model_name, label, model.version, expected=current.version if current else None
        ):
            break
    else:
        raise RuntimeError(f"Could not promote {model_name}: its label {label!r} kept moving. Try again.")
    model = Model(workspace, model_name, version=model.version)
    if current is None:
        reason = f"promoted: {model_name} version {model.version} is the first with the label {label!r}"
    elif incumbent is not None:
        reason = (
            f"promoted: {model_name} version {model.version}, {metric} {candidate:g} beats {incumbent:g} of version "
            f"{current.version}; goal: {goal}"
        )
    else:
        reason = (
            f"promoted: {model_name} version {model.version}; version {current.version} ({label}) has no {metric} "
            "on record to compare"
        )
    workspace.history.update_run(run.id, add_tags={"promotion": reason})
    return Promotion(
        True,
        reason,
        model_name,
        model.version,
        metric,
        float(candidate),
        incumbent,
    )
