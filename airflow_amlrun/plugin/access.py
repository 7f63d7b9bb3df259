"""Who may see which runs: the API server's signed-in user, and its auth manager asked about each run's DAG.

A run belongs to the DAG whose task submitted it (the run row's dag_id), and a user sees it when the auth
manager lets them read that DAG: the same question, asked the same way, as Airflow's own API asks for a DAG's
runs and task instances. A run submitted from plain Python belongs to no DAG, so no DAG permission can say
who sees it. It is shown to the users who may read the workspace's Airflow connection
(``[amlrun] workspace_conn_id``): that connection holds the run-history database's address and credentials,
so those users can read every run anyway and the pages reveal nothing new to them. Every auth manager answers
that question (it is part of Airflow's auth-manager interface), and the shipped ones keep it to operators and
admins (simple auth manager: roles op and admin; FAB: Op and Admin).

A run of a DAG that Airflow no longer has (deleted in the UI or the API: its DAG runs and task instances went
with it) is treated as a run of no DAG, in the lists and by id alike: an auth manager cannot grant a DAG that
does not exist (Airflow's lists of readable DAGs leave it out, while a question about its id gets whatever
answer a DAG-wide role gives), so only the readers of the workspace connection see it. A DAG whose file
was only removed is still Airflow's (marked stale) and keeps its permissions.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import ConnectionDetails
from airflow.api_fastapi.core_api.security import (
    GetUserDep,
    ReadableDagsFilterDep,
    auth_manager_from_app,
    requires_access_dag,
)
from airflow.configuration import conf
from fastapi import Depends, HTTPException, Request, status

from airflow_amlrun.config import load_settings
from airflow_amlrun.history import RunRecord


@dataclass(frozen=True)
class RunVisibility:
    """The runs one user may see: those of the DAGs they may read and, with `runs_without_dag`, those of no
    DAG Airflow knows (`known_dag_ids`): recorded outside any DAG, or of a DAG since deleted."""

    dag_ids: frozenset[str]
    runs_without_dag: bool
    known_dag_ids: frozenset[str] = frozenset()

    def sees(self, dag_id: str | None) -> bool:
        """Whether a run of this DAG (None: of none) is one this user may see."""
        if dag_id is not None and dag_id in self.dag_ids:
            return True
        return self.runs_without_dag and (dag_id is None or dag_id not in self.known_dag_ids)

    def history_filter(self) -> dict[str, Any]:
        """The run history's arguments that keep the runs this user may see (`dag_ids`, `runs_without_dag`,
        `hidden_dag_ids`).

        A reader of runs of no DAG sees every run except those of the DAGs Airflow knows and they may not
        read, which for an admin is none: no condition at all.
        """
        if self.runs_without_dag:
            return {
                "dag_ids": None,
                "runs_without_dag": True,
                "hidden_dag_ids": self.known_dag_ids - self.dag_ids,
            }
        return {"dag_ids": self.dag_ids, "runs_without_dag": False, "hidden_dag_ids": frozenset()}


@dataclass(frozen=True)
class Reader:
    """The signed-in user of one request, and the auth manager that decides what they may read."""

    user: BaseUser
    auth_manager: BaseAuthManager[BaseUser]
    request: Request

    def sees_runs_without_dag(self) -> bool:
        """Whether this user may read the workspace connection, and so the runs of no DAG."""
        conn_id = load_settings().workspace_conn_id
        team_name = None
        if conf.getboolean("core", "multi_team"):
            from airflow.models import Connection

            team_name = Connection.get_team_name(conn_id)
        return self.auth_manager.is_authorized_connection(
            method="GET", details=ConnectionDetails(conn_id=conn_id, team_name=team_name), user=self.user
        )

    def check(self, record: RunRecord) -> None:
        """Refuse (403) a run this user may not see."""
        if record.dag_id is not None and record.dag_id in known_dag_ids([record.dag_id]):
            # Airflow's own dependency for a DAG's resources, given the DAG id it would otherwise take from
            # the path: it looks up the DAG's team and raises 403 as Airflow's routes do.
            requires_access_dag("GET", param_dag_id=record.dag_id)(self.request, self.user)
        elif not self.sees_runs_without_dag():
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"Run {record.id} belongs to no DAG Airflow has (it was recorded outside any DAG, or its DAG "
                "was deleted): it is shown only to users who may read the workspace connection "
                f"{load_settings().workspace_conn_id!r}.",
            )


def known_dag_ids(among: Collection[str] | None = None) -> frozenset[str]:
    """The ids of the DAGs Airflow has (of `among` only, if given), stale ones included."""
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    query = select(DagModel.dag_id)
    if among is not None:
        query = query.where(DagModel.dag_id.in_(sorted(among)))
    with create_session() as session:
        return frozenset(session.scalars(query))


def _reader(
    request: Request,
    user: GetUserDep,
    auth_manager: Annotated[BaseAuthManager[BaseUser], Depends(auth_manager_from_app)],
) -> Reader:
    return Reader(user=user, auth_manager=auth_manager, request=request)


ReaderDep = Annotated[Reader, Depends(_reader)]


def _visible_runs(reader: ReaderDep, readable_dags: ReadableDagsFilterDep) -> RunVisibility:
    without_dag = reader.sees_runs_without_dag()
    return RunVisibility(
        dag_ids=frozenset(readable_dags.value or ()),
        runs_without_dag=without_dag,
        known_dag_ids=known_dag_ids() if without_dag else frozenset(),
    )


VisibleRunsDep = Annotated[RunVisibility, Depends(_visible_runs)]
