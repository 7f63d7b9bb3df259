"""Reading a sweep: its runs, the best of them by the primary metric, and what its task returns."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from airflow_amlrun.history import RunRecord, RunStatus
from airflow_amlrun.hyperdrive.replay import HYPERPARAMETERS_TAG

if TYPE_CHECKING:
    from airflow_amlrun.hyperdrive.config import HyperDriveConfig
    from airflow_amlrun.workspace import Workspace


class SweepResults:
    """The reading side of a sweep (HyperDriveRun): its runs as the history holds them."""

    workspace: Workspace
    id: str
    config: HyperDriveConfig

    def get_children(self) -> list[RunRecord]:
        """The sweep's runs, oldest first."""
        return self.workspace.history.child_runs(self.id)

    def get_children_sorted_by_primary_metric(self) -> list[dict[str, Any]]:
        """Every run with its parameters, status, final primary metric and latest value of each metric, the
        best first; runs without the primary metric last."""
        goal, name = self.config.goal, self.config.primary_metric_name
        rows = [
            {
                "run_id": r.id,
                "hyperparameters": json.loads(r.tags.get(HYPERPARAMETERS_TAG, "{}")),
                "status": str(r.status),
                name: metric_of(r, name),
                "metrics": dict(r.metrics),
                "error": r.error,
            }
            for r in self.get_children()
        ]

        def key(row: dict[str, Any]) -> tuple[int, float]:
            value = row[name]
            if value is None or row["status"] != RunStatus.COMPLETED.value:
                return (1, 0.0)
            return (0, value if goal == "minimize" else -value)

        return sorted(rows, key=key)

    def get_best_run_by_primary_metric(self) -> RunRecord | None:
        """The Completed run with the best final primary metric, or None."""
        goal, name = self.config.goal, self.config.primary_metric_name
        done = [
            r
            for r in self.get_children()
            if r.status is RunStatus.COMPLETED and metric_of(r, name) is not None
        ]
        if not done:
            return None
        pick = min if goal == "minimize" else max
        return pick(done, key=lambda r: metric_of(r, name) or 0.0)

    def summary(self) -> dict[str, Any]:
        """What a task returns: the best run's summary, and every run's id, parameters and metrics."""
        best = self.get_best_run_by_primary_metric()
        return {
            "sweep_run_id": self.id,
            "best_run": best.summary() if best is not None else None,
            "children": self.get_children_sorted_by_primary_metric(),
        }


def metric_of(record: RunRecord, name: str) -> float | None:
    """A run's final value of a metric, if it is a finite number (a NaN would win or lose every comparison)."""
    value = record.metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
