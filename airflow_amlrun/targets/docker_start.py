"""How a Docker run's code and the supervisor get into its container, and how the container starts.

How ``run/`` gets into its container and back (``transfer``, chosen once per process and daemon by
``choose_transfer``):
- ``bind``: the daemon sees the worker's files (a local socket, the worker not itself in a container):
  ``run/`` is bind-mounted, copying nothing; the worker reads the events file there while the run goes on,
  and takes ``outputs/`` and ``logs/`` out of it once the container ended.
- ``archive``: any other daemon (remote, or local to a worker that runs in a container of its own, as with
  docker-compose): ``run/`` goes in as one tar (``put_archive``) before the container starts; a thread
  copies the events file by offset while the run goes on (the image's Python, run with ``exec``, prints what
  is new: n bytes of metrics cost O(n)), and ``outputs/`` and ``logs/`` come back with ``get_archive``.
- ``auto`` (the default): ``bind`` for a daemon on a unix socket that sees the runs folder (checked once per
  process and daemon, with a probe file and a container that is created but never started), else
  ``archive``.

A container that runs as another user than the worker's gets ``run/`` handed over (``open_to``): a root worker
gives it to that user, another worker makes the folders the script writes in writable by every user (they lie in
``<runs>/<run id>``, which only the worker's user may enter). With ``archive`` the tar says who owns the files.

The supervisor's folder (``/amlrun/lib``) is the worker's, kept in its cache, one per version of those files
(``docker_lib``): ``start_container`` creates, fills and starts the container while the caller holds it, and
the other versions' folders are removed once no container uses them (``remove_unused_libs``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.targets.common import CONTROL_DIR
from airflow_amlrun.targets.docker_files import hand_over
from airflow_amlrun.targets.docker_lib import remove_unused
from airflow_amlrun.targets.docker_transfer import daemon_sees, run_dir_archive, send_and_close, user_ids

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_amlrun.environment.image_recipe import EnvironmentImage
    from airflow_amlrun.hooks.docker_daemon import DockerDaemon
    from airflow_amlrun.targets.docker_spec import ContainerSpec

log = logging.getLogger(__name__)


def choose_transfer(
    client: Callable[[], APIClient],
    daemon: DockerDaemon,
    runs_dir: Path,
    probe_images: tuple[str | None, ...],
    *,
    wanted: str,
    where: str,
) -> str | None:
    """How runs reach ``daemon`` (``bind`` or ``archive``) for the ``transfer`` option ``wanted``; None when it
    cannot be told yet (``auto`` or ``bind`` on a daemon with none of the images to probe with, nor any other).

    :param client: the daemon's client, asked for only if the daemon must be probed.
    :param probe_images: images to probe the daemon with, if it has one of them (else any other it has).
    :param where: where the options come from, for the error of a ``bind`` the daemon cannot make.
    """
    if wanted == "archive" or (wanted == "auto" and not daemon.local):
        return "archive"
    sees = daemon_sees(client(), daemon.base_url, runs_dir.resolve(), probe_images)
    if sees is None:
        return None
    if not sees and wanted == "bind":
        raise ConfigurationError(
            f"Docker option transfer = 'bind' ({where}), but the Docker daemon at {daemon.base_url} "
            f"does not see this worker's runs folder {runs_dir.resolve()}: a file written there is not "
            "in a container that bind-mounts it. The worker probably runs in a container of its own (e.g. "
            "docker-compose with the host's socket mounted). Set transfer to 'archive' (or 'auto'), or "
            "mount the runs folder at the same path on the daemon's host."
        )
    if not sees:
        log.info(
            "The Docker daemon at %s does not see the runs folder %s: runs are copied into their containers",
            daemon.base_url,
            runs_dir.resolve(),
        )
    return "bind" if sees else "archive"


class Owners:
    """The uid and gid of each container user of each image, as the image's own /etc/passwd says for a name:
    asked of the daemon once per process.

    :param client: the daemon's client (which connects when first asked).
    :param option: where the ``user`` option is set, if it is (else a container's user is the image's USER, or
        the worker's), for the error when an image has no such user.
    """

    def __init__(self, client: Callable[[], APIClient], *, option: str | None) -> None:
        self._client = client
        self._option = option
        self._known: dict[tuple[str, str], tuple[int, int]] = {}

    def of(self, image: EnvironmentImage, user: str) -> tuple[int, int]:
        """The uid and gid of the container user ``user`` in ``image``."""
        key = (image.image_id, user)
        if key not in self._known:
            where = (
                f"Docker option user ({self._option})" if self._option else f"the USER of {image.reference}"
            )
            self._known[key] = user_ids(self._client(), image.image_id, user, where=where)
        return self._known[key]


def open_to(work: Path, owner: tuple[int, int]) -> None:
    """Make the run folder ``work``, bind-mounted into a container whose user is ``owner``, writable by that user."""
    uid, gid = owner
    if uid == os.getuid():
        return
    if os.getuid() == 0:
        hand_over(work, uid, gid)
        return
    # A worker that is not root cannot give its files to another user: the folders the script writes in
    # are made writable by every user instead. That opens them to no one else: they lie in <runs>/<run id>,
    # which only the worker's user may enter (0700), while the container reaches them through its mount.
    for folder in (work, work / "outputs", work / "logs", work / CONTROL_DIR):
        folder.chmod(0o777)


def start_container(
    client: APIClient,
    spec: ContainerSpec,
    request: bytes,
    *,
    copy_in: tuple[Path, Path] | None,
    owner: Callable[[], tuple[int, int]],
) -> str:
    """Create the container, copy the run into it, start it and write the supervisor's ``request`` to its stdin;
    returns its id. A container that did not start is removed again.

    :param copy_in: with ``archive`` transfer, the run folder and the supervisor's folder, copied in as one tar
        (the run's files owned by the container's user, ``owner``); None for ``bind``, whose caller holds the
        supervisor's folder (``docker_lib.lib_folder``) all along: a cleanup relies on no container starting
        outside it.
    """
    container_id = spec.create(client)
    try:
        if copy_in is not None:
            work, lib = copy_in
            with run_dir_archive(work, lib, owner=owner()) as archive:
                client.put_archive(container_id, "/", archive)
        stdin = client.attach_socket(container_id, params={"stdin": 1, "stream": 1})
        try:
            client.start(container_id)
            send_and_close(stdin, request)
        finally:
            with contextlib.suppress(OSError):
                stdin.close()
    except BaseException:
        with contextlib.suppress(Exception):
            client.remove_container(container_id, force=True)
        raise
    return container_id


def remove_unused_libs(cache_dir: Path, *, keep: Path, clients: Mapping[str, APIClient]) -> None:
    """Remove the supervisor's folders of other versions that no run uses any more (see ``docker_lib``)."""
    try:
        remove_unused(cache_dir, keep=keep, clients=clients)
    except Exception:  # housekeeping never fails a run, which has started by now
        log.warning("Could not remove the supervisor's folders of other versions", exc_info=True)
