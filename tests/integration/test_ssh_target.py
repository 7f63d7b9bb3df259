"""A DAG author's view of the SSH target: an `ssh` connection to a real sshd on a host (network namespace)
of its own, real runs on it, a real cut of its network link."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Environment, Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.environment import PythonSection
from airflow_amlrun.submission import AirflowTask
from airflow_amlrun.targets.handles import SSHHandle
from airflow_amlrun.targets.ssh import SSHTargetConfigurationError, SSHTargetUnreachableError
from airflow_amlrun.targets.ssh_helper import lib_files
from tests.conftest import REPO, dag_source, worker_dies_mid_run, write_script
from tests.integration.orphans import group_members
from tests.integration.sshd_host import SshdHost, host_for_tests, start_sshd_host
from tests.private_index import build_wheel, private_index

pytestmark = pytest.mark.usefixtures("airflow_db")

CONN_ID = "ssh_vm"


@pytest.fixture
def ssh_vm(ssh_host: SshdHost, amlrun_home: Path, monkeypatch: pytest.MonkeyPatch) -> SshdHost:
    """The Airflow connection `ssh_vm` to the host, with nothing but what any ssh connection has."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_host.connection())
    return ssh_host


def remote_base(host: SshdHost) -> Path:
    return host.home / ".amlrun"


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


# The training DAG's metrics, outputs, log and XCom, on this target as on every other: test_targets.py.
def test_a_run_on_the_host_runs_as_its_user_and_leaves_its_code_in_the_hosts_blob_cache(
    run_dag, tmp_path, ssh_vm
):
    token = secrets.token_hex(4)
    write_script(tmp_path / "src", "train.py", TRAIN.replace("{token}", token))

    result = run_dag(dag_source(tmp_path / "src", target=CONN_ID))

    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    # It ran on the host, as the host's user, in a run directory under the default base dir.
    run_dir = remote_base(ssh_vm) / "runs" / summary["run_id"]
    assert f"running as {ssh_vm.user} in {run_dir} with /usr/bin/python3" in result.log
    run = Workspace.get().get_run(summary["run_id"])
    assert run.tags == {"host": "vm"}
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

    result = run_dag(
        dag_source(source, target=CONN_ID, arguments=hostile, secret_variables={"API_TOKEN": secret})
    )

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


# With the handle saved, on this target as on every other: test_targets.py.
def test_retry_finds_on_the_host_the_run_a_worker_died_before_recording(tmp_path, ssh_vm):
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
        result = run_dag(dag_source(source, target=CONN_ID))
    finally:
        cutter.join()
        ssh_host.restore()

    assert outage, "the link was never cut"
    assert result.state == "success", result.log
    # The link went silent (the connection did not know it was cut): it is taken for lost, and made again.
    where = f"{ssh_host.user}@{ssh_host.address}:22"
    assert re.search(
        rf"No answer from {re.escape(where)} for 2 s while .*; reconnecting\. The run goes on", result.log
    )
    assert f"Reconnected to {where}" in result.log
    assert _in_order(result.log, [f"line {i}" for i in range(20)] + ["all done"])
    assert result.xcoms["train"]["status"] == "Completed"


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
    where = re.escape(f"{ssh_host.user}@{ssh_host.address}:2299")
    with pytest.raises(Exception, match=f"Cannot reach SSH host {where}") as err:
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
    where = re.escape(f"{ssh_host.user}@{ssh_host.address}:22")
    with pytest.raises(Exception, match=f"Authentication to {where} .* failed") as err:
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
    with pytest.raises(
        Exception, match=rf"host key of {re.escape(ssh_host.address)} .* is not the one on record"
    ):
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
    ssh_host.run("mount", "-t", "tmpfs", "-o", f"size=1m,uid={uid},mode=700", "tmpfs", str(mount))
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
    with pytest.raises(
        Exception, match=rf"Host {re.escape(ssh_host.address)} has 1\.0 MB free in .*small-disk"
    ) as err:
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
    env = f"Environment('probe-env', python=PythonSection(pip_requirements=['amlrun-probe==1.0'], index_url={local_index!r}))"
    dag = dag_source(tmp_path / "src", target=CONN_ID, environment=env)
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


