"""FastAPI app mounted in Airflow's API server: the run history as JSON (`runs_api`), the bundle of the UI's
pages (`ui/`, built into `static/`), and the addresses of the run pages the operator's extra link opens.

Every route needs a signed-in Airflow user, by the API server's own JWT (a bearer token, or the cookie the
Airflow UI sets), and shows only the runs that user may see (`access`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.core_api.security import requires_authenticated
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

from airflow_amlrun.plugin import BUNDLE, STATIC, UI_ROUTE
from airflow_amlrun.plugin.runs_api import router


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

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> FileResponse:
        """The UI bundle. Its address carries its content's hash (AmlRunPlugin.react_apps): cached for good."""
        if name != BUNDLE or not (STATIC / BUNDLE).is_file():
            raise HTTPException(404, f"No file {name!r}.")
        return FileResponse(
            STATIC / BUNDLE,
            media_type="text/javascript",
            headers={"Cache-Control": "private, max-age=31536000, immutable"},
        )

    # The pages live in the Airflow UI; these addresses (the operator's extra link, links kept from before)
    # lead there. The redirects are relative, so they hold under any base URL of the API server.
    @app.get("/runs", include_in_schema=False)
    def runs_page() -> RedirectResponse:
        return RedirectResponse(f"../plugin/{UI_ROUTE}", status_code=307)

    @app.get("/runs/{run_id}", include_in_schema=False)
    def run_page(run_id: str) -> RedirectResponse:
        return RedirectResponse(f"../../plugin/{UI_ROUTE}/runs/{quote(run_id, safe='')}", status_code=307)

    return app
