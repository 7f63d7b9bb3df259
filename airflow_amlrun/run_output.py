"""A run's output lines as the history's log holds them: which stream each came from, and where to show it."""

from __future__ import annotations

import sys
from typing import Any

from airflow_amlrun.targets.supervisor import STDERR_MARK, STDOUT_MARK

_STDERR_MARK = STDERR_MARK.decode()
_STDOUT_MARK = STDOUT_MARK.decode()


class OutputLine(str):
    """A line of a run's output, which says the stream the script wrote it to: ``stream`` is "stdout" or
    "stderr" (a traceback, a warning, a logging handler's records by default)."""

    stream: str

    def __new__(cls, text: str, stream: str = "stdout") -> OutputLine:
        line = super().__new__(cls, text)
        line.stream = stream
        return line

    @classmethod
    def read(cls, raw: str) -> OutputLine:
        """The line as the run's log holds it, where the supervisor marked what came from stderr (and a stdout
        line that could pass for marked)."""
        if raw.startswith(_STDERR_MARK):
            return cls(raw[len(_STDERR_MARK) :], "stderr")
        if raw.startswith(_STDOUT_MARK):
            return cls(raw[len(_STDOUT_MARK) :])
        return cls(raw)

    @property
    def is_error_output(self) -> bool:
        return self.stream == "stderr"


def log_output_line(logger: Any, line: str) -> None:
    """Write a line of a run's output to a log (the task log): what the script wrote to stderr (a traceback, a
    warning) as a warning, which the Airflow UI shows apart, the rest as info."""
    if isinstance(line, OutputLine) and line.is_error_output:
        logger.warning("%s", line)
    else:
        logger.info("%s", line)


def print_output(line: str) -> None:
    """Print a line of a run's output to this process's stdout, or to its stderr where the script wrote it."""
    stderr = isinstance(line, OutputLine) and line.is_error_output
    print(line, file=sys.stderr if stderr else sys.stdout, flush=stderr)


# Lines of the script's output kept for the error of a failed run.
LOG_TAIL_LINES = 30