# what the worker says when the host does not answer


def _target(host: SshdHost, monkeypatch: pytest.MonkeyPatch, **extra: object) -> Any:
    """The SSH target of connection ssh_vm to the host, with connection extras changed."""
    from airflow_amlrun.config import load_settings
    from airflow_amlrun.targets.registry import resolve_target

    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", _connection(host, **extra))
    return resolve_target(CONN_ID, load_settings(), Workspace.get().cache_dir)


def _a_finished_run(source: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AIRFLOW__AMLRUN__CLEANUP", "never")
    write_script(source, "train.py", "print('trained')\n")
    config = ScriptRunConfig(str(source), script="train.py", compute_target=CONN_ID)
    return Experiment(Workspace.get(), "messages").submit(config).wait_for_completion(show_output=False)


def test_a_host_never_reached_is_not_called_a_lost_connection(tmp_path, ssh_vm, monkeypatch):
    handle = SSHHandle.from_json(_a_finished_run(tmp_path / "src", monkeypatch).handle)
    target = _target(ssh_vm, monkeypatch, port=2299, extra={"amlrun_reconnect_timeout": 1})

    with pytest.raises(SSHTargetUnreachableError) as err:
        target.wait(handle, 0)

    message = str(err.value)
    assert message.startswith(
        f"Cannot reach SSH host {ssh_vm.user}@{ssh_vm.address}:2299 (connection 'ssh_vm'): "
    )
    assert "Tried for 1 s while checking the run" in message
    assert "Lost the connection" not in message and "()" not in message


def test_a_host_that_answers_too_slowly_is_not_called_a_lost_connection(ssh_vm, monkeypatch):
    target = _target(ssh_vm, monkeypatch, extra={"amlrun_io_timeout": 1, "amlrun_reconnect_timeout": 2})

    with pytest.raises(SSHTargetUnreachableError) as err:
        target.ssh.retrying("running a slow command", lambda: target.ssh.exec("sleep 3", None, 1))

    message = str(err.value)
    assert message.startswith(
        f"Host {ssh_vm.user}@{ssh_vm.address}:22 did not answer while running a slow command: nothing came for "
        "1 s, again for 2 s, although the SSH connection itself was up (TimeoutError: no answer to sleep ... "
        "for 1 s)."
    )
    assert "amlrun_io_timeout" in message and "Lost the connection" not in message


def test_a_run_that_ended_is_not_said_to_be_still_going_when_its_host_is_lost(tmp_path, ssh_vm, monkeypatch):
    handle = SSHHandle.from_json(_a_finished_run(tmp_path / "src", monkeypatch).handle)
    target = _target(
        ssh_vm, monkeypatch, extra={"amlrun_io_timeout": 1, "amlrun_reconnect_timeout": 2, "conn_timeout": 1}
    )
    assert not target.wait(handle, 0).running  # connected: the run ended
    ssh_vm.cut()
    try:
        with pytest.raises(SSHTargetUnreachableError) as err:
            target.collect(handle)
    finally:
        ssh_vm.restore()

    message = str(err.value)
    assert message.startswith(
        f"Lost the connection to {ssh_vm.user}@{ssh_vm.address}:22 while collecting outputs and logs and could "
        "not reconnect within 2 s ("
    )
    assert message.endswith(
        "The run itself has ended on the host: a retry of the task (or `amlrun reconcile`) records its outcome "
        "and collects its outputs."
    )
    assert "may still be going" not in message and "()" not in message


# what the host sends back


def test_megabytes_on_both_streams_of_a_remote_command_stall_neither(ssh_vm, monkeypatch):
    # stdout and stderr share one flow-control window: left unread, either would stall the other.
    target = _target(ssh_vm, monkeypatch)
    code = "import sys; sys.stderr.write('e' * 3000000); sys.stderr.flush(); sys.stdout.write('o' * 3000000)"

    rc, out, err = target.ssh.exec(f"python3 -c {shlex.quote(code)}", None, 5)

    assert (rc, len(out), len(err)) == (0, 3_000_000, 3_000_000)
    assert set(out) == {ord("o")} and set(err) == {ord("e")}


def test_a_process_with_over_a_thousand_descriptors_open_still_runs_remote_commands(ssh_vm, monkeypatch):
    # select() cannot wait on a descriptor numbered 1,024 or more, which a long-lived process (a triggerer
    # following many runs) reaches: the channel's descriptor then comes after them.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        target = _target(ssh_vm, monkeypatch)
        rc, out, _ = target.ssh.exec("sleep 0.5; echo answered", None, 10)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (rc, out.strip()) == (0, b"answered")


def test_thousands_of_links_left_out_of_the_outputs_are_named_a_hundred_at_most(
    run_dag, tmp_path, ssh_host, amlrun_home, monkeypatch
):
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}",
        ssh_host.connection(amlrun_io_timeout=3, amlrun_reconnect_timeout=15),
    )
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os
        open("outputs/model.txt", "w").write("trained weights")
        for i in range(12000):
            os.symlink("/nonexistent/" + "x" * 40, f"outputs/l{i:05}")
        print("outputs written")
    """,
    )
    result = run_dag(dag_source(tmp_path / "src", target=CONN_ID))

    assert result.state == "success", result.log[-3000:]
    assert Path(result.xcoms["train"]["outputs_uri"], "model.txt").read_text() == "trained weights"
    # (A line may show twice in the log a test sees: on the task's stream and in the captured records.)
    named = set(re.findall(r"'outputs/l\d{5}' is a symlink to '/nonexistent/x+'", result.log))
    assert len(named) == 100
    assert f"Host {ssh_host.address}: ... and 11900 more warnings like these, not shown." in result.log


# what the host keeps between runs


@pytest.mark.parametrize("which", ["remote", "supervisor"])
def test_a_changed_helper_on_the_host_is_written_again_before_it_gets_a_secret(
    run_dag, tmp_path, ssh_vm, which
):
    write_script(tmp_path / "src", "train.py", "import os\nprint('token', len(os.environ['API_TOKEN']))\n")
    first = run_dag(dag_source(tmp_path / "src", target=CONN_ID, secret_variables={"API_TOKEN": "warm-up"}))
    assert first.state == "success", first.log
    # This version's (a host kept from earlier test runs may hold others).
    [name] = [name for name in lib_files() if name.startswith(f"amlrun-{which}-")]
    path = remote_base(ssh_vm) / "lib" / name
    original = path.read_bytes()
    # A run under the same login rewrites it (kept the login user's: root writes into the same file).
    stolen = ssh_vm.home / f"stolen-{secrets.token_hex(4)}"
    path.write_text(f"import sys\nopen({str(stolen)!r}, 'wb').write(sys.stdin.buffer.read())\n")

    secret = f"s3cr3t-{secrets.token_hex(8)}"
    result = run_dag(dag_source(tmp_path / "src", target=CONN_ID, secret_variables={"API_TOKEN": secret}))

    assert result.state == "success", result.log
    assert f"token {len(secret)}" in result.log
    assert not stolen.exists()
    assert path.read_bytes() == original
    assert (
        f"Host {ssh_vm.address}: {remote_base(ssh_vm)}/lib/{path.name} was changed since it was written"
        in result.log
    )


@pytest.mark.parametrize("case", ["writable by its group", "another user's"])
def test_a_base_dir_other_users_could_change_is_refused_before_anything_runs(
    hello, ssh_host, amlrun_home, monkeypatch, case
):
    base = ssh_host.home / f"shared-{secrets.token_hex(3)}"
    base.mkdir()
    if case == "writable by its group":
        os.chown(base, *_owner(ssh_host.home))
        base.chmod(0o775)
        problem = "is writable by its group (mode 775)"
    else:
        base.chmod(0o777)  # root's, and open to anyone
        problem = f"belongs to uid 0, not to {ssh_host.user} (uid {_owner(ssh_host.home)[0]})"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}", _connection(ssh_host, extra={"amlrun_base_dir": str(base)})
    )
    try:
        with pytest.raises(SSHTargetConfigurationError) as err:
            _submit(hello)
        assert str(err.value).startswith(
            f"The amlrun folder {base} on host {ssh_host.address} (SSH connection 'ssh_vm') {problem}: other users "
            "of the host could change the helper, code and environments runs execute there"
        )
        assert f"chmod -R go-w {base}" in str(err.value) and "amlrun_base_dir" in str(err.value)
        assert Workspace.get().list_runs() == []
        assert list(base.iterdir()) == []
    finally:
        shutil.rmtree(base)


def _owner(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_uid, status.st_gid


# the SSH tests themselves


# Another test session's host, started by a process of its own, which then waits (or is killed).
ANOTHER_SESSION = """
import sys, time
from tests.integration.sshd_host import start_sshd_host
host = start_sshd_host(user=sys.argv[1], subnet=int(sys.argv[2]), name="other")
print(host.namespace, host.link, host.address, flush=True)
time.sleep(300)
"""


def test_two_sessions_hosts_keep_apart_and_a_gone_sessions_host_is_removed():
    subnet = 40  # past the subnets the suite's own hosts are offered first
    other_user = f"amlrun-other-{secrets.token_hex(3)}"
    other = subprocess.Popen(
        [sys.executable, "-c", ANOTHER_SESSION, other_user, str(subnet)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None
        namespace, link, other_address = other.stdout.readline().split()
        host = start_sshd_host(user=f"amlrun-mine-{secrets.token_hex(3)}", subnet=subnet, name="mine")
        try:
            # The other session's host is live: this one took another subnet, and the other still listens.
            assert host.address != other_address
            assert f"{other_address}:22" in _listening(namespace)
        finally:
            host.stop()
        # The other session dies without stopping its host: the next host offered that subnet takes it, and
        # removes what the gone session left (its namespace, sshd and login user).
        other.kill()
        other.wait()
        later = start_sshd_host(user=f"amlrun-mine-{secrets.token_hex(3)}", subnet=subnet, name="later")
        try:
            assert later.address == other_address
            assert (
                namespace
                not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            )
            assert link not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
            with pytest.raises(KeyError):
                pwd.getpwnam(other_user)
        finally:
            later.stop()
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


def test_a_host_is_stale_only_once_nobody_holds_its_lock(tmp_path, monkeypatch):
    from tests.integration import sshd_host

    monkeypatch.setattr(sshd_host, "REGISTRY", tmp_path)

    def entry(name: str, subnet: int, text: str | None = None) -> Path:
        path = tmp_path / f"amlrun-1-{name}.json"
        fields = {"namespace": f"amlrun-1-{name}", "link": f"amh{name}", "subnet": subnet, "user": "root"}
        path.write_text(text if text is not None else json.dumps(fields))
        return path

    live = entry("live", 40)
    held = sshd_host._hold(live.with_suffix(".lock"))
    # Its owner is gone (an unheld lock; and one whose lock file was never made).
    gone = entry("gone", 41)
    gone.with_suffix(".lock").touch()
    never_locked = entry("never", 42)
    # Unreadable, with its owner alive: kept, whatever it holds.
    garbled = entry("garbled", 43, text='{"subnet": 4')
    garbled_lock = sshd_host._hold(garbled.with_suffix(".lock"))
    try:
        assert sshd_host._free_subnet(40) == 41
        assert live.exists() and garbled.exists()
        assert not gone.exists() and not gone.with_suffix(".lock").exists() and not never_locked.exists()
        # Removing a stale entry never acts on a user or folder a test host cannot have made ("root" here).
        assert pwd.getpwnam("root")
    finally:
        os.close(held)
        os.close(garbled_lock)
    # Once its owner lets go of it, the host is stale: its subnet is offered again.
    assert sshd_host._free_subnet(40) == 40
    assert not live.exists()


def _listening(namespace: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, "ss", "-ltn"], capture_output=True, text=True
    ).stdout


def test_stopping_a_test_host_ends_what_it_started_and_nothing_else(tmp_path):
    user = f"amlrun-k{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--password", "*", user], check=True)
    uid = pwd.getpwnam(user).pw_uid
    # A process of the login user that has nothing to do with the host (the user existed before it).
    outside = subprocess.Popen(["sleep", "300"], user=uid, group=uid, start_new_session=True, cwd="/")
    try:
        host = start_sshd_host(user=user, subnet=3, name="keep")
        inside = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                host.namespace,
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "sleep",
                "300",
            ],
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while _process_name(inside.pid) != "sleep" and time.monotonic() < deadline:
            time.sleep(0.02)

        host.stop()

        assert inside.wait(timeout=10) == -signal.SIGKILL
        assert outside.poll() is None
        assert pwd.getpwnam(user).pw_uid == uid
    finally:
        outside.kill()
        outside.wait()
        subprocess.run(["userdel", "-r", user], capture_output=True)


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_the_ssh_tests_fail_loudly_when_their_host_cannot_be_set_up(tmp_path):
    # A test that needs the host, run by a user who is not root (uid 65534 in a user namespace of its own).
    (tmp_path / "test_needs_host.py").write_text(
        "from tests.integration.conftest import ssh_host  # noqa: F401\n\n\n"
        "def test_needs_the_host(ssh_host):\n    pass\n"
    )
    done = subprocess.run(
        ["unshare", "--user", sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rE", "."],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0, done.stdout
    assert "1 error" in done.stdout and "skipped" not in done.stdout, done.stdout
    assert "The SSH tests cannot set up their host; missing: root (running as uid 65534" in done.stdout


# a run left alone on the host


def test_a_retry_never_signals_a_process_that_now_has_the_runs_pid_on_the_host(tmp_path, ssh_vm):
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\nprint('training', flush=True)\ntime.sleep(300)\n")
    orphan = worker_dies_mid_run(source, CONN_ID)
    # The run is killed on the host as a whole (the OOM killer, an admin), leaving no exit code ...
    pid = orphan.handle["pid"]
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    # ... and its pid is given to another process of the same user (made so here: the run is pointed at it).
    uid = os.stat(ssh_vm.home).st_uid
    stranger = subprocess.Popen(["sleep", "300"], user=uid, group=uid, start_new_session=True, cwd="/")
    try:
        pid_file = remote_base(ssh_vm) / "runs" / orphan.id / ".amlrun" / "pid"
        recorded = json.loads(pid_file.read_text())
        pid_file.write_text(
            json.dumps({**recorded, "pid": stranger.pid} if isinstance(recorded, dict) else stranger.pid)
        )
        Workspace.get().history.update_run(orphan.id, handle={**orphan.handle, "pid": stranger.pid})

        config = ScriptRunConfig(str(source), script="train.py", compute_target=CONN_ID)
        task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
        run = Experiment(Workspace.get(), "reattach").submit(config, airflow_task=task)
        record = run.wait_for_completion(show_output=False, raise_on_error=False)
        run.target.cancel(
            SSHHandle.from_json(record.handle)
        )  # stopping it again, as on_kill may, signals nothing either

        assert record.id == orphan.id and record.status == "Failed"
        assert "ended without recording the run's exit code" in record.error
        assert stranger.poll() is None  # neither followed nor killed
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize(
    ("changed", "said"),
    [
        ({"base_dir": "/tmp"}, "it was started under /tmp on"),
        ({"user": "root"}, "it was started as root@"),
    ],
)
def test_a_retry_follows_a_recorded_run_only_where_its_connection_points(tmp_path, ssh_vm, changed, said):
    # A run row is data: one changed to name another base dir or login makes the retry run nothing there.
    source = tmp_path / "src"
    write_script(source, "train.py", "import time\nprint('training', flush=True)\ntime.sleep(300)\n")
    orphan = worker_dies_mid_run(source, CONN_ID)
    try:
        Workspace.get().history.update_run(orphan.id, handle={**orphan.handle, **changed})

        config = ScriptRunConfig(str(source), script="train.py", compute_target=CONN_ID)
        task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
        run = Experiment(Workspace.get(), "reattach").submit(config, airflow_task=task)

        assert run.id != orphan.id  # a new run, not the recorded one followed elsewhere
        lost = Workspace.get().get_run(orphan.id)
        assert lost.status == "Failed" and said in lost.error
        run.cancel()
    finally:
        os.killpg(orphan.handle["pid"], signal.SIGKILL)


# what comes back from the host (links in the outputs: test_targets.py)


def test_a_file_the_worker_cannot_write_costs_only_itself(run_dag, tmp_path, ssh_vm):
    # A path deeper than the worker's file system takes (its run folder lies deeper than the host's).
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os
        open("outputs/model.txt", "w").write("trained weights")
        os.chdir("outputs")
        for level in range(20):
            os.mkdir("d" * 250)
            os.chdir("d" * 250)
        open("deep.txt", "w").write("too deep for the worker")
        print("outputs written")
    """,
    )
    result = run_dag(dag_source(tmp_path / "src", target=CONN_ID))

    assert result.state == "success", result.log
    outputs = Path(result.xcoms["train"]["outputs_uri"])
    assert (outputs / "model.txt").read_text() == "trained weights"
    assert re.search(
        rf"Run \S+: skipped outputs/d+\.\.\.d+/deep\.txt from {re.escape(ssh_vm.address)}: File name too long",
        result.log,
    )


