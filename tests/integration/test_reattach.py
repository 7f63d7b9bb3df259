"""A retry follows the run its earlier try left behind instead of starting a second one."""

from __future__ import annotations

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.run import AirflowTask
from tests.conftest import worker_dies_mid_run, write_script


def test_retry_after_the_worker_died_reattaches_to_the_running_script(amlrun_home, tmp_path):
    source = tmp_path / "src"
    starts = tmp_path / "starts.txt"
    write_script(
        source,
        "train.py",
        f"""
        import time
        from airflow_amlrun.run_context import Run
        open({str(starts)!r}, "a").write("started\\n")
        run = Run.get_context()
        for epoch in range(6):
            print(f"epoch {{epoch}}", flush=True)
            run.log("loss", 1 / (epoch + 1), step=epoch)
            time.sleep(0.5)
    """,
    )
    # Try 1: a worker that submits the run, then dies hard while the script runs.
    orphan = worker_dies_mid_run(source, settle=0.6)
    assert orphan.status == "Running"

    # Try 2: the same task instance submits again.
    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
    lines: list[str] = []
    run = Experiment(Workspace.get(), "reattach").submit(
        ScriptRunConfig(source, script="train.py"), airflow_task=task
    )
    record = run.wait_for_completion(output=lines.append)

    assert record.id == orphan.id
    assert record.status == "Completed"
    assert record.try_number == 2
    assert [line for line in lines if line.startswith("epoch")] == [f"epoch {n}" for n in range(6)]
    assert [p.step for p in Workspace.get().history.get_metrics(record.id, "loss")] == list(range(6))
    assert starts.read_text() == "started\n"  # the script ran once
    assert len(Workspace.get().list_runs()) == 1


def test_retry_records_a_run_that_never_started_as_lost_and_submits_anew(amlrun_home, train_dir):
    ws = Workspace.get()
    ws.history.create_run(
        run_id="reattach_1_deadbeef",
        experiment="reattach",
        target="local",
        dag_id="retrain",
        task_id="train",
        airflow_run_id="manual_1",
        try_number=1,
    )
    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)

    record = (
        Experiment(ws, "reattach")
        .submit(ScriptRunConfig(train_dir, script="train.py"), airflow_task=task)
        .wait_for_completion(show_output=False)
    )

    assert record.status == "Completed" and record.id != "reattach_1_deadbeef"
    lost = ws.get_run("reattach_1_deadbeef")
    assert lost.status == "Failed"
    assert "Lost" in lost.error
