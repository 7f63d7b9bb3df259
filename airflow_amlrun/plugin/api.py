"""FastAPI app mounted in Airflow's API server: the run history as JSON (`runs_api`) and as plain pages.

Every route needs a signed-in Airflow user, by the API server's own JWT (a bearer token, or the cookie the
Airflow UI sets), and shows only the runs that user may see (`access`).
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.core_api.security import requires_authenticated
from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse

from airflow_amlrun.history import RunRecord
from airflow_amlrun.plugin.access import ReaderDep, VisibleRunsDep
from airflow_amlrun.plugin.runs_api import history, router, visible_run


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
        # FastAPI serves its schema and docs pages outside the app's dependencies: the schema is served by a
        # route of the app instead (/api/openapi.json), signed-in like every other.
        openapi_url=None,
    )

    app.include_router(router)

    @app.get("/runs", response_class=HTMLResponse)
    def runs_page(visible: VisibleRunsDep, experiment: str | None = None) -> str:
        runs = history().list_runs(
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
        record = visible_run(run_id, reader)
        fields = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in record.summary().items()
        )
        return _page(f"Run {record.id}", f"<table>{fields}</table>")

    return app


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
