"""A submitted run, followed from its first row in the history to its final status.

``script_run`` holds the run's life (start, follow, stop, finish); the pieces it decides with are apart:
``streams`` reads the run's output and events as it goes (``events`` parses what the script reports),
``outcome`` decides how an ended run is recorded, ``reattach`` finds what an earlier try of the task left, and
``state`` is what one follower hands on to the next. What a submission is made of, and the new run's first row,
are ``airflow_amlrun.submission``'s.
"""

from airflow_amlrun.run.script_run import ScriptRun, rerun
from airflow_amlrun.run.state import (
    STOP_REQUESTED_TAG,
    FollowState,
    PartlyCollectedError,
    RunEndedError,
    never_started_outcome,
)

__all__ = [
    "STOP_REQUESTED_TAG",
    "FollowState",
    "PartlyCollectedError",
    "RunEndedError",
    "ScriptRun",
    "never_started_outcome",
    "rerun",
]
