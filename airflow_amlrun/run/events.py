"""What a script reports while it runs (metrics, tags, models to register), read from its events file."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from airflow_amlrun.history import MetricPoint
from airflow_amlrun.run_context import RESERVED_TAG_PREFIX, metric_problem

log = logging.getLogger(__name__)


@dataclass
class ScriptEvents:
    """The events of some lines of a run's events file, in their order."""

    points: list[MetricPoint] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    model_requests: list[dict[str, Any]] = field(default_factory=list)
    # The sequence number of the line after the last one read: the next read starts there.
    next_seq: int = 0


def read_events(lines: list[str], first_seq: int, run_id: str) -> ScriptEvents:
    """The events of `lines`, numbered from `first_seq` (a metric point keeps its line's number, so a point read
    twice, by two processes following the run, is recorded once). Whatever this version's run_context would not
    have written (a malformed line, a metric it refuses, a tag in the provider's own ``amlrun.`` names) is skipped
    with a warning: the run goes on."""
    events = ScriptEvents(next_seq=first_seq)
    for line in lines:
        seq = events.next_seq
        events.next_seq += 1
        try:
            event = json.loads(line)
        except ValueError:
            log.warning("Run %s: skipping a malformed event line: %.200s", run_id, line)
            continue
        if not isinstance(event, dict):
            log.warning("Run %s: skipping an event line that is not an object: %.200s", run_id, line)
        elif event.get("kind") == "metric":
            name, value, step = event.get("name"), event.get("value"), event.get("step")
            problem = metric_problem(name, value, step)
            if problem is not None:
                log.warning("Run %s: a metric was not recorded: %s. The run goes on.", run_id, problem)
                continue
            events.points.append(
                MetricPoint(
                    name=str(name), value=value, seq=seq, step=step, logged_at=_timestamp(event.get("time"))
                )
            )
        elif event.get("kind") == "tag":
            key = str(event.get("key"))
            if key.startswith(RESERVED_TAG_PREFIX):
                # Such tags say what the provider did to the run (why it was stopped, who settled it): a script
                # setting one would make the run's record say something untrue.
                log.warning(
                    "Run %s: the script's tag %r was not recorded: names starting with %r are the provider's own.",
                    run_id,
                    key,
                    RESERVED_TAG_PREFIX,
                )
                continue
            events.tags[key] = str(event.get("value", ""))
        elif event.get("kind") == "register_model":
            events.model_requests.append(event)
    return events


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None
