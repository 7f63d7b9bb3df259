"""Where a Docker run's image comes from, and what it holds: real images on a real Docker Engine.

An environment whose package index asks for a password is built with the password on the install step's
input only: the real password-protected index of tests/private_index.py serves its package. amlrun's default
image is built on first use by a daemon that lacks it. scripts/docker.sh starts the engine and makes
amlrun-base:py3.11; nothing can be pulled from a registry here, so a local tag of that image stands in for
the public Python image the default image is built from.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from airflow_amlrun import Environment, Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.config import load_settings
from airflow_amlrun.environment import (
    EnvironmentBuildError,
    PythonSection,
    ResolvedEnvironment,
    resolve_environment,
)
from airflow_amlrun.environment.build_image import ensure_image
from airflow_amlrun.environment.image_recipe import DEFAULT_IMAGE, image_recipe
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.hooks.docker_daemon import DockerDaemon
from airflow_amlrun.targets.base import Job
from airflow_amlrun.targets.docker import DockerTarget
from tests.conftest import REPO, write_script
from tests.private_index import MODULE, PACKAGE, VERSION, build_wheel, private_index

SOCKET = "unix:///var/run/docker.sock"
TOKEN_VARIABLE = "AMLRUN_TEST_INDEX_TOKEN"


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    """The local Docker Engine, started (and amlrun-base:py3.11 made) by scripts/docker.sh."""
    done = subprocess.run([str(REPO / "scripts" / "docker.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"scripts/docker.sh failed:\n{done.stdout}\n{done.stderr}")
    client = docker.APIClient(base_url=SOCKET, version="auto")
    yield client
    client.close()


@pytest.fixture
def docker_env(amlrun_home: Path, engine: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh workspace, and compute_target="docker" meaning the local engine with default options."""
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    for key in [k for k in os.environ if k.startswith("AMLRUN_DOCKER_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    return engine


def private_environment(index_url: str) -> ResolvedEnvironment:
    """A managed environment of the private index's package, pinned as its registered version holds it:
    the lock names the index with the token as a ${VAR} reference, then the exact wheel and its hash."""
    _, wheel = build_wheel()
    spec = Environment(
        "private-deps", python=PythonSection(pip_requirements=[f"{PACKAGE}=={VERSION}"], index_url=index_url)
    )
    spec.version = "1"
    lock = (
        "# Locked by airflow-amlrun with uv: universal, Python >= 3.11.\n"
        f"--index-url {index_url}\n"
        f"{PACKAGE}=={VERSION} \\\n    --hash=sha256:{hashlib.sha256(wheel).hexdigest()}\n"
    )
    return ResolvedEnvironment(
        spec=spec, name=spec.name, version="1", lock=lock, build_key=None, user_managed=False
    )


class Folder:
    """The code of a run: one script, written into the run directory the target makes."""

    def __init__(self, script: str) -> None:
        self.script = script

    def materialize(self, dest: Path) -> None:
        (dest / "train.py").write_text(self.script)


def run_on_docker(target: DockerTarget, env: ResolvedEnvironment, script: str) -> list[str]:
    """Run a script through the Docker target as a run goes (check, prepare, submit, wait, collect); its log."""
    job = Job(
        run_id=f"img-{secrets.token_hex(4)}",
        experiment="images",
        source_directory=Path("."),
        script="train.py",
        command=None,
        arguments=[],
        environment=env,
        environment_variables={},
        max_run_duration_seconds=None,
    )
    target.check(job)
    target.prepare(job, Folder(script))
    handle = target.submit(job)
    try:
        while target.wait(handle, 5.0).running:
            pass
        lines = target.read_log(handle, 0, final=True).lines
        target.collect(handle)
    finally:
        target.cleanup(handle, remove_files=True)
    return lines


def docker_target(tmp_path: Path) -> DockerTarget:
    return DockerTarget("docker", DockerDaemon.from_environment(), load_settings(), tmp_path / "cache")


def forms_of(token: str) -> list[bytes]:
    """The token as it could be written anywhere: as is, and in the Basic auth header pip sends."""
    return [token.encode(), base64.b64encode(f"amlrun:{token}".encode())]


def saved_image_files(client: Any, reference: str, spool: Path) -> Iterator[tuple[str, bytes]]:
    """Every file of ``docker save``: the config JSON, the manifest, and each file of each layer tar."""
    with open(spool, "wb") as out:
        for data in client.get_image(reference):
            out.write(data)
    with tarfile.open(spool) as outer:
        for member in outer:
            extracted = outer.extractfile(member) if member.isfile() else None
            if extracted is None:
                continue
            if not member.name.endswith("layer.tar"):
                yield member.name, extracted.read()
                continue
            with tarfile.open(fileobj=extracted, mode="r|") as layer:
                for item in layer:
                    inner = layer.extractfile(item) if item.isfile() else None
                    if inner is not None:
                        yield f"{member.name}:{item.name}", inner.read()


@contextlib.contextmanager
def daemon_over_tcp() -> Iterator[str]:
    """The local daemon at a TCP address on loopback, as a remote daemon is reached: ``tcp://127.0.0.1:PORT``."""
    server = socket.create_server(("127.0.0.1", 0))

    def pump(source: socket.socket, dest: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                dest.sendall(data)
            dest.shutdown(socket.SHUT_WR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = server.accept()
                upstream = socket.socket(socket.AF_UNIX)
                upstream.connect(SOCKET.removeprefix("unix://"))
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


@contextlib.contextmanager
def removed_after(client: Any, *references: str) -> Iterator[None]:
    try:
        yield
    finally:
        for reference in references:
            with contextlib.suppress(docker.errors.NotFound):
                client.remove_image(reference, force=True)


# index credentials


def test_an_environment_on_a_password_protected_index_builds_an_image_that_holds_no_credential(
    docker_env, tmp_path, monkeypatch, caplog
):
    caplog.set_level("DEBUG")
    token = f"tok-{secrets.token_hex(12)}"
    monkeypatch.setenv(TOKEN_VARIABLE, token)
    target = docker_target(tmp_path)
    script = f"import {MODULE}\nprint('private package', {MODULE}.VERSION)\n"

    with private_index(token) as index:
        env = private_environment(index.url())
        reference = image_recipe(env).reference
        with removed_after(docker_env, reference):
            lines = run_on_docker(target, env, script)

            assert lines == [f"private package {VERSION}"]
            assert index.authorized_downloads == 1
            assert f"Building image {reference}" in caplog.text
            image = docker_env.inspect_image(reference)
            base = docker_env.inspect_image(DEFAULT_IMAGE)["Config"]
            for key in ("Env", "Cmd", "WorkingDir", "User"):
                assert image["Config"][key] == base[key], key
            assert not image["Config"]["Entrypoint"] and not base["Entrypoint"]
            assert image["Config"]["Labels"]["amlrun.environment"] == "private-deps:1"
            assert docker_env.containers(all=True, filters={"ancestor": reference}) == []
            history = subprocess.run(
                ["docker", "history", "--no-trunc", reference], capture_output=True, text=True, check=True
            ).stdout
            inspected = subprocess.run(
                ["docker", "image", "inspect", reference], capture_output=True, text=True, check=True
            ).stdout
            leaks, locks = [], []
            for name, data in saved_image_files(docker_env, reference, tmp_path / "saved.tar"):
                leaks += [name for form in forms_of(token) if form in data]
                if name.endswith("opt/amlrun/build/lock.txt"):
                    locks.append(data.decode())
            assert leaks == []
            assert locks == [env.lock]  # the lock in the image holds the ${VAR} reference, as written
            for form in forms_of(token):
                assert form.decode() not in history + inspected
                assert form.decode() not in caplog.text + "\n".join(lines)

            # The token rotates; the spec (and the lock) are the same, so is the image: nothing is built or
            # installed again, and the index is not asked.
            asked = len(index.requests)
            monkeypatch.setenv(TOKEN_VARIABLE, f"tok-{secrets.token_hex(12)}")
            caplog.clear()
            again = run_on_docker(target, env, script)

            assert again == [f"private package {VERSION}"]
            assert "Building image" not in caplog.text
            assert len(index.requests) == asked
            assert docker_env.inspect_image(reference)["Id"] == image["Id"]


def test_a_build_that_needs_an_unset_index_token_is_refused_before_anything_is_built(docker_env, tmp_path):
    target = docker_target(tmp_path)
    env = private_environment("http://amlrun:${AMLRUN_TEST_INDEX_TOKEN}@127.0.0.1:9/simple")
    reference = image_recipe(env).reference
    job = Job(
        run_id="never",
        experiment="images",
        source_directory=Path("."),
        script="train.py",
        command=None,
        arguments=[],
        environment=env,
        environment_variables={},
        max_run_duration_seconds=None,
    )

    with pytest.raises(ConfigurationError) as raised:
        target.check(job)

    assert "${AMLRUN_TEST_INDEX_TOKEN}" in str(raised.value)
    assert "not set" in str(raised.value)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_env.inspect_image(reference)


def test_an_install_the_index_refuses_on_a_remote_daemon_leaves_no_image_no_container_and_no_token(
    docker_env, tmp_path
):
    token, wrong = f"tok-{secrets.token_hex(12)}", f"tok-{secrets.token_hex(12)}"
    lines: list[str] = []

    with private_index(token) as index, daemon_over_tcp() as url:
        remote = docker.APIClient(base_url=url, version="auto")
        env = private_environment(index.url())
        reference = image_recipe(env).reference
        with removed_after(docker_env, reference), pytest.raises(EnvironmentBuildError) as raised:
            ensure_image(remote, env, daemon=url, environ={TOKEN_VARIABLE: wrong}, output=lines.append)

    message = str(raised.value)
    assert f"Building image {reference} of environment 'private-deps' version 1 on {url} failed" in message
    assert "the install step exited with code 1" in message
    assert "No matching distribution found for amlrun-private-pkg" in message  # pip's own words
    assert (f"/simple/{PACKAGE}/", False) in index.requests  # the wrong token reached pip, and the index
    labelled = {"label": f"amlrun.build_key={image_recipe(env).key}"}
    stages = docker_env.images(all=True, filters=labelled)
    for stage in stages:  # left untagged, as build cache, as docker build leaves the steps it made
        docker_env.remove_image(stage["Id"])
    assert [stage["RepoTags"] for stage in stages] in ([], [None], [["<none>:<none>"]])
    with pytest.raises(docker.errors.ImageNotFound):
        docker_env.inspect_image(reference)
    assert docker_env.containers(all=True, filters=labelled) == []
    for form in forms_of(wrong):
        assert form.decode() not in message + "\n".join(lines) + raised.value.output


# the default image


@pytest.fixture
def fake_public_python(docker_env: Any) -> Iterator[str]:
    """A "public" Python image the daemon has: amlrun-base:py3.11 under another name."""
    repository, tag = "amlrun-test-python", f"3.11-{secrets.token_hex(4)}"
    docker_env.tag(DEFAULT_IMAGE, repository, tag)
    with removed_after(docker_env, f"{repository}:{tag}"):
        yield f"{repository}:{tag}"


class CountingClient(docker.APIClient):  # type: ignore[misc]
    """The real client, counting the calls made to the daemon by name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls: list[str] = []
        super().__init__(*args, **kwargs)
        self.calls.clear()

    def _get(self, url: str, **kwargs: Any) -> Any:
        self.calls.append(f"GET {url.split('/v1.', 1)[-1].split('/', 1)[-1]}")
        return super()._get(url, **kwargs)

    def _post(self, url: str, **kwargs: Any) -> Any:
        self.calls.append(f"POST {url.split('/v1.', 1)[-1].split('/', 1)[-1]}")
        return super()._post(url, **kwargs)


def test_a_daemon_without_the_default_image_builds_it_on_first_use(
    docker_env, tmp_path, monkeypatch, caplog, fake_public_python
):
    caplog.set_level("INFO", logger="airflow_amlrun")
    default = f"amlrun-base:first-use-{secrets.token_hex(4)}"
    monkeypatch.setenv("AMLRUN_DOCKER_DEFAULT_IMAGE", default)
    monkeypatch.setenv("AMLRUN_DOCKER_DEFAULT_IMAGE_BASE", fake_public_python)
    write_script(tmp_path / "src", "train.py", "import sys, venv\nprint('running on', sys.version[:4])\n")
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")
    experiment = Experiment(Workspace.get(), "default-image")

    with removed_after(docker_env, default):
        first: list[str] = []
        record = experiment.submit(config).wait_for_completion(output=first.append)
        built = caplog.text
        caplog.clear()
        second: list[str] = []
        again = experiment.submit(config).wait_for_completion(output=second.append)
        counting = CountingClient(base_url=SOCKET, version="auto")
        ensure_image(
            counting,
            resolve_environment(Workspace.get(), None),
            default_image=default,
            default_image_base=fake_public_python,
        )
        image = docker_env.inspect_image(default)

        assert record.status == again.status == "Completed"
        assert first == second == ["running on 3.11"]
        assert f"Building the default image {default} from {fake_public_python}" in built
        assert "Building" not in caplog.text  # the second run found it
        assert counting.calls == [f"GET images/{default}/json"]  # found again: one inspect
        assert image["Config"]["Labels"]["amlrun.default_image_base"] == fake_public_python


def test_a_daemon_that_cannot_get_the_default_image_refuses_the_run_naming_the_setting(
    docker_env, tmp_path, monkeypatch
):
    default = f"amlrun-base:nowhere-{secrets.token_hex(4)}"
    public = f"amlrun-test-no-such-python:{secrets.token_hex(4)}"
    monkeypatch.setenv("AMLRUN_DOCKER_DEFAULT_IMAGE", default)
    monkeypatch.setenv("AMLRUN_DOCKER_DEFAULT_IMAGE_BASE", public)
    write_script(tmp_path / "src", "train.py", "print('never runs')\n")
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")

    with pytest.raises(ConfigurationError) as raised:
        Experiment(Workspace.get(), "default-image").submit(config)

    message = str(raised.value)
    assert f"The default image {default!r} is not on the Docker daemon at {SOCKET}" in message
    assert f"its base {public!r} is not there, and pulling it failed" in message
    for hint in ("[amlrun] docker_default_image", "default_image", "AMLRUN_DOCKER_DEFAULT_IMAGE"):
        assert hint in message
    assert "docker load" in message and "scripts/docker.sh" in message
    assert Workspace.get().list_runs() == []
    with pytest.raises(docker.errors.ImageNotFound):
        docker_env.inspect_image(default)
