"""The run API users know from Azure ML, on a real local run: on the handle Experiment.submit returns and on
Run.get of the recorded run, alike (status, details, full metric series, files, tags, names, waiting)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from airflow_amlrun import Experiment, Run, ScriptRunConfig, Workspace
from airflow_amlrun.errors import ConfigurationError, DownloadError, RunFailedError
from airflow_amlrun.history import RunHistory
from tests.conftest import write_script

AMLRUN = str(Path(sys.executable).parent / "amlrun")

TRAIN = """\
import os
from airflow_amlrun.run_context import Run

run = Run.get_context()
for epoch, loss in enumerate([0.5, 0.25, 0.125]):
    run.log("loss", loss, step=epoch)
    print(f"epoch {epoch}: loss {loss}")
run.log("accuracy", 0.9)
run.tag("data", "v2")
os.makedirs("outputs/sub", exist_ok=True)
with open("outputs/model.txt", "w") as f:
    f.write("weights")
with open("outputs/sub/notes.txt", "w") as f:
    f.write("notes")
"""


@pytest.fixture
def completed(amlrun_home: Path, tmp_path: Path) -> tuple[Workspace, object]:
    write_script(tmp_path / "src", "train.py", TRAIN)
    run = Experiment(Workspace.get(), "run_api").submit(
        ScriptRunConfig(tmp_path / "src", script="train.py", arguments=["--alpha", 0.5]), tags={"team": "a"}
    )
    run.wait_for_completion(show_output=False)
    return Workspace.get(), run


def test_the_handle_and_the_record_answer_alike_with_full_metric_series(completed, tmp_path):
    ws, submitted = completed
    recorded = Run.get(ws, submitted.id)
    for run in (submitted, recorded):
        assert run.get_status() == "Completed"
        # A metric logged three times is its series; one logged once is its value.
        assert run.get_metrics() == {"loss": [0.5, 0.25, 0.125], "accuracy": 0.9}
        assert run.get_metrics("loss") == {"loss": [0.5, 0.25, 0.125]}
        assert run.get_metrics("never") == {}
        assert run.get_file_names() == ["logs/std_log.txt", "outputs/model.txt", "outputs/sub/notes.txt"]
        assert run.get_tags() == {"team": "a", "data": "v2"}


def test_details_have_the_shape_of_azure_mls(completed):
    ws, run = completed
    details = Run.get(ws, run.id).get_details()
    assert details["runId"] == run.id and details["status"] == "Completed" and details["target"] == "local"
    assert details["startTimeUtc"].endswith("Z") and details["endTimeUtc"] >= details["startTimeUtc"]
    definition = details["runDefinition"]
    assert definition["script"] == "train.py" and definition["arguments"] == ["--alpha", "0.5"]
    assert definition["framework"] == "Python" and definition["environment"]["user_managed"] is True
    assert details["properties"]["ContentSnapshotId"] == ws.get_run(run.id).snapshot_id
    [(name, where)] = details["logFiles"].items()
    assert name == "logs/std_log.txt" and "epoch 2: loss 0.125" in Path(where).read_text()
    assert "error" not in details and "inputDatasets" not in details


def test_tags_display_name_and_description_are_set_and_kept(completed):
    ws, run = completed
    run.tag("reviewed")
    run.tag("score", 3)
    run.display_name = "ridge, alpha 0.5"
    Run.get(ws, run.id).description = "the baseline"
    again = Run.get(ws, run.id)
    assert again.get_tags() == {"team": "a", "data": "v2", "reviewed": "", "score": "3"}
    assert (again.display_name, again.description) == ("ridge, alpha 0.5", "the baseline")
    assert ws.get_run(run.id).summary()["display_name"] == "ridge, alpha 0.5"
    with pytest.raises(ConfigurationError, match="display_name=3 must be a string"):
        again.display_name = 3  # type: ignore[assignment]
    # The command line shows them too.
    shown = subprocess.run(
        [AMLRUN, "runs", "show", run.id, "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(shown.stdout)["description"] == "the baseline"


def test_files_download_one_by_one_or_by_prefix(completed, tmp_path):
    ws, run = completed
    path = run.download_file("outputs/model.txt", tmp_path / "got")
    assert Path(path).read_text() == "weights"
    into = tmp_path / "folder"
    into.mkdir()
    assert Path(run.download_file("outputs/sub/notes.txt", into)).read_text() == "notes"
    written = Run.get(ws, run.id).download_files("outputs/", tmp_path / "all", append_prefix=False)
    assert sorted(Path(p).relative_to(tmp_path / "all").as_posix() for p in written) == [
        "model.txt",
        "sub/notes.txt",
    ]
    kept = run.download_files("outputs/sub", tmp_path / "kept")
    assert [Path(p).relative_to(tmp_path / "kept").as_posix() for p in kept] == ["outputs/sub/notes.txt"]
    with pytest.raises(
        ConfigurationError, match=r"has no file 'outputs/missing.txt'. Its files: logs/std_log"
    ):
        run.download_file("outputs/missing.txt")
    with pytest.raises(ConfigurationError, match="names begin with outputs/ or logs/"):
        run.download_file("../history.db")


def test_a_download_that_would_write_two_files_to_one_path_writes_nothing_and_names_both(
    amlrun_home, tmp_path
):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import os

        for folder, text in (("outputs/run1", "first"), ("outputs/run/1", "second")):
            os.makedirs(folder)
            with open(f"{folder}/model.txt", "w") as f:
                f.write(text)
        """,
    )
    run = Experiment(Workspace.get(), "run_api").submit(ScriptRunConfig(tmp_path / "src", script="train.py"))
    run.wait_for_completion(show_output=False)
    out = tmp_path / "out"

    with pytest.raises(ConfigurationError) as raised:
        run.download_files("outputs/run", out, append_prefix=False)
    assert (
        "would write both the run's file 'outputs/run/1/model.txt' and its file 'outputs/run1/model.txt' to "
        "'1/model.txt' in the output directory, one over the other: nothing was downloaded. Pass "
        "append_prefix=True to keep each file's whole name, or a narrower prefix such as 'outputs/run/'."
    ) in str(raised.value)
    assert not out.exists()
    # Either way out: each file whole, under its own name.
    written = run.download_files("outputs/run", out)
    assert sorted(Path(p).read_text() for p in written) == ["first", "second"]
    assert [
        Path(p).name for p in run.download_files("outputs/run/", out / "narrower", append_prefix=False)
    ] == ["model.txt"]


