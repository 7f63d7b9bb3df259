"""A run failed: what `amlrun` shows of it (its log's last lines, where the log is, tags, git), its whole log,
a running run's log followed to its end (or until nobody reports on it), what of a log reaches the terminal,
and the first use of an embedded workspace."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.run_log import printable
from tests.conftest import commit_all, worker_dies_mid_run, write_script

AMLRUN = str(Path(sys.executable).parent / "amlrun")

FAILING = """\
for i in range(30):
    print(f"line {i}")


def load():
    raise ValueError("the data has no column 'y'")


load()
"""


def amlrun(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AMLRUN, *argv], capture_output=True, text=True, env=env or os.environ.copy(), timeout=120
    )


def squeezed(text: str) -> str:
    """Text without white space and table borders, so a value folded over table lines reads whole."""
    return re.sub(r"[\s│┃]", "", text)


@pytest.fixture
def failed_run(amlrun_home: Path, tmp_path: Path) -> tuple[str, str]:
    """A real local run of a script that raises, from a git checkout with an uncommitted change: its id and
    the commit."""
    source = tmp_path / "src"
    write_script(source, "train.py", FAILING)
    commit = commit_all(source, "experiments", "first")
    with (source / "train.py").open("a") as script:
        script.write("# tried another column\n")
    run = Experiment(Workspace.get(), "cli_failed").submit(
        ScriptRunConfig(source, script="train.py", arguments=["--column", "y", "--rows", 30]),
        tags={"team": "forecasting"},
    )
    record = run.wait_for_completion(show_output=False, raise_on_error=False)
    assert str(record.status) == "Failed"
    return run.id, commit


def test_show_of_a_failed_run_gives_its_last_log_lines_log_location_tags_and_git(failed_run):
    run_id, commit = failed_run
    shown = amlrun("runs", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "The script failed (exit code 1)" in out
    # The traceback's last lines, and 20 lines in all: the last 14 printed lines before it.
    assert "Last 20 lines of its log:" in out
    tail = out[out.index("Last 20 lines of its log:") :].splitlines()[1:]
    assert tail[-1] == "ValueError: the data has no column 'y'"
    assert tail[0] == "line 16" and len(tail) == 20
    assert "line 15" not in out
    # Where the whole log is, and how to print it.
    location = Workspace.get().store.uri_for(f"runs/{run_id}/logs/std_log.txt")
    assert squeezed(location) in squeezed(out)
    assert Path(location).read_text().endswith("ValueError: the data has no column 'y'\n")
    assert f"`amlrunrunslogs{run_id}`" in squeezed(out)
    assert "team=forecasting" in out
    # Each field once: the tags in their own row, not also as the summary's JSON.
    fields = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") >= 3]
    assert fields.count("tags") == 1 and '{"team": "forecasting"}' not in out
    assert squeezed(f"{commit} on experiments, dirty: uncommitted changes, diff stored") in squeezed(out)
    assert "Traceback (most recent call last)" in out  # the script's, printed as its log has it

    fewer = amlrun("runs", "show", run_id, "--tail", "2")
    assert fewer.returncode == 0, fewer.stderr
    assert fewer.stdout.splitlines()[-3:] == [
        "Last 2 lines of its log:",
        "    raise ValueError(\"the data has no column 'y'\")",
        "ValueError: the data has no column 'y'",
    ]
    as_json = json.loads(amlrun("runs", "show", run_id, "--json", "--tail", "1").stdout)
    assert as_json["log"] == location and as_json["tags"] == {"team": "forecasting"}
    assert as_json["log_tail"] == ["ValueError: the data has no column 'y'"]
    assert as_json["git"]["commit"] == commit and as_json["git"]["dirty"] is True
    # As the table's row and GET /api/runs/{id} give them.
    assert as_json["arguments"] == ["--column", "y", "--rows", "30"]
    assert squeezed("arguments │ --column y --rows 30") in squeezed(out)


def test_logs_prints_the_whole_log_of_a_failed_run(failed_run):
    run_id, _commit = failed_run
    printed = amlrun("runs", "logs", run_id)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert lines[:30] == [f"line {i}" for i in range(30)]
    assert lines[30] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: the data has no column 'y'"
    stored = Path(Workspace.get().store.uri_for(f"runs/{run_id}/logs/std_log.txt")).read_text()
    assert printed.stdout == stored
    # Following a run that already ended prints the same, and ends with its outcome.
    followed = amlrun("runs", "logs", run_id, "--follow")
    assert followed.stdout == stored
    assert followed.returncode == 1
    assert f"Run {run_id} Failed: The script failed (exit code 1)." in " ".join(followed.stderr.split())


def test_status_filter_takes_any_case_and_a_bad_one_names_the_choices(failed_run, amlrun_home, tmp_path):
    run_id, _commit = failed_run
    write_script(tmp_path / "ok", "train.py", "print('fine')\n")
    done = Experiment(Workspace.get(), "cli_failed").submit(
        ScriptRunConfig(tmp_path / "ok", script="train.py")
    )
    done.wait_for_completion(show_output=False)
    for status in ("failed", "FAILED", "Failed"):
        listed = amlrun("runs", "list", "--status", status, "--json")
        assert listed.returncode == 0, listed.stderr
        assert [r["run_id"] for r in json.loads(listed.stdout)] == [run_id]
    completed = json.loads(amlrun("runs", "list", "--status", "completed", "--json").stdout)
    assert [r["run_id"] for r in completed] == [done.id]

    bad = amlrun("runs", "list", "--status", "broken")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        "argument --status: 'broken' is not a run status; use one of Queued, Preparing, Starting, Running, "
        "Finalizing, Completed, Failed, Canceled"
    ) in " ".join(bad.stderr.split())
    helped = amlrun("runs", "list", "--help")
    assert "Completed, Failed, Canceled" in " ".join(helped.stdout.split())


def test_restoring_an_unknown_id_says_no_run_or_snapshot_has_it_and_how_to_find_one(amlrun_home, tmp_path):
    restored = amlrun("snapshot", "restore", "nosuchrun", str(tmp_path / "restored"))
    said = " ".join(restored.stderr.split())
    assert restored.returncode == 2, said
    assert "No run or snapshot 'nosuchrun'" in said and "`amlrun runs list`" in said
    assert "BLAKE3" not in said and "Traceback" not in said
    assert not (tmp_path / "restored").exists()


SLOW = """\
import pathlib
import sys
import time