# a host whose sshd has no SFTP subsystem


@pytest.fixture(scope="module")
def host_without_sftp() -> Iterator[SshdHost]:
    host = host_for_tests(user=f"amlrun-nosftp-{os.getpid()}", subnet=2, name="nosftp", sftp=False)
    try:
        yield host
    finally:
        host.stop()


def test_a_host_without_sftp_runs_through_the_helper_and_says_how_to_enable_it(
    run_dag, tmp_path, host_without_sftp, amlrun_home, monkeypatch
):
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", host_without_sftp.connection())
    token = secrets.token_hex(4)
    source = tmp_path / "src"
    write_script(source, "train.py", TRAIN.replace("{token}", token))
    (source / "data.bin").write_bytes(os.urandom(3_000_000))  # several reads and writes' worth

    result = run_dag(dag_source(source, target=CONN_ID))

    assert result.state == "success", result.log
    assert "offers no SFTP subsystem" in result.log
    assert "add the line `Subsystem sftp internal-sftp` to the host's /etc/ssh/sshd_config" in result.log
    summary = result.xcoms["train"]
    assert summary["metrics"]["loss"] == pytest.approx(1 / 3)
    assert _in_order(result.log, ["epoch 0 done", "epoch 1 done", "epoch 2 done", "model written"])
    assert Path(summary["outputs_uri"], "model.txt").read_text() == f"weights of {token}"
    run = Workspace.get().get_run(summary["run_id"])
    assert run.handle["blob_bytes_sent"] >= 3_000_000
    data = Workspace.get().store.get_manifest(run.snapshot_id).entries
    [blob] = [e for e in data if e.path == "data.bin"]
    assert (host_without_sftp.home / ".amlrun" / "blobs" / str(blob.digest)).read_bytes() == (
        source / "data.bin"
    ).read_bytes()


