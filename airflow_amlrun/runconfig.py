"""ScriptRunConfig: what to run (source directory, script or command, arguments) and where."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from airflow_amlrun.environment import Environment
from airflow_amlrun.environment.paths import PathBase, as_path, check_path_text, user_file
from airflow_amlrun.environment.requirements import read_text
from airflow_amlrun.environment.resolve import parse_reference
from airflow_amlrun.environment.sections import check_environment_name
from airflow_amlrun.errors import ConfigurationError, shown
from airflow_amlrun.run_context import RESERVED_TAG_PREFIX
from airflow_amlrun.workspace import CONNECTION_ID, CONNECTION_ID_RULE

_RENDERABLE = (str, int, float, bool, PurePath)

# Linux refuses to start a process with one argument or environment entry ("NAME=value") longer than this
# (MAX_ARG_STRLEN, less the terminating NUL).
MAX_WORD_BYTES = 128 * 1024 - 1
# Linux holds about 2 MiB of arguments and environment in all (ARG_MAX with the default 8 MiB stack), each
# word counted with its NUL and its pointer; what a config passes may take 1.5 MiB of it, leaving the rest to
# the interpreter, the script's path and the environment the target adds.
MAX_EXEC_BYTES = 1536 * 1024
# What a script is written for: plain Python, or Python using Spark (pyspark).
FRAMEWORKS = ("python", "pyspark")
# The target a sweep's parent run records (hyperdrive/sweep.py): not a compute target (the parent runs no code),
# and a name no compute target may have, for the history to tell sweeps apart by it.
SWEEP_TARGET = "hyperdrive"


def check_word(text: str, where: str) -> None:
    """Refuse a string no process can receive as an argument or environment entry: a NUL byte, text that is
    not Unicode, or more than Linux passes in one word. The message names the place, never the value (it may
    be a secret, or a megabyte)."""
    if "\0" in text:
        raise ConfigurationError(
            f"{where} holds a NUL byte (\\0), which no process argument or environment variable can carry: "
            "remove it, or pass binary data through a file."
        )
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise ConfigurationError(
            f"{where} is not valid Unicode text (it holds {text[err.start : err.end]!r}, a lone surrogate, as "
            "bytes decoded with errors='surrogateescape' give): decode the bytes with their real encoding."
        ) from None
    if size > MAX_WORD_BYTES:
        raise ConfigurationError(
            f"{where} is {size} bytes long; Linux passes at most {MAX_WORD_BYTES} bytes in one argument or "
            "environment variable. Write the value to a file (in source_directory, or the store) and pass its "
            "path instead."
        )


def render_arguments(arguments: Sequence[Any] | None) -> list[str]:
    """Turn script arguments into the strings the script receives; refuse what has no sensible form."""
    if arguments is None:
        return []
    if isinstance(arguments, str | bytes) or not isinstance(arguments, Sequence):
        raise ConfigurationError(
            f"arguments must be a list such as ['--alpha', 0.5], not {type(arguments).__name__} "
            f"{shown(arguments)}. Split a command line into its words, or use command= for a shell command."
        )
    rendered = []
    for index, value in enumerate(arguments):
        if not isinstance(value, _RENDERABLE) or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigurationError(
                f"arguments[{index}] = {shown(value)} ({type(value).__name__}) cannot be passed to a script: "
                "give a string, number, boolean or path (for a structure, pass json.dumps(value))."
            )
        text = str(value)
        check_word(text, f"arguments[{index}]")
        rendered.append(text)
    return rendered


def render_environment_variables(
    variables: Mapping[str, Any] | None, name: str = "environment_variables", *, secret: bool = False
) -> dict[str, str]:
    """Check names and turn values into strings, as a process environment needs them.

    :param name: the argument the variables came from, for messages.
    :param secret: the values are secrets: no message shows one.
    """
    if variables is None:
        return {}
    if not isinstance(variables, Mapping):
        raise ConfigurationError(
            f"{name} must be a mapping of names to values such as {{'MY_VAR': 'value'}}, not "
            f"{type(variables).__name__}."
        )
    rendered = {}
    for key, value in variables.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ConfigurationError(
                f"{name} has an invalid name {shown(key)}: use a non-empty string without '=' or NUL."
            )
        if not isinstance(value, _RENDERABLE) or (isinstance(value, float) and not math.isfinite(value)):
            what = type(value).__name__ if secret else f"{shown(value)} ({type(value).__name__})"
            raise ConfigurationError(
                f"{name}[{shown(key)}] = {what} is not a string, number, boolean or path: give the value as a "
                "string (for a structure, pass json.dumps(value))."
            )
        text = str(value)
        check_word(key, f"{name} name {shown(key)}")
        check_word(f"{key}={text}", f"{name}[{shown(key)}]")
        rendered[key] = text
    return rendered


def render_tags(tags: Mapping[str, Any] | None, name: str = "tags", *, of_run: bool = True) -> dict[str, str]:
    """Tags as the run history keeps them: names and values as strings; refuse what has no one string form.

    :param name: the argument the tags came from, for messages.
    :param of_run: tags of a run, whose names starting with ``amlrun.`` are the provider's own (a model's are not).
    """
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise ConfigurationError(
            f"{name} must be a mapping of names to values such as {{'team': 'vision'}}, not "
            f"{type(tags).__name__} {shown(tags)}."
        )
    rendered = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not key.strip() or "\0" in key:
            raise ConfigurationError(
                f"{name} has an invalid name {shown(key)}: use a non-empty string without NUL bytes."
            )
        if of_run and key.startswith(RESERVED_TAG_PREFIX):
            raise ConfigurationError(
                f"{name} has the name {shown(key)}, which starts with {RESERVED_TAG_PREFIX!r}: the provider keeps "
                "such names for what it records of a run (why it was stopped, who settled it). Choose another name."
            )
        if isinstance(value, Mapping | list | tuple | set | frozenset | bytes):
            raise ConfigurationError(
                f"{name}[{shown(key)}] = {shown(value)} ({type(value).__name__}) is a structure: give the value "
                "as a string (pass json.dumps(value))."
            )
        # Anything else is kept as its text, as before: None, numbers, dates, numpy scalars.
        text = str(value)
        if "\0" in text:
            raise ConfigurationError(
                f"{name}[{shown(key)}] holds a NUL byte (\\0), which the run history cannot store: remove it."
            )
        rendered[key] = text
    return rendered


def check_exec_size(arguments: Sequence[str], *variables: Mapping[str, str]) -> None:
    """Refuse arguments and environment variables that together are more than a process can start with."""
    words = [*arguments, *(f"{key}={value}" for mapping in variables for key, value in mapping.items())]
    total = sum(len(word.encode("utf-8")) + 9 for word in words)
    if total > MAX_EXEC_BYTES:
        raise ConfigurationError(
            f"arguments ({len(arguments)} words) and environment_variables take {total / 2**20:.1f} MiB as the "
            "script's command line and environment (each word's bytes, plus 9 for its NUL and its pointer); "
            f"at most {MAX_EXEC_BYTES / 2**20:.1f} MiB fit beside what the target adds (Linux allows about "
            "2 MiB in all). Pass bulky input through a file: put it in source_directory, or pass its path or URL."
        )


@dataclass
class ScriptRunConfig:
    """Everything needed to submit a run: the code, how to start it, where, and with what environment.

    :param source_directory: folder holding the training code; it becomes the run's working directory.
    :param script: path of the script inside source_directory (exclusive with command).
    :param command: a shell command (string) or argv (list) to run instead of a script.
    :param arguments: words passed to the script after its path.
    :param compute_target: ``"local"`` or the id of an Airflow connection naming a target (not ``"hyperdrive"``,
        the target the run history records for a sweep's parent run).
    :param environment: an Environment, or the name (``name`` or ``name:version``) of a registered one.
    :param max_run_duration_seconds: stop the run, Failed, once it has run this long.
    :param environment_variables: set for the script's process, beside the environment's own.
    :param secret_environment_variables: set like environment_variables, but masked in task logs and never
        written to the run history, a YAML file or a remote command line.
    :param framework: ``"python"`` (the default) or ``"pyspark"``: the script uses Spark. On a Spark target it
        is a Spark application either way; on any other target a ``pyspark`` script gets a local SparkSession
        (``SparkSession.builder.getOrCreate()`` starts ``local[*]``, its Python workers on the run's own
        interpreter), so the same script runs everywhere. Recorded with the run's environment.
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
    framework: str = "python"

    def __post_init__(self) -> None:
        if isinstance(self.source_directory, str) and not self.source_directory:
            raise ConfigurationError(
                "source_directory is empty: name the folder that holds the training code."
            )
        self.source_directory = os.fsdecode(as_path(self.source_directory, "source_directory"))
        if (self.script is None) == (self.command is None):
            raise ConfigurationError(
                "Give exactly one of script= (a file inside source_directory) or command= (a shell command); "
                f"got script={shown(self.script)} and command={shown(self.command)}."
            )
        if self.script is not None:
            _check_script_path(self.script)
        if self.command is not None:
            _check_command(self.command)
            if self.arguments:
                raise ConfigurationError(
                    f"arguments={shown(self.arguments)} only apply to a script; with command=, write them into "
                    "the command itself."
                )
        self.arguments = render_arguments(self.arguments)
        self.environment_variables = render_environment_variables(self.environment_variables)
        self.secret_environment_variables = render_environment_variables(
            self.secret_environment_variables, "secret_environment_variables", secret=True
        )
        check_exec_size(self.arguments, self.environment_variables, self.secret_environment_variables)
        if not isinstance(self.compute_target, str) or not self.compute_target.strip():
            raise ConfigurationError(
                f"compute_target={shown(self.compute_target)} must be 'local' or the id of an Airflow connection."
            )
        if not CONNECTION_ID.fullmatch(self.compute_target):
            raise ConfigurationError(
                f"compute_target {shown(self.compute_target)} cannot name a compute target: use 'local', "
                f"'docker' or the id of an Airflow connection ({CONNECTION_ID_RULE})."
            )
        if self.compute_target == SWEEP_TARGET:
            # The history tells a sweep's parent run by this target: runs on a connection of that id would be
            # taken for sweeps (refused by rerun, recorded Failed by reconcile, shown among the sweeps).
            raise ConfigurationError(
                f"compute_target {shown(self.compute_target)} is the target the run history records for a "
                "sweep's parent run, so no compute target can have that name: rename the Airflow connection "
                f"{shown(self.compute_target)} (e.g. to 'hyperdrive_vm') and give its new id as compute_target."
            )
        limit = self.max_run_duration_seconds
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not math.isfinite(limit)
            or not limit > 0
        ):
            raise ConfigurationError(
                f"max_run_duration_seconds={limit!r} must be a positive number of seconds, or None for no limit."
            )
        for name in ("snapshot_max_size_mb", "snapshot_max_files"):
            limit = getattr(self, name)
            whole = name == "snapshot_max_files"
            if whole and isinstance(limit, float) and limit.is_integer():
                limit = int(limit)  # 1e4 from YAML
                object.__setattr__(self, name, limit)
            if limit is not None and (
                isinstance(limit, bool)
                or not isinstance(limit, int if whole else int | float)
                or not math.isfinite(limit)
                or limit <= 0
            ):
                raise ConfigurationError(
                    f"{name}={shown(limit)} must be a positive number"
                    f"{' (a whole number of files)' if whole else ''}, or None for the [amlrun] default."
                )
        if self.framework not in FRAMEWORKS:
            raise ConfigurationError(
                f"framework={shown(self.framework)} is not one amlrun runs: use "
                f"{' or '.join(map(repr, FRAMEWORKS))} ('pyspark' for a script that uses Spark)."
            )
        if self.framework == "pyspark" and self.script is None:
            raise ConfigurationError(
                "framework='pyspark' runs a Python script with Spark: give script= (a file inside "
                "source_directory), not command=."
            )
        if self.environment is not None and not isinstance(self.environment, Environment | str):
            raise ConfigurationError(
                f"environment={shown(self.environment)} must be an Environment or the name of a registered one."
            )
        if isinstance(self.environment, str):
            name, _version, _label = parse_reference(self.environment)
            check_environment_name(name, f"environment={shown(self.environment)}: the name")

    def resolved(self, base_dir: str | os.PathLike[str] | None = None) -> ScriptRunConfig:
        """This config with an absolute, checked source_directory and script.

        :param base_dir: where a relative source_directory starts (a ``PathBase`` says why); default: the
            DAG file's folder when called from a DAG file, else the working directory.
        """
        try:
            return self._resolved(base_dir)
        except OSError as err:
            # The paths passed their checks here, but the file system refuses them (a parent folder this
            # user may not enter, a path grown too long once joined to base_dir).
            raise ConfigurationError(
                f"source_directory {shown(self.source_directory)} or script {shown(self.script)} cannot be read "
                f"({err.strerror or err}{f': {err.filename}' if err.filename else ''}). Check the path and its "
                "permissions."
            ) from None

    def _resolved(self, base_dir: str | os.PathLike[str] | None) -> ScriptRunConfig:
        source = Path(self.source_directory).expanduser()
        where = ""
        if not source.is_absolute():
            base = PathBase.given(base_dir)
            where = f" ({base.explain()})"
            source = base.folder / source
        if not source.exists():
            raise ConfigurationError(
                f"source_directory {shown(str(source))} does not exist{where}. Create it, or point "
                "source_directory at the folder holding the training script."
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
            "framework": None if self.framework == "python" else self.framework,
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
            "framework",
        }
        if "secret_environment_variables" in data:
            raise ConfigurationError(
                "secret_environment_variables cannot come from a run configuration file: secrets are never "
                "written to one. Pass them to ScriptRunOperator(secret_environment_variables=...) (e.g. "
                "'{{ conn.my_conn.password }}'), or set them on the ScriptRunConfig in Python."
            )
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ConfigurationError(
                f"Unknown ScriptRunConfig field(s) {', '.join(map(shown, unknown))}; known: "
                f"{', '.join(sorted(known))}."
            )
        if "source_directory" not in data:
            raise ConfigurationError("The run configuration has no source_directory.")
        values = dict(data)
        source = as_path(values["source_directory"], "source_directory").expanduser()
        if base_dir is not None and not source.is_absolute():
            values["source_directory"] = str(Path(base_dir) / source)
        if isinstance(values.get("environment"), Mapping):
            # Files the environment names (python.requirements_file, ...) start where source_directory does.
            values["environment"] = Environment.from_dict(
                values["environment"], base_dir=PathBase.given(base_dir)
            )
        return cls(**values)

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], *, base_dir: str | os.PathLike[str] | None = None
    ) -> ScriptRunConfig:
        """Load a config; the relative paths it names (source_directory, files) start at the YAML file's folder.

        :param path: the YAML file.
        :param base_dir: where a relative ``path`` starts; default: the DAG file's folder when called from a
            DAG file, else the working directory.
        """
        path = user_file(
            as_path(path, "Run configuration file path"), "Run configuration file", PathBase.given(base_dir)
        )
        text = read_text(path, "Run configuration file")
        import yaml  # only a config read from a file pays this import (each task is a fresh process)

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigurationError(
                f"Run configuration file {str(path)!r} is not valid YAML. Fix the YAML at the line shown (plain "
                f"YAML only, no !!python tags): {err}"
            ) from None
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"Run configuration file {str(path)!r} must hold a mapping of fields.")
        return cls.from_dict(data, base_dir=PathBase.of_file(path, "run configuration file"))

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_command(command: object) -> None:
    if isinstance(command, list):
        if not command or not all(isinstance(word, str) for word in command):
            raise ConfigurationError(
                f"command={shown(command)} must be a non-empty list of strings or a shell string."
            )
        for index, word in enumerate(command):
            check_word(word, f"command[{index}]")
    elif not isinstance(command, str) or not command.strip():
        raise ConfigurationError(
            f"command={shown(command)} must be a non-empty shell string or a non-empty list of strings."
        )
    else:
        check_word(command, "command")


def _check_script_path(script: str) -> None:
    if not isinstance(script, str) or not script.strip():
        raise ConfigurationError(
            f"script={shown(script)} must name a file inside source_directory, e.g. 'train.py'."
        )
    check_path_text(script, "script")
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