gate = pathlib.Path(sys.argv[1])
print("first line", flush=True)
while not gate.exists():
    time.sleep(0.05)
print("second line", flush=True)
time.sleep(0.5)
print("last line", flush=True)
sys.exit(int(sys.argv[2]))
"""


def _lines_of(stream: object) -> queue.Queue[str | None]:
    """The lines of a pipe as they come, None at its end."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.mark.parametrize(("exit_code", "outcome", "status"), [(0, 0, "Completed"), (3, 1, "Failed")])
def test_follow_prints_a_running_runs_lines_as_they_come_and_exits_with_its_outcome(
    amlrun_home, tmp_path, exit_code, outcome, status
):
    write_script(tmp_path / "src", "slow.py", SLOW)
    gate = tmp_path / "go"
    submitter, run_id = submitted(tmp_path / "src", "slow.py", [str(gate), str(exit_code)], "cli_follow")
    assert run_id.startswith("cli_follow_"), run_id
    follower = None
    try:
        follower, lines = following(run_id)
        assert lines.get(timeout=60) == "first line"
        # Printed while the run still waits for the gate: it goes on, and so does the follower.
        assert str(Workspace.get().get_run(run_id).status) == "Running"
        assert follower.poll() is None

        so_far = amlrun("runs", "logs", run_id)
        assert so_far.returncode == 0 and so_far.stdout == "first line\n"
        assert f"Run {run_id} is Running: this is its log so far" in " ".join(so_far.stderr.split())

        gate.touch()
        assert lines.get(timeout=60) == "second line"
        assert lines.get(timeout=60) == "last line"
        assert lines.get(timeout=60) is None
        assert follower.wait(timeout=60) == outcome
        said = " ".join(follower.stderr.read().split())  # type: ignore[union-attr]
        assert f"Run {run_id} {status}" in said
        if exit_code:
            assert "The script failed (exit code 3)" in said
        assert submitter.wait(timeout=60) == 0
    finally:
        for process in (follower, submitter):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_first_use_of_the_embedded_workspace_says_where_it_is_and_how_to_choose_another(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in ("AIRFLOW_HOME", "AIRFLOW_CONFIG", "AIRFLOW__AMLRUN__HOME", "AIRFLOW_CONN_AMLRUN_DEFAULT")
    }
    env["HOME"] = str(home)
    first = amlrun("runs", "list", env=env)
    assert first.returncode == 0, first.stderr
    said = " ".join(first.stderr.split())
    assert f"Created the embedded amlrun workspace in {home / 'airflow' / 'amlrun'}" in said
    assert "set AIRFLOW_HOME" in said and "create the connection 'amlrun_default' of type 'amlrun'" in said
    assert (home / "airflow" / "amlrun" / "history.db").is_file()

    again = amlrun("runs", "list", env=env)
    assert again.returncode == 0 and again.stderr == ""


