"""What an ended run leaves: its logs and outputs brought into the store, and the models it asked to register."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow_amlrun.history import RunBookkeeper, RunStatus
from airflow_amlrun.model import Model
from airflow_amlrun.run.state import PartlyCollectedError

if TYPE_CHECKING:
    from airflow_amlrun.snapshot import BlobStore
    from airflow_amlrun.targets.base import ComputeTarget
    from airflow_amlrun.targets.handles import RunHandle
    from airflow_amlrun.workspace import Workspace

log = logging.getLogger(__name__)


def collect_outputs(
    target: ComputeTarget[Any], handle: RunHandle, store: BlobStore, run_id: str
) -> dict[str, Any]:
    """Bring the run's logs and outputs from its target into the store; the run row's fields naming them.

    :raises PartlyCollectedError: the outputs failed after the logs were stored (its fields name those).
    """
    collected = target.collect(handle)
    prefix = f"runs/{run_id}"
    fields: dict[str, Any] = {}
    # The logs first (small, and what says what went wrong): a store that fills up with the outputs still keeps
    # them.
    if collected.logs_dir is not None and collected.logs_dir.is_dir():
        fields["logs_uri"] = store.upload_dir(collected.logs_dir, f"{prefix}/logs")
    if collected.outputs_dir is not None and collected.outputs_dir.is_dir():
        try:
            fields["outputs_uri"] = store.upload_dir(collected.outputs_dir, f"{prefix}/outputs")
        except Exception as err:
            raise PartlyCollectedError(str(err), fields) from err
    return fields


def register_models(
    workspace: Workspace, run_id: str, requests: list[dict[str, Any]], status: RunStatus, book: RunBookkeeper
) -> str:
    """Register what the script asked to (Run.register_model) from the run's collected outputs, if it Completed;
    what became of each request, as the run's ``model_registration`` tag says it. A request that fails is named
    there and in the log, never fatal: the run's own outcome stands.

    :param book: the run's bookkeeper, drained first so the registration sees the run as recorded so far.
    """
    said = []
    for request in requests:
        name, path = str(request.get("name")), str(request.get("path"))
        if status is not RunStatus.COMPLETED:
            said.append(f"{name} from {path}: not registered, the run is {status}")
            log.warning("Run %s: model %r was not registered: the run is %s.", run_id, name, status)
            continue
        try:
            book.drain(30)
            model = Model.from_outputs(
                workspace,
                workspace.history.get_run(run_id),
                name,
                path,
                tags=request.get("tags"),
                properties=request.get("properties"),
                once=True,
            )
        except Exception as err:
            said.append(f"{name} from {path}: not registered, {err}")
            log.warning("Run %s: model %r was not registered from %r: %s", run_id, name, path, err)
        else:
            said.append(f"{model.name} version {model.version} from {path}")
            log.info(
                "Run %s: registered model %s version %d from %s.", run_id, model.name, model.version, path
            )
    return "; ".join(said)
