"""A DAG author's view of the SSH target: an `ssh` connection to a real sshd on a host (network namespace)
of its own, real runs on it, a real cut of its network link."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_amlrun import Environment, Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.environment import PythonSection
from airflow_amlrun.run import AirflowTask
from tests.conftest import worker_dies_mid_run, write_script
from tests.integration.sshd_host import SshdHost, start_sshd_host

pytestmark = pytest.mark.usefixtures("airflow_db")

CONN_ID = "ssh_vm"


@pytest.fixture(scope="session")
def ssh_host() -> Iterator[SshdHost]:
    """The remote VM: sshd in a network namespace with its own address, user and host key."""
    if os.geteuid() != 0:
        pytest.skip("the SSH host needs root (ip netns, useradd, sshd)")
    host = start_sshd_host(user="amlrun-remote", subnet=0)
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def ssh_vm(ssh_host: SshdHost, amlrun_home: Path, monkeypatch: pytest.MonkeyPatch) -> SshdHost:
    """The Airflow connection `ssh_vm` to the host, with nothing but what any ssh connection has."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_host.connection())
    return ssh_host


def remote_base(host: SshdHost) -> Path:
    return host.home / ".amlrun"


DAG = """
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    ScriptRunOperator(
        task_id="train",
        config=ScriptRunConfig(
            {source!r},
            script="train.py",
            compute_target={target!r},
            max_run_duration_seconds={limit!r},
            secret_environment_variables={secrets!r},
        ),
        arguments={arguments!r},
    )
"""


def dag_source(
    source: Path,
    *,
    arguments: object = None,
    limit: float | None = None,
    target: str = CONN_ID,
    secret_variables: dict[str, str] | None = None,
) -> str:
    return DAG.format(
        source=str(source), arguments=arguments, limit=limit, target=target, secrets=secret_variables or {}
    )


TRAIN = """
import os, sys
from airflow_amlrun.run_context import Run

run = Run.get_context()
print("running as", os.environ["USER"], "in", os.getcwd(), "with", sys.executable)
for epoch in range(3):
    run.log("loss", 1.0 / (epoch + 1), step=epoch)
    print(f"epoch {epoch} done", flush=True)
run.tag("host", "vm")
with open("outputs/model.txt", "w") as out:
    out.write("weights of {token}")
print("model written")
"""


def test_training_run_executes_on_the_remote_host_and_comes_back_with_metrics_outputs_and_xcom(
    run_dag, tmp_path, ssh_vm
):
    token = secrets.token_hex(4)
    write_script(tmp_path / "src", "train.py", TRAIN.replace("{token}", token))

    result = run_dag(dag_source(tmp_path / "src"))

    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    assert summary["status"] == "Completed"
    assert summary["target"] == CONN_ID
    assert summary["metrics"]["loss"] == pytest.approx(1 / 3)
    # It ran on the host, as the host's user, in a run directory under the default base dir.
    run_dir = remote_base(ssh_vm) / "runs" / summary["run_id"]
    assert f"running as amlrun-remote in {run_dir} with /usr/bin/python3" in result.log
    assert _in_order(result.log, ["epoch 0 done", "epoch 1 done", "epoch 2 done", "model written"])
    assert Path(summary["outputs_uri"], "model.txt").read_text() == f"weights of {token}"

    run = Workspace.get().get_run(summary["run_id"])
    assert run.tags == {"host": "vm"}
    assert [p.step for p in Workspace.get().history.get_metrics(run.id, "loss")] == [0, 1, 2]
    assert "epoch 2 done" in Path(run.logs_uri, "std_log.txt").read_text()
    assert run.handle["host"] == ssh_vm.address and run.handle["blob_bytes_sent"] > 0
    # cleanup=on_success: the run directory is gone from the host; the code stays in its blob cache.
    assert not run_dir.exists()
    [train] = Workspace.get().store.get_manifest(run.snapshot_id).entries
    assert (remote_base(ssh_vm) / "blobs" / str(train.digest)).is_file()