# package-index credentials, for an environment built on the host


def _register_private_environment(index_url: str) -> Environment:
    """The environment version, registered as the worker would after resolving it: its lock pins the one
    package of the private index and keeps the index URL's ${VAR} as written."""
    from sqlalchemy import insert

    from airflow_amlrun.history.repository import utcnow
    from airflow_amlrun.history.tables import environments

    env = Environment(
        "private-env",
        python=PythonSection(pip_requirements=["amlrun-private-pkg==1.0.0"], index_url=index_url),
    )
    env.validate()
    _name, wheel = build_wheel()
    lock = (
        "# Locked by airflow-amlrun with uv (test): universal, Python >= 3.11.\n"
        f"--index-url {index_url}\n"
        f"amlrun-private-pkg==1.0.0 \\\n    --hash=sha256:{hashlib.sha256(wheel).hexdigest()}\n"
    )
    with Workspace.get().history.transaction() as connection:
        connection.execute(
            insert(environments).values(
                name=env.name,
                version="1",
                seq=1,
                spec_hash=env.spec_hash(),
                spec=env.copy(version="1").to_dict(),
                lock=lock,
                created_at=utcnow(),
            )
        )
    return env


@pytest.fixture
def pip_trusts_the_index(ssh_vm: SshdHost) -> Iterator[None]:
    """The host's pip configured to accept the test index over plain HTTP, as an admin would for an
    internal index (uv is not installed on the host, so pip installs the lock there)."""
    config = ssh_vm.home / ".config" / "pip" / "pip.conf"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"[global]\ntrusted-host = {ssh_vm.worker_address}\n")
    try:
        yield
    finally:
        config.unlink()


