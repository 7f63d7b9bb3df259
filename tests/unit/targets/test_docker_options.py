"""The Docker target's run options, as a user writes them in an amlrun_docker connection's extras or the
worker's AMLRUN_DOCKER_* variables: read into what containers are made with, and refused before any run when
wrong."""

from __future__ import annotations

import os
from typing import Any

import pytest

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.targets.docker_options import DockerOptions


@pytest.fixture(autouse=True)
def _settings(amlrun_options: Any) -> None:
    amlrun_options()


def options(**values: Any) -> DockerOptions:
    return DockerOptions.from_mapping(values, where="connection 'gpu_box'")


def test_limits_and_gpus_become_the_containers_host_config():
    config = options(cpus="1.5", mem_limit="8g", shm_size="1g", gpus="all", network_mode="host").host_config()

    assert config["nano_cpus"] == 1_500_000_000
    assert (config["mem_limit"], config["shm_size"], config["network_mode"]) == ("8g", "1g", "host")
    assert config["device_requests"][0]["Count"] == -1
    assert config["device_requests"][0]["Capabilities"] == [["gpu"]]


def test_every_container_runs_unprivileged_under_an_init_without_the_capabilities_to_escalate():
    for config in (options().host_config(), options(cpus=2, gpus="1").host_config()):
        assert config["init"] is True and config["privileged"] is False
        assert config["cap_drop"] == ["MKNOD", "SETUID", "SETGID", "FSETID"]
        assert config["security_opt"] == ["no-new-privileges"]


def test_no_option_leaves_the_daemons_defaults():
    assert set(options().host_config()) == {"init", "privileged", "cap_drop", "security_opt"}


@pytest.mark.parametrize(
    ("gpus", "count", "ids"), [("all", -1, []), ("2", 2, []), ("device=0, 1", 0, ["0", "1"])]
)
def test_gpus_are_written_as_docker_run_takes_them(gpus, count, ids):
    [request] = options(gpus=gpus).device_requests()
    assert (request["Count"], request["DeviceIDs"]) == (count, ids)


@pytest.mark.skipif(os.getuid() != 0, reason="what a root worker does")
def test_a_root_worker_runs_the_images_user_unless_that_is_root():
    assert options().run_user(image_user="") == options().run_user(image_user="root") == "65534:65534"
    assert options().run_user(image_user="0:0") == "65534:65534"
    assert options().run_user(image_user="jovyan") == "jovyan"


@pytest.mark.skipif(os.getuid() == 0, reason="what a worker that is not root does")
def test_a_worker_that_is_not_root_runs_containers_as_itself():
    assert options().run_user(image_user="jovyan") == f"{os.getuid()}:{os.getgid()}"


def test_the_user_option_wins_even_for_root():
    assert options(user="0").run_user(image_user="jovyan") == "0"
    assert options(user="1000:1000").run_user(image_user="root") == "1000:1000"


def test_flags_and_choices_are_read_as_users_write_them():
    assert options().auto_remove is True
    assert options(auto_remove="false").auto_remove is False
    assert options(auto_remove=False).auto_remove is False  # a JSON value in the extras
    assert options().transfer == "auto" and options(transfer=" Archive ").transfer == "archive"
    assert options(cpus=2).cpus == 2.0 and options(cpus="").cpus is None


def test_the_default_images_come_from_the_amlrun_settings(amlrun_options):
    assert (options().default_image, options().default_image_base) == (
        "amlrun-base:py3.11",
        "python:3.11-slim",
    )
    amlrun_options(docker_default_image="registry.example.com/base:1", docker_default_image_base="")
    assert (options().default_image, options().default_image_base) == ("registry.example.com/base:1", "")


@pytest.mark.parametrize(
    ("values", "said"),
    [
        (
            {"privileged": True},
            "connection 'gpu_box': 'privileged' is not supported: a training script never needs the host's "
            "devices and kernel. Remove it; use 'gpus' for GPUs and 'shm_size' for shared memory.",
        ),
        (
            {"mem_limit": "lots"},
            "connection 'gpu_box': mem_limit = 'lots' is not a size; write e.g. '512m' or '8g'.",
        ),
        ({"shm_size": "half"}, "connection 'gpu_box': shm_size = 'half' is not a size"),
        ({"cpus": "two"}, "connection 'gpu_box': cpus = 'two' is not a number; write e.g. 2 or 1.5."),
        ({"cpus": "0"}, "connection 'gpu_box': cpus = '0' must be more than 0."),
        (
            {"gpus": "some"},
            "Docker option gpus = 'some' is not understood; write 'all', a count such as 2, or",
        ),
        ({"memory": "1g", "cpu": 2}, "connection 'gpu_box': unknown Docker option(s) cpu, memory; known: "),
        ({"transfer": "copy"}, "connection 'gpu_box': transfer = 'copy' is not one of auto, bind, archive"),
        ({"auto_remove": "maybe"}, "connection 'gpu_box': auto_remove = 'maybe' is not a boolean"),
    ],
)
def test_a_wrong_option_is_refused_naming_it_where_it_is_set_and_the_fix(values, said):
    with pytest.raises(ConfigurationError) as raised:
        options(**values)

    assert said in str(raised.value)
