"""Run files: a YAML file read as `amlrun submit` and `amlrun sweep` read it, and the run it describes.

A run file holds a ScriptRunConfig's fields (as ``ScriptRunConfig.from_yaml`` reads them) and what the command
line records with a run (``RUN_FILE_KEYS``); a sweep file holds one under ``run_config``. Both commands read
their file, check its experiment, pick the experiment the command line gives over it, and name the run they
submit, here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from airflow_amlrun.errors import ConfigurationError, shown

if TYPE_CHECKING:
    from airflow_amlrun.environment.paths import PathBase
    from airflow_amlrun.runconfig import ScriptRunConfig
    from airflow_amlrun.workspace import Workspace

# What a run file adds to the ScriptRunConfig's fields.
RUN_FILE_KEYS = ("experiment", "tags", "display_name", "description", "environment_file")


@dataclass(frozen=True)
class RunFile:
    """A run as a YAML file describes it: its config, and what is recorded with it."""

    config: ScriptRunConfig
    experiment: str | None = None
    tags: dict[str, str] | None = None
    display_name: str | None = None
    description: str | None = None

    def experiment_or(self, given: str | None, where: str) -> str:
        """The experiment to submit in: `given` (``--experiment``) over the file's.

        :param where: the file, for the message when neither names one.
        """
        name = given or self.experiment
        if name is None:
            raise ConfigurationError(
                f"{where} names no experiment: give --experiment NAME, or `experiment: NAME` in it."
            )
        return name

    def name_run(self, workspace: Workspace, run_id: str) -> None:
        """Record the file's display_name and description on the run submitted from it."""
        from airflow_amlrun.recorded_run import Run

        run = Run.get(workspace, run_id)
        if self.display_name is not None:
            run.display_name = self.display_name
        if self.description is not None:
            run.description = self.description


def read_yaml(path: str, what: str) -> tuple[Mapping[str, Any], PathBase]:
    """A YAML file's mapping, and the base its relative paths start at (its folder)."""
    import yaml

    from airflow_amlrun.environment.paths import PathBase, as_path, user_file
    from airflow_amlrun.environment.requirements import read_text

    file = user_file(as_path(path, what), what, PathBase.working_directory())
    try:
        data = yaml.safe_load(read_text(file, what))
    except yaml.YAMLError as err:
        raise ConfigurationError(
            f"{what} {str(file)!r} is not valid YAML; fix it where shown (plain YAML, no !!python tags): {err}"
        ) from None
    if not isinstance(data, Mapping):
        raise ConfigurationError(
            f"{what} {str(file)!r} must hold a mapping of fields (source_directory, script, ...), not "
            f"{type(data).__name__}."
        )
    return data, PathBase.of_file(file, what.lower())


def load_run_file(path: str) -> RunFile:
    """The run the run file at `path` describes (`amlrun submit`)."""
    data, base = read_yaml(path, "Run file")
    return run_file(data, base, f"Run file {path!r}")


def run_file(data: Mapping[str, Any], base: PathBase, where: str) -> RunFile:
    """The run a run file's mapping describes; a key that is not one is named, with the keys there are.

    :param where: the file (and the key it is under), for messages.
    """
    from airflow_amlrun.environment import Environment
    from airflow_amlrun.environment.paths import as_path, user_file
    from airflow_amlrun.run_api import MAX_DESCRIPTION, MAX_DISPLAY_NAME, _text
    from airflow_amlrun.runconfig import ScriptRunConfig, render_tags

    config_keys = {f.name for f in fields(ScriptRunConfig)} - {"secret_environment_variables"}
    known = sorted(config_keys | set(RUN_FILE_KEYS))
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown key(s) {', '.join(map(shown, unknown))}; the keys of a run file are "
            f"{', '.join(known)}."
        )
    values = {key: value for key, value in data.items() if key in config_keys}
    environment_file = data.get("environment_file")
    if environment_file is not None:
        if "environment" in data:
            raise ConfigurationError(f"{where}: give environment or environment_file, not both.")
        what = f"{where}: environment_file"
        values["environment"] = Environment.load(user_file(as_path(environment_file, what), what, base))
    try:
        config = ScriptRunConfig.from_dict(values, base_dir=base)
    except ConfigurationError as err:
        raise ConfigurationError(f"{where}: {err}") from None
    names = {}
    for key, limit in (("display_name", MAX_DISPLAY_NAME), ("description", MAX_DESCRIPTION)):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"{where}: {key} must be text, not {shown(value)}.")
        # Checked as the run will be named, before it is submitted: a run whose naming fails is followed by
        # nobody.
        try:
            names[key] = _text(value, key, limit)
        except ConfigurationError as err:
            raise ConfigurationError(f"{where}: {err}") from None
    return RunFile(
        config=config,
        experiment=checked_experiment(data.get("experiment"), where),
        tags=render_tags(data.get("tags"), f"{where}: tags"),
        display_name=names["display_name"],
        description=names["description"],
    )


def checked_experiment(value: object, where: str) -> str | None:
    """A file's ``experiment``, checked before anything runs; an error names the file and the key."""
    from airflow_amlrun.experiment import check_experiment_name

    if value is None:
        return None
    try:
        return check_experiment_name(value)
    except ConfigurationError as err:
        raise ConfigurationError(f"{where}: experiment: {err}") from None
