"""Making images on a Docker daemon through its API: ``docker build``, ``docker pull``, and an install step
run in a container that receives secrets on its stdin and is committed.

The docker SDK speaks the legacy builder only (no BuildKit, so no build secrets), and Debian's docker.io has
no buildx: a value given to ``docker build`` as a build argument or ``ENV`` lands in the image's history or
config. ``commit_install`` is the way around it that any daemon, local or remote, offers: create a container
of an image, attach to its stdin before it starts, write the values, let the script keep them in its own
environment, and commit the container with an explicit configuration. The daemon fills what a commit leaves
unset from the container's own configuration (its environment and labels included), so nothing of the
values may be in that configuration either: they are only ever written to the container's stdin.

What these functions say about an image goes to ``say`` (the task log); errors name the image and the
daemon. This module imports nothing from Airflow: it takes a ``docker.APIClient``.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_amlrun.environment.errors import EnvironmentBuildError

if TYPE_CHECKING:
    from docker import APIClient

BUILD_TIMEOUT_SECONDS = 1800
# Lines of a failing build step shown in the error.
FAILED_STEP_LINES = 60
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BUILT = re.compile(r"Successfully built ([0-9a-f]+)$")


def commit_config(stage: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    """The configuration of an image committed from an install container: its stage's own, plus the labels.

    A commit fills what this leaves empty from the container, whose entrypoint is the install script: an
    empty entrypoint (not a missing one) keeps the script out.

    :param stage: ``Config`` of the image the install container was created from.
    :param labels: all labels of the image.
    """
    return {
        "Env": list(stage.get("Env") or []),
        "Cmd": stage.get("Cmd"),
        "Entrypoint": list(stage.get("Entrypoint") or []),
        "WorkingDir": stage.get("WorkingDir") or "",
        "User": stage.get("User") or "",
        "Labels": dict(labels),
    }


def inspect_image(client: APIClient, reference: str) -> dict[str, Any] | None:
    """The daemon's record of an image, None when it does not have it."""
    from docker.errors import ImageNotFound, NotFound

    try:
        return dict(client.inspect_image(reference))
    except (ImageNotFound, NotFound):
        return None


def pull(client: APIClient, reference: str) -> str | None:
    """Pull an image: None once it arrived, else why not, in the daemon's words."""
    from docker.errors import APIError

    repository, tag = split_reference(reference)
    try:
        # A pull that starts can still fail half-way: the stream says so, not the status code.
        for event in client.pull(repository, tag=tag, stream=True, decode=True):
            if "error" in event or "errorDetail" in event:
                return str(event.get("errorDetail", {}).get("message") or event.get("error", "")).strip()
    except APIError as err:
        return str(getattr(err, "explanation", None) or err).strip()
    return None


def build(
    client: APIClient,
    context: bytes,
    *,
    tag: str | None,
    subject: str,
    key: str,
    daemon: str,
    say: Callable[[str], None],
) -> str:
    """Run ``docker build`` of a context on the host network, streaming its output; the built image's id.

    The daemon tags the image only once every step succeeded, so a tag is always complete.

    :param context: the build context, a tar holding the Dockerfile.
    :param tag: the tag of the image; None leaves it untagged (a stage of a larger build).
    :param subject: what is built, for messages ("image X of environment 'y' version 1").
    :param key: the build key, carried by the error.
    :param daemon: how to name the daemon in messages (its URL).
    :param say: gets each line of the build's output.
    """
    from docker.errors import APIError

    step: list[str] = []
    image_id = ""
    try:
        stream = client.build(
            fileobj=io.BytesIO(context),
            custom_context=True,
            tag=tag,
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
                    f"Building {subject} on {daemon} failed: {str(detail).strip()}\nThe failing step and its "
                    f"output:\n{shown}",
                    build_key=key,
                    output="\n".join(step),
                )
            image_id = str((event.get("aux") or {}).get("ID") or image_id)
            # The legacy builder colours a step's stderr; the task log wants plain text.
            for line in _ANSI.sub("", str(event.get("stream", ""))).splitlines():
                if line.startswith("Step "):
                    step = []
                built = _BUILT.match(line)
                if built and not image_id:
                    image_id = built.group(1)
                if line.strip():
                    step.append(line)
                    say(line)
    except APIError as err:
        raise EnvironmentBuildError(
            f"The Docker daemon at {daemon} refused to build {subject}: {getattr(err, 'explanation', None) or err}",
            build_key=key,
            output="",
        ) from None
    return image_id


