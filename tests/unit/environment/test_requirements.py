"""Reading the files users already have: requirements files, conda files, and the file an environment names."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun import Environment
from airflow_amlrun.environment.requirements import (
    read_conda_specification,
    read_package_file,
    read_requirements,
)
from airflow_amlrun.errors import ConfigurationError


def test_continued_lines_comments_and_hashes_leave_the_requirements_alone(tmp_path: Path) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text(
        textwrap.dedent(
            """\
            # training
            numpy==1.26.4 \\
                --hash=sha256:0123  # pinned
            pkg @ https://example.com/pkg-1.0.tar.gz#egg=pkg
            """
        )
    )
    assert read_requirements(path).requirements == [
        "numpy==1.26.4",
        "pkg @ https://example.com/pkg-1.0.tar.gz#egg=pkg",
    ]


def test_a_conda_pip_section_may_include_a_requirements_file_beside_the_conda_file(tmp_path: Path) -> None:
    (tmp_path / "extra.txt").write_text("--extra-index-url https://pkgs.example.com/simple\nsix==1.16.0\n")
    conda = tmp_path / "env.yml"
    conda.write_text("dependencies:\n  - python=3.10.4\n  - pip:\n    - -r extra.txt\n    - tomli==2.0.1\n")
    version, parsed = read_conda_specification(conda)
    assert version == "3.10"
    assert parsed.requirements == ["six==1.16.0", "tomli==2.0.1"]
    assert parsed.extra_index_urls == ["https://pkgs.example.com/simple"]


def test_an_environment_names_one_package_file_or_none(tmp_path: Path) -> None:
    assert read_package_file("e", tmp_path, requirements_file=None, conda_file=None)[1].requirements == []
    with pytest.raises(ConfigurationError, match="sets both python.requirements_file and python.conda_file"):
        read_package_file("e", tmp_path, requirements_file="r.txt", conda_file="env.yml")


@given(st.lists(st.sampled_from(["six==1.16.0", "tomli>=2", "numpy", "a-b.c_d~=1.0"]), max_size=6))
def test_a_requirements_file_gives_back_the_lines_written_to_it(requirements: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.txt"
        path.write_text("\n".join(f"  {line}   # note" for line in requirements) + "\n")
        assert read_requirements(path).requirements == requirements


def test_the_environment_constructors_read_the_files_they_are_given(tmp_path: Path) -> None:
    (tmp_path / "r.txt").write_text("six==1.16.0\n--index-url https://pypi.example/simple\n")
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\n")
    from_file = Environment.from_pip_requirements("a", tmp_path / "r.txt")
    assert from_file.python.pip_requirements == ["six==1.16.0"]
    assert from_file.python.index_url == "https://pypi.example/simple"
    assert not from_file.user_managed
    from_image = Environment.from_docker_image("b", "python:3.11-slim", pip_requirements=["six"])
    assert from_image.docker.base_image == "python:3.11-slim"
    assert from_image.python.pip_requirements == ["six"]
    assert (
        Environment.from_dockerfile("c", tmp_path / "Dockerfile").docker.dockerfile
        == "FROM python:3.11-slim\n"
    )
