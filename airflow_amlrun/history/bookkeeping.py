"""Writing a running run's bookkeeping to the history, without ever stopping the run over it.

While a run goes on, its status, tags and metric points are bookkeeping: if the database is away for a
while (a PostgreSQL restart or failover, a locked SQLite file), they are kept here and written, in order,
once it answers again; the run is not disturbed. Only the run's final outcome must be written before the
waiting side may let go, and it is retried for a bounded time; if it still cannot be written, the caller
gets :class:`HistoryUnavailableError` and the run row is left as it was, for a retry of the task to
re-attach to the finished run and record it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.history.records import MetricPoint, RunRecord
from airflow_amlrun.history.repository import RunHistory

log = logging.getLogger(__name__)

# Waits between attempts while the history does not answer: doubling from the first to the last.
FIRST_RETRY_SECONDS = 0.5
LAST_RETRY_SECONDS = 15.0
# How long the final outcome is retried before the waiting side gives up (and leaves the row for a retry).
FINAL_WRITE_SECONDS = 300.0
# Metric points written per transaction.
_POINTS_PER_WRITE = 5000


class HistoryUnavailableError(AmlRunError):
    """The run ended, but the run history did not accept its outcome in time; the run row was left as it was.

    :param run_id: the run.
    """

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


def is_transient(error: BaseException) -> bool:
    """Whether a database error is the database being away (worth waiting for), not a refused write."""
    if isinstance(error, OperationalError | InterfaceError | DisconnectionError):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


class RunBookkeeper:
    """One run's pending history writes: run fields, tags and metric points, written when the history answers.

    :param history: the run history.
    :param run_id: the run.
    :param clock: monotonic seconds (for the waits between attempts).
    :param sleep: how to wait while retrying the final write.
    """

    def __init__(
        self,
        history: RunHistory,
        run_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.history = history
        self.run_id = run_id
        self._clock = clock
        self._sleep = sleep
        self._fields: dict[str, Any] = {}
        self._tags: dict[str, str] = {}
        self._points: list[MetricPoint] = []
        self._retry_at = 0.0
        self._delay = FIRST_RETRY_SECONDS
        self._away_since: float | None = None

    @property
    def backlog(self) -> int:
        """Metric points waiting to be written."""
        return len(self._points)

    def update(self, **fields: Any) -> None:
        """Set run fields (a later value of a field replaces an earlier one), writing them if possible now."""
        self._fields.update(fields)
        self.flush()

    def add_tags(self, tags: dict[str, str]) -> None:
        """Set tags beside the run's others, writing them if possible now."""
        self._tags.update(tags)
        self.flush()

    def add_metrics(self, points: Iterable[MetricPoint]) -> None:
        """Queue metric points, writing them if possible now."""
        self._points.extend(points)
        self.flush()

    def flush(self) -> bool:
        """Write what is pending unless the history was found away moments ago; True if nothing is left.

        Never raises for the database: a write that fails is kept and tried again after a growing wait.
        """
        if not (self._fields or self._tags or self._points):
            return True
        if self._clock() < self._retry_at:
            return False
        try:
            self._write()
        except Exception as err:
            self._failed(err)
            return False
        self._recovered()
        return True

    def finish(self, **fields: Any) -> RunRecord:
        """Write the run's final fields (after everything still pending), retrying for a bounded time.

        :raises HistoryUnavailableError: the history did not accept them within ``FINAL_WRITE_SECONDS``.
        """
        self._fields.update(fields)
        deadline = self._clock() + FINAL_WRITE_SECONDS
        while True:
            try:
                record = self._write()
            except Exception as err:
                self._failed(err)
                if self._clock() + self._delay > deadline:
                    raise HistoryUnavailableError(
                        f"Run {self.run_id} ended, but the run history at {self.history.url_for_display} did "
                        f"not accept its outcome ({fields.get('status')}) for {FINAL_WRITE_SECONDS:.0f} s "
                        f"(last error: {_brief(err)}). The run was not stopped or changed, and its row was "
                        "left as it was: a retry of this task re-attaches to the finished run and records "
                        "its outcome. Check that the history database is up.",
                        run_id=self.run_id,
                    ) from err
                self._sleep(max(0.0, self._retry_at - self._clock()))
                continue
            self._recovered()
            assert record is not None
            return record

    def _write(self) -> RunRecord | None:
        # Metric points first: a run recorded as ended has all of its points.
        while self._points:
            batch = self._points[:_POINTS_PER_WRITE]
            try:
                self.history.add_metrics(self.run_id, batch)
            except Exception as err:
                if is_transient(err):
                    raise
                # Refused, not away: these points can never be written; the rest of the run still can.
                log.error(
                    "Run %s: %d metric points were refused by the run history and dropped: %s",
                    self.run_id,
                    len(batch),
                    _brief(err),
                )
            del self._points[: len(batch)]
        record = None
        if self._fields or self._tags:
            fields, tags = dict(self._fields), dict(self._tags)
            record = self.history.update_run(self.run_id, add_tags=tags or None, **fields)
            for key, value in fields.items():
                if self._fields.get(key) is value:
                    del self._fields[key]
            self._tags = {k: v for k, v in self._tags.items() if tags.get(k) != v}
        return record

    def _failed(self, err: Exception) -> None:
        now = self._clock()
        if self._away_since is None:
            self._away_since = now
            self._delay = FIRST_RETRY_SECONDS
            log.warning(
                "Run %s: the run history at %s does not answer (%s). The run goes on; its status, tags and "
                "metrics are kept and written when the history is back.",
                self.run_id,
                self.history.url_for_display,
                _brief(err),
            )
        else:
            self._delay = min(self._delay * 2, LAST_RETRY_SECONDS)
        self._retry_at = now + self._delay

    def _recovered(self) -> None:
        if self._away_since is not None:
            log.info(
                "Run %s: the run history answers again after %.1f s; what was kept meanwhile is written.",
                self.run_id,
                self._clock() - self._away_since,
            )
        self._away_since = None
        self._retry_at = 0.0
        self._delay = FIRST_RETRY_SECONDS


def _brief(err: BaseException) -> str:
    """An error in one line: database drivers add the statement and parameters on following lines."""
    text = str(getattr(err, "orig", None) or err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
