"""Airflow plugin: mounts the run-history app in the API server and links it from the UI's menu."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_amlrun.links import URL_PREFIX
from airflow_amlrun.plugin.api import create_app


class AmlRunPlugin(AirflowPlugin):
    name = "amlrun"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "AML Run"}]
    external_views = [
        {"name": "AML Runs", "href": f"{URL_PREFIX}/runs", "destination": "nav", "url_route": "amlrun_runs"}
    ]
