"""Re-running a recorded run: the same code, environment version, arguments and config, as a new run.

The code comes from the run's snapshot in the workspace store (restored and hash-checked first, so a store
that lost a blob fails before anything is recorded), the environment is the exact version the run resolved
to (its lock with it), and the config is what the run row keeps of the ScriptRunConfig it was submitted
with. Secret variables are never recorded, so a run that needed them gets them again from the caller.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.history import RunNotFoundError, RunRecord
from airflow_amlrun.runconfig import SWEEP_TARGET, ScriptRunConfig

# The names (never the values) of a run's secret variables, in its recorded config.
SECRET_NAMES = "secret_environment_variable_names"

if TYPE_CHECKING:
    from airflow_amlrun.environment import ResolvedEnvironment
    from airflow_amlrun.workspace import Workspace


@contextlib.contextmanager
def recorded_submission(
    workspace: Workspace,
    run_id: str,
    *,
    compute_target: str | None = None,
    secret_environment_variables: Mapping[str, str] | None = None,
) -> Iterator[tuple[RunRecord, ScriptRunConfig]]:
    """The recorded run ``run_id`` and the config that submits it again (``run.rerun`` submits it).

    Its source_directory is a copy of the run's code restored from the store, removed on leaving the block:
    the submission takes the code from the store itself, the copy only has the config checked against it.

    :raises RunNotFoundError: no such run.
    :raises ConfigurationError: the run cannot be repeated (a sweep, recorded before configs were kept, never
        snapshotted), or the new target or variables are not valid.
    """
    try:
        record = workspace.get_run(run_id)
    except RunNotFoundError as err:
        raise RunNotFoundError(f"{err} `amlrun runs list` shows the runs there.") from None
    if record.target == SWEEP_TARGET:
        raise ConfigurationError(
            f"Run {record.id} is a sweep (the parent run of a HyperDrive sweep, which runs no code of its own), "
            "so it cannot be re-run as one run. Run the sweep again: `amlrun sweep SWEEP.yaml` with its sweep "
            "file, Experiment.submit(HyperDriveConfig) in Python, or clear its HyperDriveOperator task in "
            "Airflow. A run of the sweep re-runs by its own id: `amlrun rerun RUN_ID` (the sweep's tag "
            "best_run_id names its best run)."
        )
    if record.config is None:
        raise ConfigurationError(
            f"Run {record.id} cannot be re-run: it was recorded by a version of airflow-amlrun that did not keep "
            "the run's configuration. Submit its ScriptRunConfig again instead (its code: `amlrun snapshot "
            f"restore {record.id} FOLDER`)."
        )
    if record.snapshot_id is None:
        raise ConfigurationError(
            f"Run {record.id} cannot be re-run: it has no code snapshot (it never started)."
        )
    data = dict(record.config)
    if compute_target is not None:
        data["compute_target"] = compute_target
    needed = [str(name) for name in data.pop(SECRET_NAMES, None) or []]
    given = secret_environment_variables or {}
    if not isinstance(given, Mapping):
        raise ConfigurationError(
            f"secret_environment_variables must be a mapping of names to values, not {type(given).__name__}."
        )
    missing = [name for name in needed if name not in given]
    if missing:
        raise ConfigurationError(
            f"Run {record.id} had the secret environment variables {', '.join(missing)}, whose values are never "
            "recorded: give them again (rerun(..., secret_environment_variables={...}), or `amlrun rerun "
            f"{record.id} --secret NAME` for each, taking its value from that variable of your environment)."
        )
    folder = tempfile.mkdtemp(prefix=f"amlrun-rerun-{record.id[:40]}-")
    try:
        # The restore checks every file's hash: a store missing or spoiling a blob fails here, recording nothing.
        workspace.restore_snapshot(record.snapshot_id, folder)
        config = ScriptRunConfig.from_dict({**data, "source_directory": folder})
        if given:
            config = replace(config, secret_environment_variables=dict(given))
        yield record, config
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def recorded_config(
    config: ScriptRunConfig, environment: ResolvedEnvironment, rerun_of: RunRecord | None = None
) -> dict[str, Any]:
    """What the run row keeps of its config, for a re-run: the config as a run configuration file holds it
    (secret variables are never part of it), with the environment pinned to the version it resolved to, or,
    for an unregistered (user-managed) one, its whole spec. A re-run keeps the source_directory of the run
    it repeats (its own is a restored copy, gone once it is submitted)."""
    data = config.to_dict()
    if rerun_of is not None and rerun_of.config and "source_directory" in rerun_of.config:
        data["source_directory"] = rerun_of.config["source_directory"]
    # A version names the spec that ran only when the registry gave it: a reference resolved there, or a managed
    # spec registered as it is. A user-managed Environment object is used as given, changed or not.
    if environment.version is not None and (
        isinstance(config.environment, str) or not environment.user_managed
    ):
        data["environment"] = f"{environment.name}:{environment.version}"
    elif config.environment is not None:
        data["environment"] = environment.spec.to_dict()
    if config.secret_environment_variables:
        # Their names only, so that a re-run can ask for them: the values are never recorded.
        data[SECRET_NAMES] = sorted(config.secret_environment_variables)
    return data