def test_resubmitting_unchanged_code_sends_no_blob_bytes(tmp_path, ssh_vm):
    source = tmp_path / "src"
    write_script(source, "train.py", "print('hello from the vm')\n")
    (source / "data.csv").write_bytes(os.urandom(50_000))
    experiment = Experiment(Workspace.get(), "resubmit")
    config = ScriptRunConfig(str(source), script="train.py", compute_target=CONN_ID)

    first = experiment.submit(config)
    first.wait_for_completion(show_output=False)
    second = experiment.submit(config)
    second.wait_for_completion(show_output=False)
    changed = f"print('hello again from the vm, {secrets.token_hex(4)}')\n"
    write_script(source, "train.py", changed)
    third = experiment.submit(config)
    third.wait_for_completion(show_output=False)

    sent = [Workspace.get().get_run(r.id).handle["blob_bytes_sent"] for r in (first, second, third)]
    assert sent[0] >= 50_000
    assert sent[1] == 0
    assert sent[2] == len(changed)  # only the changed file


def test_hostile_arguments_and_secrets_arrive_literally_and_leak_nowhere(
    run_dag, tmp_path, ssh_vm, monkeypatch
):
    monkeypatch.setenv("AIRFLOW__AMLRUN__CLEANUP", "never")
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        """
        import hashlib, os, sys
        print("argv", repr(sys.argv[1:]))
        token = os.environ["API_TOKEN"]
        print("token sha256", hashlib.sha256(token.encode()).hexdigest())
        # Is the secret on any command line of the host (ssh commands, the launcher, this script)?
        leaked = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if token.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    leaked.append(pid)
            except OSError:
                pass
        print("secret on a command line:", leaked)
    """,
    )
    (source / "x").write_text("keep me")
    hostile = ["; rm -rf x", "$(touch y)", "`touch z`", 'it\'s "quoted"', "a b\nc", "$HOME", "*"]

    result = run_dag(dag_source(source, arguments=hostile, secret_variables={"API_TOKEN": secret}))

    assert result.state == "success", result.log
    assert f"argv {hostile!r}" in result.log
    assert f"token sha256 {hashlib.sha256(secret.encode()).hexdigest()}" in result.log
    assert "secret on a command line: []" in result.log
    run = Workspace.get().get_run(result.xcoms["train"]["run_id"])
    run_dir = remote_base(ssh_vm) / "runs" / run.id
    assert (run_dir / "x").read_text() == "keep me"
    assert not any((p / name).exists() for p in (run_dir, ssh_vm.home) for name in ("y", "z"))
    # The secret is nowhere a user or an admin could read it: task log, run row, run directory on the host.
    assert secret not in result.log
    assert secret not in repr(run) and secret not in json.dumps(run.handle)
    assert not (run_dir / ".amlrun" / "env.json").exists()
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("handle", ["saved", "lost"])
def test_retry_reattaches_to_the_run_a_killed_worker_left_on_the_host(tmp_path, ssh_vm, handle):
    token = secrets.token_hex(4)
    counter = ssh_vm.home / f"ran-{token}"
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        f"""
        import os, time
        with open(os.path.expanduser("~/ran-{token}"), "a") as out:
            out.write("ran\\n")
        for step in range(8):
            print(f"step {{step}}", flush=True)
            time.sleep(0.5)
        print("finished")
    """,
    )
    earlier = worker_dies_mid_run(source, CONN_ID)
    if handle == "lost":
        # The worker died between starting the run and recording its handle: the host is asked by run id.
        Workspace.get().history.update_run(earlier.id, handle=None)

    config = ScriptRunConfig(str(source), script="train.py", compute_target=CONN_ID)
    lines: list[str] = []
    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
    retried = Experiment(Workspace.get(), "reattach").submit(config, airflow_task=task)
    record = retried.wait_for_completion(output=lines.append)

    assert record.id == earlier.id
    assert record.status == "Completed" and record.try_number == 2
    assert lines == [f"step {i}" for i in range(8)] + ["finished"]
    assert counter.read_text() == "ran\n"  # the script ran once
    assert [r.id for r in Workspace.get().list_runs()] == [earlier.id]


