"""Provider metadata that Airflow reads through the `apache_airflow_provider` entry point."""

from __future__ import annotations

from typing import Any

from airflow_amlrun import __version__
from airflow_amlrun.config import OPTIONS, SECTION

INTEGRATION = "AML Run"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-amlrun",
        "name": "AML Run",
        "description": "Submit tracked, reproducible training runs (ScriptRunConfig) to compute targets.",
        "versions": [__version__],
        "integrations": [{"integration-name": INTEGRATION, "tags": ["software"]}],
        "operators": [
            {
                "integration-name": INTEGRATION,
                "python-modules": [
                    "airflow_amlrun.operators.script_run",
                    "airflow_amlrun.operators.hyperdrive",
                ],
            }
        ],
        "sensors": [
            {"integration-name": INTEGRATION, "python-modules": ["airflow_amlrun.sensors.run_status"]}
        ],
        "hooks": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["airflow_amlrun.hooks.workspace", "airflow_amlrun.hooks.docker"],
            }
        ],
        "triggers": [
            {
                "integration-name": INTEGRATION,
                "python-modules": [
                    "airflow_amlrun.triggers.run_status",
                    "airflow_amlrun.triggers.script_run",
                ],
            }
        ],
        "connection-types": [
            {
                "connection-type": "amlrun",
                "hook-class-name": "airflow_amlrun.hooks.workspace.AmlRunWorkspaceHook",
                "hook-name": "AML Run workspace",
            },
            {
                "connection-type": "amlrun_docker",
                "hook-class-name": "airflow_amlrun.hooks.docker.AmlRunDockerHook",
                "hook-name": "AML Run Docker daemon",
            },
        ],
        "extra-links": ["airflow_amlrun.links.AmlRunLink"],
        "plugins": [{"name": "amlrun", "plugin-class": "airflow_amlrun.plugin.AmlRunPlugin"}],
        "config": {
            SECTION: {
                "description": "Settings of airflow-amlrun: the workspace, run directories and snapshot limits.",
                "options": {
                    name: {
                        "description": option.description,
                        "version_added": "0.1.0",
                        "type": option.type,
                        "example": None,
                        "default": option.default,
                    }
                    for name, option in OPTIONS.items()
                },
            }
        },
    }
