"""The `amlrun` connection type: which database holds the run history and where the store lives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import BaseHook

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.workspace import Workspace


@dataclass(frozen=True)
class WorkspaceConnection:
    """The workspace settings read from a connection."""

    database_url: str
    store_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)


def workspace_connection(conn_id: str) -> WorkspaceConnection | None:
    """Read an `amlrun` connection; None when no connection has that id."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    return AmlRunWorkspaceHook.parse(conn_id, conn.conn_type, conn.extra_dejson)


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

    @staticmethod
    def parse(conn_id: str, conn_type: str | None, extras: dict[str, Any]) -> WorkspaceConnection:
        if conn_type not in (None, "", "amlrun"):
            raise ConfigurationError(
                f"Connection {conn_id!r} has type {conn_type!r}; a workspace connection must be of type 'amlrun'."
            )
        missing = [key for key in ("database_url", "store_url") if not extras.get(key)]
        if missing:
            raise ConfigurationError(
                f"Connection {conn_id!r} lacks {' and '.join(missing)} in its extras: set database_url "
                "(e.g. postgresql://user@host/amlrun) and store_url (a folder or s3://bucket/prefix)."
            )
        options = extras.get("storage_options") or {}
        if not isinstance(options, dict):
            raise ConfigurationError(f"Connection {conn_id!r}: storage_options must be a JSON object.")
        return WorkspaceConnection(str(extras["database_url"]), str(extras["store_url"]), options)

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
