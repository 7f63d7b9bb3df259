"""The `amlrun_docker` connection type: a Docker daemon that runs training scripts.

A connection of this type names the daemon (host: ``unix:///var/run/docker.sock``, ``tcp://host:2376``,
``ssh://user@host``) and how to reach it (TLS files in the extras); the extras also carry the run options of
the Docker target (cpus, mem_limit, ...; see ``airflow_amlrun.targets.docker_options.DockerOptions``). The stock
``docker`` connection type of apache-airflow-providers-docker names a *registry* instead, which is why this
provider has a type of its own; the hook itself is the provider's ``DockerHook``, pointed at the daemon.

The daemon itself (its URL, its TLS files, its errors) is ``airflow_amlrun.hooks.docker_daemon.DockerDaemon``,
which the Docker target uses without importing Airflow; only this hook does.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.docker.hooks.docker import DockerHook

# Named here too, where they were before the daemon had a module of its own: code that imports them from here
# goes on working.
from airflow_amlrun.hooks.docker_daemon import (
    DEFAULT_TIMEOUT_SECONDS,
    LOCAL_SOCKET,
    TLS_EXTRAS,
    DockerDaemon,
    DockerDaemonLostError,
    DockerDaemonUnreachableError,
)

if TYPE_CHECKING:
    from docker import APIClient


class AmlRunDockerHook(DockerHook):
    """A Docker daemon that runs training scripts, named by an ``amlrun_docker`` connection.

    The provider's ``DockerHook`` talks to the daemon; this hook reads the daemon's URL from the connection's
    host and its TLS files from the extras (``ca_cert``, ``client_cert``, ``client_key``, ``verify``), where
    the provider's hook takes them as arguments. Use the connection's id as ``compute_target`` to run there.

    :param amlrun_docker_conn_id: id of the connection.
    :param timeout: seconds a call to the daemon may take.
    """

    conn_name_attr = "amlrun_docker_conn_id"
    default_conn_name = "amlrun_docker_default"
    conn_type = "amlrun_docker"
    hook_name = "AML Run Docker daemon"

    def __init__(
        self, amlrun_docker_conn_id: str = default_conn_name, *, timeout: int = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        self.amlrun_docker_conn_id = amlrun_docker_conn_id
        conn = self.get_connection(amlrun_docker_conn_id)
        self.daemon = DockerDaemon.from_connection(amlrun_docker_conn_id, conn.host, conn.extra_dejson)
        super().__init__(
            docker_conn_id=None,  # no registry login: the connection names a daemon, not a registry
            base_url=self.daemon.base_url,
            version="auto",
            tls=self.daemon.tls,
            timeout=timeout,
        )
        self._timeout = timeout

    @cached_property
    def api_client(self) -> APIClient:
        """A ``docker.APIClient`` of the daemon; an unreachable daemon raises an error naming its URL."""
        client = self.daemon.connect(timeout=self._timeout)
        self._client_created = True
        return client

    def test_connection(self) -> tuple[bool, str]:
        """Ask the daemon its version (the UI's Test button)."""
        try:
            info = self.api_client.version()
        except Exception as err:
            return False, str(err)
        return True, f"Docker {info.get('Version')} (API {info.get('ApiVersion')}) at {self.daemon.base_url}"

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "login", "password", "port"],
            "relabeling": {"host": "Docker daemon URL"},
            "placeholders": {
                "host": "unix:///var/run/docker.sock or tcp://gpu-box:2376",
                "extra": json.dumps(
                    {
                        "ca_cert": "/etc/docker-certs/ca.pem",
                        "client_cert": "/etc/docker-certs/cert.pem",
                        "client_key": "/etc/docker-certs/key.pem",
                        "verify": True,
                        "cpus": 2,
                        "mem_limit": "8g",
                        "shm_size": "1g",
                        "gpus": "all",
                        "transfer": "auto",
                    },
                    indent=2,
                ),
            },
        }


__all__ = [
    "LOCAL_SOCKET",
    "TLS_EXTRAS",
    "AmlRunDockerHook",
    "DockerDaemon",
    "DockerDaemonLostError",
    "DockerDaemonUnreachableError",
]
