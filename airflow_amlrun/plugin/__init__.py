"""Airflow plugin: mounts the run-history app in the API server and links it from the UI's menu."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from airflow_amlrun.links import URL_PREFIX


class AmlRunPlugin(AirflowPlugin):
    name = "amlrun"
    external_views = [
        {"name": "AML Runs", "href": f"{URL_PREFIX}/runs", "destination": "nav", "url_route": "amlrun_runs"}
    ]

    @cached_property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The run-history app, built when the API server asks for it.

        Every task process loads plugins too; building the app there would import Airflow's API security
        module (seconds) for nothing.
        """
        from airflow_amlrun.plugin.api import create_app

        return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "AML Run"}]
