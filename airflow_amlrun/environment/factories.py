"""The packages of an environment made from what users already have: a requirements file (or list), a conda
file, a Dockerfile. :class:`~airflow_amlrun.environment.spec.Environment`'s constructors
(``from_pip_requirements`` and the others) are built on these."""

from __future__ import annotations

import os
from collections.abc import Sequence

from airflow_amlrun.environment.paths import as_path, calling_base, user_file
from airflow_amlrun.environment.requirements import (
    read_conda_specification,
    read_requirement_lines,
    read_requirements,
    read_text,
)
from airflow_amlrun.environment.sections import PythonSection, check_environment_name
from airflow_amlrun.errors import ConfigurationError, shown

Requirements = str | os.PathLike[str] | Sequence[str]


def pip_packages(name: str, file_path: Requirements) -> PythonSection:
    """A managed Python with the packages of a requirements file (``-r`` includes followed) or list."""
    check_environment_name(name)
    where = f"Environment {name!r}: file_path"
    if isinstance(file_path, str | os.PathLike):
        path = user_file(as_path(file_path, where), "Requirements file")
        conda_fix = f"Environment.from_conda_specification({name!r}, {os.fsdecode(file_path)!r})"
        parsed = read_requirements(path, conda_fix=conda_fix)
    elif isinstance(file_path, Sequence) and not isinstance(file_path, bytes):
        parsed = read_requirement_lines(
            file_path, where=f"Environment {name!r}: requirements", folder=calling_base().folder
        )
    else:
        raise ConfigurationError(
            f"{where} must be a path (a string or pathlib.Path) of a requirements file, or a list of "
            f"requirements such as ['pandas>=2'], not {type(file_path).__name__} {shown(file_path)}."
        )
    return PythonSection(
        user_managed_dependencies=False,
        pip_requirements=parsed.requirements,
        index_url=parsed.index_url,
        extra_index_urls=parsed.extra_index_urls,
    )


def conda_packages(name: str, file_path: str | os.PathLike[str]) -> PythonSection:
    """A managed Python with a conda environment file's Python version and pip section."""
    check_environment_name(name)
    where = f"Environment {name!r}: file_path"
    version, parsed = read_conda_specification(user_file(as_path(file_path, where), "Conda environment file"))
    return PythonSection(
        user_managed_dependencies=False,
        version=version,
        pip_requirements=parsed.requirements,
        index_url=parsed.index_url,
        extra_index_urls=parsed.extra_index_urls,
    )


def packages_on_top(
    name: str, pip_requirements: Requirements | None, conda_specification: str | os.PathLike[str] | None
) -> PythonSection:
    """The Python of an image's environment: packages on top from one of the two, else the image's own."""
    if pip_requirements is not None and conda_specification is not None:
        raise ConfigurationError(
            f"Environment {name!r}: give pip_requirements or conda_specification, not both."
        )
    if pip_requirements is not None and (
        isinstance(pip_requirements, bytes) or not isinstance(pip_requirements, str | os.PathLike | Sequence)
    ):
        raise ConfigurationError(
            f"Environment {name!r}: pip_requirements must be the path of a requirements file or a list of "
            f"requirements such as ['pandas>=2'], not {type(pip_requirements).__name__} "
            f"{shown(pip_requirements)}."
        )
    if conda_specification is not None:
        return conda_packages(name, conda_specification)
    # An empty list names no packages: the image's own Python, as when none are given.
    if isinstance(pip_requirements, str | os.PathLike) or pip_requirements:
        return pip_packages(name, pip_requirements)
    return PythonSection()


def dockerfile_text(name: str, dockerfile: str | os.PathLike[str]) -> str:
    """The text of a Dockerfile given as a path, or as its text (anything with a newline or a FROM line)."""
    where = f"Environment {name!r}: dockerfile"
    if not isinstance(dockerfile, str | os.PathLike) or not str(dockerfile).strip():
        raise ConfigurationError(
            f"{where} must be the path of a Dockerfile or its text, not {shown(dockerfile)}."
        )
    text = str(dockerfile)
    if isinstance(dockerfile, os.PathLike) or (
        "\n" not in text and not text.lstrip().upper().startswith("FROM")
    ):
        text = read_text(user_file(as_path(dockerfile, where), "Dockerfile"), "Dockerfile")
    return text
