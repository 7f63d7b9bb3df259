"""Airflow plugin: mounts the run-history app in the API server and shows its pages in the Airflow UI.

The pages are React apps of the Airflow UI (Airflow 3.1+): "Training runs" in the navigation, and a
"Training run" tab on every task instance. The UI imports one bundle, served by the plugin's own app
(`api.BUNDLE`), for both; the names below are the ones the bundle registers itself under (ui/src/main.tsx).
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from airflow_amlrun.links import URL_PREFIX

NAV_APP = "Training runs"
TASK_APP = "Training run"
# Where the Airflow UI shows the pages, under its own address: /plugin/<url_route>.
UI_ROUTE = "amlrun_runs"
TASK_UI_ROUTE = "amlrun_task_run"
# The pages' bundle, built from ui/ (see docs/ui.md).
STATIC = Path(__file__).parent / "static"
BUNDLE = "amlrun-ui.js"


class AmlRunPlugin(AirflowPlugin):
    name = "amlrun"

    @cached_property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The run-history app, built when the API server asks for it.

        Every task process loads plugins too; building the app there would import Airflow's API security
        module (seconds) for nothing.
        """
        from airflow_amlrun.plugin.api import create_app

        return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "AML Run"}]

    @cached_property
    def react_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The pages, as the Airflow UI's React apps; their bundle's address carries its content's hash, so a
        browser keeps it until the package changes."""
        static = f"{URL_PREFIX.strip('/')}/static"
        bundle = STATIC / BUNDLE
        version = hashlib.sha256(bundle.read_bytes()).hexdigest()[:16] if bundle.is_file() else "missing"
        # No icon of its own: the UI's plugin icon takes the navigation's colours in either theme.
        common = {"bundle_url": f"{static}/{BUNDLE}?v={version}"}
        return [
            {
                **common,
                "name": NAV_APP,
                "url_route": UI_ROUTE,
                "destination": "nav",
                "nav_top_level": True,
            },
            {**common, "name": TASK_APP, "url_route": TASK_UI_ROUTE, "destination": "task_instance"},
        ]
