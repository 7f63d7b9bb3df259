"""FastAPI app mounted in Airflow's API server: the run history as JSON and as plain pages."""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse

from airflow_amlrun.history import RunNotFoundError, RunRecord


def _workspace() -> Any:
    from airflow_amlrun.workspace import Workspace

    return Workspace.get()


def create_app() -> FastAPI:
    app = FastAPI(title="AML Run", description="Runs, metrics and outputs recorded by airflow-amlrun.")

    @app.get("/api/runs")
    def list_runs(
        experiment: str | None = None, status: str | None = None, limit: int = Query(100, ge=1, le=1000)
    ) -> list[dict[str, Any]]:
        return [
            r.summary() for r in _workspace().list_runs(experiment=experiment, status=status, limit=limit)
        ]

    @app.get("/api/runs/{run_id}")
    def get_run(run_id: str) -> dict[str, Any]:
        ws = _workspace()
        record = _get(ws, run_id)
        points = ws.history.get_metrics(run_id)
        return {
            **record.summary(),
            "arguments": record.arguments,
            "tags": record.tags,
            "airflow": {
                "dag_id": record.dag_id,
                "task_id": record.task_id,
                "run_id": record.airflow_run_id,
                "map_index": record.map_index,
                "try_number": record.try_number,
            },
            "metric_history": [{"name": p.name, "step": p.step, "value": p.value} for p in points],
        }

    @app.get("/api/experiments")
    def list_experiments() -> list[dict[str, Any]]:
        return [{"name": e.name, "runs": e.run_count} for e in _workspace().list_experiments()]

    @app.get("/runs", response_class=HTMLResponse)
    def runs_page(experiment: str | None = None) -> str:
        rows = "".join(_row(r) for r in _workspace().list_runs(experiment=experiment, limit=200))
        return _page(
            "Runs",
            "<table><tr><th>Run</th><th>Experiment</th><th>Status</th><th>Target</th><th>Start</th>"
            f"<th>Duration (s)</th><th>Metrics</th></tr>{rows}</table>",
        )

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(run_id: str) -> str:
        record = _get(_workspace(), run_id)
        fields = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in record.summary().items()
        )
        return _page(f"Run {record.id}", f"<table>{fields}</table>")

    return app


def _get(ws: Any, run_id: str) -> RunRecord:
    try:
        record: RunRecord = ws.get_run(run_id)
    except RunNotFoundError as err:
        raise HTTPException(status_code=404, detail=str(err)) from None
    return record


def _row(record: RunRecord) -> str:
    metrics = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.metrics.items()
    )
    cells = [
        f'<a href="runs/{html.escape(record.id)}">{html.escape(record.id)}</a>',
        html.escape(record.experiment),
        html.escape(str(record.status)),
        html.escape(record.target),
        html.escape(record.start.isoformat(timespec="seconds") if record.start else ""),
        html.escape(str(record.duration_seconds or "")),
        html.escape(metrics),
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}td,th{padding:.2em .6em;text-align:left;"
        "border-bottom:1px solid #ddd}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
