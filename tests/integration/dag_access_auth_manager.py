"""An auth manager for the API-server tests: the simple one, with the DAGs some users may read set per user.

The simple auth manager lets every user read every DAG, so it cannot show that the run-history app asks
about each run's own DAG. This one answers by DAG id: AMLRUN_TEST_DAG_ACCESS holds JSON such as
``{"ann": ["dag_a"]}``, and a user listed there may read those DAGs only (not "all DAGs"); every other
question, and every user not listed, gets the simple auth manager's answer. The API server imports it
through AIRFLOW__CORE__AUTH_MANAGER.
"""

from __future__ import annotations

import json
import os
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser


class DagAccessAuthManager(SimpleAuthManager):
    """SimpleAuthManager whose DAG check reads the DAG id for the users AMLRUN_TEST_DAG_ACCESS lists."""

    def is_authorized_dag(
        self,
        *,
        method: Any,
        user: SimpleAuthManagerUser,
        access_entity: Any = None,
        details: Any = None,
    ) -> bool:
        granted = json.loads(os.environ.get("AMLRUN_TEST_DAG_ACCESS", "{}")).get(user.username)
        if granted is not None and (details is None or details.id not in granted):
            return False
        return super().is_authorized_dag(
            method=method, user=user, access_entity=access_entity, details=details
        )
