"""Docker images of environments: the image a run executes in, built once per build key on a daemon.

What image an environment runs in:
- user-managed, with ``docker.base_image`` (or none: the target's default image): that image, as it is;
- user-managed, with ``docker.dockerfile``: the Dockerfile built as it is;
- managed (a lock): the base image or Dockerfile, plus a virtualenv at ``/opt/amlrun/env`` (with the
  image's own site-packages visible) into which the lock is installed with
  ``pip install --require-hashes --no-deps -r`` (or ``uv pip sync --require-hashes`` when the image has
  uv).

A built image is tagged ``amlrun-env:<build key[:32]>``; the key hashes the spec (which holds the base image
or Dockerfile), the lock, the Python asked for and the platform, so "already built" is one inspect call on
the daemon. ``docker build`` tags an image only once every step succeeded, so a tag is always complete; a
file lock per key on the worker keeps two runs here from building it twice at once.

How the install reaches the package index: the build runs with ``network_mode="host"`` (a daemon started
with ``--bridge=none`` gives build containers no network otherwise), and the worker's CA bundle is copied
into the build context and handed to pip/uv for that step only (``PIP_CERT``, ``SSL_CERT_FILE``): package
indexes behind a TLS-inspecting proxy are trusted by the worker's bundle, not by the image's. A build cannot
bind-mount, which is why the bundle is copied; it is public data, kept in the image at
``/opt/amlrun/build/ca.pem`` beside the lock it installed.

This module imports nothing from Airflow: it takes a ``docker.APIClient``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun.environment.errors import EnvironmentBuildError
from airflow_amlrun.environment.lock import has_requirements, lock_python_version
from airflow_amlrun.errors import ConfigurationError

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_amlrun.environment.resolve import ResolvedEnvironment

PLATFORM = "linux/amd64"
REPOSITORY = "amlrun-env"
BUILD_DIR = "/opt/amlrun/build"
VENV = "/opt/amlrun/env"
VENV_PYTHON = f"{VENV}/bin/python"
# What a Docker target runs when neither the environment nor the target names an image.
DEFAULT_IMAGE = "amlrun-base:py3.11"
BUILD_TIMEOUT_SECONDS = 1800
# Lines of a failing build step shown in the error.
FAILED_STEP_LINES = 60
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ImageRecipe:
    """What image an environment runs in, known without asking the daemon.

    :param reference: the image to run: the user's image, or the tag of the build.
    :param base_image: the image the build starts from (None when a Dockerfile says it).
    :param dockerfile: the Dockerfile text of the build, None when the image is used as it is.
    :param python: the interpreter that runs the script inside the image.
    :param key: the build key (None when nothing is built).
    """

    reference: str
    base_image: str | None
    dockerfile: str | None
    python: str
    key: str | None

    @property
    def built(self) -> bool:
        return self.dockerfile is not None


@dataclass(frozen=True)
class EnvironmentImage:
    """An image present on the daemon, ready to run: its reference, interpreter and configured variables."""

    reference: str
    python: str
    image_id: str
    env: dict[str, str]
    built_now: bool = False


def image_recipe(resolved: ResolvedEnvironment, *, default_image: str = DEFAULT_IMAGE) -> ImageRecipe:
    """The image a resolved environment runs in (pure: no daemon call).

    :param resolved: the environment pinned for the run.
    :param default_image: the image of an environment that names none.
    """
    spec = resolved.spec
    base = spec.docker.base_image or (None if spec.docker.dockerfile else default_image)
    interpreter = spec.python.interpreter_path or "python3"
    if resolved.user_managed or resolved.lock is None:
        if spec.docker.dockerfile is None:
            assert base is not None
            return ImageRecipe(reference=base, base_image=base, dockerfile=None, python=interpreter, key=None)
        key = _hash({"dockerfile": spec.docker.dockerfile, "platform": PLATFORM})
        return ImageRecipe(
            reference=f"{REPOSITORY}:{key[:32]}",
            base_image=None,
            dockerfile=spec.docker.dockerfile,
            python=interpreter,
            key=key,
        )
    spec_key = resolved.build_key_for(python=spec.python.version or "image", platform=PLATFORM)
    assert spec_key is not None
    key = spec_key
    if not spec.docker.base_image and not spec.docker.dockerfile:
        # The default image is the target's setting, not part of the spec: it must be part of the key.
        key = _hash({"build_key": key, "default_image": default_image})
    head = spec.docker.dockerfile if spec.docker.dockerfile else f"FROM {base}\n"
    return ImageRecipe(
        reference=f"{REPOSITORY}:{key[:32]}",
        base_image=base,
        dockerfile=head.rstrip("\n") + "\n" + _install_steps(key, resolved),
        python=VENV_PYTHON,
        key=key,
    )


def install_script(resolved: ResolvedEnvironment) -> str:
    """The shell script that installs a lock into the image's virtualenv (run by the build, as root)."""
    spec = resolved.spec
    lock = resolved.lock or ""
    base_python = shlex.quote(spec.python.interpreter_path or "python3")
    want = shlex.quote(spec.python.version or lock_python_version(lock) or "")
    exact = "1" if spec.python.version else ""
    index = []
    if spec.python.index_url:
        index += ["--index-url", spec.python.index_url]
    for url in spec.python.extra_index_urls:
        index += ["--extra-index-url", url]
    index_args = " ".join(shlex.quote(a) for a in index)
    check = (
        "import sys\n"
        "v = '%d.%d' % sys.version_info[:2]\n"
        "want, exact = sys.argv[1], sys.argv[2]\n"
        "print('amlrun: the image runs Python ' + v)\n"
        "t = lambda s: tuple(int(p) for p in s.split('.'))\n"
        "if want and ((exact and v != want) or t(v) < t(want)):\n"
        "    sys.exit('amlrun: the environment needs Python %s%s, but this image runs Python %s. Use a base '\n"
        "             'image with that Python, or change python.version.' % (want, '' if exact else ' or newer', v))\n"
    )
    install = (
        ""
        if not has_requirements(lock)
        else (
            "if command -v uv >/dev/null 2>&1; then\n"
            f"  uv pip sync --require-hashes --python {VENV_PYTHON} {index_args} {BUILD_DIR}/lock.txt\n"
            "else\n"
            f"  {VENV}/bin/pip install --no-cache-dir --no-deps --require-hashes --disable-pip-version-check "
            f"--no-input --progress-bar off {index_args} -r {BUILD_DIR}/lock.txt\n"
            "fi\n"
        )
    )
    return (
        "set -eu\n"
        f"{base_python} -c {shlex.quote(check)} {want} {shlex.quote(exact)}\n"
        f"if [ -f {BUILD_DIR}/ca.pem ]; then export PIP_CERT={BUILD_DIR}/ca.pem SSL_CERT_FILE={BUILD_DIR}/ca.pem; fi\n"
        "if command -v uv >/dev/null 2>&1; then\n"
        f"  uv venv --quiet --system-site-packages --python {base_python} {VENV}\n"
        "else\n"
        f"  {base_python} -m venv --system-site-packages {VENV} || {{ echo 'amlrun: this image cannot make a "
        "virtualenv (python3 -m venv failed): use a base image with the venv module (on Debian and Ubuntu, "
        "the python3-venv package), or make the environment user-managed.' >&2; exit 1; }\n"
        "fi\n"
        f"{install}"
    )


