"""The run options of the Docker target: how it runs containers (limits, GPUs, user, transfer).

They come from the extras of an ``amlrun_docker`` connection, or for ``compute_target="docker"`` from the
worker's ``AMLRUN_DOCKER_<OPTION>`` variables, and are checked before any run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from airflow_amlrun.config import load_settings, parse_flag
from airflow_amlrun.environment.image_recipe import DEFAULT_IMAGE, DEFAULT_IMAGE_BASE
from airflow_amlrun.errors import ConfigurationError

# How a run's folder may reach its container (see ``DockerOptions.transfer``).
TRANSFERS = ("auto", "bind", "archive")
# Capabilities a run container never has (besides what Docker drops anyway): making device nodes, and
# changing user or group, or keeping setuid/setgid bits, which a script needs only to escalate.
DROPPED_CAPABILITIES = ("MKNOD", "SETUID", "SETGID", "FSETID")
# Nothing in the container gains privileges through exec (setuid binaries of the image, file capabilities).
SECURITY_OPTIONS = ("no-new-privileges",)
# The container's user when the worker is root and the image's own user is root too: nobody:nogroup.
UNPRIVILEGED_USER = "65534:65534"


@dataclass(frozen=True)
class DockerOptions:
    """How the target runs containers; extras of an ``amlrun_docker`` connection, or for
    ``compute_target="docker"`` the worker's ``AMLRUN_DOCKER_<OPTION>`` variables (e.g.
    ``AMLRUN_DOCKER_MEM_LIMIT=8g``).

    :param cpus: CPUs the container may use, e.g. ``1.5`` (``docker run --cpus``).
    :param mem_limit: memory limit, e.g. ``"512m"``, ``"8g"``; a script going over it is killed, and the
        run fails saying so.
    :param shm_size: size of /dev/shm, e.g. ``"1g"`` (PyTorch data loaders want more than the 64m default).
    :param gpus: GPUs, as ``docker run --gpus`` takes them: ``"all"``, a count (``2``), or device ids
        (``"device=0,1"``); needs the NVIDIA container toolkit on the daemon's host.
    :param network_mode: the container's network, e.g. ``"host"``, ``"none"``, or a network name; default
        the daemon's.
    :param user: user (``"1000:1000"``, or a name of the image's /etc/passwd) the script runs as; default the
        worker's own uid:gid (so that the worker can collect and remove what the script wrote); a worker that
        runs as root runs it as the image's user when that is not root, else as ``65534:65534`` (nobody).
        Give ``"0"`` to run as root in the container.
    :param auto_remove: remove the container once the run's outcome is recorded (default true); false keeps
        it for ``docker inspect`` / ``docker logs``.
    :param default_image: image of a run whose environment names none (default ``[amlrun]
        docker_default_image``, else ``amlrun-base:py3.11``).
    :param default_image_base: public Python image from which a daemon that lacks the default image (an
        ``amlrun-base`` image) builds it on first use (default ``[amlrun] docker_default_image_base``, else
        ``python:3.11-slim``).
    :param transfer: how a run's folder reaches its container: ``bind`` (bind-mount it: the daemon sees the
        worker's files), ``archive`` (copy it in and outputs out through the Docker API: a remote daemon, or
        a worker that runs in a container of its own), or ``auto`` (default: ``bind`` for a daemon on a unix
        socket that is seen to share the runs folder, else ``archive``).

    Privileged containers are not offered, and every run container lacks the capabilities MKNOD, SETUID,
    SETGID and FSETID and runs with no-new-privileges.
    """

    cpus: float | None = None
    mem_limit: str | None = None
    shm_size: str | None = None
    gpus: str | None = None
    network_mode: str | None = None
    user: str | None = None
    auto_remove: bool = True
    default_image: str = DEFAULT_IMAGE
    default_image_base: str = DEFAULT_IMAGE_BASE
    transfer: str = "auto"

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, where: str) -> DockerOptions:
        """Options from connection extras or variables, checked; errors name the option and where it is set.

        :param values: option name -> value (strings from variables, JSON values from extras).
        :param where: where the values come from, for messages.
        """
        from docker.errors import DockerException
        from docker.utils import parse_bytes

        known = {f.name for f in fields(cls)}
        if "privileged" in values:
            raise ConfigurationError(
                f"{where}: 'privileged' is not supported: a training script never needs the host's devices and "
                "kernel. Remove it; use 'gpus' for GPUs and 'shm_size' for shared memory."
            )
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown Docker option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}."
            )
        settings = load_settings()
        parsed: dict[str, Any] = {
            "default_image": settings.docker_default_image,
            "default_image_base": settings.docker_default_image_base,
        }
        for name, value in values.items():
            if value is None or value == "":
                continue
            if name == "cpus":
                try:
                    parsed[name] = float(value)
                except (TypeError, ValueError):
                    raise ConfigurationError(
                        f"{where}: cpus = {value!r} is not a number; write e.g. 2 or 1.5."
                    ) from None
                if parsed[name] <= 0:
                    raise ConfigurationError(f"{where}: cpus = {value!r} must be more than 0.")
            elif name in ("mem_limit", "shm_size"):
                try:
                    parse_bytes(str(value))
                except DockerException:
                    raise ConfigurationError(
                        f"{where}: {name} = {value!r} is not a size; write e.g. '512m' or '8g'."
                    ) from None
                parsed[name] = str(value)
            elif name == "auto_remove":
                parsed[name] = parse_flag(value, f"{where}: auto_remove")
            elif name == "transfer":
                parsed[name] = str(value).strip().lower()
                if parsed[name] not in TRANSFERS:
                    raise ConfigurationError(
                        f"{where}: transfer = {value!r} is not one of {', '.join(TRANSFERS)}; write 'bind' when "
                        "the daemon sees this worker's files, 'archive' when it does not (a remote daemon, or "
                        "a worker in a container of its own), or 'auto' to have it checked."
                    )
            else:
                parsed[name] = str(value)
        options = cls(**parsed)
        options.device_requests()  # a bad gpus value fails here, before any run
        return options

    def device_requests(self) -> list[Any] | None:
        """The GPU request of ``gpus``, as ``docker run --gpus`` makes it."""
        if not self.gpus:
            return None
        from docker.types import DeviceRequest

        text = self.gpus.strip()
        if text == "all":
            return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if text.isdigit():
            return [DeviceRequest(count=int(text), capabilities=[["gpu"]])]
        if text.startswith("device="):
            ids = [d.strip() for d in text[len("device=") :].split(",") if d.strip()]
            return [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
        raise ConfigurationError(
            f"Docker option gpus = {self.gpus!r} is not understood; write 'all', a count such as 2, or "
            "'device=0,1'."
        )

    def host_config(self) -> dict[str, Any]:
        """The options as ``create_host_config`` arguments."""
        config: dict[str, Any] = {
            "init": True,
            "privileged": False,
            "device_requests": self.device_requests(),
            "network_mode": self.network_mode,
            "mem_limit": self.mem_limit,
            "shm_size": self.shm_size,
            "cap_drop": list(DROPPED_CAPABILITIES),
            "security_opt": list(SECURITY_OPTIONS),
        }
        if self.cpus is not None:
            config["nano_cpus"] = int(self.cpus * 1e9)
        return {k: v for k, v in config.items() if v is not None}

    def run_user(self, image_user: str | None) -> str:
        """The user a container of an image whose configured user is ``image_user`` runs as: the option, else
        the worker's uid:gid; for a root worker, the image's user unless that is root, else nobody.

        A root worker could run containers as root, but nothing needs that (it can collect and remove the
        files of any user), and a script that is not root in its container cannot chown, bypass file
        permissions or make setuid-root files in its bind-mounted run folder.
        """
        if self.user:
            return self.user
        if os.getuid() != 0:
            return f"{os.getuid()}:{os.getgid()}"
        if image_user and not is_root(image_user):
            return image_user
        return UNPRIVILEGED_USER


def is_root(user: str) -> bool:
    """Whether a container user (``name``, ``uid``, ``name:group``, ``uid:gid``) is root."""
    return user.partition(":")[0].strip() in ("", "0", "root")
