"""The amlrun_docker connection: which daemon it names and how to reach it, checked before any run."""

from __future__ import annotations

import pytest

from airflow_amlrun.errors import ConfigurationError


def test_the_host_names_the_daemon_and_the_other_extras_are_run_options():
    from airflow_amlrun.hooks.docker_daemon import DockerDaemon

    daemon = DockerDaemon.from_connection("gpu_box", "tcp://gpu-box:2376", {"tls": True, "mem_limit": "8g"})

    assert daemon.base_url == "tcp://gpu-box:2376"
    assert daemon.tls and not daemon.local
    assert daemon.options == {"mem_limit": "8g"}


def test_an_empty_host_is_the_local_socket():
    from airflow_amlrun.hooks.docker_daemon import LOCAL_SOCKET, DockerDaemon

    daemon = DockerDaemon.from_connection("docker_here", "", {})
    assert daemon.base_url == LOCAL_SOCKET and daemon.local


def test_a_host_that_is_not_a_daemon_url_is_refused_with_the_forms_it_takes():
    from airflow_amlrun.hooks.docker_daemon import DockerDaemon

    with pytest.raises(ConfigurationError) as raised:
        DockerDaemon.from_connection("gpu_box", "gpu-box", {})
    assert str(raised.value) == (
        "Connection 'gpu_box' (type amlrun_docker): host 'gpu-box' is not a Docker daemon URL. Write it as "
        "unix:///var/run/docker.sock, tcp://HOST:2376 or ssh://USER@HOST."
    )


def test_a_tls_file_that_is_not_on_the_worker_is_refused_naming_it():
    from airflow_amlrun.hooks.docker_daemon import DockerDaemon

    with pytest.raises(ConfigurationError) as raised:
        DockerDaemon.from_connection("gpu_box", "tcp://gpu-box:2376", {"ca_cert": "/nowhere/ca.pem"})
    assert str(raised.value) == (
        "Connection 'gpu_box' (type amlrun_docker): extra 'ca_cert' names '/nowhere/ca.pem', which is not a file "
        "on this worker. Give the path of the PEM file here, or remove the extra."
    )


def test_a_client_certificate_without_its_key_is_refused(tmp_path):
    from airflow_amlrun.hooks.docker_daemon import DockerDaemon

    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here")
    with pytest.raises(ConfigurationError, match="give both client_cert and client_key"):
        DockerDaemon.from_connection("gpu_box", "tcp://gpu-box:2376", {"client_cert": str(cert)})


def test_without_a_connection_the_daemon_is_the_docker_clis_and_options_come_from_amlrun_docker_variables():
    from airflow_amlrun.hooks.docker_daemon import LOCAL_SOCKET, DockerDaemon

    daemon = DockerDaemon.from_environment(
        {"DOCKER_HOST": "tcp://10.0.0.7:2375", "AMLRUN_DOCKER_MEM_LIMIT": "8g", "AMLRUN_DOCKER_GPUS": ""}
    )

    assert (daemon.base_url, daemon.source, daemon.tls) == ("tcp://10.0.0.7:2375", "DOCKER_HOST", False)
    assert daemon.options == {"mem_limit": "8g"}  # an empty variable is no option
    assert DockerDaemon.from_environment({}).base_url == LOCAL_SOCKET
