"""Recipes of Docker images, known without a daemon: what a build sends, reads and keeps.

The builds themselves run against the real Docker Engine in tests/integration/test_docker_images.py.
"""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_amlrun.environment import Environment, PythonSection, ResolvedEnvironment
from airflow_amlrun.environment.docker_build import commit_config
from airflow_amlrun.environment.image_recipe import (
    DEFAULT_IMAGE,
    build_context,
    credential_input,
    default_image_recipe,
    image_recipe,
    install_script,
    is_default_image,
)
from airflow_amlrun.errors import ConfigurationError

INDEX = "https://ci:${INDEX_TOKEN}@pkgs.example.com/simple"
MIRROR = "https://ro:${MIRROR_TOKEN}@mirror.example.com/simple"


def locked(index_url: str | None = INDEX, extra: list[str] | None = None) -> ResolvedEnvironment:
    """A managed environment pinned with a lock as resolve_lock writes it (index lines, then hashes)."""
    spec = Environment(
        "train",
        python=PythonSection(
            pip_requirements=["torch==2.4.0"], index_url=index_url, extra_index_urls=list(extra or [])
        ),
    )
    spec.version = "3"
    lines = ["# Locked by airflow-amlrun with uv 0.5.0: universal, Python >= 3.11."]
    lines += [f"--index-url {index_url}"] if index_url else []
    lines += [f"--extra-index-url {url}" for url in extra or []]
    lines += ["torch==2.4.0 \\", "    --hash=sha256:" + "ab" * 32]
    return ResolvedEnvironment(
        spec=spec, name="train", version="3", lock="\n".join(lines) + "\n", build_key=None, user_managed=False
    )


def test_an_environment_on_a_password_protected_index_installs_outside_docker_build() -> None:
    recipe = image_recipe(locked(extra=[MIRROR]))

    assert recipe.credentials == ("INDEX_TOKEN", "MIRROR_TOKEN")
    assert recipe.dockerfile == (
        f"FROM {DEFAULT_IMAGE}\nCOPY amlrun/ /opt/amlrun/build/\n"  # no RUN: the install is not a build step
        f'LABEL amlrun.build_key="{recipe.key}" amlrun.environment="train:3"\n'
    )
    assert recipe.labels == {"amlrun.build_key": recipe.key, "amlrun.environment": "train:3"}


def test_an_environment_without_credentials_keeps_its_plain_docker_build() -> None:
    recipe = image_recipe(locked(index_url="https://pkgs.example.com/simple"))

    assert recipe.credentials == ()
    assert recipe.dockerfile is not None
    assert "RUN /bin/sh /opt/amlrun/build/install.sh\n" in recipe.dockerfile
    assert f'LABEL amlrun.build_key="{recipe.key}" amlrun.environment="train:3"\n' in recipe.dockerfile


def test_nothing_a_build_sends_or_keys_on_holds_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    env = locked(extra=[MIRROR])
    monkeypatch.setenv("INDEX_TOKEN", "first-secret-value")
    monkeypatch.setenv("MIRROR_TOKEN", "mirror-secret-value")
    recipe = image_recipe(env)
    with tarfile.open(fileobj=io.BytesIO(build_context(recipe, env, ca_bundle=None))) as tar:
        sent = b"".join(tar.extractfile(member).read() for member in tar.getmembers())  # type: ignore[union-attr]
    monkeypatch.setenv("INDEX_TOKEN", "rotated-secret-value")

    assert image_recipe(env) == recipe  # same key, same tag: a rotated token reuses the image
    assert b"${INDEX_TOKEN}" in sent and b"${MIRROR_TOKEN}" in sent
    assert b"secret-value" not in sent
    script = install_script(env)
    assert (
        "--index-url" not in script
    )  # the lock names the index; pip and uv expand it from their environment
    assert (
        script.index("read -r INDEX_TOKEN")
        < script.index("read -r MIRROR_TOKEN")
        < script.index("pip install")
    )


