"""What an environment is: the interpreter and packages a run's script executes with."""

from __future__ import annotations

import builtins
import copy
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun.environment.factories import (
    Requirements,
    conda_packages,
    dockerfile_text,
    packages_on_top,
    pip_packages,
)
from airflow_amlrun.environment.paths import PathBase, as_path, user_file
from airflow_amlrun.environment.requirements import (
    read_package_file,
    read_text,
    string_list,
)
from airflow_amlrun.environment.sections import (
    DockerSection,
    PythonSection,
    SparkSection,
    check_environment_name,
    check_image_reference,
)
from airflow_amlrun.errors import ConfigurationError, shown

if TYPE_CHECKING:
    from airflow_amlrun.environment.registry import RegistryHost

DEFAULT_NAME = "amlrun-user-managed"
# Values a process environment can take; anything else has no one string form.
_VARIABLE_VALUES = (str, int, float, bool, os.PathLike)


@dataclass
class Environment:
    """A named, versioned environment; user-managed by default, running the worker's own interpreter.

    :param name: name under which versions are registered in a workspace.
    :param version: set by the registry (``"1"``, ``"2"``, ...); None until registered.
    :param python: interpreter and pip requirements.
    :param docker: base image or Dockerfile for Docker targets.
    :param spark: Maven packages for Spark targets.
    :param environment_variables: set for the run's process.
    """

    name: str = DEFAULT_NAME
    version: str | None = None
    python: PythonSection = field(default_factory=PythonSection)
    docker: DockerSection = field(default_factory=DockerSection)
    spark: SparkSection = field(default_factory=SparkSection)
    environment_variables: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def user_managed(self) -> bool:
        """Whether the run uses an interpreter as it is, rather than a virtualenv built from a lock."""
        return bool(self.python.user_managed_dependencies)

    def validate(self) -> None:
        """Check the spec as it is now; fields may have been changed since construction."""
        check_environment_name(self.name)
        if self.version is not None and not isinstance(self.version, str):
            raise ConfigurationError(
                f"Environment {self.name!r}: version={shown(self.version)} is set by the registry ('1', '2', ...) "
                "when the environment is registered: leave it unset."
            )
        for section, kind in (("python", PythonSection), ("docker", DockerSection), ("spark", SparkSection)):
            if not isinstance(getattr(self, section), kind):
                raise ConfigurationError(
                    f"Environment {self.name!r}: {section} must be a {kind.__name__} (from "
                    f"airflow_amlrun.environment import {kind.__name__}), not {type(getattr(self, section)).__name__}; "
                    "to make an environment from a dict, use Environment.from_dict."
                )
        where = f"Environment {self.name!r}"
        self.python.check(where)
        self.docker.check(where)
        self.spark.check(where)
        if not isinstance(self.environment_variables, Mapping):
            raise ConfigurationError(
                f"Environment {self.name!r}: environment_variables must be a mapping of names to values such "
                f"as {{'MY_VAR': 'value'}}, not {type(self.environment_variables).__name__}."
            )
        for key, value in self.environment_variables.items():
            if not isinstance(key, str) or not key or "=" in key or "\0" in key:
                raise ConfigurationError(
                    f"Environment {self.name!r}: environment_variables has an invalid name {shown(key)}; "
                    "use a non-empty string without '=' or NUL."
                )
            if not isinstance(value, _VARIABLE_VALUES) or "\0" in str(value):
                raise ConfigurationError(
                    f"Environment {self.name!r}: environment_variables[{key!r}] = {shown(value)} "
                    f"({type(value).__name__}) is not a string, number, boolean or path without NUL bytes: "
                    "give the value as a string."
                )
            if not isinstance(value, str):
                self.environment_variables[key] = (
                    os.fsdecode(value) if isinstance(value, os.PathLike) else str(value)
                )

    def local_interpreter(self) -> str:
        """The interpreter a run on this machine uses; checked, so a bad path fails before the run."""
        path = self.python.interpreter_path
        if path is None:
            return sys.executable
        path = os.path.expanduser(path)
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise ConfigurationError(
                f"Environment {self.name!r}: interpreter_path {path!r} is not an executable file. "
                "Point python.interpreter_path at a Python interpreter on the worker (for example "
                "'/usr/bin/python3'), or leave it unset to use the worker's own interpreter."
            )
        return path

    # serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "python": self.python.to_dict(),
            "docker": self.docker.to_dict(),
            "spark": self.spark.to_dict(),
            "environment_variables": dict(self.environment_variables),
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None
    ) -> Environment:
        """An environment from its dict form (as YAML holds it).

        Besides the fields of ``to_dict``, ``python.requirements_file``, ``python.conda_file`` and
        ``docker.dockerfile_path`` name files to read in; relative paths start at base_dir.

        :param data: the dict.
        :param base_dir: folder relative file names start at; default: the DAG file's folder in a DAG file,
            else the working directory.
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                f"An environment must be a mapping of fields, not {type(data).__name__}."
            )
        _reject_unknown(data, {"name", "version", "python", "docker", "spark", "environment_variables"}, "")
        name = str(data.get("name") or DEFAULT_NAME)
        base = PathBase.given(base_dir)
        python = _section(data, "python", name)
        # PythonSection's fields, and the files whose packages the section takes.
        known = {f.name for f in fields(PythonSection)} | {"requirements_file", "conda_file"}
        _reject_unknown(python, known, "python.")
        file_version, files = read_package_file(
            name, base, requirements_file=python.get("requirements_file"), conda_file=python.get("conda_file")
        )
        where = f"Environment {name!r}: python."
        requirements = (
            string_list(python.get("pip_requirements"), where + "pip_requirements") + files.requirements
        )
        index_url = python.get("index_url") or files.index_url
        extra = (
            string_list(python.get("extra_index_urls"), where + "extra_index_urls") + files.extra_index_urls
        )
        version = python.get("version") or file_version
        docker = _section(data, "docker", name)
        _reject_unknown(docker, {"base_image", "dockerfile", "dockerfile_path"}, "docker.")
        dockerfile = docker.get("dockerfile")
        if docker.get("dockerfile_path") is not None:
            if dockerfile is not None:
                raise ConfigurationError(
                    f"Environment {name!r} sets both docker.dockerfile and docker.dockerfile_path: give one."
                )
            where = f"Environment {name!r}: docker.dockerfile_path"
            dockerfile = read_text(user_file(docker["dockerfile_path"], where, base), where)
        spark = _section(data, "spark", name)
        _reject_unknown(spark, set(SparkSection.KEYS), "spark.")
        variables = data.get("environment_variables") or {}
        if not isinstance(variables, Mapping):
            raise ConfigurationError(f"Environment {name!r}: environment_variables must be a mapping.")
        raw_version = data.get("version")
        return cls(
            name=name,
            version=None if raw_version is None else str(raw_version),
            python=PythonSection(
                user_managed_dependencies=python.get("user_managed_dependencies"),
                interpreter_path=python.get("interpreter_path"),
                version=version,
                pip_requirements=requirements,
                index_url=index_url,
                extra_index_urls=extra,
            ),
            docker=DockerSection(base_image=docker.get("base_image"), dockerfile=dockerfile),
            spark=SparkSection.from_dict(spark, f"Environment {name!r}"),
            environment_variables={str(k): v for k, v in variables.items()},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Environment:
        """An environment from a YAML file; files it names are read relative to the YAML file's folder.

        :param path: the YAML file; relative to the DAG file's folder in a DAG file, else to the working
            directory.
        """
        import yaml  # YAML is read here only; a task that never loads a file does not import it

        path = user_file(as_path(path, "Environment file path"), "Environment file")
        text = read_text(path, "Environment file")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigurationError(f"Environment file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"Environment file {str(path)!r} must hold a mapping of fields.")
        return cls.from_dict(data, base_dir=PathBase.of_file(path, "environment file"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the environment as YAML, self-contained (requirements and Dockerfile inline).

        :param path: the YAML file to write.
        """
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # identity

    def canonical(self) -> dict[str, Any]:
        """The spec without name and version, in a normal form: what makes two versions the same."""
        data = self.to_dict()
        del data["name"], data["version"]
        # Requirement order does not change what gets resolved; spark package order may (classpath).
        data["python"]["pip_requirements"] = sorted(set(self.python.pip_requirements))
        data["python"]["user_managed_dependencies"] = self.user_managed
        return data

    def spec_hash(self) -> str:
        """SHA-256 of the canonical spec: equal for every spec that would build the same thing."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def copy(self, **changes: Any) -> Environment:
        """A deep copy, with top-level fields changed."""
        new = copy.deepcopy(self)
        for key, value in changes.items():
            setattr(new, key, value)
        new.validate()
        return new

    # constructors from what users already have: a requirements file, a conda file, an image, a Dockerfile

    @classmethod
    def from_pip_requirements(cls, name: str, file_path: Requirements) -> Environment:
        """A managed environment with the packages of a pip requirements file (``-r`` includes followed), or
        of a list of requirements.

        :param name: environment name.
        :param file_path: the requirements file (relative to the DAG file's folder in a DAG file, else to the
            working directory), or a list such as ``["pandas>=2", "scikit-learn==1.5.*"]``, each item read
            as a line of a requirements file is.
        """
        return cls(name=name, python=pip_packages(name, file_path))

    @classmethod
    def from_conda_specification(cls, name: str, file_path: str | os.PathLike[str]) -> Environment:
        """A managed environment from a conda environment file's Python version and pip section.

        Conda itself is not assumed on a target, so a file listing conda-only packages is refused.

        :param name: environment name.
        :param file_path: the conda environment YAML file (relative to the DAG file's folder in a DAG file,
            else to the working directory).
        """
        return cls(name=name, python=conda_packages(name, file_path))

    @classmethod
    def from_docker_image(
        cls,
        name: str,
        image: str,
        *,
        pip_requirements: Requirements | None = None,
        conda_specification: str | os.PathLike[str] | None = None,
    ) -> Environment:
        """An environment running in a Docker image, with the image's own Python unless packages are given.

        :param name: environment name.
        :param image: image reference, e.g. ``python:3.11-slim``.
        :param pip_requirements: a requirements file, or a list of requirements, to install on top.
        :param conda_specification: a conda file whose pip section to install on top.
        """
        check_environment_name(name)
        check_image_reference(image, f"Environment {name!r}: image")
        python = packages_on_top(name, pip_requirements, conda_specification)
        return cls(name=name, python=python, docker=DockerSection(base_image=image))

    @classmethod
    def from_dockerfile(
        cls,
        name: str,
        dockerfile: str | os.PathLike[str],
        *,
        pip_requirements: Requirements | None = None,
        conda_specification: str | os.PathLike[str] | None = None,
    ) -> Environment:
        """An environment running in an image built from a Dockerfile (a path, or the Dockerfile's text).

        :param name: environment name.
        :param dockerfile: path of a Dockerfile, or its text (anything with a newline or a FROM line).
        :param pip_requirements: a requirements file, or a list of requirements, to install on top.
        :param conda_specification: a conda file whose pip section to install on top.
        """
        check_environment_name(name)
        text = dockerfile_text(name, dockerfile)
        python = packages_on_top(name, pip_requirements, conda_specification)
        return cls(name=name, python=python, docker=DockerSection(dockerfile=text))

    # registry: environment/registry.py does the work

    def register(self, workspace: RegistryHost) -> Environment:
        """Register this spec: an unchanged spec returns its existing version, a changed one the next.

        The requirements are resolved into a lock once, here, and stored with the version.

        :param workspace: the workspace whose registry to use.
        """
        from airflow_amlrun.environment import registry

        registry.check_call(f"Environment {self.name!r}.register", workspace, None)
        return registry.register(workspace, self).spec

    @classmethod
    def get(
        cls, workspace: RegistryHost, name: str, version: str | None = None, label: str | None = None
    ) -> Environment:
        """A registered or curated environment: the latest version, or the given version or label.

        :param workspace: the workspace whose registry to use.
        :param name: environment name.
        :param version: a version such as ``"2"``; default the latest.
        :param label: a label set with ``set_label``; exclusive with version.
        """
        from airflow_amlrun.environment import registry

        registry.check_call("Environment.get", workspace, name, version, label)
        return registry.lookup(cls, workspace, name, version=version, label=label).spec

    @classmethod
    def set_label(cls, workspace: RegistryHost, name: str, version: str, label: str) -> None:
        """Point a label (``"production"``) at one version of an environment; it moves if already set.

        :param workspace: the workspace whose registry to use.
        :param name: environment name.
        :param version: the version the label should name.
        :param label: the label.
        """
        from airflow_amlrun.environment import registry

        registry.check_call("Environment.set_label", workspace, name, version, label)
        registry.set_label(cls, workspace, name, version, label)

    @classmethod
    def list(cls, workspace: RegistryHost, name: str | None = None) -> builtins.list[Environment]:
        """The latest version of every registered and curated environment, or every version of one name.

        :param workspace: the workspace whose registry to use.
        :param name: list the versions of this environment only, newest first.
        """
        from airflow_amlrun.environment import registry

        registry.check_call("Environment.list", workspace, name)
        return registry.list_environments(cls, workspace, name=name)


def _section(data: Mapping[str, Any], key: str, name: str) -> Mapping[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"Environment {name!r}: {key} must be a mapping, not {type(value).__name__}."
        )
    return value


def _reject_unknown(data: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise ConfigurationError(
            f"Unknown environment field(s) {', '.join(prefix + k for k in unknown)}; known: "
            f"{', '.join(prefix + k for k in sorted(known))}."
        )
