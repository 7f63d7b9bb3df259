"""The parts of an environment: its Python, the image a Docker target runs in, what Spark adds."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_amlrun.environment.credentials import referenced_variables
from airflow_amlrun.environment.paths import as_path
from airflow_amlrun.environment.requirements import (
    check_requirement,
    check_url,
    normalize_python_version,
    string_list,
)
from airflow_amlrun.errors import ConfigurationError, shown

_ENV_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}")
# Maven coordinates as spark-submit --packages takes them: group:artifact:version.
_MAVEN_COORDINATE = re.compile(r"^[A-Za-z0-9_.\-]+:[A-Za-z0-9_.\-]+:[A-Za-z0-9_.\-+]+$")
# An image reference as Docker parses it: [registry[:port]/]path[:tag][@digest], lowercase path components.
_IMAGE_REFERENCE = re.compile(
    r"(?:(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)
# Spark properties that name credentials (Spark's own redaction pattern, widened to tokens and keys).
_SECRET_KEY = re.compile(r"(?i)secret|password|token|access.?key|credential")
# Set by the Spark target from the environment; a user value would silently replace the shipped interpreter.
_SHIPPED_KEYS = ("spark.pyspark.python", "spark.pyspark.driver.python")
_DOCKERFILE_FROM = re.compile(r"^\s*FROM\s", re.IGNORECASE | re.MULTILINE)


def check_environment_name(name: object, what: str = "Environment name") -> str:
    """The name, if an environment may have it; else an error that says the rule."""
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise ConfigurationError(
            f"{what} {shown(name)} is not valid: use letters, digits, '.', '_' and '-' (at most 255 "
            "characters, starting with a letter or digit)."
        )
    return name


def check_image_reference(image: object, what: str) -> str:
    """The image reference, if Docker can parse it (``python:3.11-slim``, ``registry:5000/team/img@sha256:...``)."""
    if not isinstance(image, str) or not image.strip():
        raise ConfigurationError(
            f"{what} must name a Docker image such as 'python:3.11-slim', not {shown(image)}."
        )
    repository = image.split("@", 1)[0]
    if repository.rfind(":") > repository.rfind("/"):
        repository = repository[: repository.rfind(":")]
    if not _IMAGE_REFERENCE.fullmatch(image) or len(repository) > 255:
        raise ConfigurationError(
            f"{what} {shown(image)} is not a Docker image reference: write [registry[:port]/]name[:tag][@digest] "
            "with a lowercase name, e.g. 'python:3.11-slim' or 'registry.example.com:5000/team/train:1.2'."
        )
    return image


@dataclass
class PythonSection:
    """How the run gets its Python: the user's own interpreter as is, or a virtualenv built from a lock.

    :param user_managed_dependencies: True runs the interpreter as it is (nothing installed); False builds
        a virtualenv from the locked pip requirements. Left unset, it is False when pip requirements are
        given and True otherwise.
    :param interpreter_path: the interpreter to run (user-managed), or to build the virtualenv from
        (managed); unset means the worker's own.
    :param version: Python version ``"3.11"`` the environment needs; unset means the worker's.
    :param pip_requirements: PEP 508 requirements (``"pandas>=2"``), installed from the lock.
    :param index_url: package index replacing PyPI.
    :param extra_index_urls: package indexes searched beside the main one.
    """

    user_managed_dependencies: bool | None = None
    interpreter_path: str | None = None
    version: str | None = None
    pip_requirements: list[str] = field(default_factory=list)
    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.user_managed_dependencies is None:
            self.user_managed_dependencies = not self.pip_requirements

    @property
    def index_urls(self) -> list[str]:
        """Every package index the requirements come from, as written (``${VAR}`` references unexpanded)."""
        return [*([self.index_url] if self.index_url else []), *self.extra_index_urls]

    def credential_variables(self) -> list[str]:
        """Names of the ``${VAR}`` references in the index URLs and the direct-URL requirements: the variables
        resolving and installing the requirements need set, and that nothing may store."""
        return referenced_variables([*self.index_urls, *self.pip_requirements])

    def index_options(self) -> list[str]:
        """The index options as requirements-file lines, which pip and uv read with ``${VAR}`` expanded."""
        lines = [f"--index-url {self.index_url}"] if self.index_url else []
        return lines + [f"--extra-index-url {url}" for url in self.extra_index_urls]

    def check(self, where: str) -> None:
        """Check the section as it is now, normalising what has one normal form; `where` names the environment."""
        if self.user_managed_dependencies is None:
            self.user_managed_dependencies = not self.pip_requirements
        if not isinstance(self.user_managed_dependencies, bool):
            raise ConfigurationError(
                f"{where}: python.user_managed_dependencies={shown(self.user_managed_dependencies)} must be "
                "True, False or None (decided by whether pip_requirements are given)."
            )
        if self.version is not None:
            self.version = normalize_python_version(self.version, where=f"{where}: python.version")
        if isinstance(self.pip_requirements, str) or not isinstance(self.pip_requirements, Sequence):
            raise ConfigurationError(
                f"{where}: python.pip_requirements must be a list such as ['pandas>=2'], not "
                f"{self.pip_requirements!r}; to read a requirements file, use Environment.from_pip_requirements."
            )
        self.pip_requirements = [check_requirement(r, where=where) for r in self.pip_requirements]
        if self.user_managed_dependencies and self.pip_requirements:
            raise ConfigurationError(
                f"{where} is user-managed (python.user_managed_dependencies=True) but lists pip requirements "
                f"{self.pip_requirements}: they would not be installed. Set "
                "python.user_managed_dependencies=False to have them locked and installed, or remove them."
            )
        if self.interpreter_path is not None:
            self.interpreter_path = os.fsdecode(
                as_path(self.interpreter_path, f"{where}: python.interpreter_path")
            )
            if not os.path.isabs(os.path.expanduser(self.interpreter_path)):
                raise ConfigurationError(
                    f"{where}: python.interpreter_path {shown(self.interpreter_path)} must be an absolute path "
                    "such as '/usr/bin/python3'."
                )
        if self.index_url is not None:
            self.index_url = check_url(self.index_url, where=f"{where}: python", option="index_url")
        self.extra_index_urls = [
            check_url(u, where=f"{where}: python", option="extra_index_urls")
            for u in string_list(self.extra_index_urls, f"{where}: python.extra_index_urls")
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_managed_dependencies": self.user_managed_dependencies,
            "interpreter_path": self.interpreter_path,
            "version": self.version,
            "pip_requirements": list(self.pip_requirements),
            "index_url": self.index_url,
            "extra_index_urls": list(self.extra_index_urls),
        }


@dataclass
class DockerSection:
    """The image a Docker target runs in: a base image to add the environment to, or a whole Dockerfile.

    :param base_image: image reference such as ``python:3.11-slim`` (exclusive with dockerfile).
    :param dockerfile: the text of a Dockerfile (exclusive with base_image).
    """

    base_image: str | None = None
    dockerfile: str | None = None

    def check(self, where: str) -> None:
        """Check the section as it is now; `where` names the environment."""
        if self.base_image is not None:
            check_image_reference(self.base_image, f"{where}: docker.base_image")
        if self.dockerfile is not None:
            _check_dockerfile(self.dockerfile, f"{where}: docker.dockerfile")
        if self.base_image and self.dockerfile:
            raise ConfigurationError(
                f"{where} sets both docker.base_image ({self.base_image!r}) and docker.dockerfile: give one. Use "
                "base_image to add the environment to an existing image, or a Dockerfile whose FROM line names "
                "the base."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"base_image": self.base_image, "dockerfile": self.dockerfile}


@dataclass
class SparkSection:
    """What a Spark target adds to spark-submit: Maven packages, the repositories they come from, and Spark
    configuration.

    :param packages: Maven coordinates ``group:artifact:version``.
    :param repositories: Maven repository URLs searched beside Maven Central.
    :param configuration: Spark properties passed as ``--conf key=value`` (e.g. ``spark.executor.memory``):
        keys starting ``spark.``, values strings, numbers or booleans.
    """

    packages: list[str] = field(default_factory=list)
    repositories: list[str] = field(default_factory=list)
    configuration: dict[str, Any] = field(default_factory=dict)

    KEYS = ("packages", "repositories", "configuration")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> SparkSection:
        """The section as an environment file writes it (its keys checked by the caller)."""
        configuration = data.get("configuration")
        return cls(
            packages=string_list(data.get("packages"), f"{where}: spark.packages"),
            repositories=string_list(data.get("repositories"), f"{where}: spark.repositories"),
            configuration={} if configuration is None else configuration,
        )

    def check(self, where: str) -> None:
        """Check the section as it is now; `where` names the environment."""
        for package in string_list(self.packages, f"{where}: spark.packages"):
            if not _MAVEN_COORDINATE.match(package):
                raise ConfigurationError(
                    f"{where}: spark package {package!r} is not a Maven coordinate. Write it as "
                    "group:artifact:version, e.g. 'org.apache.spark:spark-avro_2.12:3.5.1'."
                )
        self.repositories = [
            check_url(u, where=where, option="spark repository")
            for u in string_list(self.repositories, f"{where}: spark.repositories")
        ]
        for url in self.repositories:
            # spark-submit prints each repository URL it is given (its log, the task log), and puts it on its
            # command line and in the application's environment: no credential may travel in one.
            if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
                raise ConfigurationError(
                    f"{where}: spark repository {url.split('@')[-1]!r} carries credentials, which spark-submit "
                    "would print into the run's log and show on its command line. Use a repository that needs "
                    "none, or give Spark an Ivy settings file of its own (spark.jars.ivySettings)."
                )
        self.configuration = spark_configuration(self.configuration, where)

    @property
    def empty(self) -> bool:
        return not (self.packages or self.repositories or self.configuration)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"packages": list(self.packages), "repositories": list(self.repositories)}
        if self.configuration:
            # Written only when set: an environment without it keeps the spec hash it always had.
            data["configuration"] = dict(self.configuration)
        return data


def spark_configuration(value: object, where: str) -> dict[str, str]:
    """Spark properties as spark-submit's --conf takes them: each key ``spark.*``, each value a scalar (given
    on as text; booleans as Spark writes them, ``true``/``false``)."""
    if not isinstance(value, dict):
        raise ConfigurationError(
            f"{where}: spark.configuration must be a mapping of Spark properties to values, e.g. "
            f"{{'spark.executor.memory': '2g'}}, not {shown(value)}."
        )
    checked: dict[str, str] = {}
    for key, item in value.items():
        if (
            not isinstance(key, str)
            or not key.startswith("spark.")
            or len(key) <= len("spark.")
            or "=" in key
        ):
            raise ConfigurationError(
                f"{where}: spark.configuration key {shown(key)} is not a Spark property: keys start with "
                "'spark.' (e.g. 'spark.executor.memory') and hold no '='."
            )
        if key in _SHIPPED_KEYS:
            raise ConfigurationError(
                f"{where}: spark.configuration[{key!r}] is set by the Spark target (the environment's own "
                "interpreter); choose the interpreter with python.interpreter_path instead."
            )
        if _SECRET_KEY.search(key):
            raise ConfigurationError(
                f"{where}: spark.configuration[{key!r}] looks like a credential, which would be recorded with the "
                "environment and shown on spark-submit's command line. Give it to Spark another way (e.g. a "
                "Hadoop credential provider, or the cluster's own configuration)."
            )
        if isinstance(item, bool):
            checked[key] = "true" if item else "false"
        elif isinstance(item, str | int | float):
            checked[key] = str(item)
        else:
            raise ConfigurationError(
                f"{where}: spark.configuration[{key!r}] = {shown(item)} must be a string, number or boolean "
                "(Spark properties are text)."
            )
    return checked


def _check_dockerfile(text: object, where: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError(
            f"{where} must be the text of a Dockerfile, not {shown(text)}; to read one from a file, use "
            "Environment.from_dockerfile(name, path)."
        )
    if "\0" in text:
        raise ConfigurationError(f"{where} holds a NUL byte (\\0): a Dockerfile is text; fix the file.")
    if not _DOCKERFILE_FROM.search(text):
        raise ConfigurationError(
            f"{where} has no FROM line, so Docker cannot build it: start it with the base image, e.g. "
            "'FROM python:3.11-slim' (or give docker.base_image instead)."
        )
