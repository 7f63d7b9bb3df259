"""What a container can reach of the worker that runs it: nothing outside its run, no secret in its config,
no device and no privilege on the worker's machine.

Real containers on the real Docker Engine; the hostile ones plant links where the worker reads, writes and
collects, to files of the worker (whose paths the test hands them) and to files of their own image, or make
setuid programs, devices, FIFOs and sockets in their run folder.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import site
import stat
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

# A folder of the worker's machine. The container makes one of its own at the same path, with files of the
# same names: every link below leads to a real file wherever it is followed, on the worker (bind) or in the
# container (archive, where the daemon packs outputs/ and logs/).
host = os.environ["HOST_DIR"]
os.makedirs(f"{host}/logs", exist_ok=True)
open(f"{host}/secret.txt", "w").write("INSIDE-SECRET: a file of the container, outside its run\\n")
open(f"{host}/events.jsonl", "w").write('{"kind": "metric", "name": "stolen", "value": 2}\\n')
open(f"{host}/logs/leak.txt", "w").write("INSIDE-LOGS: a file of the container, outside its run\\n")
Run.get_context().log("planted", 1)
open("outputs/model.txt", "w").write("weights")


def plant(link, target):
    tmp = link + ".tmp"
    os.symlink(target, tmp)
    if os.path.isdir(link) and not os.path.islink(link):
        shutil.rmtree(link)
    os.replace(tmp, link)


plant("outputs/x", f"{host}/secret.txt")
plant("outputs/passwd", "/etc/passwd")  # the image's, in the container; the worker's own, on the worker
plant("outputs/up", "../../../../etc/passwd")
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
    # ... and nothing outside the run, of the worker or of the container, was read into the task log or the
    # history...
    task_log = "\n".join(lines) + caplog.text
    assert "HOST-" not in task_log and "INSIDE-" not in task_log and "root:x:0:0" not in task_log
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
    for left_out in ("outputs/x", "outputs/passwd", "outputs/up", "logs"):
        assert any(left_out in w and "not collected" in w for w in warnings), (left_out, warnings)
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


ESCALATE = """
import os, shutil, socket, stat, sys

print("running as", os.getuid(), os.getgid(), flush=True)
os.makedirs("scratch", exist_ok=True)
shutil.copy("/bin/sh", "scratch/rootsh")
os.chmod("scratch/rootsh", 0o6755)  # setuid and setgid: whoever runs it would be this container's user
os.chmod("scratch", 0o2775)
os.mkfifo("scratch/fifo")
socket.socket(socket.AF_UNIX).bind("scratch/socket")
try:
    major, minor = (int(n) for n in os.environ["HOST_DISK"].split(":"))
    os.mknod("scratch/disk", 0o666 | stat.S_IFBLK, os.makedev(major, minor))
    print("mknod: made the host's disk device", flush=True)
except OSError as err:
    print("mknod:", err.strerror, flush=True)
sys.exit(3)  # a failed run: its folder is kept (cleanup = on_success), for a look
"""


@pytest.mark.parametrize("user", ["root", "default"])
def test_a_container_leaves_no_device_and_no_setuid_program_on_the_worker(
    docker_home, amlrun_home, tmp_path, caplog, monkeypatch, user
):
    if os.getuid() != 0:
        pytest.fail("this test needs a worker running as root (the case where the container's user is root)")
    if user == "root":
        monkeypatch.setenv("AMLRUN_DOCKER_USER", "0")  # the worst case: root in the container
    disk = os.stat(tmp_path).st_dev
    write_script(tmp_path / "src", "train.py", ESCALATE)
    config = ScriptRunConfig(
        tmp_path / "src",
        script="train.py",
        compute_target="docker",
        environment_variables={"HOST_DISK": f"{os.major(disk)}:{os.minor(disk)}"},
    )
    lines: list[str] = []
    caplog.set_level("INFO", logger="airflow_amlrun")

    record = (
        Experiment(Workspace.get(), "escalate")
        .submit(config)
        .wait_for_completion(output=lines.append, raise_on_error=False)
    )

    assert record.status == "Failed" and "exit code 3" in record.error
    # The container could make no device node...
    assert "mknod: Operation not permitted" in lines
    # ... and its kept run folder holds no special file and no setuid or setgid bit...
    run_dir = amlrun_home / "runs" / record.id
    kept = {p.relative_to(run_dir).as_posix(): os.lstat(p).st_mode for p in run_dir.rglob("*")}
    assert "run/scratch/rootsh" in kept
    assert {p: stat.filemode(m) for p, m in kept.items() if m & (stat.S_ISUID | stat.S_ISGID)} == {}
    special = [p for p, m in kept.items() if not (stat.S_ISREG(m) or stat.S_ISDIR(m) or stat.S_ISLNK(m))]
    assert special == []
    # ... in a folder only the worker's user may enter: another user of the machine runs nothing there.
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    tried = subprocess.run(
        ["runuser", "-u", "nobody", "--", str(run_dir / "run" / "scratch" / "rootsh"), "-p", "-c", "id -u"],
        capture_output=True,
        text=True,
    )
    assert tried.returncode != 0 and tried.stdout.strip() != "0", tried
    # A root worker runs the image's root user as nobody unless told otherwise.
    assert ("running as 0 0" if user == "root" else "running as 65534 65534") in lines
    # The task log says what was removed and cleared.
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "run/scratch/rootsh had its setuid and setgid bits: cleared" in warnings
    assert "run/scratch/fifo was a FIFO: it was removed" in warnings
    assert "run/scratch/socket was a socket: it was removed" in warnings


@pytest.mark.parametrize("transfer", ["bind", "archive"])
def test_a_container_user_given_by_name_gets_its_run_folder_open_to_it_alone(
    docker_home, amlrun_home, tmp_path, monkeypatch, transfer
):
    monkeypatch.setenv("AMLRUN_DOCKER_USER", "nobody")  # a name of the image's /etc/passwd
    monkeypatch.setenv("AMLRUN_DOCKER_TRANSFER", transfer)
    monkeypatch.setenv("AIRFLOW__AMLRUN__CLEANUP", "never")
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os, stat
        print("running as", os.getuid(), os.getgid(), flush=True)
        for folder in (".", "outputs", "logs", ".amlrun"):
            print("mode of", folder, oct(stat.S_IMODE(os.stat(folder).st_mode)), flush=True)
        os.makedirs("scratch", exist_ok=True)
        open("scratch/cache", "w").write("a file in the working directory")
        open("outputs/model.txt", "w").write("weights")
        """,
    )
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")
    lines: list[str] = []

    record = Experiment(Workspace.get(), "by-name").submit(config).wait_for_completion(output=lines.append)

    assert record.status == "Completed", record.error
    assert "running as 65534 65534" in lines
    assert Path(record.outputs_uri, "model.txt").read_text() == "weights"
    # The script writes in folders that are its user's, not in folders every user may write to.
    modes = {line.split()[2]: int(line.split()[3], 8) for line in lines if line.startswith("mode of")}
    assert {folder: oct(mode) for folder, mode in modes.items() if mode & 0o002} == {}
    kept = amlrun_home / "runs" / record.id
    assert [p for p in kept.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o002] == []


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
