"""Run history: experiments, runs and metrics in a database of the workspace's own."""

from airflow_amlrun.history.bookkeeping import HistoryRefusedError, HistoryUnavailableError, RunBookkeeper
from airflow_amlrun.history.database import HistoryReadOnlyError
from airflow_amlrun.history.records import ExperimentRecord, MetricPoint, RunRecord, RunStatus
from airflow_amlrun.history.repository import RunHistory, RunNotFoundError

__all__ = [
    "ExperimentRecord",
    "HistoryReadOnlyError",
    "HistoryRefusedError",
    "HistoryUnavailableError",
    "MetricPoint",
    "RunBookkeeper",
    "RunHistory",
    "RunNotFoundError",
    "RunRecord",
    "RunStatus",
]
