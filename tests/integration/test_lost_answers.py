"""A start whose answer is lost never leaves a run going on unseen, nor a second one started blindly.

The SSH host is real; only the moment the answer is lost is chosen by the test: the target starts the run on
the host, then its answer does not arrive (as when the connection drops during that round trip).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.errors import TargetUnreachableError
from airflow_amlrun.submission import AirflowTask
from airflow_amlrun.targets import registry
from airflow_amlrun.targets.base import Job
from airflow_amlrun.targets.handles import SSHHandle
from airflow_amlrun.targets.ssh import SSHTarget, SSHTargetUnreachableError
from tests.conftest import write_script
from tests.integration.sshd_host import SshdHost

CONN_ID = "ssh_lossy"


class AnswerLostSSHTarget(SSHTarget):
    """Starts the run on the host, then loses the answer: an error the waiting side cannot tell apart."""

    def submit(self, job: Job) -> SSHHandle:
        super().submit(job)
        raise OSError("the connection dropped before the host's answer arrived")


class AnswerLostUnstoppableSSHTarget(AnswerLostSSHTarget):
    """As above, and the run found on the host cannot be stopped (the connection drops again)."""

    def cancel(self, handle: SSHHandle) -> bool:
        raise OSError("the connection dropped while stopping the run")


class HostGoneSSHTarget(SSHTarget):
    """Starts the run on the host, then the host cannot be reached any more."""

    def submit(self, job: Job) -> SSHHandle:
        super().submit(job)
        raise SSHTargetUnreachableError(f"Lost the connection to {self.where}", host=self.host)


@pytest.fixture
def lossy_ssh(ssh_host: SshdHost, amlrun_home: Path, monkeypatch: pytest.MonkeyPatch) -> SshdHost:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}",
        ssh_host.connection(amlrun_io_timeout=3, amlrun_reconnect_timeout=10),
    )
    return ssh_host


def use_target(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    monkeypatch.setitem(registry.CONNECTION_KINDS, "ssh", f"{__name__}:{cls.__name__}")


def _script(tmp_path: Path, host: SshdHost) -> tuple[Path, Path]:
    # The host's home outlives a test session, and tmp_path's name repeats from one session to the next.
    starts = host.home / f"starts-{tmp_path.name}-{secrets.token_hex(4)}.txt"
    source = tmp_path / "src"
    write_script(
        source,
        "train.py",
        f"""
        import time
        open({str(starts)!r}, "a").write("started\\n")
        print("training", flush=True)
        time.sleep(4)
        print("done", flush=True)
        """,
    )
    return source, starts


def test_a_run_started_whose_answer_was_lost_is_found_and_stopped(lossy_ssh, tmp_path, monkeypatch):
    source, starts = _script(tmp_path, lossy_ssh)
    use_target(monkeypatch, AnswerLostSSHTarget)

    with pytest.raises(OSError, match="answer arrived"):
        Experiment(Workspace.get(), "lossy").submit(
            ScriptRunConfig(str(source), script="train.py", compute_target=CONN_ID)
        )

    [run] = Workspace.get().list_runs()
    assert run.status == "Failed"
    assert "could not be started" in run.error
    assert run.handle is not None  # found on the host by its run id
    time.sleep(5)  # longer than the script would have run
    assert starts.read_text() == "started\n"
    # The host's own log, read after the script would have finished: it was stopped, not left to run.
    host_log = (Path(run.handle["run_dir"]) / ".amlrun" / "std_log.txt").read_text()
    assert "training" in host_log and "done" not in host_log


def test_a_run_found_but_not_stopped_after_a_lost_answer_is_left_for_the_retry(
    lossy_ssh, tmp_path, monkeypatch
):
    source, starts = _script(tmp_path, lossy_ssh)
    config = ScriptRunConfig(str(source), script="train.py", compute_target=CONN_ID)
    use_target(monkeypatch, AnswerLostUnstoppableSSHTarget)

    with pytest.raises(TargetUnreachableError, match="stopping it failed"):
        Experiment(Workspace.get(), "lossy").submit(config, airflow_task=_task(1))

    [left] = Workspace.get().list_runs()
    assert left.status == "Starting"  # not Failed: it runs, and the row says where
    assert left.handle is not None and left.handle["run_id"] == left.id

    use_target(monkeypatch, SSHTarget)
    record = (
        Experiment(Workspace.get(), "lossy")
        .submit(config, airflow_task=_task(2))
        .wait_for_completion(show_output=False)
    )

    assert record.id == left.id and record.status == "Completed"
    assert starts.read_text() == "started\n"  # one execution, followed to its end by the retry
    assert "done" in (Path(record.logs_uri) / "std_log.txt").read_text()


def _task(try_number: int) -> AirflowTask:
    return AirflowTask("retrain", "train", "manual_1", None, try_number)


def test_a_run_started_on_a_host_that_is_then_lost_is_left_for_the_retry(lossy_ssh, tmp_path, monkeypatch):
    source, starts = _script(tmp_path, lossy_ssh)
    config = ScriptRunConfig(str(source), script="train.py", compute_target=CONN_ID)

    use_target(monkeypatch, HostGoneSSHTarget)
    with pytest.raises(SSHTargetUnreachableError):
        Experiment(Workspace.get(), "lossy").submit(config, airflow_task=_task(1))
    [left] = Workspace.get().list_runs()
    assert left.status == "Starting" and left.handle is None  # not recorded Failed: it may well run

    use_target(monkeypatch, SSHTarget)
    record = (
        Experiment(Workspace.get(), "lossy")
        .submit(config, airflow_task=_task(2))
        .wait_for_completion(show_output=False)
    )

    assert record.id == left.id and record.status == "Completed"
    assert starts.read_text() == "started\n"  # one execution
    assert "done" in (Path(record.logs_uri) / "std_log.txt").read_text()
