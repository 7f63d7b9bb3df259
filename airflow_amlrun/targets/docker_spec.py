"""What a Docker run's container is made of: its name and labels, its command, environment and user, its mounts
and resources, and the request its supervisor reads on stdin.

The container runs ``supervisor.py`` (``airflow_amlrun.targets.supervisor``) with the image's Python, under an
init process (``docker run --init``): the supervisor starts the script (or command), stops it at
``max_run_duration_seconds`` even when no task follows the run, and passes a ``docker stop`` on to the script.
Its request (the command line, the secret variables) is written to the container's stdin, which is closed after
it: ``docker inspect`` of the container shows no secret value. So a ``command=`` run, like a script, needs
Python 3.7 or newer in the image (``python3``, or the environment's ``python.interpreter_path``). The supervisor
and ``airflow_amlrun.run_context`` sit in a read-only folder (``/amlrun/lib``; ``archive``: copied), and
run_context is on PYTHONPATH: any image with a Python runs a script that logs metrics, with nothing installed
into it.

The container runs as the worker's uid:gid (unless the ``user`` option says otherwise), so that everything it
writes in ``run/`` is the worker's to collect and remove; a worker that runs as root runs it as the image's user
unless that is root, else as nobody (65534:65534) (``DockerOptions.run_user``). Whoever it runs as, the
container lacks the capabilities MKNOD, SETUID, SETGID and FSETID and runs with no-new-privileges
(``DockerOptions.host_config``, with the resources the options give).

The container is named ``amlrun-<run id>`` (a second start of the same run cannot happen: the name is taken) and
labelled with the run id, which is how a retry whose handle was lost finds it (``started_container``), and with
how its files travel. One that was created but never started is no run to follow: it is removed only once the run
is recorded lost (``remove_never_started``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_amlrun.targets.common import CONTROL_DIR, EVENTS, job_environment, python_path
from airflow_amlrun.targets.docker_transfer import LABEL_MANAGED_BY, LIB_DIR, PYLIB_DIR, RUN_DIR, SUPERVISOR
from airflow_amlrun.targets.handles import DockerHandle

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_amlrun.environment.image_recipe import EnvironmentImage
    from airflow_amlrun.targets.base import Job
    from airflow_amlrun.targets.docker_options import DockerOptions

log = logging.getLogger(__name__)

LABEL_RUN_ID = "amlrun.run_id"
LABEL_EXPERIMENT = "amlrun.experiment"
LABEL_TRANSFER = "amlrun.transfer"


def container_name(run_id: str) -> str:
    """The container's name: one per run, so the same run cannot be started twice on a daemon."""
    return "amlrun-" + re.sub(r"[^A-Za-z0-9_.-]", "-", run_id)


@dataclass(frozen=True)
class RunContainer:
    """A run's container as the run's handle records it: its name and image, how the run's files travel (``bind``
    or ``archive``), the Python its supervisor runs with, and its user."""

    name: str
    image: str
    transfer: str
    python: str
    user: str | None

    def handle(
        self, container_id: str, *, daemon: str, daemon_id: str | None, run_dir: str, host: str
    ) -> DockerHandle:
        """The run's handle: this container, of id ``container_id``, on the daemon at ``daemon`` (of id
        ``daemon_id``, if it told), with the run folder ``run_dir`` on the worker ``host``."""
        return DockerHandle(
            container_id=container_id,
            container=self.name,
            daemon=daemon,
            daemon_id=daemon_id,
            image=self.image,
            run_dir=run_dir,
            transfer=self.transfer,
            python=self.python,
            user=self.user,
            host=host,
        )


