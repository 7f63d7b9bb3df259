"""A run goes on when the run history is away or refuses a value: bookkeeping never cancels training, and only
a history that is away is waited for."""

from __future__ import annotations

import json
import logging
import threading
import traceback
from datetime import UTC, datetime
from typing import Any

import pytest

from airflow_amlrun import Workspace
from airflow_amlrun.history import HistoryRefusedError, RunBookkeeper, RunHistory, RunStatus
from tests.conftest import dag_source, wait_until_running, write_script

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_a_run_goes_on_while_postgresql_restarts_and_every_metric_arrives(run_dag, tmp_path, own_postgres):
    restarted = tmp_path / "restarted"
    write_script(
        tmp_path / "src",
        "train.py",
        f"""
        import os, time
        from airflow_amlrun.run_context import Run
        run = Run.get_context()
        step = 0
        # Training logs a loss every few milliseconds, before, during and after the database restart.
        while not os.path.exists({str(restarted)!r}) or step < 400:
            run.log("loss", 1.0 / (step + 1), step=step)
            step += 1
            time.sleep(0.01)
        run.tag("steps", step)
        print("trained", step, "steps")
    """,
    )

    def restart_the_database() -> None:
        try:
            if wait_until_running() is not None:
                own_postgres.stop()
                threading.Event().wait(3)  # down for a while, as a restart or a failover is
                own_postgres.start()
        finally:
            restarted.touch()  # whatever happened here, the script must not wait forever

    restarter = threading.Thread(target=restart_the_database)
    restarter.start()
    result = run_dag(dag_source(tmp_path / "src"))
    restarter.join()

    assert result.state == "success", result.log
    assert "does not answer" in result.log and "The run goes on" in result.log
    assert "the run history answers again" in result.log
    ws = Workspace.get()
    run = ws.get_run(result.xcoms["train"]["run_id"])
    assert run.status == "Completed"
    steps = int(run.tags["steps"])
    assert f"trained {steps} steps" in result.log
    points = ws.history.get_metrics(run.id, "loss")
    assert [p.step for p in points] == list(range(steps))
    assert run.metrics["loss"] == pytest.approx(1.0 / steps)


def test_a_history_that_stays_away_fails_the_task_but_never_the_finished_run(
    run_dag, tmp_path, own_postgres, monkeypatch
):
    from airflow_amlrun.history import bookkeeping

    monkeypatch.setattr(bookkeeping, "FINAL_WRITE_SECONDS", 2.0)
    database_down = tmp_path / "database-down"
    write_script(
        tmp_path / "src",
        "train.py",
        f"""
        import os, time
        from airflow_amlrun.run_context import Run
        while not os.path.exists({str(database_down)!r}):
            time.sleep(0.02)
        Run.get_context().log("accuracy", 0.93)
        open("outputs/model.txt", "w").write("trained")
        print("training finished")
    """,
    )

    def stop_the_database() -> None:
        try:
            if wait_until_running() is not None:
                own_postgres.stop()
        finally:
            database_down.touch()

    stopper = threading.Thread(target=stop_the_database)
    stopper.start()
    result = run_dag(dag_source(tmp_path / "src"))
    stopper.join()
    own_postgres.start()

    assert result.state == "failed"
    assert "training finished" in result.log
    assert "HistoryUnavailableError" in result.log
    assert "did not accept its outcome (Completed) for 2 s" in result.log
    assert "a retry of this task re-attaches to the finished run" in result.log
    [run] = Workspace.get().list_runs()
    assert run.status == "Running"  # left for the retry, neither Canceled nor Failed
    assert run.handle is not None


def test_metrics_the_history_cannot_keep_are_refused_without_touching_the_run(
    run_dag, tmp_path, workspace_backend
):
    write_script(
        tmp_path / "src",
        "train.py",
        """
        import json, os
        from airflow_amlrun.run_context import Run
        run = Run.get_context()
        for epoch in range(3):
            run.log("loss", 0.1, step=epoch + 0.5)  # a half step: the history keeps integer steps only
            run.log("accuracy", epoch / 4, step=epoch)
        run.log("n" * 300, 1.0)
        run.log("tokens_seen", 0.5, step=2**40)
        # Lines an older run_context, or a script writing the file itself, could leave behind.
        with open(os.environ["AMLRUN_EVENTS_FILE"], "a") as events:
            events.write(json.dumps({"kind": "metric", "name": "m" * 300, "value": 1}) + "\\n")
            events.write(json.dumps({"kind": "metric", "name": "huge_step", "value": 1, "step": 2**70}) + "\\n")
        run.log("after", 2)
        print("training went on to the end")
    """,
    )
    result = run_dag(dag_source(tmp_path / "src"))

    assert result.state == "success", result.log
    assert "training went on to the end" in result.log
    warning = (
        "amlrun: WARNING: Run.log: a point of metric 'loss' was not recorded: step 0.5 of metric 'loss' must be "
        "an integer from -2**63 to 2**63-1. The run goes on"
    )
    assert result.log.count(warning) == 1  # once, not once per epoch
    assert "a point of metric 'nnnn" in result.log
    assert "is 300 characters long; the run history keeps names of at most 255" in result.log
    assert "a metric was not recorded: metric name 'mmmm" in result.log
    assert "a metric was not recorded: step 1180591620717411303424 of metric 'huge_step'" in result.log
    ws = Workspace.get()
    run = ws.get_run(result.xcoms["train"]["run_id"])
    assert run.status == "Completed"
    assert run.metrics == {"accuracy": 0.5, "after": 2, "tokens_seen": 0.5}
    assert [p.step for p in ws.history.get_metrics(run.id, "accuracy")] == [0, 1, 2]
    [point] = ws.history.get_metrics(run.id, "tokens_seen")
    assert point.step == 2**40


