"""Extra link from a ScriptRunOperator task to its run's page in the Airflow UI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

RUN_ID_XCOM_KEY = "amlrun_run_id"
# Where the plugin mounts its FastAPI app inside Airflow's API server.
URL_PREFIX = "/amlrun"


def run_page(run_id: str) -> str:
    return f"{URL_PREFIX}/runs/{run_id}"


class AmlRunLink(BaseOperatorLink):
    """'AML Run': the page of the run this task submitted."""

    name = "AML Run"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        run_id = XCom.get_value(ti_key=ti_key, key=RUN_ID_XCOM_KEY)
        if not run_id:
            return ""
        from airflow.configuration import conf

        base = conf.get("api", "base_url", fallback="").rstrip("/")
        return f"{base}{run_page(str(run_id))}"