def test_index_credentials_reach_only_the_installer_on_the_host(
    run_dag, tmp_path, ssh_vm, monkeypatch, pip_trusts_the_index
):
    token = f"tok-{secrets.token_hex(12)}"
    monkeypatch.setenv("AMLRUN_TEST_INDEX_TOKEN", token)
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import amlrun_private_pkg  # only in the environment's virtualenv on the host
        print("private package", amlrun_private_pkg.VERSION)
    """,
    )
    leaked: set[str] = set()
    done = threading.Event()

    def watch_command_lines() -> None:
        # Every process of the machine (the host shares its pids), for the whole run, build included.
        while not done.is_set():
            for proc in Path("/proc").iterdir():
                try:
                    if token.encode() in (proc / "cmdline").read_bytes():
                        leaked.add((proc / "cmdline").read_bytes().decode(errors="replace"))
                except OSError:
                    pass
            time.sleep(0.01)

    with private_index(token) as index:
        index_url = index.url(ssh_vm.worker_address)
        _register_private_environment(index_url)
        env = (
            "Environment('private-env', python=PythonSection(pip_requirements=['amlrun-private-pkg==1.0.0'], "
            f"index_url={index_url!r}))"
        )
        dag = dag_source(tmp_path / "src", target=CONN_ID, environment=env)
        watcher = threading.Thread(target=watch_command_lines)
        watcher.start()
        try:
            result = run_dag(dag)
        finally:
            done.set()
            watcher.join()

    assert result.state == "success", result.log
    assert "private package 1.0.0" in result.log
    assert index.authorized_downloads >= 1  # the host's pip did authenticate
    assert leaked == set()
    assert token not in result.log
    run = Workspace.get().get_run(result.xcoms["train"]["run_id"])
    assert token not in repr(run) and token not in json.dumps(run.handle)
    assert list((remote_base(ssh_vm) / "envs").glob("*/amlrun-build.json")), "nothing was built on the host"
    # No file the host user has (the base dir with its builds and run directories, caches, configuration).
    files = [p for p in ssh_vm.home.rglob("*") if p.is_file() and not p.is_symlink()]
    assert [p for p in files if token.encode() in p.read_bytes()] == []


def test_a_missing_index_credential_fails_before_anything_is_recorded(hello, ssh_vm, monkeypatch):
    monkeypatch.delenv("AMLRUN_TEST_INDEX_TOKEN", raising=False)
    env = _register_private_environment(
        f"http://amlrun:${{AMLRUN_TEST_INDEX_TOKEN}}@{ssh_vm.worker_address}:9/simple"
    )
    # Whichever layer notices first (the environment's resolution, or the SSH target's check) names it.
    with pytest.raises(Exception, match=r"needs \$\{AMLRUN_TEST_INDEX_TOKEN\} for its package index"):
        _submit(hello, env)
    assert Workspace.get().list_runs() == []