def commit_install(
    client: APIClient,
    stage: str,
    *,
    command: Sequence[str],
    stdin: bytes,
    tag: str,
    labels: Mapping[str, str],
    message: str,
    hide: Sequence[str],
    subject: str,
    key: str,
    daemon: str,
    say: Callable[[str], None],
) -> None:
    """Run an install step in a container of ``stage`` with ``stdin`` as its input, and commit it as ``tag``.

    The image gets the stage's configuration plus ``labels``, and a history entry saying ``message``; the tag
    appears only once the step succeeded. The container is removed either way.

    :param command: the install step, run as the container's entrypoint (as the stage's user, like a RUN).
    :param stdin: all of the step's input (the values it must not write anywhere).
    :param hide: strings replaced by ``***`` in the output shown and in errors.
    """
    from docker.errors import APIError

    config = dict((inspect_image(client, stage) or {}).get("Config") or {})
    # A commit copies the container's labels into the image: the container gets the image's own.
    labels = {**(config.get("Labels") or {}), **labels}
    container_id = ""
    try:
        container_id = str(
            client.create_container(
                stage,
                entrypoint=list(command),
                stdin_open=True,
                labels=labels,
                host_config=client.create_host_config(network_mode="host"),
            )["Id"]
        )
        code, lines = _run_with_input(client, container_id, stdin, hide=hide, say=say)
        if code != 0:
            shown = "\n".join(f"  | {line}" for line in lines[-FAILED_STEP_LINES:])
            raise EnvironmentBuildError(
                f"Building {subject} on {daemon} failed: the install step exited with code {code}. Its output:\n"
                f"{shown}",
                build_key=key,
                output="\n".join(lines),
            )
        repository, version = split_reference(tag)
        client.commit(
            container_id,
            repository=repository,
            tag=version,
            message=message,
            conf=commit_config(config, labels),
        )
    except APIError as err:
        raise EnvironmentBuildError(
            f"The Docker daemon at {daemon} refused to build {subject}: {getattr(err, 'explanation', None) or err}",
            build_key=key,
            output="",
        ) from None
    finally:
        if container_id:
            with contextlib.suppress(Exception):
                client.remove_container(container_id, force=True)


def split_reference(reference: str) -> tuple[str, str | None]:
    """``(repository, tag)`` of an image reference; a digest reference has no tag."""
    if "@" in reference:
        return reference, None
    name, _, tag = reference.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return reference, "latest"


def _run_with_input(
    client: APIClient, container_id: str, stdin: bytes, *, hide: Sequence[str], say: Callable[[str], None]
) -> tuple[int, list[str]]:
    """Start a created container, write its input, follow its output; its exit code and output lines.

    Attached before it starts, so nothing of its input or output is missed; past the build's time limit it
    is killed (its output then ends, and the exit code says so).
    """
    from docker.utils.socket import frames_iter

    sock = client.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        with contextlib.suppress(Exception):
            client.kill(container_id)

    watchdog = threading.Timer(BUILD_TIMEOUT_SECONDS, kill)
    watchdog.daemon = True
    lines: list[str] = []
    pending: dict[int, bytes] = {}

    def emit(data: bytes) -> None:
        line = _ANSI.sub("", data.decode(errors="replace")).rstrip("\r")
        for secret in hide:
            line = line.replace(secret, "***")
        if line.strip():
            lines.append(line)
            say(line)

    try:
        client.start(container_id)
        watchdog.start()
        _write_input(sock, stdin)
        for stream, data in frames_iter(sock, tty=False):
            *complete, pending[stream] = (pending.get(stream, b"") + data).split(b"\n")
            for line in complete:
                emit(line)
        for rest in pending.values():
            emit(rest)
    finally:
        watchdog.cancel()
        sock.close()
    code = int(client.wait(container_id, timeout=60).get("StatusCode", -1))
    if killed.is_set():
        lines.append(f"amlrun: the install step took longer than {BUILD_TIMEOUT_SECONDS} s and was killed")
    return code, lines


def _write_input(sock: Any, data: bytes) -> None:
    """Write a container's input on its attach socket. Not ended: the install step reads what it expects,
    then reads no more (half-closing a TLS socket would end its reading side too)."""
    # The SDK hands a plain connection's socket wrapped in a SocketIO; TLS and ssh:// ones as they are.
    raw: Any = getattr(sock, "_sock") if isinstance(sock, socket.SocketIO) else sock  # noqa: B009
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it exited already: its code says why
        raw.sendall(data)
