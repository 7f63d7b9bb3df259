"""What a follower hands on about a run it followed so far, and the errors that say a run cannot be followed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.history import RunRecord, RunStatus

# The tag saying why a stop of the run was asked (ScriptRun.cancel), written before the target is asked: whoever
# records the run's end (this follower, another that takes it over, reconcile) records it Canceled with why,
# even if the stop, or what came after it here, failed.
STOP_REQUESTED_TAG = "amlrun.stop_requested"


def never_started_outcome(record: RunRecord, lost: str) -> tuple[RunStatus, str]:
    """How a run that never reached its target is recorded by whoever settles it (a retry, reconcile): Canceled
    with the stop's reason if its task was stopped as the target prepared it (the tag), else Failed with `lost`."""
    stop_asked = record.tags.get(STOP_REQUESTED_TAG)
    return (RunStatus.FAILED, lost) if stop_asked is None else (RunStatus.CANCELED, stop_asked)


@dataclass(frozen=True)
class FollowState:
    """How far a follower got with a run, for another process to go on from there (a deferred task's
    trigger in the triggerer, then the task again): offsets in its log and events, and what it asked of it."""

    log_offset: int = 0
    events_offset: int = 0
    event_seq: int = 0
    timed_out: bool = False
    cancel_requested: bool = False
    # Why the follower stopped the run itself, if it did (e.g. the task's execution_timeout).
    stop_reason: str | None = None
    # Models the script asked to register (Run.register_model), once the run has Completed.
    model_requests: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "model_requests": list(self.model_requests),
            "log_offset": self.log_offset,
            "events_offset": self.events_offset,
            "event_seq": self.event_seq,
            "timed_out": self.timed_out,
            "cancel_requested": self.cancel_requested,
            "stop_reason": self.stop_reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FollowState:
        return cls(
            log_offset=int(data.get("log_offset", 0)),
            events_offset=int(data.get("events_offset", 0)),
            event_seq=int(data.get("event_seq", 0)),
            timed_out=bool(data.get("timed_out", False)),
            cancel_requested=bool(data.get("cancel_requested", False)),
            stop_reason=None if data.get("stop_reason") is None else str(data["stop_reason"]),
            model_requests=tuple(r for r in data.get("model_requests") or () if isinstance(r, dict)),
        )


class PartlyCollectedError(AmlRunError):
    """Collecting a run's outputs failed after some of what it produced (its logs) was stored."""

    def __init__(self, message: str, fields: dict[str, Any]) -> None:
        super().__init__(message)
        self.fields = fields


class RunEndedError(AmlRunError):
    """A run to follow on turned out recorded as ended already (by another process that followed it: a retry of
    its task, ``amlrun reconcile``); carries that record, whose outcome stands.
    """

    def __init__(self, record: RunRecord) -> None:
        super().__init__(f"Run {record.id} already ended {record.status}: {record.error or 'no error'}.")
        self.record = record
