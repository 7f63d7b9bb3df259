"""Writing a running run's bookkeeping to the history, without ever stopping the run over it.

While a run goes on, its status, tags and metric points are bookkeeping: if the database is away for a
while (a PostgreSQL restart or failover, a locked SQLite file) or an SQLite file turns read-only (its file
system remounted read-only after an I/O error, a network volume), they are kept here and written, in order,
once it takes them again; the run is not disturbed. Only the run's final outcome must be written before the
waiting side may let go, and it is retried for a bounded time; if it still cannot be written, the caller
gets :class:`HistoryUnavailableError` and the run row is left as it was, for a retry of the task to
re-attach to the finished run and record it.

Only a database that is away or read-only is waited for. A write the database answers and refuses
(a value too long for its column, one it cannot store) would be refused again however long one waits: it is
reported at once with the database's reason. The refused value alone is dropped, each field and tag of a
write being tried on its own once the write as a whole is refused, so that it holds back nothing else: during
the run a warning names it and the run goes on; a refused part of the final outcome raises
:class:`HistoryRefusedError`, after everything else of the outcome was recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.history.database import HistoryReadOnlyError
from airflow_amlrun.history.records import MetricPoint, RunRecord, RunStatus
from airflow_amlrun.history.repository import RunHistory

log = logging.getLogger(__name__)

# Waits between attempts while the history does not answer: doubling from the first to the last.
FIRST_RETRY_SECONDS = 0.5
LAST_RETRY_SECONDS = 15.0
# How long the final outcome is retried before the waiting side gives up (and leaves the row for a retry).
FINAL_WRITE_SECONDS = 300.0
# Metric points written per transaction.
_POINTS_PER_WRITE = 5000
# SQLSTATE classes of a PostgreSQL server that is away or busy, not refusing the write: connection exceptions,
# operator intervention (shutdown, starting up), insufficient resources, a system (I/O) error, transaction
# rollback (deadlock, serialization failure), a lock not available, and a read-only transaction (a failover
# that has not promoted the standby yet).
_TRANSIENT_SQLSTATES = ("08", "57P", "53", "58", "40", "25006", "55P03")
# SQLite reports a statement its schema refuses (a missing table or column, a column added twice) as an
# OperationalError, like a locked file; it is not one. Its code tells them apart (SQLITE_ERROR; a busy, locked or
# unopenable file has codes of its own); these words do for an error that carries no code.
_SQLITE_SCHEMA_ERRORS = ("no such table", "no such column", "has no column named")


class HistoryRefusedError(AmlRunError):
    """The run ended, but the run history refused part of its outcome: the database answered and said no.

    :param run_id: the run.
    :param fields: the fields of the outcome it refused.
    :param reason: the database's reason.
    :param record: the run as recorded with the rest of its outcome; None if its status itself was refused
        (the row then still shows the run as it was before it ended).
    """

    def __init__(
        self, message: str, *, run_id: str, fields: list[str], reason: str, record: RunRecord | None
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.fields = fields
        self.reason = reason
        self.record = record


class HistoryUnavailableError(AmlRunError):
    """The run ended, but the run history did not accept its outcome in time; the run row was left as it was.

    :param run_id: the run.
    """

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


def is_transient(error: BaseException) -> bool:
    """Whether a database error is the database being away (worth waiting for), not a refused write."""
    if isinstance(error, PoolTimeoutError):
        return True  # every connection of the pool busy: the database is slow, not refusing
    if not isinstance(error, DBAPIError):
        return False  # raised before the database was asked (a value SQLAlchemy cannot send, a missing row)
    if error.connection_invalidated:
        return True
    sqlstate = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate.startswith(_TRANSIENT_SQLSTATES)
    if getattr(error.orig, "sqlite_errorname", None) == "SQLITE_ERROR":
        return False
    if isinstance(error, OperationalError) and any(s in str(error.orig) for s in _SQLITE_SCHEMA_ERRORS):
        return False
    return isinstance(error, OperationalError | InterfaceError | DisconnectionError)


def _waited_for(error: BaseException) -> bool:
    """Whether a failed write is kept to try again: the history is away, or read-only for now. A read-only file
    is an error at once where a command asks once (the CLI, opening a workspace), but while a run goes on it may
    be writable again before the run ends (a volume remounted, its mode or owner fixed)."""
    return is_transient(error) or isinstance(error, HistoryReadOnlyError)


@dataclass(frozen=True)
class Refusal:
    """A write the run history refused: what it was (``field outputs_uri``, ``tag note``) and why."""

    what: str
    reason: str
    field: str | None = None


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
        self._final_tags: dict[str, str] | None = None
        # Another process recorded the run's outcome before this one could.
        self.superseded = False

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

        Never raises for the database: a write that fails because the history is away or read-only is kept
        and tried again after a growing wait; a value the history refuses is dropped with a warning naming it.
        """
        if not (self._fields or self._tags or self._points):
            return True
        if self._clock() < self._retry_at:
            return False
        try:
            _, refusals = self._write()
        except Exception as err:  # the history is away or read-only: _write raises for nothing else
            self._failed(err)
            return False
        self._recovered()
        self._warn(refusals)
        return True

    def drain(self, timeout: float) -> bool:
        """Write everything pending, retrying while the history is away, for at most `timeout` seconds; True
        once nothing is left. For a follower handing the run to another process, which must not lose what
        this one read but did not write yet."""
        deadline = self._clock() + timeout
        while not self.flush():
            wait = max(0.0, self._retry_at - self._clock())
            if self._clock() + wait > deadline:
                return False
            self._sleep(wait)
        return True

    def finish(self, tags: dict[str, str] | None = None, **fields: Any) -> RunRecord:
        """Write the run's final fields (after everything still pending), retrying for a bounded time while the
        history is away. If another process recorded the run's outcome first (two followers of one run), its
        record stands: this one is dropped and `superseded` says so.

        :param tags: tags recorded with the outcome, only if this call records it.
        :raises HistoryUnavailableError: the history did not answer, or stayed read-only, for
            ``FINAL_WRITE_SECONDS``.
        :raises HistoryRefusedError: the history refused one of the final fields; the others were written.
        """
        self._fields.update(fields)
        self._final_tags = dict(tags or {})
        deadline = self._clock() + FINAL_WRITE_SECONDS
        while True:
            try:
                record, refusals = self._write()
            except Exception as err:  # the history is away or read-only: _write raises for nothing else
                self._failed(err)
                if self._clock() + self._delay > deadline:
                    # A read-only history's error names the file and the fix; an away one's says only why.
                    read_only = isinstance(err, HistoryReadOnlyError)
                    last = "it is read-only" if read_only else f"last error: {_brief(err)}"
                    advice = str(err) if read_only else "Check that the history database is up."
                    raise HistoryUnavailableError(
                        f"Run {self.run_id} ended, but the run history at {self.history.url_for_display} did "
                        f"not accept its outcome ({fields.get('status')}) for {FINAL_WRITE_SECONDS:.0f} s "
                        f"({last}). The run was not stopped or changed, and its row was left as it was: a "
                        f"retry of this task re-attaches to the finished run and records its outcome. {advice}",
                        run_id=self.run_id,
                    ) from err
                self._sleep(max(0.0, self._retry_at - self._clock()))
                continue
            self._recovered()
            final = [r for r in refusals if r.field in fields]
            self._warn([r for r in refusals if r not in final])
            if final:
                raise self._refused_outcome(fields, final, record)
            assert record is not None
            return record

    def _refused_outcome(
        self, fields: dict[str, Any], refusals: list[Refusal], record: RunRecord | None
    ) -> HistoryRefusedError:
        names = [r.field for r in refusals if r.field is not None]
        status = getattr(fields.get("status"), "value", fields.get("status"))
        reasons = "; ".join(f"{r.what}: {r.reason}" for r in refusals)
        if "status" in names:
            recorded = (
                "Its status was not recorded: the row still shows the run as it was before it ended, and a "
                "retry of this task, or `amlrun reconcile`, would be refused the same way until the value is fixed."
            )
        else:
            recorded = (
                f"The rest of its outcome was recorded (status {status}); the run row lacks only "
                f"{', '.join(names)}."
            )
        return HistoryRefusedError(
            f"Run {self.run_id} ended ({status}), but the run history at {self.history.url_for_display} "
            f"refused to record {', '.join(names)} of its outcome ({reasons}). The history is up and "
            f"answered; it refuses these values, so waiting would not help. {recorded} The run itself was "
            "not stopped or changed. Make such values fit what the history keeps (the reason says how) for the "
            "runs to come.",
            run_id=self.run_id,
            fields=names,
            reason=reasons,
            record=record,
        )

    def _write(self) -> tuple[RunRecord | None, list[Refusal]]:
        """Write everything pending; what the history refuses is dropped and returned. Raises only when the
        history is away or read-only (:func:`_waited_for`), with what was not written still pending."""
        refusals: list[Refusal] = []
        # Metric points first: a run recorded as ended has all of its points.
        while self._points:
            batch = self._points[:_POINTS_PER_WRITE]
            try:
                self.history.add_metrics(self.run_id, batch)
            except Exception as err:
                if _waited_for(err):
                    raise
                # Refused, not away: these points can never be written; the rest of the run still can.
                names = sorted({p.name for p in batch})
                shown = ", ".join(repr(n if len(n) <= 60 else n[:40] + "...") for n in names[:5])
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                refusals.append(Refusal(f"{len(batch)} point(s) of metric(s) {shown}{more}", _brief(err)))
            del self._points[: len(batch)]
        record = None
        status = self._fields.get("status")
        if self._final_tags is not None and status is not None and RunStatus(status).is_terminal:
            final = dict(self._fields)
            try:
                recorded = self.history.finish_run(self.run_id, **final)
            except Exception as err:
                if _waited_for(err):
                    raise
                recorded = None  # refused: each field is tried on its own below, to name the one at fault
            if recorded is False:
                self.superseded = True
                self._fields.clear()
                self._tags.clear()
                return self.history.get_run(self.run_id), refusals
            if recorded:
                self._written(final, {})
                self._tags.update(self._final_tags)
                self._final_tags = {}
                if not self._tags:
                    record = self.history.get_run(self.run_id)
        if self._fields or self._tags:
            fields, tags = dict(self._fields), dict(self._tags)
            try:
                record = self.history.update_run(self.run_id, add_tags=tags or None, **fields)
                self._written(fields, tags)
            except Exception as err:
                if _waited_for(err):
                    raise
                # One value was refused, and the whole write with it. Each is tried on its own, so that the
                # one at fault, and only it, is dropped; the others (a status above all) are written.
                for key, value in fields.items():
                    try:
                        record = self.history.update_run(self.run_id, **{key: value})
                    except Exception as one:
                        if _waited_for(one):
                            raise
                        refusals.append(Refusal(f"field {key} = {_shown(value)}", _brief(one), field=key))
                    self._written({key: value}, {})
                for key, value in tags.items():
                    try:
                        record = self.history.update_run(self.run_id, add_tags={key: value})
                    except Exception as one:
                        if _waited_for(one):
                            raise
                        refusals.append(Refusal(f"tag {key[:60]!r}", _brief(one)))
                    self._written({}, {key: value})
        return record, refusals

    def _written(self, fields: dict[str, Any], tags: dict[str, str]) -> None:
        """Drop what was written (or refused) from what is pending, unless a newer value came meanwhile."""
        for key, value in fields.items():
            if key in self._fields and self._fields[key] is value:
                del self._fields[key]
        for key, value in tags.items():
            if self._tags.get(key) == value:
                del self._tags[key]

    def _warn(self, refusals: list[Refusal]) -> None:
        for refusal in refusals:
            log.warning(
                "Run %s: the run history at %s refused to record %s (%s); it was dropped. The history is up, "
                "and the run and its later writes go on.",
                self.run_id,
                self.history.url_for_display,
                refusal.what,
                refusal.reason,
            )

    def _failed(self, err: Exception) -> None:
        now = self._clock()
        if self._away_since is None:
            self._away_since = now
            self._delay = FIRST_RETRY_SECONDS
            if isinstance(err, HistoryReadOnlyError):
                log.warning(
                    "Run %s: the run history at %s takes no writes: %s The run goes on; its status, tags and "
                    "metrics are kept and written once the history is writable again.",
                    self.run_id,
                    self.history.url_for_display,
                    err,
                )
            else:
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


def _shown(value: Any) -> str:
    """A value for a message: short enough to read, its length said when it was cut."""
    text = repr(getattr(value, "value", value))
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _brief(err: BaseException) -> str:
    """An error in one line: database drivers add the statement and parameters on following lines."""
    text = str(getattr(err, "orig", None) or err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
