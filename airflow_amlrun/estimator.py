"""Estimator: the older way Azure ML submitted training code, still found in much of it, as the
ScriptRunConfig and Environment it amounts to.

    est = SKLearn("train", entry_script="train.py", script_params={"--alpha": 0.1}, pip_packages=["pandas"])
    Experiment(ws, "ridge").submit(est)            # or ScriptRunOperator(config=est), HyperDriveConfig(estimator=est)
    est.run_config                                 # the ScriptRunConfig it stands for

Everything is converted when the estimator is made, so what cannot map fails there, naming the argument and
what to do instead: conda-only packages (conda is not assumed on a compute target), several nodes, a GPU
the target cannot give, a framework version this package does not know, Azure-only settings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from airflow_amlrun.environment import DockerSection, Environment, PythonSection
from airflow_amlrun.environment.paths import as_path, user_file
from airflow_amlrun.environment.registry import curated_environment
from airflow_amlrun.environment.requirements import (
    RequirementsFile,
    normalize_python_version,
    read_conda_specification,
    read_requirements,
    string_list,
)
from airflow_amlrun.environment.resolve import parse_reference
from airflow_amlrun.errors import ConfigurationError, shown
from airflow_amlrun.runconfig import ScriptRunConfig

__all__ = ["Estimator", "PyTorch", "SKLearn", "TensorFlow"]

# Azure ML settings with nothing to map to here, and what to do instead.
AZURE_ONLY = {
    "vm_size": "the machine is the compute target's: name an SSH connection to a VM of that size",
    "vm_priority": "the machine is the compute target's: name an SSH connection to a VM of that kind",
    "inputs": "read data from a path or URL passed in script_params (a mounted folder, s3://...)",
    "source_directory_data_store": "the code is snapshotted into the workspace store: leave it out",
    "image_registry_details": "no image registry is used: name an image the Docker host has in custom_docker_image",
    "custom_docker_base_image": "use custom_docker_image",
    "shm_size": "set shm_size in the extras of an amlrun_docker connection, and submit to it",
    "resume_from": "pass a checkpoint's path in script_params and resume from it in the script",
    "distributed_backend": "runs use one node here: submit to a Spark target (framework='pyspark'), or start the "
    "processes from the script",
    "distributed_training": "runs use one node here: submit to a Spark target (framework='pyspark'), or start the "
    "processes from the script",
    "parameter_server_count": "runs use one node here: leave it out",
    "worker_count": "runs use one node here: leave it out",
    "conda_dependencies_file_path": "use conda_dependencies_file",
    "pip_requirements_file_path": "use pip_requirements_file",
    "conda_dependencies_file_path_or_name": "use conda_dependencies_file",
}
# Azure ML's estimators took these to size a run over nodes; one node (and one process) maps.
_ONE_NODE = ("node_count", "process_count_per_node")
# Accepted as Azure ML took them, with the same meaning here (ignored by Azure ML's newer versions too).
_IGNORED = {"_disable_validation", "_show_lint_warnings", "_show_package_warnings", "_enable_optimized_mode"}


@dataclass(frozen=True)
class Framework:
    """A framework flavour: the curated environment it runs in and the versions it may pin."""

    name: str
    package: str
    curated: str
    # Minor versions with wheels for the Pythons this package supports, oldest first.
    versions: tuple[str, ...]
    # The requirement that asks for the GPU build, if it is another one (None: the same wheels use a GPU).
    gpu_package: str | None
    uses_gpu: bool


SKLEARN = Framework(
    "scikit-learn", "scikit-learn", "amlrun-sklearn", tuple(f"1.{m}" for m in range(2, 10)), None, False
)
PYTORCH = Framework("PyTorch", "torch", "amlrun-pytorch", tuple(f"2.{m}" for m in range(16)), None, True)
TENSORFLOW = Framework(
    "TensorFlow",
    "tensorflow",
    "amlrun-tensorflow",
    tuple(f"2.{m}" for m in range(12, 21)),
    "tensorflow[and-cuda]",
    True,
)


class Estimator:
    """A training script with its packages, as Azure ML's ``Estimator`` described one; it becomes the
    ScriptRunConfig ``run_config`` (and its Environment) that ``Experiment.submit``, ``ScriptRunOperator`` and
    ``HyperDriveConfig`` take.

    :param source_directory: the folder holding the training code.
    :param entry_script: the script, inside source_directory.
    :param compute_target: ``"local"``, ``"docker"`` or an Airflow connection's id.
    :param script_params: the script's arguments, ``{"--alpha": 0.1}``; a value of None or ``""`` passes the
        name alone (a flag).
    :param pip_packages: requirements to install, ``["pandas>=2"]``.
    :param conda_packages: only ``python=3.x`` (the environment's Python) and ``pip`` map: conda is not assumed
        on a target, so any other package is refused, with its pip_packages spelling.
    :param pip_requirements_file: a pip requirements file whose packages to install.
    :param conda_dependencies_file: a conda environment file; its pip section and Python are used (see
        ``Environment.from_conda_specification``).
    :param custom_docker_image: the image a Docker target runs the script in.
    :param environment_definition: an Environment (or a registered one's name) to use as it is, instead of
        the package arguments above.
    :param environment_variables: set for the script's process.
    :param max_run_duration_seconds: stop the run, Failed, once it has run this long.
    :param use_gpu: the script needs a GPU: refused on the local and docker targets, which give none of their
        own accord (an amlrun_docker connection with ``gpus`` in its extras, or an SSH host with a GPU, does).
    :param use_docker: True with compute_target ``"local"`` runs on this machine's Docker daemon (the
        ``"docker"`` target), as Azure ML ran local Docker runs; False refuses a Docker target.
    :param user_managed: run the worker's interpreter as it is, installing nothing.
    """

    framework: ClassVar[Framework | None] = None

    def __init__(
        self,
        source_directory: str | os.PathLike[str],
        entry_script: str | None = None,
        *,
        compute_target: str | None = "local",
        script_params: Mapping[str, Any] | None = None,
        pip_packages: Sequence[str] | None = None,
        conda_packages: Sequence[str] | None = None,
        pip_requirements_file: str | os.PathLike[str] | None = None,
        conda_dependencies_file: str | os.PathLike[str] | None = None,
        custom_docker_image: str | None = None,
        environment_definition: Environment | str | None = None,
        environment_variables: Mapping[str, Any] | None = None,
        max_run_duration_seconds: float | None = None,
        use_gpu: bool = False,
        use_docker: bool | None = None,
        user_managed: bool = False,
        framework_version: str | None = None,
        **azure_only: Any,
    ) -> None:
        self._where = type(self).__name__
        self._refuse_unmapped(azure_only)
        if entry_script is None:
            raise ConfigurationError(
                f"{self._where}: entry_script is missing: name the training script inside source_directory, "
                "e.g. entry_script='train.py'."
            )
        self.framework_version = self._framework_version(framework_version)
        target = self._compute_target(compute_target, use_docker)
        self._check_gpu(use_gpu, target)
        packages = _PackageArguments(
            pip_packages, conda_packages, pip_requirements_file, conda_dependencies_file, custom_docker_image
        )
        if environment_definition is not None:
            self._check_definition_alone(environment_definition, packages, user_managed)
            environment: Environment | str | None = environment_definition
        else:
            environment = self._environment(packages, use_gpu=use_gpu, user_managed=user_managed)
        if custom_docker_image is not None and target == "local":
            raise ConfigurationError(
                f"{self._where}: custom_docker_image={custom_docker_image!r} runs only on a Docker target, and "
                "compute_target is 'local': set compute_target='docker' (this machine's Docker daemon) or an "
                "amlrun_docker connection's id, or use_docker=True."
            )
        try:
            self.run_config = ScriptRunConfig(
                source_directory,
                script=entry_script,
                arguments=_arguments(script_params, self._where),
                compute_target=target,
                environment=environment,
                max_run_duration_seconds=max_run_duration_seconds,
                environment_variables=dict(environment_variables or {}),
            )
        except ConfigurationError as err:
            raise ConfigurationError(f"{self._where}: {err}") from None

    # what it is

    @property
    def environment(self) -> Environment | None:
        """The environment the run gets (a curated one named by the run config is read from the package);
        None: the worker's own interpreter. A registered one named by environment_definition is looked up only
        when the run is submitted, so it shows here as None."""
        environment = self.run_config.environment
        if isinstance(environment, str):
            name, version, label = parse_reference(environment)
            return curated_environment(Environment, name) if version is None and label is None else None
        return environment

    def __repr__(self) -> str:
        return f"{self._where}({self.run_config!r})"

    # conversion

    def _refuse_unmapped(self, given: dict[str, Any]) -> None:
        for name, value in given.items():
            if name in _IGNORED:
                continue
            if name in _ONE_NODE:
                if value in (None, 1):
                    continue
                raise ConfigurationError(
                    f"{self._where}: {name}={shown(value)}: runs use one node and one process here. Submit to a "
                    "Spark target (framework='pyspark') to spread work over nodes, or start the processes from "
                    f"the script; leave {name} out."
                )
            if name in AZURE_ONLY:
                if value is None:
                    continue
                raise ConfigurationError(f"{self._where}: {name} has no equivalent here: {AZURE_ONLY[name]}.")
            raise ConfigurationError(
                f"{self._where} got an unknown argument {name!r}. It takes source_directory, entry_script, "
                "compute_target, script_params, pip_packages, conda_packages, pip_requirements_file, "
                "conda_dependencies_file, custom_docker_image, environment_definition, environment_variables, "
                "max_run_duration_seconds, use_gpu, use_docker, user_managed"
                + (", framework_version." if self.framework else ".")
            )

    def _framework_version(self, version: object) -> str | None:
        framework = self.framework
        if version is None:
            return None
        if framework is None:
            raise ConfigurationError(
                f"Estimator: framework_version={shown(version)} needs a framework: use SKLearn, PyTorch or "
                "TensorFlow, or name the package's version in pip_packages (e.g. 'torch==2.5.*')."
            )
        text = str(version).strip()
        if (
            isinstance(version, bool)
            or not re.fullmatch(r"\d+\.\d+(\.\d+)?", text)
            or (".".join(text.split(".")[:2]) not in framework.versions)
        ):
            raise ConfigurationError(
                f"{self._where}: framework_version={shown(version)} is not a {framework.name} version this package "
                f"knows: use one of {', '.join(framework.versions)} (a patch release such as "
                f"'{framework.versions[-1]}.1' pins it exactly), or leave it out for the curated "
                f"{framework.curated} environment."
            )
        return text

    def _compute_target(self, target: object, use_docker: object) -> str:
        if target is None:
            target = "local"
        if not isinstance(target, str):
            raise ConfigurationError(
                f"{self._where}: compute_target={shown(target)} must be 'local', 'docker' or the id of an Airflow "
                "connection (Azure ML's ComputeTarget objects have no meaning here: name a connection)."
            )
        if use_docker is None:
            return target
        if not isinstance(use_docker, bool):
            raise ConfigurationError(f"{self._where}: use_docker={shown(use_docker)} must be True or False.")
        if use_docker and target == "local":
            return "docker"
        if not use_docker and target == "docker":
            raise ConfigurationError(
                f"{self._where}: use_docker=False with compute_target='docker': a Docker target runs in Docker. "
                "Use compute_target='local' to run without Docker, or drop use_docker."
            )
        return target

    def _check_gpu(self, use_gpu: object, target: str) -> None:
        if not isinstance(use_gpu, bool):
            raise ConfigurationError(f"{self._where}: use_gpu={shown(use_gpu)} must be True or False.")
        if not use_gpu:
            return
        if self.framework is not None and not self.framework.uses_gpu:
            raise ConfigurationError(
                f"{self._where}: use_gpu=True, but {self.framework.name} runs on the CPU: leave use_gpu out."
            )
        if target in ("local", "docker"):
            raise ConfigurationError(
                f"{self._where}: use_gpu=True, but compute_target={target!r} gives the script no GPU of its own "
                "accord. Submit to an amlrun_docker connection whose extras set gpus (e.g. 'all'), or to an SSH "
                "host with a GPU, by its connection id; on a worker that has a GPU, the local target's script sees "
                "it as it is: drop use_gpu."
            )

    def _check_definition_alone(
        self, definition: object, packages: _PackageArguments, user_managed: object
    ) -> None:
        if not isinstance(definition, Environment | str):
            raise ConfigurationError(
                f"{self._where}: environment_definition={shown(definition)} must be an Environment or the name of "
                "a registered one ('name', 'name:version' or 'name@label')."
            )
        clashing = [*packages.given(), *(["user_managed"] if user_managed else [])]
        if self.framework_version is not None:
            clashing.append("framework_version")
        if clashing:
            raise ConfigurationError(
                f"{self._where}: environment_definition is the whole environment, so {', '.join(clashing)} cannot "
                "be added to it: put them into the Environment (its python.pip_requirements, docker.base_image), "
                "or drop environment_definition."
            )

    def _environment(
        self, packages: _PackageArguments, *, use_gpu: bool, user_managed: object
    ) -> Environment | str | None:
        """The environment the package arguments describe: the flavour's curated one (by name when nothing is
        added to it), with the packages given; None when nothing is asked for (the worker's interpreter)."""
        if not isinstance(user_managed, bool):
            raise ConfigurationError(
                f"{self._where}: user_managed={shown(user_managed)} must be True or False."
            )
        framework = self.framework
        read = packages.read(self._where)
        if user_managed:
            if read.requirements or self.framework_version:
                named = "framework_version" if self.framework_version else packages.given()[0]
                raise ConfigurationError(
                    f"{self._where}: user_managed=True runs the worker's interpreter as it is, installing nothing, "
                    f"so {named} cannot be installed: drop user_managed, or install them into that interpreter."
                )
            return Environment(
                name=f"{framework.package if framework else 'estimator'}-user-managed",
                docker=DockerSection(base_image=packages.image),
            )
        added = bool(read.requirements or read.python_version or packages.image)
        if framework is None:
            if not added:
                return None
            name, requirements = "estimator", read.requirements
        else:
            if not (added or self.framework_version or use_gpu):
                return framework.curated
            name = f"{framework.curated.removeprefix('amlrun-')}-estimator"
            requirements = [*self._framework_requirements(framework, use_gpu), *read.requirements]
        return Environment(
            name=name,
            python=PythonSection(
                user_managed_dependencies=not requirements,
                version=read.python_version,
                pip_requirements=requirements,
                index_url=read.index_url,
                extra_index_urls=read.extra_index_urls,
            ),
            docker=DockerSection(base_image=packages.image),
        )

    def _framework_requirements(self, framework: Framework, use_gpu: bool) -> list[str]:
        """The curated environment's requirements with the framework's pinned to framework_version, and its GPU
        build asked for if it has one."""
        curated = curated_environment(Environment, framework.curated)
        assert curated is not None, f"{framework.curated} ships with the package"
        found = []
        for line in curated.python.pip_requirements:
            if _package_of(line) != framework.package:
                found.append(line)
                continue
            package = framework.gpu_package if use_gpu and framework.gpu_package else framework.package
            version = self.framework_version
            if version is None:
                found.append(package + line[len(framework.package) :])
            else:
                found.append(f"{package}=={version}" + ("" if version.count(".") == 2 else ".*"))
        return found


class SKLearn(Estimator):
    """An Estimator for scikit-learn: the curated ``amlrun-sklearn`` environment (scikit-learn, pandas, numpy).

    :param framework_version: the scikit-learn release to pin, e.g. ``"1.5"`` (default: the curated one's).

    The other parameters are Estimator's.
    """

    framework = SKLEARN


class PyTorch(Estimator):
    """An Estimator for PyTorch: the curated ``amlrun-pytorch`` environment (torch, numpy).

    :param framework_version: the torch release to pin, e.g. ``"2.5"`` (default: the curated one's).

    The other parameters are Estimator's.
    """

    framework = PYTORCH


class TensorFlow(Estimator):
    """An Estimator for TensorFlow: the curated ``amlrun-tensorflow`` environment (tensorflow, numpy);
    ``use_gpu=True`` installs ``tensorflow[and-cuda]``.

    :param framework_version: the tensorflow release to pin, e.g. ``"2.17"`` (default: the curated one's).

    The other parameters are Estimator's.
    """

    framework = TENSORFLOW


@dataclass(frozen=True)
class _PackageArguments:
    """The arguments of an estimator that describe its packages, read together into requirements."""

    pip_packages: Sequence[str] | None
    conda_packages: Sequence[str] | None
    pip_requirements_file: str | os.PathLike[str] | None
    conda_dependencies_file: str | os.PathLike[str] | None
    image: str | None

    def given(self) -> list[str]:
        names = {
            "pip_packages": self.pip_packages,
            "conda_packages": self.conda_packages,
            "pip_requirements_file": self.pip_requirements_file,
            "conda_dependencies_file": self.conda_dependencies_file,
            "custom_docker_image": self.image,
        }
        return [name for name, value in names.items() if value]

    def read(self, where: str) -> _Packages:
        """The Python version, requirements and indexes the arguments name; conda-only packages refused, each
        with how to write it as a pip package."""
        found = _Packages(requirements=string_list(self.pip_packages, f"{where}: pip_packages"))
        conda_only = []
        for spec in string_list(self.conda_packages, f"{where}: conda_packages"):
            text = spec.strip()
            name = _package_of(text)
            rest = text[len(name) :].strip()
            if name == "python" and rest:
                found.python_version = normalize_python_version(
                    rest.lstrip("=<>~ "), where=f"{where}: conda_packages {spec!r}"
                )
            elif name not in ("python", "pip"):
                conda_only.append(f"{spec!r} (as a pip package: {_pip_spelling(text[: len(name)], rest)!r})")
        if conda_only:
            raise ConfigurationError(
                f"{where}: conda_packages lists {', '.join(conda_only)}: conda is not assumed on a compute target, "
                "so only python and pip map. Give these as pip_packages under their PyPI names (torch for pytorch, "
                "xgboost for py-xgboost), or use a custom_docker_image that has them."
            )
        if self.pip_requirements_file is not None:
            what = f"{where}: pip_requirements_file"
            parsed = read_requirements(
                user_file(as_path(self.pip_requirements_file, what), what),
                what=what,
                conda_fix="conda_dependencies_file",
            )
            found.add(parsed)
        if self.conda_dependencies_file is not None:
            what = f"{where}: conda_dependencies_file"
            version, parsed = read_conda_specification(
                user_file(as_path(self.conda_dependencies_file, what), what), what=what
            )
            found.add(parsed)
            found.python_version = found.python_version or version
        return found


@dataclass
class _Packages:
    """What an estimator's package arguments amount to."""

    requirements: list[str]
    python_version: str | None = None
    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)

    def add(self, parsed: RequirementsFile) -> None:
        self.requirements += parsed.requirements
        self.index_url = self.index_url or parsed.index_url
        self.extra_index_urls += [u for u in parsed.extra_index_urls if u not in self.extra_index_urls]