def test_a_download_never_writes_through_a_link_out_of_the_output_directory(completed, tmp_path):
    _ws, run = completed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "outputs").symlink_to(elsewhere)
    with pytest.raises(ConfigurationError, match="would be written outside the output directory"):
        run.download_files("outputs/", out)
    assert list(elsewhere.iterdir()) == []


def test_a_download_that_fails_partway_takes_back_what_it_wrote_and_names_the_file(completed, tmp_path):
    ws, run = completed
    out = tmp_path / "out"
    (out / "outputs").mkdir(parents=True)
    (out / "outputs" / "model.txt").write_text("the model I had")
    (out / "mine.txt").write_text("mine")
    # The last of the run's files in the store is no longer its own (a link someone put in its place).
    stored = Path(ws.store.uri_for(f"runs/{run.id}/outputs/sub/notes.txt"))
    stored.unlink()
    stored.symlink_to(tmp_path / "elsewhere.txt")

    for folder in (out, tmp_path / "new" / "out"):
        with pytest.raises(
            DownloadError, match=r"downloading its file 'outputs/sub/notes.txt' to '.*sub/notes.txt'"
        ):
            Run.get(ws, run.id).download_files(output_directory=folder)
    # Nothing of the downloads is left, and what was there before is as it was.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "out" in p.parts) == [
        "out",
        "out/mine.txt",
        "out/outputs",
        "out/outputs/model.txt",
    ]
    assert (out / "outputs" / "model.txt").read_text() == "the model I had"
    assert not (tmp_path / "new").exists()


