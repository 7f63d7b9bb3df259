"""The Docker daemon a Docker target runs its containers on: where it listens, how to reach it, what went wrong.

It comes from an ``amlrun_docker`` connection (``DockerDaemon.from_connection``: its host and extras) or from
the worker's environment (``DockerDaemon.from_environment``: ``DOCKER_HOST``, as the docker CLI). Nothing here
imports Airflow: the Docker target runs without it (the CLI, a notebook, the benchmarks); the Airflow hook of
the connection type is ``airflow_amlrun.hooks.docker.AmlRunDockerHook``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow_amlrun.config import parse_flag
from airflow_amlrun.errors import ConfigurationError, TargetUnreachableError

if TYPE_CHECKING:
    from docker import APIClient, TLSConfig

LOCAL_SOCKET = "unix:///var/run/docker.sock"
# Seconds a call to the daemon may take; a build or a log stream sets its own.
DEFAULT_TIMEOUT_SECONDS = 60
# The extras that say how to reach the daemon; every other extra is a run option of the target.
TLS_EXTRAS = ("tls", "ca_cert", "client_cert", "client_key", "verify")


class DockerDaemonUnreachableError(ConfigurationError):
    """Nothing answered at the Docker daemon's URL before a run started there; carries the URL.

    The message says where the URL came from (``DOCKER_HOST`` or an ``amlrun_docker`` connection) and what to
    check: that the daemon runs and listens there, that this user may open its socket, and that the TLS files match.
    """

    def __init__(self, message: str, *, base_url: str) -> None:
        super().__init__(message)
        self.base_url = base_url


class DockerDaemonLostError(TargetUnreachableError):
    """The Docker daemon of a running container stopped answering for longer than the waiting task waits.

    The container goes on (or ended) on the daemon, untouched: the run is left unfinished for a retry to
    re-attach to, or for ``amlrun reconcile`` to settle. Carries the URL.
    """

    def __init__(self, message: str, *, base_url: str) -> None:
        super().__init__(message)
        self.base_url = base_url


@dataclass(frozen=True)
class DockerDaemon:
    """Where a Docker daemon listens and how to reach it, plus the run options given beside it.

    :param base_url: the daemon's URL, e.g. ``unix:///var/run/docker.sock`` or ``tcp://gpu-box:2376``.
    :param tls: a ``docker.TLSConfig``, True for TLS with the system's CAs, or False.
    :param source: where the settings come from, for error messages ("connection 'x'", "DOCKER_HOST").
    :param options: the remaining extras (or ``AMLRUN_DOCKER_*`` variables): the target's run options.
    """

    base_url: str
    tls: TLSConfig | bool = False
    source: str = "the local Docker daemon"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        """Whether the daemon listens on a unix socket of this machine. It may still not see this machine's
        files (a worker in a container of its own): the Docker target checks before it bind-mounts."""
        return self.base_url.startswith(("unix://", "/"))

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> DockerDaemon:
        """The daemon the docker CLI would use: ``DOCKER_HOST`` (with ``DOCKER_TLS_VERIFY`` and
        ``DOCKER_CERT_PATH``), else the local socket; run options from ``AMLRUN_DOCKER_<OPTION>``."""
        from docker.utils import kwargs_from_env

        env = dict(os.environ if environ is None else environ)
        kwargs = kwargs_from_env(environment=env)
        base_url = str(kwargs.get("base_url") or LOCAL_SOCKET)
        options = {
            key[len("AMLRUN_DOCKER_") :].lower(): value
            for key, value in env.items()
            if key.startswith("AMLRUN_DOCKER_") and value != ""
        }
        source = "DOCKER_HOST" if env.get("DOCKER_HOST") else "the local Docker daemon"
        return cls(base_url=base_url, tls=kwargs.get("tls") or False, source=source, options=options)

    @classmethod
    def from_connection(cls, conn_id: str, host: str | None, extras: dict[str, Any]) -> DockerDaemon:
        """The daemon named by an ``amlrun_docker`` connection: host is its URL, TLS files are extras.

        :param conn_id: the connection's id, for messages.
        :param host: the connection's host, a daemon URL; empty means the local socket.
        :param extras: ``ca_cert``, ``client_cert``, ``client_key`` (paths on the worker), ``verify``
            (default true), ``tls`` (TLS without client certificates); the rest are run options.
        """
        base_url = (host or "").strip() or LOCAL_SOCKET
        if "://" not in base_url and not base_url.startswith("/"):
            raise ConfigurationError(
                f"Connection {conn_id!r} (type amlrun_docker): host {base_url!r} is not a Docker daemon URL. "
                "Write it as unix:///var/run/docker.sock, tcp://HOST:2376 or ssh://USER@HOST."
            )
        tls = _tls_config(conn_id, extras)
        options = {k: v for k, v in extras.items() if k not in TLS_EXTRAS}
        return cls(base_url=base_url, tls=tls, source=f"connection {conn_id!r}", options=options)

    def connect(self, *, timeout: float | None = DEFAULT_TIMEOUT_SECONDS, version: str = "auto") -> APIClient:
        """A client of the daemon; asks the daemon its API version, so an absent daemon fails here, clearly.

        :param timeout: seconds a call may take; None for none (a log stream that may be quiet for hours).
        :param version: the API version; ``"auto"`` asks the daemon (one call).
        """
        from docker import APIClient
        from docker.errors import DockerException

        try:
            return APIClient(base_url=self.base_url, tls=self.tls, timeout=timeout, version=version)
        except DockerException as err:
            raise DockerDaemonUnreachableError(
                self.unreachable_message(err), base_url=self.base_url
            ) from None

    def unreachable_message(self, err: BaseException) -> str:
        """What to tell a user whose daemon does not answer: the URL, where it came from, and what to do."""
        detail = str(err).split("\n")[0]
        if self.local:
            fix = (
                "Start the daemon on this machine (systemctl start docker, or `dockerd &`; the project's "
                "scripts/docker.sh does it), check that this user may open the socket, or point DOCKER_HOST "
                "(or an amlrun_docker connection) at a daemon that runs."
            )
        else:
            fix = (
                "Check that the daemon runs on that host and listens on that address, that the TLS files "
                "(extras ca_cert, client_cert, client_key) match it, and that this worker can reach it."
            )
        return f"The Docker daemon at {self.base_url} ({self.source}) is not reachable: {detail}. {fix}"

    def lost(self, err: BaseException, *, container: str, waited: float) -> DockerDaemonLostError:
        """The error of a task that gave up on this daemon, which runs its run's ``container``, after it did not
        answer for ``waited`` seconds."""
        waiting = f"It has not answered for {waited:.0f} s. " if waited >= 1 else ""
        return DockerDaemonLostError(
            f"{self.unreachable_message(err)} {waiting}The run's container {container} is left as "
            "it is there, and the run unfinished: a retry of this task re-attaches to the container once the "
            "daemon answers (or records how it ended meanwhile), and amlrun reconcile settles it if no retry comes.",
            base_url=self.base_url,
        )


def _tls_config(conn_id: str, extras: dict[str, Any]) -> TLSConfig | bool:
    ca_cert, client_cert, client_key = (
        extras.get(k) or None for k in ("ca_cert", "client_cert", "client_key")
    )
    verify = parse_flag(extras.get("verify", True), f"connection {conn_id!r}: extra 'verify'")
    for key, path in (("ca_cert", ca_cert), ("client_cert", client_cert), ("client_key", client_key)):
        if path is not None and not os.path.isfile(str(path)):
            raise ConfigurationError(
                f"Connection {conn_id!r} (type amlrun_docker): extra {key!r} names {path!r}, which is not a file "
                "on this worker. Give the path of the PEM file here, or remove the extra."
            )
    if bool(client_cert) != bool(client_key):
        raise ConfigurationError(
            f"Connection {conn_id!r} (type amlrun_docker): give both client_cert and client_key (the client's "
            "certificate and its key), or neither."
        )
    if ca_cert and client_cert and client_key:
        # The provider's own constructor, which knows which TLSConfig arguments this docker SDK takes. Only a
        # connection gets here, and Airflow, which resolved it, is loaded already.
        from airflow.providers.docker.hooks.docker import DockerHook

        return DockerHook.construct_tls_config(
            ca_cert=str(ca_cert), client_cert=str(client_cert), client_key=str(client_key), verify=verify
        )
    if ca_cert or client_cert or parse_flag(extras.get("tls", False), f"connection {conn_id!r}: extra 'tls'"):
        from docker import TLSConfig

        return TLSConfig(
            ca_cert=str(ca_cert) if ca_cert else None,
            client_cert=(str(client_cert), str(client_key)) if client_cert else None,
            verify=str(ca_cert) if (ca_cert and verify) else verify,
        )
    return False
