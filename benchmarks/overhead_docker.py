"""Case module of benchmarks/overhead.py for the Docker target (``--targets docker``).

Both tasks run ``python3 train.py <seconds>`` in a container of the same image (amlrun-base:py3.11, made by
scripts/docker.sh), on the local Docker daemon, with ``airflow_amlrun.run_context`` importable from a
read-only mount:
- amlrun: ScriptRunOperator with compute_target="docker" (snapshot, run row, run directory bind-mounted,
  log streamed, metrics and outputs collected, container removed);
- baseline: the stock DockerOperator of apache-airflow-providers-docker, with the source folder mounted as
  the working directory, its log streamed into the task log, the container removed on success.
The image is on the daemon and the code is unchanged between rounds: what is measured is the target's
per-run overhead, not a build.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

BASELINE = "DockerOperator (apache-airflow-providers-docker) running the same command in the same image"

IMAGE = "amlrun-base:py3.11"
REPO = Path(__file__).resolve().parent.parent

AMLRUN = """
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG("overhead_docker_amlrun", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    ScriptRunOperator(
        task_id="train",
        experiment="overhead",
        config=ScriptRunConfig({source!r}, script="train.py", arguments=[{seconds!r}], compute_target="docker"),
    )
"""

BASELINE_DAG = """
import pendulum
from airflow.sdk import DAG
from airflow.providers.docker.operators.docker import DockerOperator
from docker.types import Mount

with DAG("overhead_docker_baseline", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    DockerOperator(
        task_id="train",
        image={image!r},
        command=["python3", "train.py", {seconds!r}],
        docker_url="unix:///var/run/docker.sock",
        mounts=[
            Mount(target="/src", source={source!r}, type="bind"),
            Mount(target="/amlrun/pylib", source={pylib!r}, type="bind", read_only=True),
        ],
        working_dir="/src",
        environment={{"PYTHONPATH": "/amlrun/pylib", "PYTHONUNBUFFERED": "1"}},
        mount_tmp_dir=False,
        auto_remove="success",
    )
"""


def prepare(root: Path, source: Path, seconds: float) -> tuple[str, str]:
    """Start the daemon and make the image (scripts/docker.sh), then the two DAGs."""
    from airflow_amlrun.targets.common import write_run_context_package

    subprocess.run([str(REPO / "scripts" / "docker.sh")], check=True, stdout=subprocess.DEVNULL)
    pylib = write_run_context_package(root / "docker-pylib")
    return (
        AMLRUN.format(source=str(source), seconds=str(seconds)),
        BASELINE_DAG.format(image=IMAGE, source=str(source), pylib=str(pylib), seconds=str(seconds)),
    )
