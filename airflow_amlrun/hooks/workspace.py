"""The `amlrun` connection type: which database holds the run history and where the store lives."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from airflow_amlrun.workspace import Workspace


class AmlRunWorkspaceHook(BaseHook):
    """Opens the workspace named by an `amlrun` connection.

    The connection's extras carry ``database_url`` (SQLAlchemy URL of the run history), ``store_url``
    (folder or fsspec URL) and, optionally, ``storage_options`` (fsspec options of the store), e.g.
    ``amlrun://?database_url=postgresql%3A%2F%2Fairflow%40db%2Famlrun&store_url=s3%3A%2F%2Fbucket%2Faml``.

    :param amlrun_conn_id: id of the connection.
    """

    conn_name_attr = "amlrun_conn_id"
    default_conn_name = "amlrun_default"
    conn_type = "amlrun"
    hook_name = "AML Run workspace"

    def __init__(self, amlrun_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.amlrun_conn_id = amlrun_conn_id

    def get_conn(self) -> Workspace:
        """The Workspace of this connection."""
        return Workspace.get(self.amlrun_conn_id)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["host", "schema", "login", "password", "port"],
            "relabeling": {},
            "placeholders": {
                "extra": '{"database_url": "postgresql://airflow@db/amlrun", "store_url": "s3://bucket/amlrun"}'
            },
        }