@dataclass(frozen=True)
class ContainerSpec:
    """A run's container as it is created: all that ``docker inspect`` shows of it, which holds no secret value.

    :param binds: the bind mounts, as (path in the container, path on the daemon's host, read-only).
    :param host_config: the other ``create_host_config`` arguments: the options' limits and privileges.
    """

    name: str
    image: str
    command: list[str]
    labels: dict[str, str]
    environment: dict[str, str]
    user: str
    binds: list[tuple[str, str, bool]]
    host_config: dict[str, Any]

    def create(self, client: APIClient) -> str:
        """Create the container (not started); returns its id."""
        from docker.types import Mount

        mounts = [Mount(target, source, type="bind", read_only=ro) for target, source, ro in self.binds]
        container = client.create_container(
            self.image,
            command=self.command,
            name=self.name,
            labels=self.labels,
            environment=self.environment,
            working_dir=RUN_DIR,
            user=self.user,
            # Open stdin, closed after the first attach ends: the one the request is written to.
            stdin_open=True,
            detach=False,
            host_config=client.create_host_config(mounts=mounts or None, **self.host_config),
        )
        return str(container["Id"])


def container_spec(
    job: Job,
    image: EnvironmentImage,
    options: DockerOptions,
    *,
    transfer: str,
    user: str,
    work: Path,
    lib: Path,
) -> ContainerSpec:
    """The container of ``job`` in ``image``, running as ``user``; with ``bind`` transfer it mounts the run folder
    ``work`` and the supervisor's folder ``lib`` of the worker (``archive``: they are copied in)."""
    # Secret values go to the supervisor through stdin only (``supervisor_request``): the container's
    # configuration (docker inspect) holds the other variables.
    env = job_environment(
        replace(job, secret_environment_variables={}),
        run_dir=RUN_DIR,
        events_file=f"{RUN_DIR}/{CONTROL_DIR}/{EVENTS}",
        python=image.python,
    )
    env["PYTHONPATH"] = python_path(PYLIB_DIR, image.env.get("PYTHONPATH"))
    binds = [(RUN_DIR, str(work), False), (LIB_DIR, str(lib), True)] if transfer == "bind" else []
    return ContainerSpec(
        name=container_name(job.run_id),
        image=image.reference,
        command=[image.python, SUPERVISOR, f"{RUN_DIR}/{CONTROL_DIR}"],
        labels={
            LABEL_RUN_ID: job.run_id,
            LABEL_EXPERIMENT: job.experiment,
            LABEL_MANAGED_BY: "airflow-amlrun",
            LABEL_TRANSFER: transfer,
        },
        environment=env,
        user=user,
        binds=binds,
        host_config=options.host_config(),
    )


def started_container(client: APIClient, run_id: str) -> tuple[str, RunContainer] | None:
    """The container of run ``run_id`` that started, found by its label: its id and what it says of itself; None
    if there is none (or only one an earlier version started, which a retry cannot follow)."""
    from docker.errors import NotFound

    found = client.containers(all=True, filters={"label": f"{LABEL_RUN_ID}={run_id}"})
    for container in found:
        if container.get("State") == "created":
            # Never started: its task died between creating and starting it, or is between the two calls
            # right now (it has no handle yet). Either way there is no run to follow; the container is left
            # as it is (removing it here could pull it from under a live task: reconcile asks this even
            # with --dry-run), for whoever records the run lost to discard.
            log.info(
                "Container %s of run %s was created but never started: not followed",
                str(container["Id"])[:12],
                run_id,
            )
            continue
        try:
            config = client.inspect_container(container["Id"])["Config"]
        except NotFound:
            continue
        labels = config.get("Labels") or {}
        if labels.get(LABEL_TRANSFER) not in ("bind", "archive"):
            continue  # started by an earlier version: not followed (see DockerTarget.attachable)
        return str(container["Id"]), RunContainer(
            name=str((container.get("Names") or [container_name(run_id)])[0]).lstrip("/"),
            image=str(container.get("Image")),
            transfer=str(labels[LABEL_TRANSFER]),
            python=str((config.get("Cmd") or ["python3"])[0]),
            user=config.get("User") or None,
        )
    return None


def remove_never_started(client: APIClient, run_id: str) -> None:
    """Remove the containers of run ``run_id`` that were created but never started."""
    from docker.errors import NotFound

    found = client.containers(all=True, filters={"label": f"{LABEL_RUN_ID}={run_id}", "status": "created"})
    for container in found:
        with contextlib.suppress(NotFound):
            client.remove_container(container["Id"], force=True)
        log.info(
            "Removed container %s of run %s, which was created but never started",
            str(container["Id"])[:12],
            run_id,
        )
