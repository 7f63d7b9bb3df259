"""What every target does the same way: the command line and variables of a run, the supervisor's request and
verdicts, and reading a run's growing files without ever hanging or following a link."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import airflow_amlrun
from airflow_amlrun import run_context
from airflow_amlrun.environment import Environment
from airflow_amlrun.targets import common
from airflow_amlrun.targets.base import Job
from airflow_amlrun.targets.common import exit_status, python_path, recorded_status, unmarked
from airflow_amlrun.targets.supervisor import STDERR_MARK, STDOUT_MARK
from tests.unit.targets.jobs import a_job


def _job(**changes: object) -> Job:
    values: dict[str, object] = {
        "arguments": ["--alpha", "0.5"],
        "environment_variables": {"SHARED": "job", "STAGE": "dev"},
        "max_run_duration_seconds": 60.0,
    }
    values.update(changes)
    return a_job(Environment(environment_variables={"FROM_ENV": "env", "SHARED": "env"}), **values)


# the command line, the variables, the supervisor's request


def test_a_script_runs_under_the_environments_interpreter_with_its_arguments():
    assert common.job_argv(_job(), "/opt/env/bin/python") == [
        "/opt/env/bin/python",
        "train.py",
        "--alpha",
        "0.5",
    ]


def test_a_command_list_runs_as_given_and_a_command_string_through_the_shell():
    assert common.job_argv(_job(script=None, command=["sh", "run.sh", "a b"]), "python") == [
        "sh",
        "run.sh",
        "a b",
    ]
    assert common.job_argv(_job(script=None, command="make train && echo done"), "python") == [
        "/bin/sh",
        "-c",
        "make train && echo done",
    ]


def test_the_script_sees_its_variables_and_the_runs_own_ones_cannot_be_overridden():
    job = _job(
        environment_variables={"SHARED": "job", run_context.RUN_ID_ENV: "not-the-run"},
        secret_environment_variables={"API_TOKEN": "s3cret"},
    )

    env = common.job_environment(job, run_dir="/amlrun/run", events_file="/amlrun/run/.amlrun/events.jsonl")

    assert env["FROM_ENV"] == "env"
    assert env["SHARED"] == "job"  # the job's own variables win over its environment's
    assert env["API_TOKEN"] == "s3cret"
    assert env[run_context.RUN_ID_ENV] == "exp_1_cafe"
    assert env[run_context.EXPERIMENT_ENV] == "exp"
    assert env[run_context.EVENTS_FILE_ENV] == "/amlrun/run/.amlrun/events.jsonl"
    assert env[run_context.OUTPUTS_DIR_ENV] == "/amlrun/run/outputs"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_the_supervisor_is_told_the_limit_the_grace_and_to_end_the_whole_group():
    request = common.supervisor_request(_job(max_run_duration_seconds=2.5), ["python3", "train.py"])

    assert request == {
        "argv": ["python3", "train.py"],
        "max_seconds": 2.5,
        "grace_seconds": common.TERM_GRACE_SECONDS,
        "forward_signals": True,
        "end_group": True,
    }
    assert common.supervisor_request(_job(), ["x"], {"A": "1"})["env"] == {"A": "1"}


def test_in_a_container_the_supervisor_passes_the_stop_signal_on_and_leaves_the_end_to_the_container():
    request = common.supervisor_request(
        _job(max_run_duration_seconds=None), ["python3", "train.py"], {}, in_container=True
    )

    assert request == {
        "argv": ["python3", "train.py"],
        "max_seconds": None,
        "grace_seconds": common.TERM_GRACE_SECONDS,
        "forward_signals": True,
        "env": {},
    }


@pytest.mark.parametrize(
    ("ended_by", "for_limit"),
    [
        (json.dumps({"reason": "max_run_duration", "max_seconds": 2}), True),
        (json.dumps({"reason": "max_run_duration", "max_seconds": 2}).encode(), True),
        (json.dumps({"reason": "canceled"}), False),
        (None, False),
        (b"", False),
        (b"max_run_duration", False),  # not JSON: written by something else than the supervisor
        (b'["max_run_duration"]', False),
        (b"\xff\xfe", False),
    ],
)
def test_only_the_supervisors_own_record_says_the_limit_ended_a_run(ended_by, for_limit):
    assert common.stopped_for_limit(ended_by) is for_limit


@pytest.mark.parametrize(
    ("ended_by", "signal_name"),
    [
        (json.dumps({"reason": "stopped", "signal": "SIGTERM"}), "SIGTERM"),
        (json.dumps({"reason": "stopped", "signal": "SIGINT"}).encode(), "SIGINT"),
        (json.dumps({"reason": "max_run_duration", "max_seconds": 2}), None),  # the supervisor's own stop
        (None, None),
        (b"stopped", None),
        (b'["stopped"]', None),
        (b"\xff\xfe", None),
    ],
)
def test_a_stop_that_reached_the_run_is_read_from_the_supervisors_record(ended_by, signal_name):
    assert common.stopped_by(ended_by) == signal_name
    assert common.exit_status(0, stopped_by=common.stopped_by(ended_by)).stopped_by == signal_name


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        (
            {"control_exists": False},
            "the run's control folder /r/.amlrun on host 10.0.0.5 was removed while the run ran (by the script?), "
            "so its supervisor could not record how the run ended, and the run's log there is gone too",
        ),
        (
            {"control_exists": True, "killed_by": "SIGKILL"},
            "the run's supervisor on host 10.0.0.5 was killed by SIGKILL before the run ended (if by the "
            "out-of-memory killer, the kernel log says so: dmesg)",
        ),
        (
            {"control_exists": True, "leftovers": 1},
            "the run's supervisor on host 10.0.0.5 ended without recording the run's exit code in /r/.amlrun: it "
            "was killed (if by the out-of-memory killer, the kernel log says so: dmesg), or could not write "
            "there (a full disk?), in which case its message ends the run's log (/r/.amlrun/std_log.txt); the 1 "
            "process the run had left running was stopped",
        ),
        (
            {"control_exists": False, "leftovers": 3},
            "the run's control folder /r/.amlrun on host 10.0.0.5 was removed while the run ran (by the script?), "
            "so its supervisor could not record how the run ended, and the run's log there is gone too; the 3 "
            "processes the run had left running were stopped",
        ),
    ],
)
def test_a_run_without_an_exit_code_is_explained_by_what_became_of_its_supervisor(kwargs, said):
    assert common.supervisor_lost_reason("host 10.0.0.5", "/r/.amlrun", **kwargs) == said


# What a script gets of airflow_amlrun: the package's __init__, run_context, the MLflow capture, the rest of the
# package (Workspace, or None), and whether its run is offline (started by hand, as here).
IMPORTS = """
import airflow_amlrun
from airflow_amlrun import run_context
import airflow_amlrun.mlflow_capture as capture
try:
    from airflow_amlrun import Workspace
