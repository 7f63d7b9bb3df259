"""What a container can reach of the worker that runs it: nothing outside its run, and no secret in its config.

Real containers on the real Docker Engine; the hostile ones plant links to files of the worker (whose paths
the test hands them) where the worker reads, writes and collects.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import site
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from tests.conftest import REPO, wait_until_running, write_script
from tests.integration.docker_engine import containers_of

pytest_plugins = ["tests.integration.docker_engine"]

PLANTER = """
import os, shutil, sys, time
from airflow_amlrun.run_context import Run

host = os.environ["HOST_DIR"]  # a folder of the worker's machine, not of this container
Run.get_context().log("planted", 1)
open("outputs/model.txt", "w").write("weights")


def plant(link, target):
    tmp = link + ".tmp"
    os.symlink(target, tmp)
    if os.path.isdir(link) and not os.path.islink(link):
        shutil.rmtree(link)
    os.replace(tmp, link)


plant("outputs/x", f"{host}/secret.txt")
plant(".amlrun/events.jsonl", f"{host}/events.jsonl")
plant(".amlrun/std_log.txt", f"{host}/victim.txt")
plant("logs", f"{host}/logs")
print("planted every link", flush=True)
time.sleep(1.5)  # the worker reads the run a few times meanwhile
"""


@pytest.mark.parametrize("transfer", ["bind", "archive"])
def test_a_container_cannot_make_the_worker_read_write_or_upload_its_files(
    docker_home, tmp_path, caplog, monkeypatch, transfer
):
    # Files of the worker's machine that a container knows the paths of.
    host = tmp_path / "host"
    (host / "logs").mkdir(parents=True)
    (host / "secret.txt").write_text("HOST-SECRET: the worker's airflow.cfg\n")
    (host / "events.jsonl").write_text(
        '{"kind": "metric", "name": "stolen", "value": 1}\nHOST-EVENTS: not for the task log\n'
    )
    (host / "victim.txt").write_text("HOST-VICTIM: must stay as it is\n" * 100)
    (host / "logs" / "leak.txt").write_text("HOST-LOGS: a file of the worker's log folder\n")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in host.rglob("*") if p.is_file()}
    monkeypatch.setenv("AMLRUN_DOCKER_TRANSFER", transfer)
    write_script(tmp_path / "src", "train.py", PLANTER)
    config = ScriptRunConfig(
        tmp_path / "src",
        script="train.py",
        compute_target="docker",
        environment_variables={"HOST_DIR": str(host)},
    )
    lines: list[str] = []
    caplog.set_level("INFO", logger="airflow_amlrun")

    record = Experiment(Workspace.get(), "planted").submit(config).wait_for_completion(output=lines.append)

    assert record.status == "Completed", record.error
    assert "planted every link" in lines
    # Nothing of the worker's files was written...
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in host.rglob("*") if p.is_file()}
    assert after == before
    # ... read into the task log or the history...
    task_log = "\n".join(lines) + caplog.text
    assert "HOST-" not in task_log
    assert Workspace.get().history.get_metrics(record.id, "stolen") == []
    # ... or uploaded.
    uploaded = {
        p.relative_to(record.outputs_uri).as_posix(): p.read_text() for p in _files(record.outputs_uri)
    }
    assert uploaded == {"model.txt": "weights"}
    logs = {p.relative_to(record.logs_uri).as_posix(): p.read_text() for p in _files(record.logs_uri)}
    assert list(logs) == ["std_log.txt"]
    assert "planted every link" in logs["std_log.txt"] and "HOST-" not in logs["std_log.txt"]
    # The task log says what was left out.
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("outputs/x" in w and "not collected" in w for w in warnings), warnings
    assert any("logs" in w and "not collected" in w for w in warnings), warnings
    assert any(".amlrun/events.jsonl" in w and "not read" in w for w in warnings), warnings


def test_secret_variables_are_in_no_docker_inspect_of_the_running_container(docker_home, tmp_path):
    secret = "s3cr3t-that-docker-inspect-must-not-show"
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os, time
        print("token matches:", os.environ["API_TOKEN"] == os.environ["EXPECTED"][::-1], flush=True)
        time.sleep(2)
        """,
    )
    config = ScriptRunConfig(
        tmp_path / "src",
        script="train.py",
        compute_target="docker",
        environment_variables={"EXPECTED": secret[::-1]},
        secret_environment_variables={"API_TOKEN": secret},
    )
    lines: list[str] = []
    inspected: list[dict[str, Any]] = []

    def inspect_while_it_runs() -> None:
        def running(run: Any) -> bool:
            return any(c["State"] == "running" for c in containers_of(docker_home, run.id))

        run = wait_until_running(also=running)
        if run is not None:
            inspected.append(docker_home.inspect_container(containers_of(docker_home, run.id)[0]["Id"]))

    watcher = threading.Thread(target=inspect_while_it_runs)
    watcher.start()
    record = Experiment(Workspace.get(), "secret").submit(config).wait_for_completion(output=lines.append)
    watcher.join()

    assert record.status == "Completed", record.error
    assert "token matches: True" in lines
    [info] = inspected
    assert info["State"]["Running"]
    assert not any(item.startswith("API_TOKEN=") for item in info["Config"]["Env"])
    assert secret not in json.dumps(info)


