"""The example retraining DAG over three weekly logical dates: the first run promotes, a better model is
promoted over it, a worse one is not and says why."""

from __future__ import annotations

from pathlib import Path

import pendulum

from airflow_amlrun import Workspace
from airflow_amlrun.model import Model

DAGS = Path(__file__).resolve().parents[2] / "dags"


def test_only_a_better_model_is_promoted(amlrun_home, run_dag) -> None:  # type: ignore[no-untyped-def]
    source = (DAGS / "scheduled_retraining.py").read_text().replace('"scheduled_retraining"', '"DAG_ID"')
    beside = {"train_diabetes/train.py": (DAGS / "train_diabetes" / "train.py").read_text()}
    ws = Workspace.get()

    def week(day: int, alpha: float):  # type: ignore[no-untyped-def]
        result = run_dag(
            source, beside=beside, logical_date=pendulum.datetime(2026, 3, day, tz="UTC"), alpha=alpha
        )
        assert result.state == "success", result.log
        return result, ws.get_run(result.xcoms["train"]["run_id"])

    first, run1 = week(1, 0.5)
    decision = first.xcoms["promote"]
    assert decision["promoted"] and decision["version"] == 1
    assert "is the first with the label 'production'" in decision["reason"]
    assert run1.tags["data_as_of"] == "2026-03-01"
    assert Model(ws, "diabetes-ridge", label="production").run_id == run1.id

    better, run2 = week(8, 0.01)
    assert run2.metrics["mse"] < run1.metrics["mse"]
    assert better.xcoms["promote"]["promoted"] and better.xcoms["promote"]["version"] == 2
    production = Model(ws, "diabetes-ridge", label="production")
    assert (production.version, production.run_id, production.tags) == (2, run2.id, {"alpha": "0.01"})

    worse, run3 = week(15, 50.0)
    decision = worse.xcoms["promote"]
    assert not decision["promoted"] and decision["version"] == 2
    assert decision["reason"].startswith(f"not promoted: mse {run3.metrics['mse']:g} does not beat")
    assert f"of diabetes-ridge version 2 (production, from run {run2.id})" in decision["reason"]
    assert decision["reason"] in worse.log
    assert ws.get_run(run3.id).tags["promotion"] == decision["reason"]
    assert [m.version for m in Model.list(ws, "diabetes-ridge")] == [2, 1]
    assert Model(ws, "diabetes-ridge", label="production").run_id == run2.id