except ImportError:
    Workspace = None
print(airflow_amlrun.__file__, run_context.__file__, capture.__file__, getattr(Workspace, "__module__", None))
print(run_context.Run.get_context().offline)
"""


def _imported(pylib: Path, *flags: str) -> list[str]:
    """What a fresh interpreter with the run folder's pylib first on its path imports (see IMPORTS), started
    where no airflow_amlrun is, as a run's script is."""
    done = subprocess.run(
        [sys.executable, *flags, "-c", IMPORTS],
        env={"PYTHONPATH": str(pylib)},
        cwd=pylib.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_run_context_package_gives_way_to_an_installed_airflow_amlrun_and_stands_in_for_a_missing_one(
    tmp_path,
):
    root = common.write_run_context_package(tmp_path / "pylib")
    assert sorted(p.name for p in (root / "airflow_amlrun").iterdir()) == [
        "__init__.py",
        "mlflow_capture",
        "run_context.py",
    ]

    # Installed (this interpreter's site-packages): the installed package, whole, as if no pylib were there.
    installed = Path(airflow_amlrun.__file__).parent
    assert _imported(root) == [
        str(installed / "__init__.py"),
        str(installed / "run_context.py"),
        str(installed / "mlflow_capture" / "__init__.py"),
        "airflow_amlrun.workspace",
        "True",
    ]
    # -S: no site-packages, so nothing but the folder provides airflow_amlrun (nor anything it might import).
    standin = root / "airflow_amlrun"
    assert _imported(root, "-S") == [
        str(standin / "__init__.py"),
        str(standin / "run_context.py"),
        str(standin / "mlflow_capture" / "__init__.py"),
        "None",
        "True",
    ]


def _installed_elsewhere(site: Path, version: str, protocol: int | None) -> Path:
    """A site folder holding an airflow_amlrun of `version` whose run_context is its own, declaring run protocol
    `protocol` (or none, as releases before the number)."""
    package = site / "airflow_amlrun"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f'"""airflow-amlrun {version}."""\n\n__version__ = "{version}"\nWorkspace = "installed"\n'
    )
    declared = f"RUN_PROTOCOL = {protocol}\n\n" if protocol is not None else ""
    (package / "run_context.py").write_text(
        f"{declared}class Run:\n    offline = 'installed'\n\n    @classmethod\n"
        "    def get_context(cls):\n        return cls()\n"
    )
    return site


