"""A submitted run, followed from its first row in the history to its final status.

``script_run`` holds the run's life (start, follow, stop, finish); the pieces it decides with are apart:
``events`` reads what the script reports, ``outcome`` decides how an ended run is recorded, ``reattach`` finds
what an earlier try of the task left, and ``state`` is what one follower hands on to the next.
"""

from airflow_amlrun.run.script_run import ScriptRun, rerun
from airflow_amlrun.run.state import STOP_REQUESTED_TAG, FollowState, PartlyCollectedError, RunEndedError

__all__ = ["STOP_REQUESTED_TAG", "FollowState", "PartlyCollectedError", "RunEndedError", "ScriptRun", "rerun"]
