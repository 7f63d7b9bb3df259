"""What an environment spec is: fields, YAML, factories, the files users bring, and every mistake named."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.environment import (
    DockerSection,
    Environment,
    PythonSection,
    SparkSection,
    ensure_local_python,
    resolve_environment,
)
from airflow_amlrun.environment.build_venv import build_key, local_build_key, local_platform
from airflow_amlrun.environment.lock import lock_python_version, locked_versions
from airflow_amlrun.environment.resolve import parse_reference
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.runconfig import ScriptRunConfig


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# the default and the two kinds of environment


def test_an_environment_without_packages_runs_the_workers_own_interpreter() -> None:
    env = Environment()
    assert env.user_managed
    assert env.local_interpreter() == sys.executable
    resolved = resolve_environment(None, None)  # type: ignore[arg-type]  # None needs no workspace
    assert resolved.user_managed
    assert resolved.lock is None
    assert resolved.build_key is None
    assert ensure_local_python(resolved, "/nonexistent") == sys.executable
    assert resolved.summary() == {
        "name": "amlrun-user-managed",
        "version": None,
        "build_key": None,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "user_managed": True,
    }


def test_pip_requirements_make_a_managed_environment_by_default() -> None:
    env = Environment(name="train", python=PythonSection(pip_requirements=["pandas>=2", "six"]))
    assert env.user_managed is False
    assert env.python.user_managed_dependencies is False


def test_a_user_managed_environment_listing_packages_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"user-managed.*\['six'\].*user_managed_dependencies=False"):
        Environment(name="x", python=PythonSection(user_managed_dependencies=True, pip_requirements=["six"]))


def test_a_missing_interpreter_path_is_named_before_the_run() -> None:
    env = Environment(name="mine", python=PythonSection(interpreter_path="/opt/nowhere/bin/python3"))
    resolved = resolve_environment(None, env)  # type: ignore[arg-type]  # user-managed: no registry
    with pytest.raises(ConfigurationError, match=r"'/opt/nowhere/bin/python3' is not an executable file"):
        ensure_local_python(resolved, "/nonexistent")


def test_a_relative_interpreter_path_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"'python3' must be an absolute path"):
        Environment(python=PythonSection(interpreter_path="python3"))


def test_the_dict_form_other_modules_write_still_loads() -> None:
    env = Environment.from_dict(
        {"name": "u", "python": {"user_managed_dependencies": True, "interpreter_path": sys.executable}}
    )
    assert env.user_managed
    assert env.local_interpreter() == sys.executable
    config = ScriptRunConfig.from_dict(
        {"source_directory": ".", "script": "t.py", "environment": env.to_dict()}
    )
    assert isinstance(config.environment, Environment)
    assert config.environment.name == "u"


# YAML


def test_an_environment_survives_a_yaml_round_trip(tmp_path: Path) -> None:
    env = Environment(
        name="full",
        python=PythonSection(
            version="3.11",
            pip_requirements=["six==1.16.0", "idna>=3"],
            index_url="https://packages.example.com/simple",
            extra_index_urls=["https://example.org/simple"],
        ),
        docker=DockerSection(base_image="python:3.11-slim"),
        spark=SparkSection(
            packages=["org.apache.spark:spark-avro_2.12:3.5.1"],
            repositories=["https://repo1.maven.org/maven2"],
        ),
        environment_variables={"OMP_NUM_THREADS": "1"},
    )
    env.save(tmp_path / "env.yaml")
    loaded = Environment.load(tmp_path / "env.yaml")
    assert loaded == env
    assert loaded.spec_hash() == env.spec_hash()


def test_a_yaml_environment_may_name_its_requirements_file_beside_it(tmp_path: Path) -> None:
    write(tmp_path / "conf" / "requirements.txt", "six==1.16.0\n")
    write(
        tmp_path / "conf" / "env.yaml",
        """
        name: from-yaml
        python:
          requirements_file: requirements.txt
        docker:
          dockerfile_path: Dockerfile
        """,
    )
    write(tmp_path / "conf" / "Dockerfile", "FROM python:3.11-slim\n")
    env = Environment.load(tmp_path / "conf" / "env.yaml")
    assert env.python.pip_requirements == ["six==1.16.0"]
    assert not env.user_managed
    assert env.docker.dockerfile == "FROM python:3.11-slim\n"


def test_an_unknown_yaml_field_is_named(tmp_path: Path) -> None:
    write(tmp_path / "env.yaml", "name: typo\npython:\n  pip_requirement: [six]\n")
    with pytest.raises(
        ConfigurationError, match=r"python\.pip_requirement\b.*known: .*python\.pip_requirements"
    ):
        Environment.load(tmp_path / "env.yaml")


def test_a_missing_environment_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"Environment file '.*nope\.yaml' does not exist"):
        Environment.load(tmp_path / "nope.yaml")


# pip requirements files


def test_a_requirements_file_with_includes_and_index_options_is_read_whole(tmp_path: Path) -> None:
    write(
        tmp_path / "requirements.txt",
        """
        # training requirements
        --index-url https://packages.example.com/simple
        --extra-index-url=https://example.org/simple
        -r base/common.txt
        pandas>=2 ; python_version >= "3.10"   # data frames
        scikit-learn \\
            >=1.4
        six==1.16.0 --hash=sha256:8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254
        """,
    )
    write(tmp_path / "base" / "common.txt", "numpy>=1.26\n-r more.txt\n")
    write(tmp_path / "base" / "more.txt", "--extra-index-url https://example.net/simple\nidna\n")
    env = Environment.from_pip_requirements("train", tmp_path / "requirements.txt")
    assert env.python.pip_requirements == [
        "numpy>=1.26",
        "idna",
        'pandas>=2 ; python_version >= "3.10"',
        "scikit-learn >=1.4",
        "six==1.16.0",
    ]
    assert env.python.index_url == "https://packages.example.com/simple"
    assert env.python.extra_index_urls == ["https://example.org/simple", "https://example.net/simple"]
    assert not env.user_managed


def test_a_missing_requirements_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"Requirements file '.*missing\.txt' does not exist"):
        Environment.from_pip_requirements("x", tmp_path / "missing.txt")


def test_a_missing_included_requirements_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "requirements.txt", "six\n-r extra/other.txt\n")
    with pytest.raises(ConfigurationError, match=r"Requirements file '.*extra/other\.txt' does not exist"):
        Environment.from_pip_requirements("x", tmp_path / "requirements.txt")


def test_requirements_files_including_each_other_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "-r b.txt\n")
    write(tmp_path / "b.txt", "-r a.txt\n")
    with pytest.raises(
        ConfigurationError, match=r"include each other in a loop: .*a\.txt -> .*b\.txt -> .*a\.txt"
    ):
        Environment.from_pip_requirements("x", tmp_path / "a.txt")


def test_an_editable_install_in_requirements_is_named_with_its_line(tmp_path: Path) -> None:
    write(tmp_path / "requirements.txt", "six\n-e ./mypackage\n")
    with pytest.raises(
        ConfigurationError, match=r"requirements\.txt:2: option '-e \./mypackage' is not supported"
    ):
        Environment.from_pip_requirements("x", tmp_path / "requirements.txt")


def test_an_invalid_requirement_is_named_with_its_line(tmp_path: Path) -> None:
    write(tmp_path / "requirements.txt", "six\npandas>>2\n")
    with pytest.raises(
        ConfigurationError, match=r"requirements\.txt:2: 'pandas>>2' is not a valid requirement"
    ):
        Environment.from_pip_requirements("x", tmp_path / "requirements.txt")


def test_requirements_given_as_one_string_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"pip_requirements must be a list.*from_pip_requirements"):
        Environment(python=PythonSection(pip_requirements="six", user_managed_dependencies=False))  # type: ignore[arg-type]


# conda files


def test_a_conda_file_gives_its_python_version_and_pip_section(tmp_path: Path) -> None:
    write(tmp_path / "extra.txt", "idna\n")
    write(
        tmp_path / "conda.yaml",
        """
        name: train
        channels: [conda-forge]
        dependencies:
          - python=3.10.4
          - pip=23.0
          - pip:
              - --extra-index-url https://example.org/simple
              - six==1.16.0
              - -r extra.txt
        """,
    )
    env = Environment.from_conda_specification("train", tmp_path / "conda.yaml")
    assert env.python.version == "3.10"
    assert env.python.pip_requirements == ["six==1.16.0", "idna"]
    assert env.python.extra_index_urls == ["https://example.org/simple"]
    assert not env.user_managed


def test_conda_only_packages_are_refused_by_name(tmp_path: Path) -> None:
    write(
        tmp_path / "conda.yaml",
        """
        dependencies:
          - python=3.11
          - pip
          - numpy=1.26
          - conda-forge::cudatoolkit
          - pip: [six]
        """,
    )
    with pytest.raises(
        ConfigurationError, match=r"lists conda packages numpy=1\.26, conda-forge::cudatoolkit: conda cannot"
    ):
        Environment.from_conda_specification("x", tmp_path / "conda.yaml")


def test_a_missing_conda_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"Conda environment file '.*env\.yml' does not exist"):
        Environment.from_conda_specification("x", tmp_path / "env.yml")


# docker and spark


def test_an_environment_from_a_docker_image_uses_the_images_python_unless_packages_are_given(
    tmp_path: Path,
) -> None:
    plain = Environment.from_docker_image("img", "python:3.11-slim")
    assert plain.docker.base_image == "python:3.11-slim"
    assert plain.user_managed
    write(tmp_path / "requirements.txt", "six\n")
    with_packages = Environment.from_docker_image(
        "img", "python:3.11-slim", pip_requirements=tmp_path / "requirements.txt"
    )
    assert with_packages.python.pip_requirements == ["six"]
    assert not with_packages.user_managed


def test_an_environment_from_a_dockerfile_takes_a_path_or_its_text(tmp_path: Path) -> None:
    path = write(tmp_path / "Dockerfile", "FROM python:3.12-slim\nRUN apt-get update\n")
    assert Environment.from_dockerfile("d", path).docker.dockerfile == path.read_text()
    assert Environment.from_dockerfile("d", str(path)).docker.dockerfile == path.read_text()
    assert Environment.from_dockerfile("d", "FROM busybox").docker.dockerfile == "FROM busybox"
    with pytest.raises(ConfigurationError, match=r"Dockerfile '.*nope' does not exist"):
        Environment.from_dockerfile("d", tmp_path / "nope")


def test_a_base_image_and_a_dockerfile_together_are_refused() -> None:
    with pytest.raises(
        ConfigurationError, match=r"both docker\.base_image \('python:3\.11'\) and docker\.dockerfile"
    ):
        Environment(name="both", docker=DockerSection(base_image="python:3.11", dockerfile="FROM busybox\n"))


def test_spark_packages_must_be_maven_coordinates() -> None:
    Environment(spark=SparkSection(packages=["io.delta:delta-spark_2.12:3.2.0"]))
    with pytest.raises(ConfigurationError, match=r"spark package 'delta-spark' is not a Maven coordinate"):
        Environment(spark=SparkSection(packages=["delta-spark"]))
    with pytest.raises(ConfigurationError, match=r"spark repository 'repo\.example' is not"):
        Environment(spark=SparkSection(repositories=["repo.example"]))


def test_spark_credentials_are_refused_where_spark_would_print_or_record_them() -> None:
    with pytest.raises(
        ConfigurationError, match=r"spark repository 'repo\.example/maven' carries credentials"
    ):
        Environment(spark=SparkSection(repositories=["https://${USER}:${TOKEN}@repo.example/maven"]))
    for key in ("spark.hadoop.fs.s3a.secret.key", "spark.hadoop.fs.s3a.access.key", "spark.ssl.keyPassword"):
        with pytest.raises(
            ConfigurationError, match=rf"spark\.configuration\[{key!r}\] looks like a credential"
        ):
            Environment(spark=SparkSection(configuration={key: "x"}))
    with pytest.raises(ConfigurationError, match=r"is set by the Spark target"):
        Environment(spark=SparkSection(configuration={"spark.pyspark.python": "/usr/bin/python3"}))
    kept = Environment(spark=SparkSection(configuration={"spark.executor.memory": "2g"}))
    assert kept.spark.configuration == {"spark.executor.memory": "2g"}


def test_a_python_version_is_pinned_to_its_minor_version() -> None:
    assert Environment(python=PythonSection(version="3.12.1")).python.version == "3.12"
    with pytest.raises(ConfigurationError, match=r"python\.version = 'three' is not a Python version"):
        Environment(python=PythonSection(version="three"))


def test_an_invalid_environment_name_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"Environment name 'my env:1' is not valid"):
        Environment(name="my env:1")


# identity: what makes two versions the same


def test_the_spec_hash_ignores_name_version_and_requirement_order() -> None:
    a = Environment(name="a", python=PythonSection(pip_requirements=["six", "idna"]))
    b = Environment(name="b", version="7", python=PythonSection(pip_requirements=["idna", "six"]))
    c = Environment(name="a", python=PythonSection(pip_requirements=["six", "idna<3"]))
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


@given(
    st.permutations(["six", "idna", "packaging>=23", "pandas ; python_version >= '3.10'"]),
    st.text(min_size=1),
)
def test_the_spec_hash_is_the_same_for_any_requirement_order_and_name(order: list[str], suffix: str) -> None:
    name = "env-" + "".join(ch for ch in suffix if ch.isalnum() and ch.isascii())[:20]
    reference = Environment(name="reference", python=PythonSection(pip_requirements=sorted(order)))
    assert (
        Environment(name=name, python=PythonSection(pip_requirements=order)).spec_hash()
        == reference.spec_hash()
    )


def test_a_build_key_changes_with_the_lock_python_or_platform_but_not_the_name() -> None:
    spec = Environment(name="a", python=PythonSection(pip_requirements=["six"]))
    key = build_key(spec, "six==1", python="3.11", platform="linux/amd64")
    assert key == build_key(spec.copy(name="b"), "six==1", python="3.11", platform="linux/amd64")
    assert key != build_key(spec, "six==2", python="3.11", platform="linux/amd64")
    assert key != build_key(spec, "six==1", python="3.12", platform="linux/amd64")
    assert key != build_key(spec, "six==1", python="3.11", platform="linux/arm64")
    assert local_build_key(spec, "six==1") == build_key(
        spec,
        "six==1",
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
        platform=local_platform(),
    )


def test_a_lock_says_which_python_it_was_resolved_for_and_what_it_pins() -> None:
    lock = textwrap.dedent(
        """\
        # Locked by airflow-amlrun with uv 0.9.0: universal, Python >= 3.11.
        numpy==2.4.6 ; python_full_version < '3.12' \\
            --hash=sha256:aa
        numpy==2.5.5 ; python_full_version >= '3.12' \\
            --hash=sha256:bb
        Six==1.16.0 \\
            --hash=sha256:cc
        """
    )
    assert lock_python_version(lock) == "3.11"
    assert locked_versions(lock) == {"numpy": ["2.4.6", "2.5.5"], "six": ["1.16.0"]}


# references a run config uses


@pytest.mark.parametrize(
    ("reference", "parsed"),
    [
        ("amlrun-sklearn", ("amlrun-sklearn", None, None)),
        ("train:3", ("train", "3", None)),
        ("train@production", ("train", None, "production")),
    ],
)
def test_a_run_config_names_an_environment_by_name_version_or_label(
    reference: str, parsed: tuple[str, str | None, str | None]
) -> None:
    assert parse_reference(reference) == parsed


@pytest.mark.parametrize("reference", ["", ":3", "train:", "@prod"])
def test_a_malformed_environment_reference_is_refused(reference: str) -> None:
    with pytest.raises(
        ConfigurationError, match=r"is not an environment reference: write 'name', 'name:version'"
    ):
        parse_reference(reference)


def test_a_package_index_must_be_a_url() -> None:
    with pytest.raises(ConfigurationError, match=r"python: extra_index_urls 'pypi\.internal' is not an http"):
        Environment(python=PythonSection(pip_requirements=["six"], extra_index_urls=["pypi.internal"]))


def test_an_index_password_in_clear_is_refused_and_the_message_says_to_use_a_variable() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Environment(
            python=PythonSection(
                pip_requirements=["six"], index_url="https://bot:hunter2@pkgs.example/simple"
            )
        )
    message = str(caught.value)
    assert "carries a password in clear" in message and "${INDEX_TOKEN}" in message
    assert "hunter2" not in message and "https://***:***@pkgs.example/simple" in message


def test_an_index_password_in_a_requirements_file_is_refused_naming_the_line(tmp_path: Path) -> None:
    write(tmp_path / "requirements.txt", "--extra-index-url https://bot:hunter2@pkgs.example/simple\nsix\n")
    with pytest.raises(
        ConfigurationError, match=r"requirements\.txt:1: --extra-index-url .*in clear"
    ) as caught:
        Environment.from_pip_requirements("env", tmp_path / "requirements.txt")
    assert "hunter2" not in str(caught.value)


# Each way a credential is written in clear: as the user name (GitHub, Gemfury), in the query, in the URL
# of a direct-URL requirement; with the secret and the form the message suggests instead.
CLEAR_CREDENTIALS = [
    (
        "index_url",
        "https://ghp_SECRET123@pypi.example.com/simple",
        "ghp_SECRET123",
        "https://${INDEX_TOKEN}@",
    ),
    (
        "index_url",
        "https://ghp_SECRET123:@pypi.example.com/simple",
        "ghp_SECRET123",
        "https://${INDEX_TOKEN}@",
    ),
    ("index_url", "https://host/simple?token=SECRET", "SECRET", "token=${INDEX_TOKEN}"),
    (
        "index_url",
        "https://host/simple?X-Amz-Signature=SECRET&v=1",
        "SECRET",
        "X-Amz-Signature=${INDEX_TOKEN}",
    ),
    ("requirement", "pkg @ https://user:SECRETPW@host/x.whl", "SECRETPW", "https://NAME:${PACKAGE_TOKEN}@"),
    (
        "requirement",
        "pkg @ git+https://ghp_SECRET@github.com/o/r",
        "ghp_SECRET",
        "git+https://${PACKAGE_TOKEN}@",
    ),
    (
        "requirement",
        "pkg @ https://host/x.whl?access_token=SECRET",
        "SECRET",
        "access_token=${PACKAGE_TOKEN}",
    ),
]


def _credential_spec_lines(kind: str, url: str) -> tuple[list[str], str | None]:
    """The requirement lines and index URL of a spec holding the URL, as the tests below write it."""
    return ([url], None) if kind == "requirement" else (["six"], url)


@pytest.mark.parametrize(("kind", "url", "secret", "suggestion"), CLEAR_CREDENTIALS)
def test_a_credential_in_clear_is_refused_in_every_place_a_spec_holds_a_url(
    tmp_path: Path, kind: str, url: str, secret: str, suggestion: str
) -> None:
    requirements, index_url = _credential_spec_lines(kind, url)
    option = [f"--index-url {index_url}"] if index_url else []
    lines = "\n".join([*option, *requirements]) + "\n"
    write(tmp_path / "requirements.txt", lines)
    pip_section = "".join(f"\n      - {line}" for line in [*option, *requirements])
    write(tmp_path / "conda.yaml", f"dependencies:\n  - python=3.11\n  - pip:{pip_section}\n")
    attempts = {
        "pip_requirements": lambda: Environment(
            python=PythonSection(pip_requirements=requirements, index_url=index_url)
        ),
        "requirements file": lambda: Environment.from_pip_requirements("env", tmp_path / "requirements.txt"),
        "conda pip section": lambda: Environment.from_conda_specification("env", tmp_path / "conda.yaml"),
    }
    for where, attempt in attempts.items():
        with pytest.raises(ConfigurationError) as caught:
            attempt()
        message = str(caught.value)
        assert "in clear" in message, where
        assert secret not in message, where
        assert suggestion in message, (where, message)
        assert "in the environment of the workers" in message, where


@given(
    # Prefixed so that no secret is a word the message itself uses ("password", "token").
    secret=st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.~", min_size=5
    ).map(lambda text: f"Zq9{text}"),
    form=st.sampled_from(
        [
            "https://{s}@pkgs.example/simple",
            "https://{s}:@pkgs.example/simple",
            "https://bot:{s}@pkgs.example/simple",
            "https://{s}:x-oauth-basic@pkgs.example/simple",
            "https://pkgs.example/simple?v=1&private_token={s}",
            "https://pkgs.example/simple?AWSAccessKeyId=AK&Signature={s}",
        ]
    ),
    as_requirement=st.booleans(),
)
def test_a_credential_in_clear_never_reaches_the_message_that_refuses_it(
    secret: str, form: str, as_requirement: bool
) -> None:
    url = form.format(s=secret)
    requirements, index_url = ([f"pkg @ {url}"], None) if as_requirement else (["six"], url)
    with pytest.raises(ConfigurationError, match="in clear") as caught:
        Environment(python=PythonSection(pip_requirements=requirements, index_url=index_url))
    assert secret not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://aws:${INDEX_TOKEN}@pkgs.example/simple",  # a user name, and the password a reference
        "https://${INDEX_TOKEN}@pkgs.example/simple",  # the token as the user name, a reference
        "https://${INDEX_USER}:${INDEX_TOKEN}@pkgs.example/simple",
        "https://pkgs.example/${FURY_TOKEN}/team/simple",  # a token in the path, a reference
        "https://pkgs.example/simple?token=${INDEX_TOKEN}&format=html",
        "https://pkgs.example/simple?token=",
    ],
)
def test_index_credentials_written_as_references_are_accepted(url: str) -> None:
    env = Environment(python=PythonSection(pip_requirements=["six"], index_url=url))
    assert env.python.index_url == url


@pytest.mark.parametrize(
    "requirement",
    [
        "pkg @ https://aws:${PKG_TOKEN}@host/x.whl",
        "pkg @ git+https://${GH_TOKEN}@github.com/o/r@v1.0",  # the revision's '@' is not user info
        "pkg @ git+ssh://git@github.com/o/r.git",  # ssh's user name is never a secret: keys authenticate
        "pkg @ https://host/x.whl?version=2#sha256=" + "ab" * 32,
    ],
)
def test_direct_url_requirements_without_a_credential_in_clear_are_accepted(requirement: str) -> None:
    env = Environment(python=PythonSection(pip_requirements=[requirement]))
    assert env.python.pip_requirements == [requirement]


def test_the_variables_of_direct_url_requirements_are_what_resolving_and_installing_need() -> None:
    python = PythonSection(
        pip_requirements=["six", "pkg @ https://ci:${PKG_TOKEN}@host/x.whl", "git @ git+https://${GH}@h/o/r"],
        index_url="https://ci:${INDEX_TOKEN}@pkgs.example/simple",
    )
    assert python.credential_variables() == ["INDEX_TOKEN", "PKG_TOKEN", "GH"]


@pytest.mark.parametrize(
    "line",
    [
        "https://user:SECRETPW@host/x.whl",  # a bare URL is not a requirement pip can lock
        "-e git+https://ghp_SECRET@github.com/o/r#egg=r",
        "--find-links https://user:SECRETPW@host/wheels",
    ],
)
def test_a_line_refused_for_another_reason_does_not_show_its_credential(tmp_path: Path, line: str) -> None:
    write(tmp_path / "requirements.txt", line + "\n")
    with pytest.raises(ConfigurationError) as caught:
        Environment.from_pip_requirements("env", tmp_path / "requirements.txt")
    message = str(caught.value)
    assert "SECRET" not in message and "***" in message


def test_a_bare_dollar_variable_in_an_index_url_is_refused_with_the_braced_form() -> None:
    with pytest.raises(
        ConfigurationError, match=r"refers to \$TOKEN, which pip and uv do not expand; .*\$\{TOKEN\}"
    ):
        Environment(
            python=PythonSection(pip_requirements=["six"], index_url="https://bot:$TOKEN@pkgs.example/simple")
        )


def test_index_credentials_stay_references_so_a_rotated_token_is_the_same_spec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "https://bot:${PKG_TOKEN}@pkgs.example/simple"

    def spec() -> Environment:
        return Environment(python=PythonSection(pip_requirements=["six"], index_url=url))

    monkeypatch.setenv("PKG_TOKEN", "first-token")
    first = spec()
    monkeypatch.setenv("PKG_TOKEN", "rotated-token")
    assert first.python.index_url == url
    assert first.spec_hash() == spec().spec_hash()
    assert "token" not in json.dumps(first.to_dict()).replace("PKG_TOKEN", "")


@pytest.mark.parametrize(
    "python",
    [
        {"extra_index_urls": "https://user:TOPSECRET@idx.example/simple"},
        {"index_url": ["https://user:TOPSECRET@idx.example/simple"]},
    ],
)
def test_an_index_url_of_the_wrong_type_is_refused_without_showing_its_credentials(python):
    with pytest.raises(ConfigurationError) as raised:
        Environment("x", python=PythonSection(pip_requirements=["six"], **python))
    assert "TOPSECRET" not in str(raised.value)
    assert "***" in str(raised.value)
