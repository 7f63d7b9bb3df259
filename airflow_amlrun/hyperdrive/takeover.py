"""Taking a sweep over in another process: what one process hands to the next, and the sweeps an earlier try
of a task left unfinished."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.history import RunRecord, RunStatus
from airflow_amlrun.history.listing import RunFilter
from airflow_amlrun.hyperdrive.stopping import stop_all
from airflow_amlrun.run import FollowState, RunEndedError, ScriptRun
from airflow_amlrun.run.outcome import TIMED_OUT
from airflow_amlrun.runconfig import SWEEP_TARGET as TARGET

if TYPE_CHECKING:
    from airflow_amlrun.submission import AirflowTask
    from airflow_amlrun.workspace import Workspace

log = logging.getLogger(__name__)


class SweepChangedError(ConfigurationError):
    """The sweep recorded differs from the one given to go on with it (its DAG file changed meanwhile).

    A retry of the task starts a new sweep; a sweep whose task was deferred is recorded Failed, its runs stopped.
    Change a sweep's config between its runs, not while one goes on.
    """


# How long a run whose stop failed goes on before it is stopped again: 5 s after the first failure, doubling with
# each further one up to 5 minutes. A target that failed once (a dropped connection) is not asked again at every
# look, and one that keeps failing does not wake a deferred sweep's task every few seconds.
STOP_RETRY_SECONDS = 5.0
STOP_RETRY_MAX_SECONDS = 300.0


@dataclass(frozen=True)
class Unstopped:
    """A run the sweep's policy stopped whose stop failed: why it is stopped, when to try again (seconds since the
    epoch: another process may be the one to try), and how many stops of it failed so far."""

    reason: str
    again_at: float = 0.0
    failures: int = 1

    @classmethod
    def failed(cls, reason: str, earlier: Unstopped | None, now: float) -> Unstopped:
        """The state after one more failed stop: the next try waits twice as long as the last did."""
        failures = (earlier.failures if earlier is not None else 0) + 1
        # The exponent is bounded: past the cap it changes nothing, and 2.0 ** 1024 overflows.
        delay = min(STOP_RETRY_SECONDS * 2.0 ** min(failures - 1, 16), STOP_RETRY_MAX_SECONDS)
        return cls(reason, now + delay, failures)

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "again_at": self.again_at, "failures": self.failures}

    @classmethod
    def from_json(cls, data: Any) -> Unstopped:
        if isinstance(data, str):  # handed over with its reason alone: due at once
            return cls(data)
        return cls(str(data["reason"]), float(data.get("again_at", 0.0)), int(data.get("failures", 1)))


@dataclass(frozen=True)
class SweepState:
    """How far a process got with a sweep's live runs, for another process to go on from there (the trigger of
    a deferred sweep, then the task again): each live run's FollowState, how many of each run's reports the
    policy judged, and the runs the policy stopped whose stop failed, with why and when to try again (the next
    process stops them again: the policy does not name a run twice for one report)."""

    children: dict[str, FollowState] = field(default_factory=dict)
    looked_at: dict[str, int] = field(default_factory=dict)
    unstopped: dict[str, Unstopped] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "children": {run_id: state.to_json() for run_id, state in self.children.items()},
            "looked_at": dict(self.looked_at),
            "unstopped": {run_id: state.to_json() for run_id, state in self.unstopped.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SweepState:
        # A state handed over by an earlier version has no "unstopped".
        return cls(
            children={str(k): FollowState.from_json(v) for k, v in (data.get("children") or {}).items()},
            looked_at={str(k): int(v) for k, v in (data.get("looked_at") or {}).items()},
            unstopped={str(k): Unstopped.from_json(v) for k, v in (data.get("unstopped") or {}).items()},
        )


@dataclass(frozen=True)
class SweepEnding:
    """How an error that stops a process going on with a sweep ends the sweep: the status and reason it is recorded
    with, and the reason its live runs are stopped (Canceled) with."""

    status: RunStatus
    reason: str
    run_reason: str

    @classmethod
    def of(cls, err: BaseException) -> SweepEnding:
        """Canceled for an interruption (Ctrl-C, the task killed); Failed naming the error otherwise, or the task's
        execution_timeout."""
        name = type(err).__name__
        if name == "AirflowTaskTimeout":
            return cls.failed(TIMED_OUT)
        if not interrupts(err):
            return cls.failed(f"The sweep failed: {err}")
        reason = f"Canceled: the sweep was interrupted ({name})."
        return cls(RunStatus.CANCELED, reason, reason)

    @classmethod
    def failed(cls, reason: str) -> SweepEnding:
        return cls(RunStatus.FAILED, reason, f"Canceled: {reason}")


def interrupts(err: BaseException) -> bool:
    """Whether `err` interrupts the process going on with a sweep (Ctrl-C, the task killed, its execution_timeout)
    rather than fails one of its steps: an interruption ends the sweep, its live runs stopped, even where a failure
    leaves it for another process to go on with (a retry of its task)."""
    return not isinstance(err, Exception) or type(err).__name__ in _AIRFLOW_INTERRUPTIONS


# By name, as the core imports nothing from Airflow: they interrupt whatever class they derive from.
_AIRFLOW_INTERRUPTIONS = ("AirflowTaskTimeout", "AirflowTaskTerminated")


def earlier_sweeps(workspace: Workspace, task: AirflowTask) -> list[RunRecord]:
    """The unfinished sweeps of this Airflow task instance (left by an earlier try), newest first.

    Only the DAG's unfinished sweep parents are read: a sweep's runs record the same task and come after its
    parent, so a list of the task's newest runs would lose a parent behind its runs.
    """
    where = RunFilter(
        target=TARGET,
        dag_id=task.dag_id,
        statuses=tuple(s.value for s in RunStatus if not s.is_terminal),
    )
    found: list[RunRecord] = []
    cursor: str | None = None
    while True:
        page = workspace.history.page_runs(where, cursor=cursor)
        found += [
            workspace.history.get_run(item.id)
            for item in page.runs
            if (item.task_id, item.airflow_run_id, item.map_index)
            == (task.task_id, task.run_id, task.map_index)
        ]
        cursor = page.next_cursor
        if cursor is None:
            # One may have ended between the two reads.
            return [r for r in found if not r.status.is_terminal]


def settle_earlier_sweeps(
    workspace: Workspace, task: AirflowTask, reason: str, *, keep: str | None = None
) -> list[str]:
    """End the unfinished sweeps an earlier try of this task left (but `keep`): their live runs are stopped,
    and they are recorded Failed with `reason`; returns their ids."""
    settled = []
    for parent in earlier_sweeps(workspace, task):
        if parent.id != keep:
            end_sweep(workspace, parent.id, RunStatus.FAILED, reason, f"Canceled: {reason}")
            settled.append(parent.id)
    return settled


def end_sweep(
    workspace: Workspace,
    sweep_run_id: str,
    status: RunStatus,
    reason: str,
    child_reason: str,
    states: Mapping[str, FollowState] | None = None,
    *,
    at_once: bool = True,
) -> None:
    """End a sweep that no process follows: its live runs are stopped (Canceled with `child_reason`), and it is
    recorded `status` with `reason`, unless another process recorded its end first.

    :param states: how far the last follower got with each live run, where known.
    :param at_once: stop the runs at once, each in a thread; False in a signal handler (see stopping.py).
    """
    live: dict[str, ScriptRun] = {}
    try:
        # Taken over here, in this thread (looking up a target's connection is not safe from several threads).
        for child in workspace.history.child_runs(sweep_run_id):
            if child.status.is_terminal:
                continue
            try:
                live[child.id] = ScriptRun.resumed(
                    workspace, child.id, (states or {}).get(child.id, FollowState())
                )
            except RunEndedError:
                continue
            except Exception as err:
                # Left as it is, for `amlrun reconcile`, which settles a run it can reach or knows gone.
                log.warning("Sweep %s: run %s was left as it is: %s", sweep_run_id, child.id, err)
        failed = stop_all(live, lambda run: run.cancel(child_reason), at_once=at_once)
    except BaseException:
        # Interrupted: the runs taken over here are let go of (a run whose end was recorded already is let go of
        # as well: nothing changes for it), not followed on by heartbeats nobody ends.
        for run in live.values():
            run.abandon()
        raise
    for run_id, error in failed.items():
        log.warning("Sweep %s: stopping run %s failed: %s", sweep_run_id, run_id, error)
        live[run_id].abandon()
    workspace.history.update_unfinished_run(sweep_run_id, status=status, end_time=_now(), error=reason)


def _now() -> datetime:
    return datetime.now(UTC)