def test_the_run_context_package_gives_way_only_to_an_airflow_amlrun_of_the_workers_run_protocol(tmp_path):
    root = common.write_run_context_package(tmp_path / "pylib")
    script = (
        "import airflow_amlrun.run_context as rc; print(rc.__file__, flush=True)\n"
        "from airflow_amlrun import Workspace; print(Workspace)"
    )

    def imported(site: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-S", "-c", script],
            env={"PYTHONPATH": f"{root}:{site}"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )

    # Another version of the same run protocol (a patch release either side): that package, whole, and
    # nothing said.
    same = _installed_elsewhere(tmp_path / "same-site", "0.1.1", run_context.RUN_PROTOCOL)
    done = imported(same)
    assert (done.returncode, done.stdout.split(), done.stderr) == (
        0,
        [str(same / "airflow_amlrun" / "run_context.py"), "installed"],
        "",
    )

    # One whose run_context declares no protocol (older) or another: the worker's run_context, no more of the
    # package, and a line saying why and what to install.
    for version, protocol, speaks in [
        ("0.0.1", None, "declares no run protocol"),
        ("9.0.0", run_context.RUN_PROTOCOL + 1, f"speaks run protocol {run_context.RUN_PROTOCOL + 1}"),
    ]:
        other = _installed_elsewhere(tmp_path / f"site-{version}", version, protocol)
        done = imported(other)
        assert done.stdout.split() == [str(root / "airflow_amlrun" / "run_context.py")]
        assert done.returncode == 1
        assert "ImportError: cannot import name 'Workspace' from 'airflow_amlrun'" in done.stderr
        assert done.stderr.splitlines()[0] == (
            f"airflow-amlrun: this interpreter has airflow-amlrun {version} installed "
            f"({other / 'airflow_amlrun' / '__init__.py'}), whose run_context {speaks}, and the worker that "
            f"started the run speaks run protocol {run_context.RUN_PROTOCOL}: the script gets the worker's "
            "airflow_amlrun.run_context, not the installed package. For the rest of the package, install on "
            "this interpreter the worker's version of airflow-amlrun (or another whose run_context.py declares "
            f"RUN_PROTOCOL = {run_context.RUN_PROTOCOL})."
        )


# reading a run's growing files


def _read_as_it_grows(data: bytes, cuts: list[int]) -> list[str]:
    """Every line a follower gets from data written in pieces (ending at the cuts), read after each piece,
    then once more as final."""
    lines: list[str] = []
    offset = 0
    for written in [*sorted(cuts), len(data)]:
        chunk = common.lines_from(data[offset:written], offset, final=False)
        lines += chunk.lines
        offset = chunk.offset
    chunk = common.lines_from(data[offset:], offset, final=True)
    return lines + chunk.lines


@given(
    st.lists(
        st.text(
            alphabet=st.characters(
                blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
            )
        ),
        max_size=8,
    ),
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_a_follower_gets_every_line_once_whole_however_the_writes_are_cut(lines, newline_at_end, cuts):
    data = "\n".join(lines).encode() + (b"\n" if newline_at_end and lines else b"")
    cuts = [min(cut, len(data)) for cut in cuts]

    assert _read_as_it_grows(data, cuts) == data.decode().splitlines()


def test_a_partial_line_waits_for_its_end_unless_the_run_is_over():
    assert common.lines_from(b"epoch 1\nepo", 100, final=False) == common.Chunk(["epoch 1"], 108, pending=3)
    # What waits is counted: a reader sees the log grow while a progress bar writes no newline.
    assert common.lines_from(b"epo", 108, final=False) == common.Chunk([], 108, pending=3)
    assert common.lines_from(b"epoch\r 2", 108, final=False) == common.Chunk([], 108, pending=8)
    assert common.lines_from(b"epoch 2", 108, final=True) == common.Chunk(["epoch 2"], 115)


def test_a_line_longer_than_the_read_cap_is_handed_over_in_pieces():
    chunk = common.lines_from(b"x" * common.READ_CAP, 0, final=False)
    assert chunk.offset == common.READ_CAP and chunk.lines == ["x" * common.READ_CAP]


def test_a_progress_bar_on_stderr_stays_one_marked_line():
    from airflow_amlrun.run_output import OutputLine

    data = STDERR_MARK + b"\r 10%|#         |\r 50%|#####     |\r100%|##########|\n" + b"epoch 1\r\n"
    lines = [OutputLine.read(line) for line in common.lines_from(data, 0, final=False).lines]
    assert [(line.stream, line) for line in lines] == [
        ("stderr", "\r 10%|#         |\r 50%|#####     |\r100%|##########|"),
        ("stdout", "epoch 1"),
    ]


@given(st.binary(), st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_lines_end_at_newlines_only(data, cuts):
    while b"\r\n" in data:
        data = data.replace(b"\r\n", b"\n")  # a "\r" before a newline is not kept
    assert (
        _read_as_it_grows(data, [min(cut, len(data)) for cut in cuts])
        == data.decode("utf-8", errors="replace").split("\n")[
            : -1 if data.endswith(b"\n") or not data else None
        ]
    )


def test_a_line_cut_by_the_read_cap_says_it_goes_on():
    chunk = common.lines_from(STDERR_MARK + b"E" * common.READ_CAP, 0, final=False)
    assert chunk.cut and chunk.offset == common.READ_CAP + len(STDERR_MARK)
    assert not common.lines_from(b"E" * 10 + b"\n", chunk.offset, final=False).cut


def test_a_finished_log_longer_than_the_read_cap_keeps_its_last_line():
    data = b"epoch 1\n" * (common.READ_CAP // 8) + b"done"
    chunk = common.lines_from(data, 0, final=True)
    assert chunk.lines[-2:] == ["epoch 1", "done"] and chunk.offset == len(data)
    # A read that filled the cap may have cut its last line: that waits for the next read.
    capped = common.lines_from(data[: common.READ_CAP], 0, final=True)
    assert capped.lines[-1] == "epoch 1" and capped.offset == common.READ_CAP


def test_bytes_that_are_not_utf8_are_shown_not_fatal():
    assert common.lines_from(b"loss \xff\n", 0, final=False).lines == ["loss \ufffd"]


def test_a_growing_log_is_read_from_an_offset(tmp_path):
    log = tmp_path / "std_log.txt"
    log.write_bytes(b"epoch 0\nepoch 1\nepo")

    first = common.read_lines(log, 0, final=False)
    with log.open("ab") as out:
        out.write(b"ch 2\n")
    second = common.read_lines(log, first.offset, final=False)

    assert first.lines == ["epoch 0", "epoch 1"]
    assert second.lines == ["epoch 2"] and second.offset == log.stat().st_size
    assert common.read_lines(tmp_path / "not-yet.txt", 7, final=False) == common.Chunk([], 7)


def test_a_fifo_in_place_of_a_log_is_named_once_and_read_as_empty(tmp_path, caplog):
    fifo = tmp_path / "std_log.txt"
    os.mkfifo(fifo)
    reads: list[common.Chunk] = []
    # Opening a FIFO nobody writes to blocks for good: read in a thread, so that a hang fails, not hangs.
    reader = threading.Thread(
        target=lambda: reads.extend(common.read_lines(fifo, 0, final) for final in (False, True))
    )
    reader.start()
    reader.join(10)

    assert not reader.is_alive(), "reading a FIFO hung"
    assert reads == [common.Chunk([], 0), common.Chunk([], 0)]
    assert [r.getMessage() for r in caplog.records] == [
        f"The run's file {fifo} is not a regular file: it is not read, and counts as empty."
    ]


def test_a_link_in_place_of_a_log_is_not_followed(tmp_path, caplog):
    secret = tmp_path / "worker.cfg"
    secret.write_text("password = hunter2\n")
    link = tmp_path / "std_log.txt"
    link.symlink_to(secret)

    assert common.read_lines(link, 0, final=True) == common.Chunk([], 0)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"The run's file {link} cannot be opened (")
    assert warning.endswith("): it is not read, and counts as empty.")


def test_a_control_file_is_read_from_the_runs_control_folder(tmp_path):
    control = tmp_path / "run" / common.CONTROL_DIR
    control.mkdir(parents=True)
    (control / common.EXIT_CODE).write_text("3\n")
    (control / common.EVENTS).write_text('{"kind": "metric"}\n{"kin')

    assert common.read_control(tmp_path / "run", common.EXIT_CODE) == b"3\n"
    assert common.read_control(tmp_path / "run", common.ENDED_BY) == b""  # not written: not ended by a limit
    assert common.read_control_lines(tmp_path / "run", common.EVENTS, 0, final=False) == common.Chunk(
        ['{"kind": "metric"}'], 19, pending=5
    )


@pytest.mark.parametrize("where", ["the file", "the control folder"])
def test_a_link_the_script_puts_in_its_control_folder_is_not_followed(tmp_path, caplog, where):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / common.EXIT_CODE).write_text("0\n")
    run = tmp_path / "run"
    if where == "the file":
        (run / common.CONTROL_DIR).mkdir(parents=True)
        (run / common.CONTROL_DIR / common.EXIT_CODE).symlink_to(elsewhere / common.EXIT_CODE)
    else:
        run.mkdir()
        (run / common.CONTROL_DIR).symlink_to(elsewhere)

    assert common.read_control(run, common.EXIT_CODE) == b""
    assert common.read_control(run, common.EXIT_CODE) == b""
    [warning] = [r.getMessage() for r in caplog.records]  # named once however often it is read
    assert warning.startswith(f"The run's file {run}/")
    assert warning.endswith(": it is not read, and counts as empty.")


def test_a_run_killed_by_a_signal_is_said_so_with_its_host() -> None:
    on_worker = exit_status(128 + signal.SIGKILL)
    on_host = exit_status(128 + signal.SIGTERM, on="gpu-box")

    assert (on_worker.exit_code, on_worker.reason) == (137, "killed by signal SIGKILL")
    assert (on_host.exit_code, on_host.reason) == (143, "killed by signal SIGTERM on gpu-box")


@given(st.integers(min_value=-1, max_value=128) | st.none())
def test_an_exit_status_of_the_script_itself_gives_no_reason(code: int | None) -> None:
    status = exit_status(code, timed_out=True)

    assert (status.running, status.exit_code, status.reason, status.timed_out) == (False, code, None, True)


def test_an_exit_status_past_every_named_signal_is_kept_without_a_reason() -> None:
    # A real-time signal has a number but no name of its own: the status is kept as it is.
    unnamed = next(n for n in range(1, 127) if n not in {s.value for s in signal.Signals})

    status = exit_status(128 + unnamed, on="gpu-box")

    assert (status.exit_code, status.reason) == (128 + unnamed, None)


def test_a_run_stopped_for_its_time_limit_says_where() -> None:
    status = recorded_status(143, b'{"reason": "max_run_duration"}\n', "the worker")

    assert status.timed_out and status.exit_code == 143 and status.stopped_by is None
    assert status.reason == "stopped on the worker for exceeding max_run_duration_seconds"


@pytest.mark.parametrize(
    ("ended_by", "stop"),
    [
        (None, None),
        (b"", None),
        (b"not json", None),
        (b'{"reason": "stopped", "signal": "SIGTERM"}', "SIGTERM"),
    ],
)
def test_a_recorded_exit_status_names_its_signal_on_the_host_and_the_stop_that_found_it(
    ended_by: bytes | None, stop: str | None
) -> None:
    status = recorded_status(137, ended_by, "gpu-box", on="gpu-box")

    assert (status.timed_out, status.exit_code, status.stopped_by) == (False, 137, stop)
    assert status.reason == "killed by signal SIGKILL on gpu-box"


def test_run_context_comes_first_on_the_python_path() -> None:
    assert python_path("/amlrun/pylib", None) == "/amlrun/pylib"
    assert python_path("/amlrun/pylib", "") == "/amlrun/pylib"
    assert python_path("/amlrun/pylib", "/opt/lib:/usr/lib") == "/amlrun/pylib:/opt/lib:/usr/lib"


def test_a_run_folder_is_removed_only_where_this_worker_keeps_its_runs(tmp_path: Path, caplog) -> None:
    runs = tmp_path / "runs"
    (runs / "exp_1_cafe" / "outputs").mkdir(parents=True)
    precious = tmp_path / "home" / "airflow"
    precious.mkdir(parents=True)

    # A run row is data: one whose recorded folder was changed to point elsewhere removes nothing.
    for recorded in (str(precious), str(runs / ".."), str(runs / "exp_1_cafe" / ".."), str(runs)):
        common.remove_run_dir(recorded, runs)
    assert precious.is_dir() and (runs / "exp_1_cafe").is_dir()
    assert f"The recorded run folder {precious} is not in {runs}" in caplog.text

    common.remove_run_dir(str(runs / "exp_1_cafe"), runs)
    assert not (runs / "exp_1_cafe").exists()


_LINE_TEXT = st.one_of(
    st.binary(),
    st.tuples(st.sampled_from([STDERR_MARK, STDOUT_MARK, b"\x1b[31m", b"\x1b"]), st.binary()).map(b"".join),
).filter(lambda b: b"\n" not in b)


def _marked(stderr: bool, text: bytes) -> bytes:
    """A line as the supervisor writes it to the log (see supervisor.py)."""
    if stderr:
        return STDERR_MARK + text
    return STDOUT_MARK + text if text.startswith(b"\x1b") else text


@given(
    lines=st.lists(st.tuples(st.booleans(), _LINE_TEXT), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_a_kept_log_is_the_marked_log_without_its_marks_however_it_is_read(
    lines: list[tuple[bool, bytes]], cuts: list[int]
) -> None:
    raw = b"".join(_marked(stderr, text) + b"\n" for stderr, text in lines)
    points = sorted({min(cut, len(raw)) for cut in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]

    assert b"".join(unmarked(pieces)) == b"".join(text + b"\n" for _, text in lines)


def test_output_lines_say_the_stream_the_script_wrote_them_to() -> None:
    from airflow_amlrun.run_output import OutputLine

    line = OutputLine.read(STDERR_MARK.decode() + "Traceback (most recent call last):")
    assert (line, line.stream, line.is_error_output) == ("Traceback (most recent call last):", "stderr", True)
    plain = OutputLine.read("epoch 1")
    assert (plain, plain.stream, plain.is_error_output) == ("epoch 1", "stdout", False)
