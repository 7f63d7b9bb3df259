"""What a follower reads of a run as it goes: the script's output, line by line, and the events it reports
(metrics, tags, models to register), each from where the follower got to."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

from airflow_amlrun.history import RunBookkeeper
from airflow_amlrun.run.events import read_events
from airflow_amlrun.run.state import FollowState
from airflow_amlrun.run_output import LOG_TAIL_LINES, OutputLine
from airflow_amlrun.targets.base import Chunk, ComputeTarget
from airflow_amlrun.targets.handles import RunHandle

log = logging.getLogger(__name__)

# How much of its log a follower taking a run over reads again for the lines of a failed run's error.
RECALLED_TAIL_BYTES = 8192
# While the history is away, metric events wait in the run's events file rather than in memory beyond this.
MAX_BUFFERED_POINTS = 100_000


class RunStreams:
    """How far a follower read a run's log and events, and what of them the run's end needs: the last lines (a
    failed run's error) and the models the script asked to register. Metrics and tags go to the run's
    bookkeeper as they are read."""

    def __init__(self, run_id: str, book: RunBookkeeper, tick: Callable[[], None]) -> None:
        """
        :param book: where the metrics and tags read are recorded.
        :param tick: called before each read, to say this follower is alive (its heartbeat).
        """
        self.run_id = run_id
        self._book = book
        self._tick = tick
        self.log_tail: collections.deque[OutputLine] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.log_offset = 0
        # The stream of a line longer than a read takes, whose next piece the log reads next (None: a new line).
        self._cut_stream: str | None = None
        self.events_offset = 0
        self.event_seq = 0
        self.model_requests: list[dict[str, Any]] = []

    def resume(self, state: FollowState) -> None:
        """Go on from where another follower handed the run over."""
        self.log_offset, self.events_offset = state.log_offset, state.events_offset
        self.event_seq = state.event_seq
        self.model_requests = list(state.model_requests)

    def drain(
        self,
        target: ComputeTarget[Any],
        handle: RunHandle,
        emit: Callable[[str], None] | None,
        *,
        final: bool,
    ) -> None:
        """Read what the run wrote since the last read, until nothing new comes: pass each line of its output to
        `emit`, record its metrics and tags.

        :param final: the run ended: read everything, whatever the history's backlog.
        """
        while True:
            self._tick()
            chunk = target.read_log(handle, self.log_offset, final=final)
            self.log_offset = chunk.offset
            for raw in chunk.lines:
                # Only the first piece of a line cut into pieces holds its mark.
                cut_stream, self._cut_stream = self._cut_stream, None
                line = OutputLine(raw, cut_stream) if cut_stream else OutputLine.read(raw)
                self.log_tail.append(line)
                if emit is not None:
                    emit(line)
            if chunk.cut and chunk.lines:
                self._cut_stream = line.stream
            if final or self._book.backlog < MAX_BUFFERED_POINTS:
                events = target.read_events(handle, self.events_offset, final=final)
                self.events_offset = events.offset
                self._ingest_events(events.lines)
            else:
                events = Chunk([], self.events_offset)  # the history is away: they wait in the file
            if not chunk.lines and not events.lines:
                return

    def _ingest_events(self, lines: list[str]) -> None:
        events = read_events(lines, self.event_seq, self.run_id)
        self.event_seq = events.next_seq
        self.model_requests.extend(events.model_requests)
        if events.points:
            self._book.add_metrics(events.points)
        if events.tags:
            self._book.add_tags(events.tags)

    def recall_tail(self, target: ComputeTarget[Any], handle: RunHandle) -> None:
        """The last lines printed before this follower took over, for the error of a failed run."""
        if self.log_offset <= 0:
            return
        start = max(0, self.log_offset - RECALLED_TAIL_BYTES)
        try:
            chunk = target.read_log(handle, start)
        except Exception as err:  # only an error message's context: never worth failing for
            log.debug("Run %s: the log's last lines were not read again (%s)", self.run_id, err)
            return
        # Up to the offset handed over (what lies past it is read again, and kept, by this follower); read
        # from the middle of a line, the first one is partial.
        lines, position = [], start
        for line in chunk.lines:
            position += len(line.encode()) + 1
            if position > self.log_offset:
                break
            lines.append(line)
        self.log_tail.extend(OutputLine.read(line) for line in (lines[1:] if start > 0 else lines))
