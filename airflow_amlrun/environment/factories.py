"""Environments made from what users already have: a requirements file, a conda file, an image, a Dockerfile.

``Environment.from_pip_requirements`` and its siblings call these; they are the same functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from airflow_amlrun.environment.requirements import read_conda_specification, read_requirements, read_text
from airflow_amlrun.environment.spec import DockerSection, Environment, PythonSection
from airflow_amlrun.errors import ConfigurationError


def from_pip_requirements(name: str, file_path: str | os.PathLike[str]) -> Environment:
    """A managed environment with the packages of a pip requirements file (``-r`` includes followed)."""
    parsed = read_requirements(Path(file_path))
    return Environment(
        name=name,
        python=PythonSection(
            user_managed_dependencies=False,
            pip_requirements=parsed.requirements,
            index_url=parsed.index_url,
            extra_index_urls=parsed.extra_index_urls,
        ),
    )


def from_conda_specification(name: str, file_path: str | os.PathLike[str]) -> Environment:
    """A managed environment from a conda environment file's Python version and pip section; conda itself
    is not assumed on a target, so a file listing conda-only packages is refused."""
    version, parsed = read_conda_specification(Path(file_path))
    return Environment(
        name=name,
        python=PythonSection(
            user_managed_dependencies=False,
            version=version,
            pip_requirements=parsed.requirements,
            index_url=parsed.index_url,
            extra_index_urls=parsed.extra_index_urls,
        ),
    )


def from_docker_image(
    name: str,
    image: str,
    *,
    pip_requirements: str | os.PathLike[str] | Sequence[str] | None = None,
    conda_specification: str | os.PathLike[str] | None = None,
) -> Environment:
    """An environment running in a Docker image, with the image's own Python unless packages are given."""
    env = _with_packages(name, pip_requirements, conda_specification)
    env.docker = DockerSection(base_image=image)
    env.validate()
    return env


def from_dockerfile(
    name: str,
    dockerfile: str | os.PathLike[str],
    *,
    pip_requirements: str | os.PathLike[str] | Sequence[str] | None = None,
    conda_specification: str | os.PathLike[str] | None = None,
) -> Environment:
    """An environment running in an image built from a Dockerfile (a path, or the Dockerfile's text)."""
    text = str(dockerfile)
    if isinstance(dockerfile, os.PathLike) or (
        "\n" not in text and not text.lstrip().upper().startswith("FROM")
    ):
        text = read_text(Path(dockerfile), "Dockerfile")
    env = _with_packages(name, pip_requirements, conda_specification)
    env.docker = DockerSection(dockerfile=text)
    env.validate()
    return env


def _with_packages(
    name: str,
    pip_requirements: str | os.PathLike[str] | Sequence[str] | None,
    conda_specification: str | os.PathLike[str] | None,
) -> Environment:
    if pip_requirements is not None and conda_specification is not None:
        raise ConfigurationError(
            f"Environment {name!r}: give pip_requirements or conda_specification, not both."
        )
    if conda_specification is not None:
        return from_conda_specification(name, conda_specification)
    if isinstance(pip_requirements, str | os.PathLike):
        return from_pip_requirements(name, pip_requirements)
    if pip_requirements is not None:
        return Environment(name=name, python=PythonSection(pip_requirements=list(pip_requirements)))
    return Environment(name=name)