def _install_steps(key: str, resolved: ResolvedEnvironment) -> str:
    labels = {"amlrun.build_key": key, "amlrun.environment": f"{resolved.name}:{resolved.version}"}
    return (
        f"COPY amlrun/ {BUILD_DIR}/\n"
        f"RUN /bin/sh {BUILD_DIR}/install.sh\n"
        f"LABEL {' '.join(f'{k}={json.dumps(v)}' for k, v in labels.items())}\n"
    )


def ensure_image(
    client: APIClient,
    resolved: ResolvedEnvironment,
    *,
    default_image: str = DEFAULT_IMAGE,
    daemon: str = "the Docker daemon",
    ca_bundle: str | None = None,
    lock_dir: str | os.PathLike[str] | None = None,
    output: Callable[[str], None] | None = None,
) -> EnvironmentImage:
    """The environment's image on the daemon, building it if the daemon does not have it yet.

    An image that exists costs one inspect call.

    :param client: a ``docker.APIClient`` of the daemon.
    :param resolved: the environment pinned for the run.
    :param default_image: the image of an environment that names none.
    :param daemon: how to name the daemon in messages (its URL).
    :param ca_bundle: a CA bundle file for pip during the build; default the worker's (``default_ca_bundle``).
    :param lock_dir: folder for the per-key file locks that keep this machine from building a key twice.
    :param output: gets each line the build prints.
    """
    recipe = image_recipe(resolved, default_image=default_image)
    found = inspect_image(client, recipe.reference)
    if found is not None:
        return _image(recipe, found)
    if not recipe.built:
        return _image(recipe, require_image(client, recipe.reference, daemon=daemon, what=_what(resolved)))
    if recipe.base_image is not None:
        require_image(client, recipe.base_image, daemon=daemon, what=f"the base image of {_what(resolved)}")
    assert recipe.key is not None and recipe.dockerfile is not None
    if lock_dir is None:
        return _build(client, recipe, resolved, daemon=daemon, ca_bundle=ca_bundle, output=output)
    from filelock import FileLock

    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(lock_dir) / f".{recipe.key}.lock"), timeout=BUILD_TIMEOUT_SECONDS):
        found = inspect_image(client, recipe.reference)  # built by another process while this one waited
        if found is not None:
            return _image(recipe, found)
        return _build(client, recipe, resolved, daemon=daemon, ca_bundle=ca_bundle, output=output)


def inspect_image(client: APIClient, reference: str) -> dict[str, Any] | None:
    """The daemon's record of an image, None when it does not have it."""
    from docker.errors import ImageNotFound, NotFound

    try:
        return dict(client.inspect_image(reference))
    except (ImageNotFound, NotFound):
        return None