def test_ssh_run_survives_a_dropped_connection(run_dag, tmp_path, ssh_host, amlrun_home, monkeypatch):
    # Short silences count as a drop here, so the outage below really forces a reconnect.
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_host.connection(amlrun_io_timeout=2))
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        """
        import time
        for i in range(20):
            print(f"line {i}", flush=True)
            time.sleep(0.5)
        print("all done")
    """,
    )
    outage: dict[str, float] = {}

    runs = remote_base(ssh_host) / "runs"
    earlier = set(runs.iterdir()) if runs.exists() else set()

    def cut_link_mid_run() -> None:
        # Watches the host's files only: the history is the task's own business while it runs.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = set(runs.iterdir()) - earlier if runs.exists() else set()
            logs = [run / ".amlrun" / "std_log.txt" for run in new]
            if logs and logs[0].exists() and "line 3" in logs[0].read_text():
                ssh_host.cut()
                outage["start"] = time.monotonic()
                time.sleep(5)
                ssh_host.restore()
                outage["end"] = time.monotonic()
                return
            time.sleep(0.1)

    cutter = threading.Thread(target=cut_link_mid_run)
    cutter.start()
    try:
        result = run_dag(dag_source(source))
    finally:
        cutter.join()
        ssh_host.restore()

    assert outage, "the link was never cut"
    assert result.state == "success", result.log
    assert "Lost the SSH connection" in result.log
    assert _in_order(result.log, [f"line {i}" for i in range(20)] + ["all done"])
    assert result.xcoms["train"]["status"] == "Completed"


def test_run_exceeding_max_duration_is_killed_on_the_host_with_its_children(run_dag, tmp_path, ssh_vm):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        print(f"pids {os.getpid()} {child.pid}", flush=True)
        time.sleep(300)
    """,
    )
    started = time.monotonic()
    result = run_dag(dag_source(tmp_path / "src", limit=2))

    assert time.monotonic() - started < 60
    assert result.state == "failed"
    [run] = Workspace.get().list_runs()
    assert run.status == "Failed"
    assert "max_run_duration_seconds=2" in run.error
    pids = re.search(r"pids (\d+) (\d+)", result.log)
    assert pids, result.log
    # The namespace has its own network, not its own pids: the host's processes are visible here.
    assert not any(_alive(int(pid)) for pid in pids.groups())


def test_failing_script_fails_the_task_with_its_exit_code_and_last_lines(run_dag, tmp_path, ssh_vm):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import sys
        print("column 'age' is missing", file=sys.stderr)
        sys.exit(3)
    """,
    )
    result = run_dag(dag_source(tmp_path / "src"))

    assert result.state == "failed"
    assert "exit code 3" in result.log and "column 'age' is missing" in result.log
    [run] = Workspace.get().list_runs()
    assert run.status == "Failed" and "exit code 3" in run.error


# errors a user can make, each told what happened and what to do, with no run left Running


def _submit(source: Path, environment: Environment | None = None) -> None:
    config = ScriptRunConfig(str(source), script="train.py", compute_target=CONN_ID, environment=environment)
    Experiment(Workspace.get(), "errors").submit(config).wait_for_completion(show_output=False)


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    write_script(tmp_path / "src", "train.py", "print('hello')\n")
    return tmp_path / "src"


def _connection(host: SshdHost, **changes: object) -> str:
    conn = json.loads(host.connection())
    extra = changes.pop("extra", {})
    conn.update(changes)
    conn["extra"].update(extra)
    return json.dumps(conn)


def test_unreachable_host_is_refused_before_anything_is_recorded(hello, ssh_host, amlrun_home, monkeypatch):
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", _connection(ssh_host, port=2299))
    with pytest.raises(Exception, match=r"Cannot reach SSH host amlrun-remote@10\.231\.0\.2:2299") as err:
        _submit(hello)
    assert "sshd listens on that port" in str(err.value)
    assert Workspace.get().list_runs() == []


def test_refused_key_is_an_authentication_error_naming_the_user_and_host(
    hello, ssh_host, amlrun_home, monkeypatch, tmp_path
):
    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}", _connection(ssh_host, extra={"key_file": str(stranger)})
    )
    with pytest.raises(Exception, match=r"Authentication to amlrun-remote@10\.231\.0\.2:22 .* failed") as err:
        _submit(hello)
    assert "authorized_keys" in str(err.value)
    assert Workspace.get().list_runs() == []


def test_host_with_another_host_key_is_not_trusted(hello, ssh_host, amlrun_home, monkeypatch, tmp_path):
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        f"{ssh_host.address} {' '.join((tmp_path / 'impostor.pub').read_text().split()[:2])}\n"
    )
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}", _connection(ssh_host, extra={"known_hosts": str(known_hosts)})
    )
    with pytest.raises(Exception, match=r"host key of 10\.231\.0\.2 .* is not the one on record"):
        _submit(hello)
    assert Workspace.get().list_runs() == []


