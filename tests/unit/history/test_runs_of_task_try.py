"""Which runs one try of an Airflow task instance holds: what a deferred task resumed only to fail settles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow_amlrun.history import RunHistory


def test_a_try_holds_its_own_runs_and_sweeps_newest_first_not_a_sweeps_runs_nor_other_tries(
    tmp_path: Path,
) -> None:
    history = RunHistory(f"sqlite:///{tmp_path / 'history.db'}")
    task = {"dag_id": "train", "task_id": "fit", "airflow_run_id": "manual__1", "map_index": None}

    def record(run_id: str, target: str = "local", **fields: Any) -> None:
        history.create_run(
            run_id=run_id, experiment="train", target=target, **{**task, "try_number": 2, **fields}
        )

    record("earlier-try", try_number=1)
    record("this-try")
    record("sweep", target="hyperdrive")
    record("sweep-child", parent_run_id="sweep")
    record("mapped", map_index=0)
    record("other-task", task_id="evaluate")
    record("other-dag-run", airflow_run_id="manual__2")

    found = history.runs_of_task_try(**task, try_number=2)

    assert [r.id for r in found] == ["sweep", "this-try"]
    assert [r.id for r in history.runs_of_task_try(**{**task, "map_index": 0}, try_number=2)] == ["mapped"]
    assert [r.id for r in history.runs_of_task_try(**task, try_number=1)] == ["earlier-try"]