def require_image(client: APIClient, reference: str, *, daemon: str, what: str) -> dict[str, Any]:
    """An image the daemon has, or pulls now; otherwise an error naming the image and how to provide it."""
    from docker.errors import APIError

    found = inspect_image(client, reference)
    if found is not None:
        return found
    repository, tag = _split_reference(reference)
    try:
        client.pull(repository, tag=tag)
    except APIError as err:
        reason = str(getattr(err, "explanation", None) or err).strip()
        raise ConfigurationError(
            f"Image {reference!r} ({what}) is not on the Docker daemon at {daemon}, and pulling it failed: "
            f"{reason}. Load or build it on that daemon (docker load -i image.tar, docker build -t {reference} "
            "...), log the daemon in to the registry that has it, or name an image the daemon has (docker "
            "images) in the environment's docker.base_image."
        ) from None
    found = inspect_image(client, reference)
    if found is None:
        raise ConfigurationError(f"Image {reference!r} was pulled to {daemon} but cannot be found there.")
    return found


def default_ca_bundle() -> str | None:
    """The worker's CA bundle (``SSL_CERT_FILE``, ``PIP_CERT``, or the system's), if there is one."""
    import ssl

    paths = ssl.get_default_verify_paths()
    for candidate in (
        os.environ.get("SSL_CERT_FILE"),
        os.environ.get("PIP_CERT"),
        paths.cafile,
        paths.openssl_cafile,
    ):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def build_context(recipe: ImageRecipe, resolved: ResolvedEnvironment, ca_bundle: str | None) -> bytes:
    """The tar the daemon builds from: the Dockerfile, and for a managed environment the lock, the install
    script and the CA bundle. Nothing else: a user's Dockerfile cannot COPY files from the worker."""
    assert recipe.dockerfile is not None
    files: dict[str, bytes] = {"Dockerfile": recipe.dockerfile.encode()}
    if resolved.lock is not None and not resolved.user_managed:
        files["amlrun/lock.txt"] = resolved.lock.encode()
        files["amlrun/install.sh"] = install_script(resolved).encode()
        if ca_bundle:
            files["amlrun/ca.pem"] = Path(ca_bundle).read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            # A fixed time keeps the COPY layer's cache key stable across builds of one key.
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _build(
    client: APIClient,
    recipe: ImageRecipe,
    resolved: ResolvedEnvironment,
    *,
    daemon: str,
    ca_bundle: str | None,
    output: Callable[[str], None] | None,
) -> EnvironmentImage:
    from docker.errors import APIError

    assert recipe.key is not None
    context = build_context(recipe, resolved, ca_bundle if ca_bundle is not None else default_ca_bundle())
    started = time.monotonic()
    step: list[str] = []
    say = output or (lambda line: None)
    say(f"Building image {recipe.reference} of environment {resolved.name}:{resolved.version} on {daemon}")
    try:
        stream = client.build(
            fileobj=io.BytesIO(context),
            custom_context=True,
            tag=recipe.reference,
            rm=True,
            forcerm=True,
            pull=False,
            network_mode="host",
            decode=True,
            timeout=BUILD_TIMEOUT_SECONDS,
        )
        for event in stream:
            if "error" in event or "errorDetail" in event:
                detail = event.get("errorDetail", {}).get("message") or event.get("error", "")
                shown = "\n".join(f"  | {line}" for line in step[-FAILED_STEP_LINES:])
                raise EnvironmentBuildError(
                    f"Building image {recipe.reference} of environment {resolved.name!r} version "
                    f"{resolved.version} on {daemon} failed: {str(detail).strip()}\nThe failing step and its "
                    f"output:\n{shown}",
                    build_key=recipe.key,
                    output="\n".join(step),
                )
            # The legacy builder colours a step's stderr; the task log wants plain text.
            for line in _ANSI.sub("", str(event.get("stream", ""))).splitlines():
                if line.startswith("Step "):
                    step = []
                if line.strip():
                    step.append(line)
                    say(line)
    except APIError as err:
        raise EnvironmentBuildError(
            f"The Docker daemon at {daemon} refused to build image {recipe.reference} of environment "
            f"{resolved.name!r}: {getattr(err, 'explanation', None) or err}",
            build_key=recipe.key,
            output="",
        ) from None
    found = inspect_image(client, recipe.reference)
    if found is None:
        raise EnvironmentBuildError(
            f"Building image {recipe.reference} on {daemon} ended without an image; see the build output above.",
            build_key=recipe.key,
            output="\n".join(step),
        )
    say(f"Built image {recipe.reference} in {time.monotonic() - started:.1f} s")
    return _image(recipe, found, built_now=True)


def _image(recipe: ImageRecipe, found: dict[str, Any], built_now: bool = False) -> EnvironmentImage:
    config = found.get("Config") or {}
    env = dict(item.split("=", 1) for item in (config.get("Env") or []) if "=" in item)
    return EnvironmentImage(
        reference=recipe.reference,
        python=recipe.python,
        image_id=str(found.get("Id")),
        env=env,
        built_now=built_now,
    )


def _what(resolved: ResolvedEnvironment) -> str:
    return f"environment {resolved.name!r}"


def _split_reference(reference: str) -> tuple[str, str | None]:
    if "@" in reference:
        return reference, None
    name, _, tag = reference.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return reference, "latest"


def _hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
