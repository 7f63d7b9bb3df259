"""Extra link from a ScriptRunOperator task to its run's page in the Airflow UI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

RUN_ID_XCOM_KEY = "amlrun_run_id"
# The attribute in which the operator keeps the id of the run its current try submitted or followed.
RUN_ID_ATTRIBUTE = "amlrun_run_id"
# Where the plugin mounts its FastAPI app inside Airflow's API server.
URL_PREFIX = "/amlrun"


def run_page(run_id: str) -> str:
    return f"{URL_PREFIX}/runs/{run_id}"


class AmlRunLink(BaseOperatorLink):
    """'AML Run': the page of the run this task submitted."""

    name = "AML Run"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        # Airflow asks once the try ended, in the task's own process, of the operator that ran it; the link is
        # then kept as an XCom the UI reads. The operator knows its run: asking the XCom backend instead would
        # log "XCom not found" as an error for every try that ended before a run was submitted.
        run_id = getattr(operator, RUN_ID_ATTRIBUTE, None)
        if not run_id:
            return ""
        from airflow.configuration import conf

        base = conf.get("api", "base_url", fallback="").rstrip("/")
        return f"{base}{run_page(str(run_id))}"
