"""A run never outlives the supervisor that watches it, and a run's files never hang or mislead the worker:
the same scenarios on every target that starts runs as processes (local, and an SSH host, whose processes
this machine sees: its namespace has a network of its own, not pids of its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.submission import AirflowTask
from tests.conftest import worker_dies_mid_run, write_script
from tests.integration.conftest import SSH_CONN_ID, Target
from tests.integration.orphans import wait_for_file
from tests.integration.sshd_host import SshdHost

pytestmark = pytest.mark.usefixtures("airflow_db")

# Every target that starts runs as processes this machine sees.
on_process_targets = pytest.mark.parametrize("target", ["local", "ssh"], indirect=True)


@pytest.fixture(autouse=True)
def _short_ssh_waits(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short waits on the SSH host, so that a target that hangs fails its test soon."""
    if "target" in request.fixturenames and request.getfixturevalue("target").kind == "ssh":
        host: SshdHost = request.getfixturevalue("ssh_host")
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{SSH_CONN_ID.upper()}",
            host.connection(amlrun_io_timeout=3, amlrun_reconnect_timeout=10),
        )


LEAVES_A_CHILD = """
import os, shutil, subprocess, time
child = subprocess.Popen(["sleep", "300"])  # in the run's process group, as anything the script starts
with open("pids.tmp", "w") as out:
    out.write(f"{os.getpid()} {child.pid}")
os.rename("pids.tmp", "pids")
print("training", flush=True)
if REMOVE_CONTROL_FOLDER:
    shutil.rmtree(".amlrun")
time.sleep(300)
"""


