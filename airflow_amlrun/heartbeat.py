"""The heartbeat of the task that follows a run: how the history tells a followed run from an orphaned one."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_amlrun.config import Settings
    from airflow_amlrun.history import RunHistory

log = logging.getLogger(__name__)

# How often the task following a run reports in (the run row's heartbeat_at), at most; reconcile settles a
# run nobody reported on for [amlrun] reconcile_after_seconds, a few heartbeats' time.
HEARTBEAT_SECONDS = 15.0
# How long stopping a heartbeat waits for a report being written (to a history that may be slow to answer).
STOP_WAIT_SECONDS = 2.0


def heartbeat_seconds(settings: Settings) -> float:
    """How often a following task reports in: every 15 s, or often enough for a short reconcile_after."""
    return min(HEARTBEAT_SECONDS, settings.reconcile_after_seconds / 4)


class Heartbeat:
    """Reports, from a thread of its own, that a task follows a run: the row's heartbeat_at, periodically.

    A thread, so that every phase counts, a long environment build and a long upload of outputs included;
    a write that fails (the history is away) is skipped, the next one tries again. While the task follows
    the running run it also says it is making progress (`tick`); a task stuck reading from its target
    stops reporting after a few beats, so that the run can be settled by others rather than look followed.
    """

    # Beats without a tick, while watched, after which the heartbeat falls silent.
    SILENT_AFTER_BEATS = 4

    def __init__(self, history: RunHistory, run_id: str, interval: float) -> None:
        self._history = history
        self._run_id = run_id
        self._interval = interval
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._watched = False
        self._silenced = False
        self._last_tick = time.monotonic()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._beat, name=f"amlrun-heartbeat-{self._run_id}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Report no more. The thread ends at once, or once the report it is writing is written, which this
        waits for (up to STOP_WAIT_SECONDS: a history that does not answer is not waited on for longer, and
        that one report may land later)."""
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(STOP_WAIT_SECONDS)
            if thread.is_alive():
                log.debug(
                    "Run %s: the heartbeat's last report is still being written after %.0f s",
                    self._run_id,
                    STOP_WAIT_SECONDS,
                )

    def watch(self, watched: bool) -> None:
        """Whether beats need ticks: on while the task follows the running run, off around it."""
        self._last_tick = time.monotonic()
        self._watched = watched

    def tick(self) -> None:
        self._last_tick = time.monotonic()

    def _beat(self) -> None:
        while not self._stopped.wait(self._interval):
            silent = time.monotonic() - self._last_tick > self.SILENT_AFTER_BEATS * self._interval
            if self._watched and silent:
                if not self._silenced:
                    self._silenced = True
                    log.warning(
                        "Run %s: this task has made no progress following the run for %.0f s; it stops "
                        "reporting on it, so that `amlrun reconcile` may settle it",
                        self._run_id,
                        time.monotonic() - self._last_tick,
                    )
                continue
            self._silenced = False
            if self._stopped.is_set():
                break  # stopped as this beat woke
            try:
                self._history.report_alive(self._run_id)
            except Exception as err:
                log.debug("Run %s: heartbeat not written (%s)", self._run_id, err)