def _package_of(requirement: str) -> str:
    """The package a requirement or conda spec names, lowercase: ``torch`` of ``torch>=2.4``."""
    return re.split(r"[\s=<>!~\[;]", requirement.strip(), maxsplit=1)[0].lower()


def _pip_spelling(name: str, rest: str) -> str:
    """A conda package spec as a pip requirement: conda's ``=1.26`` (and ``numpy 1.26``) mean 1.26.*."""
    if rest.startswith("=") and not rest.startswith("=="):
        return f"{name}=={rest[1:]}.*"
    if rest[:1].isdigit():
        return f"{name}=={rest}.*"
    return name + rest


def _arguments(script_params: object, where: str) -> list[Any]:
    """script_params as a script's arguments: each name, then its value unless it is None or ``""``."""
    if script_params is None:
        return []
    if not isinstance(script_params, Mapping):
        raise ConfigurationError(
            f"{where}: script_params must be a mapping such as {{'--alpha': 0.1}}, not {shown(script_params)}; "
            "for a list of words, use ScriptRunConfig(arguments=[...])."
        )
    arguments: list[Any] = []
    for name, value in script_params.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"{where}: script_params has a name {shown(name)}: names are strings.")
        arguments.append(name)
        if value is not None and value != "":
            arguments.append(value)
    return arguments