def test_waiting_on_a_recorded_run_streams_its_output_and_a_failure_raises_with_its_last_lines(
    amlrun_home, tmp_path
):
    write_script(
        tmp_path / "src",
        "train.py",
        """\
        import time
        for i in range(5):
            print(f"step {i}", flush=True)
            time.sleep(0.2)
        raise SystemExit("the data is gone")
        """,
    )
    ws = Workspace.get()
    submitted = Experiment(ws, "run_api").submit(ScriptRunConfig(tmp_path / "src", script="train.py"))
    # This process's ScriptRun follows the run (as a task would); Run.get waits on it from the record.
    follower = threading.Thread(
        target=lambda: submitted.wait_for_completion(show_output=False, raise_on_error=False)
    )
    follower.start()
    lines: list[str] = []
    try:
        with pytest.raises(RunFailedError) as failed:
            Run.get(ws, submitted.id).wait_for_completion(output=lines.append)
    finally:
        follower.join(60)
    assert [line for line in lines if line.startswith("step")] == [f"step {i}" for i in range(5)]
    assert "the data is gone" in str(failed.value) and "  | step 4" in str(failed.value)
    assert failed.value.run_id == submitted.id and "step 4" in failed.value.log_tail


# Prints, then says so in the file its argument names, then waits to be stopped.
PRINTS_THEN_WAITS = """\
import pathlib, sys, time
for step in range(3):
    print(f"step {step}", flush=True)
pathlib.Path(sys.argv[1]).touch()
time.sleep(300)
"""


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, "the script never printed"
        time.sleep(0.05)


@pytest.mark.parametrize("sink", ["kept", "failing"])
def test_canceling_a_run_nobody_follows_passes_on_what_it_printed_and_records_it_whatever_the_sink_does(
    amlrun_home, tmp_path, caplog, sink
):
    write_script(tmp_path / "src", "train.py", PRINTS_THEN_WAITS)
    config = ScriptRunConfig(tmp_path / "src", script="train.py", arguments=[str(tmp_path / "printed")])
    run = Experiment(Workspace.get(), "run_api").submit(config)
    _wait_for(tmp_path / "printed")
    lines: list[str] = []

    def failing(line: str) -> None:
        lines.append(line)
        raise OSError(28, "No space left on device")

    run.cancel("Canceled by hand.", output=lines.append if sink == "kept" else failing)

    record = Workspace.get().get_run(run.id)
    assert (record.status, record.error) == ("Canceled", "Canceled by hand.")
    if sink == "kept":
        assert lines == ["step 0", "step 1", "step 2"]
    else:
        # The sink is given the first line only; the rest is in the run's log, and the log says why.
        assert lines == ["step 0"]
        assert (
            f"Run {run.id}: passing its output on failed ([Errno 28] No space left on device)" in caplog.text
        )
    assert (
        "step 2"
        in Path(Run.get(Workspace.get(), run.id).get_details()["logFiles"]["logs/std_log.txt"]).read_text()
    )


def test_a_kill_while_the_end_of_a_run_is_recorded_does_not_read_the_run_again(amlrun_home, tmp_path):
    # A task killed while it reads the rest of a run that ended: Airflow's handler runs on_kill (cancel) on the
    # thread it interrupts, here at the first line read. The output is more than one read of the log (1 MiB).
    write_script(
        tmp_path / "src", "train.py", 'for step in range(20000):\n    print(f"step {step:05d} " + "x" * 90)\n'
    )
    run = Experiment(Workspace.get(), "run_api").submit(ScriptRunConfig(tmp_path / "src", script="train.py"))
    status = run.target.wait(run.handle, 60)
    assert not status.running
    lines: list[str] = []
    read_again: list[str] = []

    def killed_at_the_first_line(line: str) -> None:
        lines.append(line)
        if len(lines) == 1:
            run.cancel(output=read_again.append)

    record = run.conclude(status, killed_at_the_first_line)

    assert read_again == []
    assert lines == [f"step {step:05d} " + "x" * 90 for step in range(20000)]
    assert record.status == "Completed"
    assert Workspace.get().get_run(run.id).status == "Completed"


def test_downgrading_below_the_display_name_keeps_runs_and_metrics(tmp_path, monkeypatch):
    from alembic import command
    from alembic.config import Config

    from airflow_amlrun.history import MetricPoint, database

    url = f"sqlite:///{tmp_path}/history.db"
    history = RunHistory(url)
    history.create_run(run_id="named", experiment="old", target="local", display_name="first")
    history.add_metrics("named", [MetricPoint("loss", 0.5, seq=0)])
    config = Config()
    config.set_main_option("script_location", str(Path(database.__file__).with_name("migrations")))
    with history.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0007")
    history.dispose()
    monkeypatch.setattr(database, "_migrated", set())
    upgraded = RunHistory(url)
    assert upgraded.get_run("named").display_name is None
    assert [p.value for p in upgraded.get_metrics("named")] == [0.5]
