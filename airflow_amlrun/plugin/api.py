"""FastAPI app mounted in Airflow's API server: the run history as JSON and as plain pages.

Every route needs a signed-in Airflow user, by the API server's own JWT (a bearer token, or the cookie the
Airflow UI sets), and shows only the runs that user may see (`access`).
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.core_api.security import requires_authenticated
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse

from airflow_amlrun.history import RunHistory, RunNotFoundError, RunRecord
from airflow_amlrun.plugin.access import Reader, ReaderDep, VisibleRunsDep


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Airflow mounts this app with a bare app.mount, so inside it request.app is this app, and Airflow's
    # security dependencies look for the auth manager in request.app.state. The API server enters a mounted
    # app's lifespan after it has initialised its auth manager: hand over that same instance, as Airflow
    # does for its own app.
    app.state.auth_manager = get_auth_manager()
    yield


def create_app() -> FastAPI:
    app = FastAPI(
        title="AML Run",
        description="Runs, metrics and outputs recorded by airflow-amlrun.",
        lifespan=_lifespan,
        # Refuses anonymous callers on every route, before any route's own dependencies run.
        dependencies=[Depends(requires_authenticated())],
        # FastAPI serves its schema and docs pages outside the app's dependencies: keep every route signed-in.
        openapi_url=None,
    )

    @app.get("/api/runs")
    def list_runs(
        visible: VisibleRunsDep,
        experiment: str | None = None,
        status: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
    ) -> list[dict[str, Any]]:
        runs = _history().list_runs(
            experiment=experiment,
            status=status,
            limit=limit,
            dag_ids=visible.dag_ids,
            runs_without_dag=visible.runs_without_dag,
        )
        return [r.summary() for r in runs]

    @app.get("/api/runs/{run_id}")
    def get_run(run_id: str, reader: ReaderDep) -> dict[str, Any]:
        history = _history()
        record = _get(history, run_id, reader)
        points = history.get_metrics(run_id)
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
    def list_experiments(visible: VisibleRunsDep) -> list[dict[str, Any]]:
        experiments = _history().list_experiments(
            dag_ids=visible.dag_ids, runs_without_dag=visible.runs_without_dag
        )
        return [{"name": e.name, "runs": e.run_count} for e in experiments]

    @app.get("/runs", response_class=HTMLResponse)
    def runs_page(visible: VisibleRunsDep, experiment: str | None = None) -> str:
        runs = _history().list_runs(
            experiment=experiment,
            limit=200,
            dag_ids=visible.dag_ids,
            runs_without_dag=visible.runs_without_dag,
        )
        rows = "".join(_row(r) for r in runs)
        return _page(
            "Runs",
            "<table><tr><th>Run</th><th>Experiment</th><th>Status</th><th>Target</th><th>Start</th>"
            f"<th>Duration (s)</th><th>Metrics</th></tr>{rows}</table>",
        )

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(run_id: str, reader: ReaderDep) -> str:
        record = _get(_history(), run_id, reader)
        fields = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in record.summary().items()
        )
        return _page(f"Run {record.id}", f"<table>{fields}</table>")

    return app


def _history() -> RunHistory:
    """The run history of the workspace the plugin shows (``[amlrun] workspace_conn_id``)."""
    from airflow_amlrun.workspace import Workspace

    return Workspace.get().history


def _get(history: RunHistory, run_id: str, reader: Reader) -> RunRecord:
    """The run, if it exists (else 404) and the reader may see it (else 403)."""
    try:
        record = history.get_run(run_id)
    except RunNotFoundError:
        # The history's own message names the database; a reader of the pages need not learn where it is.
        raise HTTPException(status_code=404, detail=f"No run {run_id!r}.") from None
    reader.check(record)
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
