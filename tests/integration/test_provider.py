"""Airflow sees the provider: provider info, connection type, plugin, extra link, config section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

AIRFLOW = str(Path(sys.executable).parent / "airflow")


def airflow(*args: str) -> str:
    done = subprocess.run(
        [AIRFLOW, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_provider_info_validates_against_airflows_schema():
    import jsonschema
    from airflow.providers_manager import ProvidersManager  # noqa: F401  (loads the schema location)

    from airflow_amlrun.get_provider_info import get_provider_info

    schema_path = Path(sys.modules["airflow"].__file__).parent / "provider_info.schema.json"
    jsonschema.validate(get_provider_info(), json.loads(schema_path.read_text()))


@pytest.mark.usefixtures("airflow_db")
def test_airflow_providers_get_shows_the_provider_with_its_parts():
    [info] = json.loads(airflow("providers", "get", "airflow-amlrun", "--full", "-o", "json"))
    assert info["package-name"] == "airflow-amlrun"
    assert {
        "connection-type": "amlrun",
        "hook-class-name": "airflow_amlrun.hooks.workspace.AmlRunWorkspaceHook",
        "hook-name": "AML Run workspace",
    } in info["connection-types"]
    assert info["extra-links"] == ["airflow_amlrun.links.AmlRunLink"]
    assert "airflow_amlrun.operators.script_run" in info["operators"][0]["python-modules"]
    assert "airflow_amlrun.triggers.run_status" in info["triggers"][0]["python-modules"]
    assert set(info["config"]["amlrun"]["options"]) >= {
        "workspace_conn_id",
        "snapshot_max_size_mb",
        "cleanup",
    }


@pytest.mark.usefixtures("airflow_db")
def test_airflow_lists_the_plugin_and_the_config_section():
    plugins = json.loads(airflow("plugins", "-o", "json"))
    assert "amlrun" in [p["name"] for p in plugins]
    assert airflow("config", "get-value", "amlrun", "workspace_conn_id").strip() == "amlrun_default"


def test_importing_the_package_stays_light():
    code = "import sys, airflow_amlrun; heavy = [m for m in ('airflow', 'sqlalchemy', 'alembic', 'sklearn') if m in sys.modules]; print(heavy)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_run_context_imports_only_the_standard_library(tmp_path):
    # A training image holds nothing but Python and this one file.
    from airflow_amlrun import run_context

    (tmp_path / "airflow_amlrun").mkdir()
    (tmp_path / "airflow_amlrun" / "__init__.py").write_text("")
    (tmp_path / "airflow_amlrun" / "run_context.py").write_text(Path(run_context.__file__).read_text())
    code = (
        "import sys; before = set(sys.modules); from airflow_amlrun.run_context import Run; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(m for m in new if m not in sys.stdlib_module_names and m != 'airflow_amlrun'))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_plugin_app_refuses_anonymous_callers_on_every_route():
    # What the app shows, and to whom, is tested through a real API server in test_plugin_access.py; this
    # covers every route the app has, including any added later.
    from fastapi.routing import APIRoute
    from fastapi.testclient import TestClient

    from airflow_amlrun.plugin import AmlRunPlugin

    [mounted] = AmlRunPlugin().fastapi_apps
    assert mounted["url_prefix"] == "/amlrun"
    app = mounted["app"]
    paths = [
        route.path.replace("{run_id}", "some_run")
        .replace("{path:path}", "model.pkl")
        .replace("{name}", "amlrun-ui.js")
        for route in app.routes
        if isinstance(route, APIRoute)
    ]
    assert len(paths) == 18
    client = TestClient(app)
    for path in paths:
        answer = client.get(path)
        assert (answer.status_code, answer.json()) == (401, {"detail": "Not authenticated"}), path


def test_loading_the_plugin_leaves_the_api_server_modules_unloaded():
    # Every task process loads plugins; the app and Airflow's API security module are built only on demand.
    code = (
        "import sys; from airflow_amlrun.plugin import AmlRunPlugin; AmlRunPlugin(); "
        "print([m for m in ('airflow.api_fastapi.core_api.security', 'airflow_amlrun.plugin.api') "
        "if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
