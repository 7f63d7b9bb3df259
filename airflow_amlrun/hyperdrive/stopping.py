"""Stopping a sweep's live runs all at once.

A run's stop waits for the run to end, up to its target's grace period (a script that traps SIGTERM gets the
whole of it; a Spark application's kill takes seconds). One after another, the stops of a sweep's runs would
take that many times as long. So every run's stop starts at once, each in a thread of its own.

Never from a signal handler (a task's on_kill): starting a thread there can wait for a lock the interrupted
code holds (the executor's own, a log handler's), and the handler then never returns. There the runs are
stopped one after another, in the handler's thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

R = TypeVar("R")

# Stops on a remote target each open a connection of their own: a burst of dozens to one SSH host would pass its
# limit of connections being opened (sshd's MaxStartups, 10 by default) and be refused.
_MOST_AT_ONCE = 8


def stop_all(
    runs: Mapping[str, R], stop: Callable[[R], None], *, at_once: bool = True
) -> dict[str, Exception]:
    """Call ``stop`` on every run of ``runs`` (by id), at once unless ``at_once`` is False (in a signal handler:
    one after another, in this thread); returns what each stop that failed raised.

    Should the wait be interrupted (Ctrl-C, the task's timeout), the stops under way end first (each within its
    run's grace period), so that no run is left half stopped while the caller goes on; then the interruption
    is raised.
    """
    if not at_once or len(runs) <= 1:
        failed: dict[str, Exception] = {}
        for run_id, run in runs.items():
            try:
                stop(run)
            except Exception as err:
                failed[run_id] = err
        return failed
    pool = ThreadPoolExecutor(max_workers=min(len(runs), _MOST_AT_ONCE), thread_name_prefix="amlrun-stop")
    futures: dict[str, Future[None]] = {}
    try:
        for run_id, run in runs.items():
            futures[run_id] = pool.submit(stop, run)
        wait(futures.values())
    except BaseException:
        for future in futures.values():
            future.cancel()  # not yet started: dropped
        wait(futures.values())
        raise
    finally:
        # A stop queued as the wait was interrupted (its future not yet kept here) is dropped too.
        pool.shutdown(wait=False, cancel_futures=True)
    raised = {run_id: future.exception() for run_id, future in futures.items()}
    for problem in raised.values():
        if problem is not None and not isinstance(problem, Exception):
            raise problem  # not a failed stop (SystemExit in a stop): as the calling thread would have raised it
    return {run_id: problem for run_id, problem in raised.items() if isinstance(problem, Exception)}