def _pids(run_dir: str) -> list[int]:
    """The script's pid and its child's, which the script wrote into its run directory."""
    return [int(pid) for pid in wait_for_file(Path(run_dir) / "pids").split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _assert_ended(pids: list[int], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    still = [pid for pid in pids if _alive(pid)]
    for pid in still:
        os.kill(pid, signal.SIGKILL)  # the test's own clean-up, after the verdict below
    assert not still, f"{what}: processes {still} of the run still ran {timeout:g} s later"


def _retry(source: Path, target: Target, limit: float | None = None) -> Any:
    """Try 2 of task retrain.train (see conftest.worker_dies_mid_run), followed to its end here."""
    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
    config = ScriptRunConfig(
        str(source), script="train.py", compute_target=target.name, max_run_duration_seconds=limit
    )
    return (
        Experiment(Workspace.get(), "reattach")
        .submit(config, airflow_task=task)
        .wait_for_completion(show_output=False, raise_on_error=False)
    )


@on_process_targets
def test_a_run_that_removes_its_control_folder_still_stops_at_its_limit(target, tmp_path):
    source = tmp_path / "src"
    write_script(source, "train.py", LEAVES_A_CHILD.replace("REMOVE_CONTROL_FOLDER", "True"))
    # Nobody follows the run but its supervisor, which can no longer write anything to its folder.
    orphan = worker_dies_mid_run(source, target.name, max_run_duration_seconds=2)
    _assert_ended(
        _pids(orphan.handle["run_dir"]), "the run removed its control folder and ran past its 2 s limit"
    )

    record = _retry(source, target, limit=2)

    assert record.id == orphan.id and record.status == "Failed"
    control = f"{orphan.handle['run_dir']}/.amlrun"
    assert record.error == (
        f"The run ended without an exit code: the run's control folder {control} on {target.where} was removed "
        "while the run ran (by the script?), so its supervisor could not record how the run ended, and the "
        "run's log there is gone too."
    )


@on_process_targets
@pytest.mark.parametrize("follower", ["its task", "a retry"])
def test_a_supervisor_killed_alone_takes_its_run_with_it(target, tmp_path, follower):
    source = tmp_path / "src"
    write_script(source, "train.py", LEAVES_A_CHILD.replace("REMOVE_CONTROL_FOLDER", "False"))
    if follower == "its task":
        run = Experiment(Workspace.get(), "oom").submit(
            ScriptRunConfig(str(source), script="train.py", compute_target=target.name)
        )
        handle = run.handle
        assert handle is not None

        def kill_the_supervisor() -> None:
            _pids(handle.run_dir)
            os.kill(handle.pid, signal.SIGKILL)  # the supervisor alone, as the out-of-memory killer does

        killer = threading.Thread(target=kill_the_supervisor)
        killer.start()
        record = run.wait_for_completion(show_output=False, raise_on_error=False)
        killer.join()
        pids = _pids(handle.run_dir)
    else:
        orphan = worker_dies_mid_run(source, target.name)
        pids = _pids(orphan.handle["run_dir"])
        os.kill(orphan.handle["pid"], signal.SIGKILL)
        # The script dies with its supervisor at once, without anybody looking.
        _assert_ended(pids[:1], "the script outlived its supervisor", timeout=10)
        record = _retry(source, target)
        assert record.id == orphan.id

    # What the script started is ended by the target, which is sure it is the run's.
    _assert_ended(pids, "the run outlived its supervisor", timeout=1)
    assert record.status == "Failed"
    control = f"{record.handle['run_dir']}/.amlrun"
    if target.name == "local" and follower == "its task":
        # The task started the supervisor: it knows what ended it.
        assert record.error.startswith(
            f"The script failed (the run's supervisor on {target.where} was killed by SIGKILL before the run "
            "ended (if by the out-of-memory killer, the kernel log says so: dmesg)"
        )
    else:
        assert record.error.startswith(
            f"The run ended without an exit code: the run's supervisor on {target.where} ended without recording "
            "the run's exit "
            f"code in {control}: it was killed (if by the out-of-memory killer, the kernel log says so: dmesg), "
            f"or could not write there (a full disk?), in which case its message ends the run's log "
            f"({control}/std_log.txt)"
        )
    assert "the run had left running" in record.error
    assert record.error.endswith(("stopped.", "stopped)."))


SUBMIT = """
import json, logging, sys
from airflow_amlrun import Experiment, ScriptRunConfig, Workspace

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
config = ScriptRunConfig(sys.argv[1], script="train.py", arguments=sys.argv[3:], compute_target=sys.argv[2])
run = Experiment(Workspace.get(), "files").submit(config)
record = run.wait_for_completion(raise_on_error=False)
metrics = {point.name for point in Workspace.get().history.get_metrics(record.id)}
print(json.dumps({"status": str(record.status), "error": record.error, "metrics": sorted(metrics)}))
"""


def _submit_in_a_worker(source: Path, target: Target, *arguments: str) -> tuple[dict[str, Any], str]:
    """Submit and follow a run in a worker process of its own, which must be done within two minutes (a
    worker that hangs fails the test); the run's outcome, and the task log (output and warnings)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", SUBMIT, str(source), target.name, *arguments],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
            timeout=120,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the worker following the run hung; it said: {err.stderr!r}", pytrace=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout + done.stderr


@on_process_targets
@pytest.mark.parametrize("kind", ["FIFO", "link"])
def test_a_fifo_or_link_in_place_of_a_runs_file_hangs_nothing_and_is_not_read(target, tmp_path, kind):
    # Metrics in a file outside the run, which a link in place of the events file would make the worker read.
    outside = target.outside / f"metrics-{os.getpid()}.jsonl"
    outside.write_text(json.dumps({"kind": "metric", "name": "stolen", "value": 1.0}) + "\n")
    os.chown(outside, *_owner(target.outside))
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        """
        import os, sys, time
        events = os.environ["AMLRUN_EVENTS_FILE"]
        if sys.argv[1] == "FIFO":
            os.mkfifo(events)  # nobody ever writes it: opening it to read would block for good
        else:
            os.symlink(sys.argv[2], events)
        print(f"made a {sys.argv[1]}", flush=True)
        time.sleep(1)
        print("done")
        """,
    )
    try:
        outcome, log = _submit_in_a_worker(source, target, kind, str(outside))
    finally:
        outside.unlink()

    assert outcome == {"status": "Completed", "error": None, "metrics": []}
    assert f"made a {kind}" in log and "done" in log
    what = "a FIFO, not a regular file" if kind == "FIFO" else "a symbolic link"
    named = [line for line in log.splitlines() if "events.jsonl" in line and "it is not read" in line]
    assert len(named) == 1, log
    assert what in named[0]


def _owner(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_uid, status.st_gid


@pytest.mark.parametrize("link", ["logs/std_log.txt", "logs"])
def test_a_link_in_the_logs_folder_never_makes_the_worker_write_outside_the_run(amlrun_home, tmp_path, link):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "std_log.txt").write_text("the worker's own file\n")
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        f"""
        import os, shutil
        shutil.rmtree("logs", ignore_errors=True)
        os.makedirs("logs", exist_ok=True)
        if {link!r} == "logs":
            os.rmdir("logs")
            os.symlink({str(victim)!r}, "logs")
        else:
            os.symlink({str(victim / "std_log.txt")!r}, "logs/std_log.txt")
        print("trained")
        """,
    )
    record = (
        Experiment(Workspace.get(), "links")
        .submit(ScriptRunConfig(str(source), script="train.py"))
        .wait_for_completion(show_output=False)
    )

    assert record.status == "Completed"
    assert (victim / "std_log.txt").read_text() == "the worker's own file\n"
    assert sorted(p.name for p in victim.iterdir()) == ["std_log.txt"]
    assert "trained" in Path(str(record.logs_uri), "std_log.txt").read_text()
