"""ScriptRunConfig: what to run (source directory, script or command, arguments) and where."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import yaml

from airflow_amlrun.environment import Environment
from airflow_amlrun.errors import ConfigurationError

_RENDERABLE = (str, int, float, bool, PurePath)


def render_arguments(arguments: Sequence[Any] | None) -> list[str]:
    """Turn script arguments into the strings the script receives; refuse what has no sensible form."""
    if arguments is None:
        return []
    if isinstance(arguments, str | bytes) or not isinstance(arguments, Sequence):
        raise ConfigurationError(
            f"arguments must be a list such as ['--alpha', 0.5], not {type(arguments).__name__} "
            f"{arguments!r}. Split a command line into its words, or use command= for a shell command."
        )
    rendered = []
    for index, value in enumerate(arguments):
        if not isinstance(value, _RENDERABLE) or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigurationError(
                f"arguments[{index}] = {value!r} ({type(value).__name__}) cannot be passed to a script: "
                "give a string, number, boolean or path (for a structure, pass json.dumps(value))."
            )
        rendered.append(str(value))
    return rendered


def render_environment_variables(variables: Mapping[str, Any] | None) -> dict[str, str]:
    """Check names and turn values into strings, as a process environment needs them."""
    if variables is None:
        return {}
    if not isinstance(variables, Mapping):
        raise ConfigurationError(
            f"environment_variables must be a mapping of names to values, not {type(variables).__name__}."
        )
    rendered = {}
    for name, value in variables.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise ConfigurationError(
                f"environment_variables has an invalid name {name!r}: use a non-empty string without '='."
            )
        if not isinstance(value, _RENDERABLE):
            raise ConfigurationError(
                f"environment_variables[{name!r}] = {value!r} ({type(value).__name__}) is not a string, "
                "number, boolean or path."
            )
        rendered[name] = str(value)
    return rendered


@dataclass
class ScriptRunConfig:
    """Everything needed to submit a run: the code, how to start it, where, and with what environment.

    :param source_directory: folder holding the training code; it becomes the run's working directory.
    :param script: path of the script inside source_directory (exclusive with command).
    :param command: a shell command (string) or argv (list) to run instead of a script.
    :param arguments: words passed to the script after its path.
    :param compute_target: ``"local"`` or the id of an Airflow connection naming a target.
    :param environment: an Environment, or the name (``name`` or ``name:version``) of a registered one.
    :param max_run_duration_seconds: stop the run, Failed, once it has run this long.
    :param environment_variables: set for the script's process, beside the environment's own.
    :param secret_environment_variables: set like environment_variables, but masked in task logs and never
        written to the run history, a YAML file or a remote command line.
    :param snapshot_max_size_mb: largest code snapshot for this config (default ``[amlrun]
        snapshot_max_size_mb``).
    :param snapshot_max_files: most files in a code snapshot for this config (default ``[amlrun]
        snapshot_max_files``).
    """

    source_directory: str | os.PathLike[str]
    script: str | None = None
    command: str | list[str] | None = None
    arguments: list[Any] | None = None
    compute_target: str = "local"
    environment: Environment | str | None = None
    max_run_duration_seconds: float | None = None
    environment_variables: dict[str, str] = field(default_factory=dict)
    secret_environment_variables: dict[str, str] = field(default_factory=dict, repr=False)
    snapshot_max_size_mb: float | None = None
    snapshot_max_files: int | None = None

    def __post_init__(self) -> None:
        self.source_directory = str(self.source_directory)
        if not self.source_directory:
            raise ConfigurationError(
                "source_directory is empty: name the folder that holds the training code."
            )
        if (self.script is None) == (self.command is None):
            raise ConfigurationError(
                "Give exactly one of script= (a file inside source_directory) or command= (a shell command); "
                f"got script={self.script!r} and command={self.command!r}."
            )
        if self.script is not None:
            _check_script_path(self.script)
        if self.command is not None:
            if isinstance(self.command, list):
                if not self.command or not all(isinstance(word, str) for word in self.command):
                    raise ConfigurationError(
                        f"command={self.command!r} must be a non-empty list of strings or a shell string."
                    )
            elif not isinstance(self.command, str) or not self.command.strip():
                raise ConfigurationError(f"command={self.command!r} must be a non-empty shell string.")
            if self.arguments:
                raise ConfigurationError(
                    f"arguments={self.arguments!r} only apply to a script; with command=, write them into "
                    "the command itself."
                )
        self.arguments = render_arguments(self.arguments)
        self.environment_variables = render_environment_variables(self.environment_variables)
        self.secret_environment_variables = render_environment_variables(self.secret_environment_variables)
        if not isinstance(self.compute_target, str) or not self.compute_target.strip():
            raise ConfigurationError(
                f"compute_target={self.compute_target!r} must be 'local' or the id of an Airflow connection."
            )
        if self.max_run_duration_seconds is not None and (
            isinstance(self.max_run_duration_seconds, bool)
            or not isinstance(self.max_run_duration_seconds, int | float)
            or not self.max_run_duration_seconds > 0
        ):
            raise ConfigurationError(
                f"max_run_duration_seconds={self.max_run_duration_seconds!r} must be a positive number of "
                "seconds, or None for no limit."
            )
        for name in ("snapshot_max_size_mb", "snapshot_max_files"):
            limit = getattr(self, name)
            if limit is not None and (
                isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0
            ):
                raise ConfigurationError(
                    f"{name}={limit!r} must be a positive number, or None for the [amlrun] default."
                )
        if self.environment is not None and not isinstance(self.environment, Environment | str):
            raise ConfigurationError(
                f"environment={self.environment!r} must be an Environment or the name of a registered one."
            )

    def resolved(self, base_dir: str | os.PathLike[str] | None = None) -> ScriptRunConfig:
        """This config with an absolute, checked source_directory and script; relative paths start at base_dir."""
        source = Path(self.source_directory).expanduser()
        if not source.is_absolute():
            source = Path(base_dir or os.getcwd()) / source
        if not source.exists():
            raise ConfigurationError(
                f"source_directory {str(source)!r} does not exist. Create it, or point source_directory at "
                "the folder holding the training script (a relative path starts at the DAG file's folder)."
            )
        if not source.is_dir():
            raise ConfigurationError(
                f"source_directory {str(source)!r} is a file, not a directory: point it at the folder that "
                "contains the script, and name the script with script=."
            )
        source = source.resolve()
        if self.script is not None:
            script = (source / self.script).resolve()
            if not script.is_relative_to(source):
                raise ConfigurationError(
                    f"script {self.script!r} resolves to {str(script)!r}, outside source_directory "
                    f"{str(source)!r} (through a symlink): only code inside source_directory is snapshotted."
                )
            if not script.is_file():
                raise ConfigurationError(
                    f"script {self.script!r} was not found in source_directory {str(source)!r}. "
                    f"Files there: {_listing(source)}."
                )
        return replace(self, source_directory=str(source))

    # YAML

    def to_dict(self) -> dict[str, Any]:
        environment: Any = self.environment
        if isinstance(environment, Environment):
            environment = environment.to_dict()
        data = {
            "source_directory": self.source_directory,
            "script": self.script,
            "command": self.command,
            "arguments": list(self.arguments or []),
            "compute_target": self.compute_target,
            "environment": environment,
            "max_run_duration_seconds": self.max_run_duration_seconds,
            "environment_variables": dict(self.environment_variables),
            "snapshot_max_size_mb": self.snapshot_max_size_mb,
            "snapshot_max_files": self.snapshot_max_files,
        }
        return {key: value for key, value in data.items() if value not in (None, [], {})}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None
    ) -> ScriptRunConfig:
        known = {
            "source_directory",
            "script",
            "command",
            "arguments",
            "compute_target",
            "environment",
            "max_run_duration_seconds",
            "environment_variables",
            "snapshot_max_size_mb",
            "snapshot_max_files",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(
                f"Unknown ScriptRunConfig field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}."
            )
        if "source_directory" not in data:
            raise ConfigurationError("The run configuration has no source_directory.")
        values = dict(data)
        source = Path(str(values["source_directory"])).expanduser()
        if base_dir is not None and not source.is_absolute():
            values["source_directory"] = str(Path(base_dir) / source)
        if isinstance(values.get("environment"), Mapping):
            values["environment"] = Environment.from_dict(values["environment"])
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ScriptRunConfig:
        """Load a config; a relative source_directory is taken from the YAML file's folder."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(f"Run configuration file {str(path)!r} does not exist.") from None
        except yaml.YAMLError as err:
            raise ConfigurationError(
                f"Run configuration file {str(path)!r} is not valid YAML: {err}"
            ) from None
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"Run configuration file {str(path)!r} must hold a mapping of fields.")
        return cls.from_dict(data, base_dir=path.parent)

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_script_path(script: str) -> None:
    if not isinstance(script, str) or not script.strip():
        raise ConfigurationError(
            f"script={script!r} must name a file inside source_directory, e.g. 'train.py'."
        )
    if os.path.isabs(script) or PurePosixPath(script).is_absolute():
        raise ConfigurationError(
            f"script {script!r} is an absolute path; give it relative to source_directory (e.g. 'train.py'), "
            "and set source_directory to the folder that holds it."
        )
    if ".." in PurePosixPath(script.replace("\\", "/")).parts:
        raise ConfigurationError(
            f"script {script!r} leaves source_directory through '..'; only code inside source_directory is "
            "snapshotted, so move the script in or widen source_directory."
        )


def _listing(folder: Path, limit: int = 10) -> str:
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))[: limit + 1]
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")
