"""MLflow capture: a script's MLflow calls land in the run it is part of, with no change to the script.

A run's environment sets ``MLFLOW_TRACKING_URI=amlrun:``. MLflow finds the store for that scheme through
the ``mlflow.tracking_store`` entry point, which is declared twice: by this package's own distribution
(for an interpreter that has airflow-amlrun installed) and by a small ``*.dist-info`` folder written beside
the run's copy of run_context (for any other interpreter: a built virtualenv, a container, a remote host),
so that nothing is installed into the script's environment. The store (``store.py``) turns MLflow's calls
into run_context's: metrics, tags and params into the run's events file, artifacts and models into its
``outputs/``. See docs/mlflow.md.

This module imports only the standard library: it is copied into runs beside run_context, and MLflow
imports it while MLflow itself is being imported. ``store.py`` imports mlflow, and is imported only when a
script first uses MLflow's tracking.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

SCHEME = "amlrun"
# What a run's MLFLOW_TRACKING_URI is set to (unless the run's own variables set another).
TRACKING_URI = f"{SCHEME}:"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"

# The distribution a run's pylib folder declares, for interpreters that do not have airflow-amlrun.
DISTRIBUTION = "amlrun_mlflow_capture"
DISTRIBUTION_VERSION = "1"
ENTRY_POINTS = (
    f"[mlflow.tracking_store]\n{SCHEME} = {__name__}:tracking_store\n\n"
    f"[mlflow.model_registry_store]\n{SCHEME} = {__name__}:registry_store\n"
)


def tracking_store(store_uri: str | None = None, artifact_uri: str | None = None, **_: Any) -> Any:
    """The tracking store MLflow builds for ``amlrun:`` URIs (its entry point)."""
    from airflow_amlrun.mlflow_capture.store import AmlrunTrackingStore

    return AmlrunTrackingStore(store_uri)


def registry_store(store_uri: str | None = None, tracking_uri: str | None = None, **_: Any) -> Any:
    """MLflow's model registry for ``amlrun:`` URIs (its entry point): there is none inside a run, and saying
    so here gives the script a clear error where MLflow would list the URI schemes it knows."""
    from mlflow.exceptions import MlflowException

    raise MlflowException(
        "MLflow's model registry is not available in an airflow-amlrun run (MLFLOW_TRACKING_URI=amlrun:): "
        "a model logged with log_model is a folder of the run's outputs (the run's "
        "tag model.<name> says which, e.g. outputs/model). Register it with "
        "airflow_amlrun.run_context.Run.get_context().register_model('my-model', 'outputs/model'), which "
        "registers it once the run has Completed, or from the run's record afterwards."
    )


def source_files() -> list[Path]:
    """The files of this package a run's pylib folder holds (only the standard library and mlflow import them)."""
    here = Path(__file__).parent
    return [here / "__init__.py", here / "store.py"]


def write_package(root: Path) -> None:
    """Copy this package under root/airflow_amlrun/ and declare its entry point in root: MLflow (through
    importlib.metadata) reads a ``*.dist-info`` folder in any directory on the interpreter's path."""
    package = root / "airflow_amlrun" / "mlflow_capture"
    package.mkdir(parents=True, exist_ok=True)
    for source in source_files():
        shutil.copyfile(source, package / source.name)
    dist_info = root / f"{DISTRIBUTION}-{DISTRIBUTION_VERSION}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: {DISTRIBUTION_VERSION}\n"
        "Summary: Records a run's MLflow tracking calls in its airflow-amlrun run history\n"
    )
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS)