def never_wait(seconds: float) -> None:
    raise AssertionError(f"the bookkeeper waited {seconds} s for a history that answered and refused")


def test_a_value_the_history_refuses_is_dropped_with_its_reason_and_holds_back_no_later_write(
    postgres_database, caplog
):
    history = RunHistory(postgres_database)
    history.create_run(run_id="r1", experiment="refusals", target="local")
    book = RunBookkeeper(history, "r1", sleep=never_wait)
    caplog.set_level(logging.WARNING, logger="airflow_amlrun.history.bookkeeping")

    # outputs_uri is a VARCHAR(1024) on PostgreSQL; a tag must be JSON.
    book.update(status=RunStatus.RUNNING, outputs_uri="file:///" + "x" * 2000)
    book.add_tags({"note": object(), "stage": "train"})  # type: ignore[dict-item]
    book.update(status=RunStatus.FINALIZING)
    book.add_tags({"epochs": "3"})

    run = history.get_run("r1")
    assert run.status is RunStatus.FINALIZING
    assert run.outputs_uri is None and run.logs_uri is None
    assert run.tags == {"stage": "train", "epochs": "3"}
    assert book.flush()  # nothing left pending: the refused values were dropped, not kept to retry
    warnings = caplog.text
    assert "refused to record field outputs_uri = 'file:///xxxxx" in warnings
    assert "... (2010 characters) (DataError: value too long for type character varying(1024))" in warnings
    refused_tag = "refused to record tag 'note' (TypeError: Object of type object is not JSON serializable)"
    assert refused_tag in warnings
    assert "the run and its later writes go on" in warnings
    assert "does not answer" not in warnings


def test_a_final_outcome_the_history_refuses_is_reported_at_once_with_its_reason(postgres_database):
    history = RunHistory(postgres_database)
    history.create_run(run_id="r1", experiment="refusals", target="local")
    book = RunBookkeeper(history, "r1", sleep=never_wait)

    with pytest.raises(HistoryRefusedError) as caught:
        book.finish(
            status=RunStatus.COMPLETED, end_time=datetime.now(UTC), outputs_uri="s3://b/" + "k" * 2000
        )

    message = str(caught.value)
    assert "refused to record outputs_uri of its outcome" in message
    assert "value too long for type character varying(1024)" in message
    assert "The history is up and answered; it refuses these values, so waiting would not help" in message
    assert "The rest of its outcome was recorded (status Completed)" in message
    assert "Check that the history database is up" not in message
    run = history.get_run("r1")
    assert run.status is RunStatus.COMPLETED and run.end is not None
    assert run.outputs_uri is None


def test_a_run_whose_outcome_the_history_refuses_fails_the_task_at_once_saying_why(
    run_dag, tmp_path, amlrun_home, postgres_database, monkeypatch
):
    from airflow_amlrun.history import bookkeeping

    # Only bounds a regression (a refusal waited out as an outage) to seconds; a refusal is not waited for.
    monkeypatch.setattr(bookkeeping, "FINAL_WRITE_SECONDS", 5.0)
    # A store whose URL is longer than the 1024 characters the history keeps of an outputs URI.
    store = amlrun_home.joinpath(*["s" * 250] * 5)
    store.mkdir(parents=True)
    monkeypatch.setenv(
        "AIRFLOW_CONN_AMLRUN_DEFAULT",
        json.dumps(
            {"conn_type": "amlrun", "extra": {"database_url": postgres_database, "store_url": str(store)}}
        ),
    )
    write_script(
        tmp_path / "src",
        "train.py",
        """
        open("outputs/model.txt", "w").write("trained")
        print("training finished")
    """,
    )
    result = run_dag(dag_source(tmp_path / "src"))

    assert result.state == "failed"
    assert "training finished" in result.log
    assert "HistoryRefusedError" in result.log
    assert "refused to record logs_uri, outputs_uri" in result.log  # the logs are stored first
    assert "value too long for type character varying(1024)" in result.log
    assert "The rest of its outcome was recorded (status Completed)" in result.log
    assert "Check that the history database is up" not in result.log
    [run] = Workspace.get().list_runs()
    assert run.status is RunStatus.COMPLETED
    assert run.outputs_uri is None


def test_a_run_stopped_before_it_starts_while_the_history_is_away_waits_for_it_once(
    tmp_path, own_postgres, monkeypatch
):
    # Ctrl-C (or a kill) as the run is recorded, the history gone meanwhile: recording its Canceled end waits for
    # the history as long as an outcome may, then says so; the start does not wait all over again.
    from airflow_amlrun import Experiment, ScriptRunConfig
    from airflow_amlrun.history import HistoryUnavailableError, bookkeeping

    monkeypatch.setattr(bookkeeping, "FINAL_WRITE_SECONDS", 1.0)
    write_script(tmp_path / "src", "train.py", "print('the script ran')\n")

    def stopped_as_the_history_goes(run: Any) -> None:
        own_postgres.stop()
        run.cancel("Canceled: stopped as it was recorded.")

    with pytest.raises(HistoryUnavailableError) as raised:
        Experiment(Workspace.get(), "away").submit(
            ScriptRunConfig(str(tmp_path / "src"), script="train.py"), on_created=stopped_as_the_history_goes
        )
    own_postgres.start()

    assert "did not accept its outcome (Canceled) for 1 s" in str(raised.value)
    # Said once, as a traceback shows it: not tried (and waited for) again while its failure was handled.
    assert "".join(traceback.format_exception(raised.value)).count("did not accept its outcome") == 1
    [run] = Workspace.get().list_runs()
    assert (run.status, run.handle, run.start) == ("Queued", None, None)  # left for reconcile; never started
