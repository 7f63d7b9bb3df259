"""What image an environment runs in, known without asking a daemon: the recipe (pure, no daemon call).

- user-managed, with ``docker.base_image`` (or none: the target's default image): that image, as it is;
- user-managed, with ``docker.dockerfile``: the Dockerfile built as it is;
- managed (a lock): the base image or Dockerfile, plus a virtualenv at ``/opt/amlrun/env`` (with the
  image's own site-packages visible) into which the lock is installed with
  ``pip install --require-hashes --no-deps -r`` (or ``uv pip sync --require-hashes --compile-bytecode``
  when the image has uv), bytecode compiled either way: each run imports the packages in a fresh container.

A built image is tagged ``amlrun-env:<build key[:32]>``; the key hashes the spec (which holds the base image
or Dockerfile), the lock, the Python asked for and the platform, so "already built" is one inspect call on
the daemon. build_image.py has the image made on a daemon from the recipe.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun.environment.docker_build import split_reference
from airflow_amlrun.environment.lock import has_requirements, lock_python_version
from airflow_amlrun.errors import ConfigurationError

if TYPE_CHECKING:
    from airflow_amlrun.environment.resolve import ResolvedEnvironment

PLATFORM = "linux/amd64"
REPOSITORY = "amlrun-env"
BUILD_DIR = "/opt/amlrun/build"
VENV = "/opt/amlrun/env"
VENV_PYTHON = f"{VENV}/bin/python"
# What a Docker target runs when neither the environment nor the target names an image.
DEFAULT_IMAGE = "amlrun-base:py3.11"
# Images of this repository are amlrun's own: a daemon that lacks one builds it on first use...
DEFAULT_IMAGE_REPOSITORY = "amlrun-base"
# ...from this public image (a target's default_image_base), whose python3 makes virtualenvs.
DEFAULT_IMAGE_BASE = "python:3.11-slim"
# Where a user sets the default image and its public base, for messages.
DEFAULT_IMAGE_SETTINGS = (
    "[amlrun] docker_default_image, the connection extra default_image, or AMLRUN_DOCKER_DEFAULT_IMAGE"
)
DEFAULT_IMAGE_BASE_SETTINGS = (
    "[amlrun] docker_default_image_base, the connection extra default_image_base, or "
    "AMLRUN_DOCKER_DEFAULT_IMAGE_BASE"
)


# The label naming the build key of an image amlrun built for an environment.
BUILD_KEY_LABEL = "amlrun.build_key"


@dataclass(frozen=True)
class ImageRecipe:
    """What image an environment runs in, known without asking the daemon.

    :param reference: the image to run: the user's image, or the tag of the build.
    :param base_image: the image the build starts from (None when a Dockerfile says it).
    :param dockerfile: the Dockerfile text of the build, None when the image is used as it is.
    :param python: the interpreter that runs the script inside the image.
    :param key: the build key (None when nothing is built).
    :param credentials: the variables (``${VAR}`` of the index URLs) the install needs; when there are any,
        ``dockerfile`` only stages the build files (no RUN), and the install runs in a container that is
        committed.
    :param labels: what the built image is labelled with, beside its base's labels.
    """

    reference: str
    base_image: str | None
    dockerfile: str | None
    python: str
    key: str | None
    credentials: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)

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
    # The image's configured user (its USER line; empty: root).
    user: str = ""
    # The build key the image is labelled with (BUILD_KEY_LABEL): None for an image amlrun did not build.
    build_key: str | None = None


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
    labels = {BUILD_KEY_LABEL: key, "amlrun.environment": f"{resolved.name}:{resolved.version}"}
    credentials = tuple(install_credentials(resolved))
    # With credentials the install cannot be a build step (see the module's docstring); the stage is labelled
    # all the same, so that a stage left by a failed install is found by its build key.
    install = "" if credentials else f"RUN /bin/sh {BUILD_DIR}/install.sh\n"
    steps = f"COPY amlrun/ {BUILD_DIR}/\n{install}{label_step(labels)}"
    return ImageRecipe(
        reference=f"{REPOSITORY}:{key[:32]}",
        base_image=base,
        dockerfile=head.rstrip("\n") + "\n" + steps,
        python=VENV_PYTHON,
        key=key,
        credentials=credentials,
        labels=labels,
    )


def default_image_recipe(reference: str, base: str) -> ImageRecipe:
    """How a daemon that lacks amlrun's default image builds it: the public base, checked to make virtualenvs
    (what a managed environment's build needs of it).

    :param reference: the default image, an ``amlrun-base:<tag>`` image.
    :param base: the public Python image it is built from.
    """
    failed = (
        f"amlrun: {base} cannot be the default image's base: its python3 cannot make a virtualenv (python3 -m "
        f"venv failed). Point {DEFAULT_IMAGE_BASE_SETTINGS} at a Python image that can ({DEFAULT_IMAGE_BASE} does)."
    )
    labels = {"amlrun.default_image_base": base}
    dockerfile = (
        f"FROM {base}\n"
        "RUN python3 -m venv /tmp/amlrun-venv-check && rm -rf /tmp/amlrun-venv-check "
        f"|| {{ echo {shlex.quote(failed)} >&2; exit 1; }}\n"
        f"{label_step(labels)}"
    )
    key = _hash({"default_image": reference, "dockerfile": dockerfile, "platform": PLATFORM})
    return ImageRecipe(
        reference=reference, base_image=base, dockerfile=dockerfile, python="python3", key=key, labels=labels
    )


def is_default_image(reference: str) -> bool:
    """Whether an image is amlrun's own default image (repository ``amlrun-base``), which a daemon builds."""
    return split_reference(reference)[0] == DEFAULT_IMAGE_REPOSITORY


def install_credentials(resolved: ResolvedEnvironment) -> list[str]:
    """The variables whose values installing the environment's lock needs: the ``${VAR}`` of its index URLs
    and direct-URL requirements."""
    return resolved.credential_variables()


def credential_input(names: Sequence[str], values: Mapping[str, str]) -> bytes:
    """What the install step reads on its stdin: the value of each variable of ``names``, a line each.

    :param names: the variables, in the order the install script reads them (``install_credentials``).
    :param values: their values (``credential_values``).
    """
    for name in names:
        if "\n" in values[name] or "\r" in values[name]:
            raise ConfigurationError(
                f"${{{name}}} holds a line break, which no package-index password or token has. Set it to the "
                "token alone (a file read into it may end with a newline: strip it)."
            )
    return "".join(f"{values[name]}\n" for name in names).encode()


def install_script(resolved: ResolvedEnvironment) -> str:
    """The shell script that installs a lock into the image's virtualenv (run as the image's user)."""
    spec = resolved.spec
    lock = resolved.lock or ""
    base_python = shlex.quote(spec.python.interpreter_path or "python3")
    want = shlex.quote(spec.python.version or lock_python_version(lock) or "")
    exact = "1" if spec.python.version else ""
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
    # Index credentials come on stdin, a value a line, into this shell's environment only (pip and uv expand
    # ${VAR} in the lock from there); nothing after reads stdin. The lock names its indexes, so none is given
    # on a command line, where a ${VAR} would stay unexpanded.
    names = install_credentials(resolved)
    credentials = "".join(
        f"IFS= read -r {name} || {{ echo 'amlrun: the value of ${{{name}}} did not arrive on the install "
        f"step'\"'\"'s input' >&2; exit 1; }}\nexport {name}\n"
        for name in names
    ) + ("exec </dev/null\n" if names else "")
    install = (
        ""
        if not has_requirements(lock)
        else (
            "if command -v uv >/dev/null 2>&1; then\n"
            f"  uv pip sync --require-hashes --compile-bytecode --python {VENV_PYTHON} {BUILD_DIR}/lock.txt\n"
            "else\n"
            f"  {VENV}/bin/pip install --no-cache-dir --no-deps --require-hashes --disable-pip-version-check "
            f"--no-input --progress-bar off -r {BUILD_DIR}/lock.txt\n"
            "fi\n"
        )
    )
    return (
        "set -eu\n"
        f"{credentials}"
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
    return tar_of(files)


def label_step(labels: Mapping[str, str]) -> str:
    return f"LABEL {' '.join(f'{k}={json.dumps(v)}' for k, v in labels.items())}\n"


def tar_of(files: Mapping[str, bytes]) -> bytes:
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


def _hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
