"""How a run that ended is recorded: its status and error, from how it ended and what was asked of it."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from airflow_amlrun.history import RunStatus
from airflow_amlrun.targets.base import TargetStatus

# The error of a run (or sweep) stopped because the Airflow task's execution_timeout passed: while its worker
# followed it, or while a trigger did (the task deferred).
TIMED_OUT = "Stopped by the Airflow task's execution_timeout."
DEFERRED_TIMED_OUT = "Stopped by the Airflow task's execution_timeout (while deferred)."

# The signals a stop sends (SIGTERM, then SIGKILL after the grace; SIGINT where a target interrupts first).
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGKILL, signal.SIGINT})


@dataclass(frozen=True)
class Asked:
    """What the run's followers asked of it, and why, as far as the one recording its end knows."""

    # A stop asked while it was followed (the task killed, a sweep's policy): it ends Canceled.
    cancel_requested: bool = False
    # Why a stop was asked (the run's ``amlrun.stop_requested`` tag), if one was.
    stop_requested: str | None = None
    # Why the follower stopped it itself (e.g. the task's execution_timeout), if it did.
    stop_reason: str | None = None
    # Whether it ran past its max_run_duration_seconds (the follower or the target stopped it).
    timed_out: bool = False
    max_run_duration_seconds: float | None = None


def outcome(status: TargetStatus, asked: Asked) -> tuple[RunStatus, str | None]:
    """The status and error to record for a run that ended with `status`: what was asked of it explains its end
    first, then how it exited; a run that exited 0 before any stop reached it (its supervisor saw none) completed,
    whatever was asked of it after."""
    if status.exit_code == 0 and status.stopped_by is None and not status.timed_out:
        return RunStatus.COMPLETED, None
    if asked.cancel_requested:
        return RunStatus.CANCELED, asked.stop_requested or "Canceled while running (the task was killed)."
    if asked.stop_reason is not None:
        return RunStatus.FAILED, asked.stop_reason
    if asked.timed_out or status.timed_out:
        return (
            RunStatus.FAILED,
            f"Exceeded max_run_duration_seconds={asked.max_run_duration_seconds}; the run was stopped.",
        )
    stopped = stopped_on_target(status)
    if asked.stop_requested is not None and (stopped or ended_as_stopped(status)):
        # A stop that seemed to fail may have reached the run all the same (a signal sent, then the connection
        # dropped): a run asked to stop that its supervisor saw stopped, or that ended by a stop's signal, ended
        # by it. One that exited on its own (Completed, or failed with its own exit code) is recorded as it ended.
        return RunStatus.CANCELED, asked.stop_requested
    if stopped:
        # Whoever stopped it ended before it recorded why (a task killed as it stopped its run, which Airflow
        # kills outright a few seconds later): the run's supervisor saw the stop through.
        return (
            RunStatus.CANCELED,
            f"Canceled: a stop ({status.stopped_by}) reached the run on its target, and nothing recorded why "
            "(whoever sent it ended first: a task killed as it stopped its run, say).",
        )
    if status.exit_code == 0:
        return RunStatus.COMPLETED, None
    if status.exit_code is None:
        # Nothing recorded how it ended (its supervisor was killed, or could not write): say what is known.
        return (
            RunStatus.FAILED,
            f"The run ended without an exit code: {status.reason or 'nothing recorded how it ended'}.",
        )
    return RunStatus.FAILED, f"The script failed ({status.reason or f'exit code {status.exit_code}'})."


def stopped_on_target(status: TargetStatus) -> bool:
    """Whether the run's supervisor saw a stop reach it while it ran, and its target knows of no other cause of
    its end (a daemon that stopped its containers as it went down names itself)."""
    return status.stopped_by is not None and _no_other_cause(status)


def _no_other_cause(status: TargetStatus) -> bool:
    return status.reason is None or status.reason.startswith("killed by signal")


def ended_as_stopped(status: TargetStatus) -> bool:
    """Whether a run ended as a stop leaves it: with no exit status at all (its supervisor was stopped with it), or
    killed by one of the stop's signals (a shell's 128 + n, or Python's -n) with no other cause its target knows
    of (a container killed for its memory also exits 137)."""
    exit_code = status.exit_code
    if exit_code is None:
        return True
    if not _no_other_cause(status):
        return False
    number = exit_code - 128 if exit_code > 128 else -exit_code
    return number in {int(s) for s in _STOP_SIGNALS}