def test_a_direct_url_requirement_behind_a_password_installs_with_its_variable_too() -> None:
    requirement = "private-pkg @ https://ci:${PKG_TOKEN}@files.example.com/private_pkg-1.0-py3-none-any.whl"
    spec = Environment("train", python=PythonSection(pip_requirements=[requirement]))
    spec.version = "1"
    lock = f"# Locked by airflow-amlrun with uv 0.5.0: universal, Python >= 3.11.\n{requirement} \\\n"
    lock += "    --hash=sha256:" + "ab" * 32 + "\n"
    env = ResolvedEnvironment(
        spec=spec, name="train", version="1", lock=lock, build_key=None, user_managed=False
    )

    recipe = image_recipe(env)

    assert recipe.credentials == ("PKG_TOKEN",)
    assert recipe.dockerfile is not None and "RUN " not in recipe.dockerfile  # installed in a committed step
    assert "read -r PKG_TOKEN" in install_script(env)


@settings(max_examples=50)
@given(
    st.lists(
        st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n\r\x00"), min_size=1),
        min_size=2,
        max_size=2,
    )
)
def test_the_install_step_reads_each_value_exactly_as_it_was_sent(values: list[str]) -> None:
    env = locked(extra=[MIRROR])
    script = install_script(env)
    prologue = script[: script.index("\npython3 -c ") + 1]  # everything before the install proper
    names = ["INDEX_TOKEN", "MIRROR_TOKEN"]
    sent = credential_input(names, dict(zip(names, values, strict=True)))

    shown = subprocess.run(
        ["/bin/sh", "-c", prologue + 'printf "%s\\0%s" "$INDEX_TOKEN" "$MIRROR_TOKEN"'],
        input=sent,
        capture_output=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout

    assert shown.decode().split("\0") == values


def test_the_install_step_says_which_value_did_not_arrive() -> None:
    script = install_script(locked())
    prologue = script[: script.index("\npython3 -c ") + 1]

    done = subprocess.run(["/bin/sh", "-c", prologue], input=b"", capture_output=True, text=False)

    assert done.returncode == 1
    assert b"the value of ${INDEX_TOKEN} did not arrive on the install step's input" in done.stderr


def test_a_token_with_a_line_break_is_refused_naming_its_variable() -> None:
    with pytest.raises(ConfigurationError, match=r"\$\{INDEX_TOKEN\} holds a line break") as raised:
        credential_input(["INDEX_TOKEN"], {"INDEX_TOKEN": "abc\n"})

    assert "abc" not in str(raised.value)


def test_a_committed_install_keeps_its_stages_configuration_and_not_the_install_entrypoint() -> None:
    stage = {
        "Env": ["PATH=/usr/bin", "LANG=C.UTF-8"],
        "Cmd": ["python3"],
        "Entrypoint": None,
        "WorkingDir": "/work",
        "User": "1000",
        "Labels": {"org.example": "base"},
    }

    config = commit_config(stage, {"org.example": "base", "amlrun.build_key": "k"})

    assert config == {
        "Env": ["PATH=/usr/bin", "LANG=C.UTF-8"],
        "Cmd": ["python3"],
        "Entrypoint": [],  # empty, not missing: a commit would fill a missing one from the install container
        "WorkingDir": "/work",
        "User": "1000",
        "Labels": {"org.example": "base", "amlrun.build_key": "k"},
    }


@pytest.mark.parametrize(
    ("reference", "ours"),
    [
        ("amlrun-base:py3.11", True),
        ("amlrun-base:py3.12", True),
        ("python:3.11-slim", False),
        ("registry.example.com/amlrun-base:py3.11", False),
        ("amlrun-base-gpu:py3.11", False),
        ("amlrun-env:0123", False),
    ],
)
def test_only_amlrun_base_images_are_built_where_they_are_missing(reference: str, ours: bool) -> None:
    assert is_default_image(reference) is ours


def test_the_default_image_is_its_public_base_checked_to_make_virtualenvs() -> None:
    recipe = default_image_recipe("amlrun-base:py3.11", "python:3.11-slim")

    assert recipe.reference == "amlrun-base:py3.11"
    assert recipe.dockerfile is not None
    assert recipe.dockerfile.startswith("FROM python:3.11-slim\nRUN python3 -m venv ")
    assert "docker_default_image_base" in recipe.dockerfile  # what the failing check tells the user to change
    assert recipe.dockerfile.endswith('LABEL amlrun.default_image_base="python:3.11-slim"\n')
    assert recipe.key != default_image_recipe("amlrun-base:py3.11", "python:3.12-slim").key