# Point 16: a worker that is not root


WORKER_USER = "amlrun-docker-worker"

SUBMIT = """
import json, sys
from airflow_amlrun import Experiment, ScriptRunConfig, Workspace

config = ScriptRunConfig(sys.argv[1], script="train.py", compute_target="docker")
record = Experiment(Workspace.get(), "unprivileged").submit(config).wait_for_completion(show_output=False)
print(json.dumps({"id": record.id, "status": record.status, "outputs_uri": record.outputs_uri,
                  "logs_uri": record.logs_uri}))
"""


@pytest.fixture(scope="module")
def unprivileged_worker() -> Iterator[pwd.struct_passwd]:
    """A user of this machine that is not root and may use the Docker socket (group docker), as a worker."""
    if os.getuid() != 0:
        pytest.fail("this test makes a user of the machine, which needs root: run the suite as root")
    socket_group = grp.getgrgid(os.stat("/var/run/docker.sock").st_gid).gr_name
    if socket_group == "root":
        pytest.fail(
            "/var/run/docker.sock belongs to group root: start dockerd with its default group (docker)"
        )
    made = subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", socket_group, WORKER_USER],
        capture_output=True,
        text=True,
    )
    if made.returncode not in (0, 9):  # 9: it exists already (an interrupted session)
        pytest.fail(f"useradd {WORKER_USER} failed: {made.stderr}")
    try:
        yield pwd.getpwnam(WORKER_USER)
    finally:
        subprocess.run(["userdel", WORKER_USER], capture_output=True)


def test_a_non_root_worker_removes_what_its_container_wrote(docker_api, unprivileged_worker):
    user = unprivileged_worker
    home = Path(tempfile.mkdtemp(prefix="amlrun-unprivileged-"))
    try:
        home.chmod(0o755)
        write_script(
            home / "src",
            "train.py",
            """
            import os
            os.makedirs("outputs/checkpoints", exist_ok=True)
            open("outputs/checkpoints/epoch1.bin", "wb").write(b"weights")
            os.makedirs("scratch/cache", exist_ok=True)
            open("scratch/cache/shard0", "wb").write(b"data")
            print("running as", os.getuid(), os.getgid(), flush=True)
            """,
        )
        state = home / "worker"
        state.mkdir()
        os.chown(state, user.pw_uid, user.pw_gid)
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(state),
            "AIRFLOW_HOME": str(state / "airflow"),
            "AIRFLOW__AMLRUN__HOME": str(state / "amlrun"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }

        env["PYTHONPATH"] = os.pathsep.join([*_site_packages(), str(REPO)])
        done = subprocess.run(
            [_python_for(user), "-c", SUBMIT, str(home / "src")],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[os.stat("/var/run/docker.sock").st_gid],
            env=env,
            cwd=state,
            capture_output=True,
            text=True,
            timeout=300,
        )

        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads(done.stdout.strip().splitlines()[-1])
        assert record["status"] == "Completed"
        assert Path(record["outputs_uri"], "checkpoints", "epoch1.bin").read_bytes() == b"weights"
        # The run directory, with what the script made in it, is gone once the run was collected.
        runs = state / "amlrun" / "runs"
        assert not (runs / record["id"]).exists(), sorted(str(p) for p in (runs / record["id"]).rglob("*"))
        # The image's Python ran the script as the worker's own user.
        std_log = Path(record["logs_uri"], "std_log.txt").read_text()
        assert f"running as {user.pw_uid} {user.pw_gid}" in std_log
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _python_for(user: pwd.struct_passwd) -> str:
    """An interpreter of this Python's version that the user may run (this one may sit in root's home)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                user=user.pw_uid,
                capture_output=True,
                text=True,
            )
        except OSError:  # not there, or not for this user
            continue
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    pytest.fail(
        f"no Python {version} that user {user.pw_name} may run (tried {sys.executable}, /usr/bin, /usr/local/bin)"
    )


def _site_packages() -> list[str]:
    """This virtualenv's packages, for another interpreter of the same version."""
    return [p for p in site.getsitepackages() if os.access(p, os.R_OK)]


def _files(root: str | None) -> list[Path]:
    assert root is not None
    return sorted(p for p in Path(root).rglob("*") if p.is_file())
