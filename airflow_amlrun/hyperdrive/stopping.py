"""Stopping a sweep's live runs all at once.

A run's stop waits for the run to end, up to its target's grace period (a script that traps SIGTERM gets the
whole of it; a Spark application's kill takes seconds). One after another, the stops of a sweep's runs would
take that many times as long, and a task that Airflow kills has 5 seconds after its SIGTERM before the SIGKILL:
the later runs would go on. So every run's stop starts at once, each in a thread of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

R = TypeVar("R")

# A sweep runs max_concurrent_runs at once; past this many, the rest wait for a thread.
_MOST_AT_ONCE = 32


def stop_at_once(runs: Mapping[str, R], stop: Callable[[R], None]) -> dict[str, BaseException]:
    """Call ``stop`` on every run of ``runs`` (by id) at once; returns what each stop that failed raised.

    A stop started by a task's on_kill runs in Airflow's signal handler, in the thread the signal interrupted,
    perhaps while that thread held a lock (of a log handler, of the history's connection pool) that a stop in
    another thread would wait for until the SIGKILL. So a single run is stopped in the calling thread, as before
    there were threads here; several are worth that risk, as one after another most of them would not be stopped
    before the SIGKILL either.
    """
    if len(runs) <= 1:
        failed: dict[str, BaseException] = {}
        for run_id, run in runs.items():
            try:
                stop(run)
            except Exception as error:
                failed[run_id] = error
        return failed
    with ThreadPoolExecutor(
        max_workers=min(len(runs), _MOST_AT_ONCE), thread_name_prefix="amlrun-stop"
    ) as pool:
        futures = {run_id: pool.submit(stop, run) for run_id, run in runs.items()}
    raised = {run_id: future.exception() for run_id, future in futures.items()}
    return {run_id: error for run_id, error in raised.items() if error is not None}
