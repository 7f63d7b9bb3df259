"""A run's heartbeat: once stopped, nothing reports on the run any more."""

from __future__ import annotations

import threading
from typing import Any, cast

from airflow_amlrun.heartbeat import Heartbeat


class SlowHistory:
    """A run history whose heartbeat write takes a while (a history slow to answer)."""

    def __init__(self) -> None:
        self.writing = threading.Event()
        self.release = threading.Event()
        self.written: list[str] = []

    def report_alive(self, run_id: str) -> None:
        self.writing.set()
        self.release.wait(30)
        self.written.append(run_id)


def test_a_heartbeat_stopped_while_it_writes_a_report_ends_once_that_report_is_written() -> None:
    history = SlowHistory()
    heartbeat = Heartbeat(cast(Any, history), "runs_1", interval=0.01)
    heartbeat.start()
    assert history.writing.wait(30), "the heartbeat never reported"
    threading.Timer(0.2, history.release.set).start()

    heartbeat.stop()

    assert history.written == ["runs_1"]
    assert [t for t in threading.enumerate() if t.name == "amlrun-heartbeat-runs_1"] == []


def test_a_heartbeat_stopped_before_it_reports_ends_without_reporting() -> None:
    history = SlowHistory()
    heartbeat = Heartbeat(cast(Any, history), "runs_2", interval=30)
    heartbeat.start()

    heartbeat.stop()

    assert history.written == []
    assert [t for t in threading.enumerate() if t.name == "amlrun-heartbeat-runs_2"] == []
