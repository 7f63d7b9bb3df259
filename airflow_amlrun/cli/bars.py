"""Progress bars on the terminal for the long steps the package reports (``airflow_amlrun.progress``): a
snapshot's upload, an environment's build, a download. They go to stderr, so that what a command prints on
stdout (a run's output, ``--json``) stays as it is."""

from __future__ import annotations

import sys
import threading

from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


class _Done(ProgressColumn):
    """How much of a step is done, in its unit: ``3/12 files``, ``1.2/4.0 MB``."""

    def render(self, task: Task) -> Text:
        unit = str(task.fields.get("unit") or "")
        if unit == "bytes":
            done = filesize.decimal(int(task.completed))
            return Text(done if task.total is None else f"{done}/{filesize.decimal(int(task.total))}")
        if task.total is None:
            return Text(f"{task.completed:.0f} {unit}".strip() if task.completed else "")
        return Text(f"{task.completed:.0f}/{task.total:.0f} {unit}".strip())


class ProgressBars:
    """A ``progress.Reporter`` drawing each step as a bar while it runs; a finished step stays as a full bar.

    :param console: where the bars go (default: stderr).
    """

    def __init__(self, console: Console | None = None) -> None:
        # Not on a terminal (a pipe, a CI log), lines are not cut at 80 columns.
        self.console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 200)
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._running = 0

    def start(self, description: str, total: float | None, unit: str) -> TaskID:
        with self._lock:
            if self._progress is None:
                self._progress = Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    BarColumn(),
                    _Done(),
                    TimeElapsedColumn(),
                    console=self.console,
                )
                self._progress.start()
            self._running += 1
            return self._progress.add_task(description, total=total, unit=unit)

    def advance(self, token: object, amount: float) -> None:
        if self._progress is not None and isinstance(token, int):
            self._progress.advance(TaskID(token), amount)

    def finish(self, token: object) -> None:
        with self._lock:
            progress = self._progress
            if progress is None or not isinstance(token, int):
                return
            task = next(t for t in progress.tasks if t.id == token)
            # A step whose size was not known (an environment's build) ends as a full bar too.
            done = task.total or task.completed or 1
            progress.update(task.id, total=done, completed=done)
            progress.stop_task(task.id)
            self._running -= 1
            if self._running == 0:
                # Nothing else runs: the bars stay as they are, and what follows prints below them.
                progress.stop()
                self._progress = None