def test_missing_python_on_the_host_is_named_with_the_fix(hello, ssh_vm):
    environment = Environment("remote-py", python=PythonSection(interpreter_path="/opt/no-such/bin/python3"))
    with pytest.raises(
        Exception, match=r"No usable Python interpreter '/opt/no-such/bin/python3' on host 10\.231"
    ):
        _submit(hello, environment)
    assert Workspace.get().list_runs() == []


@pytest.fixture
def small_disk(ssh_host: SshdHost) -> Iterator[Path]:
    """A 1 MB file system mounted on the host, owned by its user."""
    mount = ssh_host.home / "small-disk"
    mount.mkdir(exist_ok=True)
    uid = os.stat(ssh_host.home).st_uid
    ssh_host.run("mount", "-t", "tmpfs", "-o", f"size=1m,uid={uid}", "tmpfs", str(mount))
    try:
        yield mount
    finally:
        ssh_host.run("umount", "-l", str(mount))


def test_full_remote_disk_fails_the_run_with_the_space_it_needs(
    hello, ssh_host, small_disk, amlrun_home, monkeypatch
):
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}", _connection(ssh_host, extra={"amlrun_base_dir": "~/small-disk"})
    )
    (hello / "weights.bin").write_bytes(os.urandom(2_000_000))
    with pytest.raises(Exception, match=r"Host 10\.231\.0\.2 has 1\.0 MB free in .*small-disk") as err:
        _submit(hello)
    assert "amlrun_base_dir" in str(err.value)
    [run] = Workspace.get().list_runs()
    assert run.status == "Failed" and "MB free" in run.error


# helpers


def _in_order(log: str, lines: list[str]) -> bool:
    position = 0
    for line in lines:
        position = log.find(line, position)
        if position < 0:
            return False
        position += len(line)
    return True


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# a managed environment, built on the host


@pytest.fixture(scope="module")
def local_index() -> Iterator[str]:
    """A package index (file://, readable by the host's user) holding one small wheel, so the host can
    install a lock without reaching PyPI."""
    import base64
    import shutil
    import tempfile
    import zipfile

    root = Path(tempfile.mkdtemp(prefix="amlrun-index-"))
    root.chmod(0o755)
    wheel = root / "amlrun_probe-1.0-py3-none-any.whl"
    files = {
        "amlrun_probe/__init__.py": "VALUE = 'probe 1.0'\n",
        "amlrun_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: amlrun-probe\nVersion: 1.0\n",
        "amlrun_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(text.encode())}")
            archive.writestr(name, text)
        record.append("amlrun_probe-1.0.dist-info/RECORD,,")
        archive.writestr("amlrun_probe-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    project = root / "simple" / "amlrun-probe"
    project.mkdir(parents=True)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (project / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../{wheel.name}#sha256={sha}">{wheel.name}</a></body></html>\n'
    )
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        yield f"file://{root}/simple"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_managed_environment_is_built_on_the_host_once_and_reused(run_dag, tmp_path, ssh_vm, local_index):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import sys
        import amlrun_probe  # only in the environment's virtualenv on the host
        print("probe", amlrun_probe.VALUE, "python", sys.executable)
    """,
    )
    dag = f"""
        import pendulum
        from airflow.sdk import DAG
        from airflow_amlrun import Environment, ScriptRunConfig, ScriptRunOperator
        from airflow_amlrun.environment import PythonSection

        env = Environment("probe-env", python=PythonSection(pip_requirements=["amlrun-probe==1.0"],
                                                            index_url={local_index!r}))
        with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
            ScriptRunOperator(task_id="train", config=ScriptRunConfig({str(tmp_path / "src")!r},
                              script="train.py", compute_target={CONN_ID!r}, environment=env))
    """
    first = run_dag(dag)
    assert first.state == "success", first.log
    envs = remote_base(ssh_vm) / "envs"
    match = re.search(rf"probe probe 1\.0 python ({envs}/([0-9a-f]{{64}})/bin/python)", first.log)
    assert match, first.log
    build = envs / match.group(2)
    marker = (build / "amlrun-build.json").stat().st_mtime_ns

    second = run_dag(dag)
    assert second.state == "success", second.log
    assert f"probe probe 1.0 python {match.group(1)}" in second.log
    assert (build / "amlrun-build.json").stat().st_mtime_ns == marker  # not built again
    assert not [p for p in envs.iterdir() if p.name.startswith(".tmp-")]