def following(run_id: str) -> tuple[subprocess.Popen[str], queue.Queue[str | None]]:
    """`amlrun runs logs RUN_ID --follow` started, and the lines of its stdout as they come (None at its end)."""
    follower = subprocess.Popen(
        [AMLRUN, "runs", "logs", run_id, "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    return follower, _lines_of(follower.stdout)


def submitted(
    source: Path, script: str, arguments: list[str], experiment: str
) -> tuple[subprocess.Popen[str], str]:
    """A process submitting a run of script and waiting for its end (without printing its output), and the
    run's id."""
    submitter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
                config = ScriptRunConfig({str(source)!r}, script={script!r}, arguments={arguments!r})
                run = Experiment(Workspace.get(), {experiment!r}).submit(config)
                print(run.id, flush=True)
                run.wait_for_completion(show_output=False, raise_on_error=False)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert submitter.stdout is not None
    return submitter, submitter.stdout.readline().strip()


WARNS_THEN_FAILS = """\
import logging
import pathlib
import sys
import time

gate = pathlib.Path(sys.argv[1])
print("training", flush=True)
for batch in range(100):
    logging.warning("batch %d was slow", batch)
for batch in range(20):
    print(f"\\x1b[1mbatch {batch} done\\x1b[0m", flush=True)  # a colour code: the log marks it as stdout
while not gate.exists():
    time.sleep(0.05)
raise RuntimeError("the loss is nan")
"""


def test_follow_prints_a_log_with_stderr_lines_whole_through_the_runs_end(amlrun_home, tmp_path):
    # The follower reads 100 stderr lines on the target, then the rest (the traceback) from the store, where
    # the log is kept without the marks its lines there began with.
    write_script(tmp_path / "src", "train.py", WARNS_THEN_FAILS)
    gate = tmp_path / "go"
    submitter, run_id = submitted(tmp_path / "src", "train.py", [str(gate)], "cli_follow_stderr")
    follower = None
    try:
        follower, lines = following(run_id)
        seen = [lines.get(timeout=60) for _ in range(121)]
        assert sorted(seen, key=str) == sorted(
            [
                "training",
                *(f"WARNING:root:batch {i} was slow" for i in range(100)),
                *(f"batch {i} done" for i in range(20)),
            ],
            key=str,
        )
        assert str(Workspace.get().get_run(run_id).status) == "Running"  # all read on its target
        # The follower is held while the run ends and is recorded, so that it reads the rest from the store.
        follower.send_signal(signal.SIGSTOP)
        gate.touch()
        assert submitter.wait(timeout=60) == 0
        assert str(Workspace.get().get_run(run_id).status) == "Failed"
        follower.send_signal(signal.SIGCONT)

        rest = []
        while (line := lines.get(timeout=60)) is not None:
            rest.append(line)
        assert follower.wait(timeout=60) == 1
        assert rest[:1] == ["Traceback (most recent call last):"]
        assert rest[-1:] == ["RuntimeError: the loss is nan"]
        stored = Path(Workspace.get().store.uri_for(f"runs/{run_id}/logs/std_log.txt")).read_text()
        assert "\n".join(seen + rest) + "\n" == "\n".join(printable(line) for line in stored.split("\n"))
        said = " ".join(follower.stderr.read().split())  # type: ignore[union-attr]
        assert f"Run {run_id} Failed: The script failed (exit code 1)." in said
    finally:
        for process in (follower, submitter):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_follow_stops_with_its_own_status_when_nobody_reports_on_the_run(amlrun_home, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__AMLRUN__RECONCILE_AFTER_SECONDS", "2")
    write_script(tmp_path / "src", "train.py", "import time\nprint('epoch 1', flush=True)\ntime.sleep(300)\n")
    orphan = worker_dies_mid_run(tmp_path / "src")
    try:
        followed = amlrun("runs", "logs", orphan.id, "--follow")

        assert followed.returncode == 3, followed.stderr
        assert followed.stdout == "epoch 1\n"
        said = " ".join(followed.stderr.split())
        assert f"Run {orphan.id} is Running, but the task following it has not reported on it for" in said
        assert "`amlrun reconcile` settles it" in said
        assert str(Workspace.get().get_run(orphan.id).status) == "Running"  # reading settles nothing
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(orphan.handle["pid"], signal.SIGKILL)


PRINTS_ESCAPES = """\
import sys

print("\\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\\x07copied")
print("\\x1b]0;owned\\x07\\x1b[31mred\\x1b[0m and \\x1b[2Jcleared")
print("key s3cr3t-Store-Key leaked", file=sys.stderr)
sys.exit(1)
"""


def test_the_cli_prints_a_logs_text_without_terminal_controls_and_masks_the_workspaces_secrets(
    amlrun_home, tmp_path, monkeypatch
):
    # A workspace whose store is opened with a key, and a script that prints it and writes escape sequences
    # that would set the clipboard (OSC 52) and the title of the terminal showing its log.
    monkeypatch.setenv(
        "AIRFLOW_CONN_AMLRUN_DEFAULT",
        json.dumps(
            {
                "conn_type": "amlrun",
                "extra": {
                    "database_url": f"sqlite:///{amlrun_home / 'history.db'}",
                    "store_url": str(amlrun_home / "store"),
                    "storage_options": {"secret_key": "s3cr3t-Store-Key"},
                },
            }
        ),
    )
    amlrun_home.mkdir(parents=True, exist_ok=True)
    write_script(tmp_path / "src", "train.py", PRINTS_ESCAPES)
    run = Experiment(Workspace.get(), "cli_escapes").submit(
        ScriptRunConfig(tmp_path / "src", script="train.py")
    )
    run.wait_for_completion(show_output=False, raise_on_error=False)
    stored = Path(Workspace.get().store.uri_for(f"runs/{run.id}/logs/std_log.txt")).read_text()
    assert "\x1b]52;" in stored and "s3cr3t-Store-Key" in stored  # the store keeps what the script printed

    expected = ["copied", "red and cleared", "key *** leaked"]
    for printed in (amlrun("runs", "logs", run.id), amlrun("runs", "logs", run.id, "--follow")):
        assert printed.stdout.splitlines() == expected
        assert "\x1b" not in printed.stdout + printed.stderr and "\x07" not in printed.stdout
    shown = amlrun("runs", "show", run.id, "--tail", "3")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[-3:] == expected
    assert "\x1b" not in shown.stdout and "s3cr3t" not in shown.stdout


def test_logs_of_a_run_longer_than_a_read_end_with_its_last_line_without_a_newline(amlrun_home, tmp_path):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import sys
        for step in range(11000):
            print(f"step {step:05d} " + "." * 90)
        sys.stdout.write("final progress 100%")
        """,
    )
    run = Experiment(Workspace.get(), "cli_long").submit(ScriptRunConfig(tmp_path / "src", script="train.py"))
    assert str(run.wait_for_completion(show_output=False).status) == "Completed"
    stored = Path(Workspace.get().store.uri_for(f"runs/{run.id}/logs/std_log.txt")).read_text()
    assert len(stored) > 1 << 20 and stored.endswith("." * 90 + "\nfinal progress 100%")

    for printed in (amlrun("runs", "logs", run.id), amlrun("runs", "logs", run.id, "--follow")):
        assert printed.stdout == stored + "\n"
    shown = amlrun("runs", "show", run.id, "--tail", "2")
    assert shown.stdout.splitlines()[-2:] == ["step 10999 " + "." * 90, "final progress 100%"]
