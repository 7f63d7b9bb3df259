"""The parts of an environment: its Python, the image a Docker target runs in, what Spark adds."""

from __future__ import annotations

from dataclasses import dataclass, field

from airflow_amlrun.environment.credentials import referenced_variables


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


@dataclass
class DockerSection:
    """The image a Docker target runs in: a base image to add the environment to, or a whole Dockerfile.

    :param base_image: image reference such as ``python:3.11-slim`` (exclusive with dockerfile).
    :param dockerfile: the text of a Dockerfile (exclusive with base_image).
    """

    base_image: str | None = None
    dockerfile: str | None = None


@dataclass
class SparkSection:
    """What a Spark target adds to spark-submit: Maven packages and the repositories they come from.

    :param packages: Maven coordinates ``group:artifact:version``.
    :param repositories: Maven repository URLs searched beside Maven Central.
    """

    packages: list[str] = field(default_factory=list)
    repositories: list[str] = field(default_factory=list)
