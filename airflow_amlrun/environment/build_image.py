"""Docker images of environments: the image a run executes in, built once per build key on a daemon.

What image an environment runs in, and its build key, is its recipe (image_recipe.py, pure). Here it is had
on a daemon: "already built" is one inspect call for the recipe's tag. ``docker build`` tags an image only
once every step succeeded, so a tag is always complete; a file lock per key on the worker keeps two runs here
from building it twice at once.

How the install reaches the package index: the build runs with ``network_mode="host"`` (a daemon started
with ``--bridge=none`` gives build containers no network otherwise), and the worker's CA bundle is copied
into the build context and handed to pip/uv for that step only (``PIP_CERT``, ``SSL_CERT_FILE``): package
indexes behind a TLS-inspecting proxy are trusted by the worker's bundle, not by the image's. A build cannot
bind-mount, which is why the bundle is copied; it is public data, kept in the image at
``/opt/amlrun/build/ca.pem`` beside the lock it installed. The lock names its indexes itself (``--index-url``
lines), so pip and uv are given no index on their command line.

Index credentials: an index URL may reference ``${VAR}`` (see ``credentials``); the spec, the lock and so
the build key keep the reference, so rotating the value reuses the image. The value must reach pip and uv
and nothing else, and the legacy builder (the only one the docker SDK speaks) has no build secrets: a build
argument or ``ENV`` lands in the image's history or config. So such a build is split in two. ``docker
build`` makes the stage: the base image or Dockerfile plus the build files, nothing secret. The install then
runs in a container of the stage that receives the values on its stdin (attached before it starts) and keeps
them in its own environment, from which pip and uv expand ``${VAR}`` in the lock; the container is committed
with the stage's own configuration plus the labels, under the build's tag, and removed
(``docker_build.commit_install``). The values are read from the worker's environment when the build starts
and are in no layer, history entry, config or label. This needs nothing of the daemon but containers, so it
works the same on a local and a remote one.

The default image (``amlrun-base:py3.11``, a target's ``default_image``) is made by ``scripts/docker.sh``
from Debian packages where the tests run. Any image of the repository ``amlrun-base`` is amlrun's own: a
daemon that lacks it builds it on first use from a public Python image (``default_image_base``, by default
``python:3.11-slim``, pulled when the daemon does not have it), checking that its ``python3`` can make a
virtualenv. A default image of another name is the user's, and is pulled like any other.

image_recipe.py says what to build, this module when; ``docker_build`` does the daemon's part. None imports
anything from Airflow: they take a ``docker.APIClient``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun import progress
from airflow_amlrun.environment import docker_build
from airflow_amlrun.environment.credentials import credential_values
from airflow_amlrun.environment.docker_build import BUILD_TIMEOUT_SECONDS, inspect_image
from airflow_amlrun.environment.errors import EnvironmentBuildError
from airflow_amlrun.environment.image_recipe import (
    BUILD_DIR,
    BUILD_KEY_LABEL,
    DEFAULT_IMAGE,
    DEFAULT_IMAGE_BASE,
    DEFAULT_IMAGE_BASE_SETTINGS,
    DEFAULT_IMAGE_SETTINGS,
    VENV,
    EnvironmentImage,
    ImageRecipe,
    build_context,
    credential_input,
    default_image_recipe,
    image_recipe,
    is_default_image,
    tar_of,
)
from airflow_amlrun.errors import ConfigurationError

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_amlrun.environment.resolve import ResolvedEnvironment


def check_image(
    client: APIClient,
    resolved: ResolvedEnvironment,
    *,
    default_image: str = DEFAULT_IMAGE,
    default_image_base: str = DEFAULT_IMAGE_BASE,
    daemon: str = "the Docker daemon",
    environ: Mapping[str, str] | None = None,
    lock_dir: str | os.PathLike[str] | None = None,
    output: Callable[[str], None] | None = None,
) -> None:
    """Refuse, before a run is recorded, an environment whose image cannot be had on the daemon.

    An image the daemon has costs one inspect call. Otherwise the image it runs as it is, or is built from,
    must be there or be pulled now (amlrun's default image is built now, on first use), and the index
    credentials its build needs must be set on the worker; the environment's own build happens when the
    run starts. Parameters as ``ensure_image``.
    """
    recipe = image_recipe(resolved, default_image=default_image)
    if inspect_image(client, recipe.reference) is not None:
        return
    if recipe.credentials:
        credential_input(recipe.credentials, _credentials(recipe, resolved, environ))
    source, what = _source(recipe, resolved)
    if source is not None:
        provide_image(
            client,
            source,
            what=what,
            daemon=daemon,
            default_image=default_image,
            default_image_base=default_image_base,
            lock_dir=lock_dir,
            output=output,
        )


def ensure_image(
    client: APIClient,
    resolved: ResolvedEnvironment,
    *,
    default_image: str = DEFAULT_IMAGE,
    default_image_base: str = DEFAULT_IMAGE_BASE,
    daemon: str = "the Docker daemon",
    ca_bundle: str | None = None,
    environ: Mapping[str, str] | None = None,
    lock_dir: str | os.PathLike[str] | None = None,
    output: Callable[[str], None] | None = None,
) -> EnvironmentImage:
    """The environment's image on the daemon, building it if the daemon does not have it yet.

    An image that exists costs one inspect call.

    :param client: a ``docker.APIClient`` of the daemon.
    :param resolved: the environment pinned for the run.
    :param default_image: the image of an environment that names none.
    :param default_image_base: the public image an ``amlrun-base`` image is built from where it is missing.
    :param daemon: how to name the daemon in messages (its URL).
    :param ca_bundle: a CA bundle file for pip during the build; default the worker's (``default_ca_bundle``).
    :param environ: where the values of index credentials are read; default this process's environment.
    :param lock_dir: folder for the per-key file locks that keep this machine from building a key twice.
    :param output: gets each line the build prints.
    """
    recipe = image_recipe(resolved, default_image=default_image)
    found = inspect_image(client, recipe.reference)
    if found is not None:
        return _image(recipe, found)
    source, what = _source(recipe, resolved)
    if source is not None:
        found = provide_image(
            client,
            source,
            what=what,
            daemon=daemon,
            default_image=default_image,
            default_image_base=default_image_base,
            lock_dir=lock_dir,
            output=output,
        )
        if not recipe.built:
            return _image(recipe, found)
    assert recipe.key is not None
    with _build_lock(lock_dir, recipe.key):
        found = inspect_image(client, recipe.reference)  # built by another process while this one waited
        if found is not None:
            return _image(recipe, found)
        with progress.step(f"Building the image of environment {resolved.name} version {resolved.version}"):
            return _build(
                client, recipe, resolved, daemon=daemon, ca_bundle=ca_bundle, environ=environ, output=output
            )


def provide_image(
    client: APIClient,
    reference: str,
    *,
    what: str,
    daemon: str,
    default_image: str = DEFAULT_IMAGE,
    default_image_base: str = DEFAULT_IMAGE_BASE,
    lock_dir: str | os.PathLike[str] | None = None,
    output: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """An image to run or to build from, on the daemon: there already, built now when it is amlrun's default
    image, or pulled; otherwise an error naming the image, the daemon and how to provide it.

    :param what: what the image is, for messages ("environment 'x'").
    """
    found = inspect_image(client, reference)
    if found is not None:
        return found
    if is_default_image(reference):
        return _build_default_image(
            client, reference, base=default_image_base, daemon=daemon, lock_dir=lock_dir, output=output
        )
    if reference == default_image:
        return _pull_or_fail(
            client, reference, daemon=daemon, what="the default image", setting=DEFAULT_IMAGE_SETTINGS
        )
    return _pull_or_fail(client, reference, daemon=daemon, what=what)


def require_image(client: APIClient, reference: str, *, daemon: str, what: str) -> dict[str, Any]:
    """An image the daemon has, or pulls now; otherwise an error naming the image and how to provide it."""
    found = inspect_image(client, reference)
    if found is not None:
        return found
    return _pull_or_fail(client, reference, daemon=daemon, what=what)


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


def _source(recipe: ImageRecipe, resolved: ResolvedEnvironment) -> tuple[str | None, str]:
    """The image the daemon must have before the recipe's image can be had, and what it is."""
    if not recipe.built:
        return recipe.reference, _what(resolved)
    return recipe.base_image, f"the base image of {_what(resolved)}"


def _pull_or_fail(
    client: APIClient,
    reference: str,
    *,
    daemon: str,
    what: str,
    setting: str = "the environment's docker.base_image",
) -> dict[str, Any]:
    reason = docker_build.pull(client, reference)
    found = inspect_image(client, reference) if reason is None else None
    if found is None:
        raise ConfigurationError(
            f"Image {reference!r} ({what}) is not on the Docker daemon at {daemon}, and pulling it failed: "
            f"{reason or 'the daemon reported no error, but does not have it'}. Load or build it on that daemon "
            f"(docker load -i image.tar, docker build -t {reference} ...), log the daemon in to the registry that "
            f"has it, or name an image the daemon has (docker images) in {setting}."
        )
    return found


def _build_default_image(
    client: APIClient,
    reference: str,
    *,
    base: str,
    daemon: str,
    lock_dir: str | os.PathLike[str] | None,
    output: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Build amlrun's default image, missing on the daemon, from the public Python image."""
    if not base:
        raise ConfigurationError(
            _default_image_missing(
                reference,
                base,
                daemon,
                f"building it is switched off ({DEFAULT_IMAGE_BASE_SETTINGS} is empty)",
            )
        )
    recipe = default_image_recipe(reference, base)
    assert recipe.key is not None and recipe.dockerfile is not None
    say = output or (lambda line: None)
    with _build_lock(lock_dir, recipe.key):
        found = inspect_image(client, reference)  # built by another process while this one waited
        if found is not None:
            return found
        if inspect_image(client, base) is None:
            reason = docker_build.pull(client, base)
            if reason is not None or inspect_image(client, base) is None:
                reason = reason or "the daemon reported no error, but does not have it"
                raise ConfigurationError(
                    _default_image_missing(
                        reference,
                        base,
                        daemon,
                        f"its base {base!r} is not there, and pulling it failed: {reason}",
                    )
                )
        started = time.monotonic()
        say(
            f"Building the default image {reference} from {base} on {daemon}: the daemon does not have it yet"
        )
        docker_build.build(
            client,
            tar_of({"Dockerfile": recipe.dockerfile.encode()}),
            tag=reference,
            subject=f"the default image {reference}",
            key=recipe.key,
            daemon=daemon,
            say=say,
        )
        found = inspect_image(client, reference)
        if found is None:
            raise EnvironmentBuildError(
                f"Building the default image {reference} on {daemon} ended without an image; see the build output "
                "above.",
                build_key=recipe.key,
                output="",
            )
        say(f"Built the default image {reference} in {time.monotonic() - started:.1f} s")
        return found


def _default_image_missing(reference: str, base: str, daemon: str, reason: str) -> str:
    return (
        f"The default image {reference!r} is not on the Docker daemon at {daemon}, and it cannot be built there: "
        f"{reason}. Provide it on that daemon: docker load it from a machine that has it (docker save {reference} "
        f"| docker -H {daemon} load), or run scripts/docker.sh on the daemon's machine (it makes {DEFAULT_IMAGE} "
        f"from Debian packages); or let the daemon pull {base or DEFAULT_IMAGE_BASE!r}, or point "
        f"{DEFAULT_IMAGE_BASE_SETTINGS} at a Python image it has; or name another default image in "
        f"{DEFAULT_IMAGE_SETTINGS}, or give the environment a docker.base_image."
    )


# building


def _build(
    client: APIClient,
    recipe: ImageRecipe,
    resolved: ResolvedEnvironment,
    *,
    daemon: str,
    ca_bundle: str | None,
    environ: Mapping[str, str] | None,
    output: Callable[[str], None] | None,
) -> EnvironmentImage:
    assert recipe.key is not None
    # Credentials are read first: a missing one fails before anything is built.
    values = _credentials(recipe, resolved, environ) if recipe.credentials else {}
    stdin = credential_input(recipe.credentials, values)
    context = build_context(recipe, resolved, ca_bundle if ca_bundle is not None else default_ca_bundle())
    started = time.monotonic()
    say = output or (lambda line: None)
    subject = f"image {recipe.reference} of environment {resolved.name!r} version {resolved.version}"
    say(f"Building image {recipe.reference} of environment {resolved.name}:{resolved.version} on {daemon}")
    if not recipe.credentials:
        docker_build.build(
            client, context, tag=recipe.reference, subject=subject, key=recipe.key, daemon=daemon, say=say
        )
    else:
        listed = ", ".join(f"${{{name}}}" for name in recipe.credentials)
        say(f"The install step gets {listed} on its input, and keeps them out of the image")
        stage = docker_build.build(
            client, context, tag=None, subject=subject, key=recipe.key, daemon=daemon, say=say
        )
        docker_build.commit_install(
            client,
            stage,
            command=["/bin/sh", f"{BUILD_DIR}/install.sh"],
            stdin=stdin,
            tag=recipe.reference,
            labels=recipe.labels,
            message=f"amlrun: installed the lock of {resolved.name}:{resolved.version} into {VENV}",
            hide=list(values.values()),
            subject=subject,
            key=recipe.key,
            daemon=daemon,
            say=say,
        )
    found = inspect_image(client, recipe.reference)
    if found is None:
        raise EnvironmentBuildError(
            f"Building image {recipe.reference} on {daemon} ended without an image; see the build output above.",
            build_key=recipe.key,
            output="",
        )
    say(f"Built image {recipe.reference} in {time.monotonic() - started:.1f} s")
    return _image(recipe, found, built_now=True)


@contextlib.contextmanager
def _build_lock(lock_dir: str | os.PathLike[str] | None, key: str) -> Iterator[None]:
    """Held while this machine builds a key, so that two runs here do not build it twice at once."""
    if lock_dir is None:
        yield
        return
    from filelock import FileLock

    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(lock_dir) / f".{key}.lock"), timeout=BUILD_TIMEOUT_SECONDS):
        yield


def _credentials(
    recipe: ImageRecipe, resolved: ResolvedEnvironment, environ: Mapping[str, str] | None
) -> dict[str, str]:
    return credential_values(
        recipe.credentials, what=f"Building image {recipe.reference} of {_what(resolved)}", environ=environ
    )


def _image(recipe: ImageRecipe, found: dict[str, Any], built_now: bool = False) -> EnvironmentImage:
    config = found.get("Config") or {}
    env = dict(item.split("=", 1) for item in (config.get("Env") or []) if "=" in item)
    return EnvironmentImage(
        reference=recipe.reference,
        python=recipe.python,
        image_id=str(found.get("Id")),
        env=env,
        built_now=built_now,
        user=str(config.get("User") or ""),
        build_key=(config.get("Labels") or {}).get(BUILD_KEY_LABEL),
    )


def _what(resolved: ResolvedEnvironment) -> str:
    return f"environment {resolved.name!r}"
