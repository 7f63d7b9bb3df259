"""Run: any recorded run of a workspace, by its id, with the run API of Azure ML's ``Run``.

    run = Run.get(ws, "diabetes_ridge_1795700859_0852cf59")
    run.wait_for_completion(show_output=True)     # follows a run another process (a task) started
    run.get_metrics()["mse"]
    run.download_files("outputs/", "here/")

``Experiment.submit`` returns a ``ScriptRun``, which has the same methods and also follows the run itself.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow_amlrun.errors import (
    AmlRunError,
    ConfigurationError,
    RunCanceledError,
    RunFailedError,
    RunTimeoutError,
    shown,
)
from airflow_amlrun.history import RunNotFoundError, RunRecord, RunStatus
from airflow_amlrun.run_api import RunApi
from airflow_amlrun.run_log import LogPosition, LogUnavailableError, RunLog, silent_seconds
from airflow_amlrun.run_output import LOG_TAIL_LINES, print_output

if TYPE_CHECKING:
    from airflow_amlrun.run_context import Run as ScriptSideRun
    from airflow_amlrun.workspace import Workspace

__all__ = ["Run"]


class Run(RunApi):
    """A recorded run of a workspace; ``Run.get(ws, run_id)``.

    Its attributes (``status``, ``tags``, ``record``) are the run as it was last read; the methods read it
    anew (``get_status()`` refreshes them).

    :param workspace: the workspace holding the run.
    :param run_id: the run's id.
    :raises RunNotFoundError: no such run; the message says where the runs are listed.
    """

    def __init__(self, workspace: Workspace, run_id: str) -> None:
        from airflow_amlrun.workspace import Workspace

        if not isinstance(workspace, Workspace):
            raise ConfigurationError(
                f"Run: workspace must be a Workspace (e.g. Workspace.get()), not {type(workspace).__name__} "
                f"{shown(workspace)}."
            )
        if not isinstance(run_id, str) or not run_id.strip():
            raise ConfigurationError(
                f"Run: run_id={shown(run_id)} must be a run's id, as `amlrun runs list` shows."
            )
        self.workspace = workspace
        try:
            self.record = workspace.history.get_run(run_id)
        except RunNotFoundError as err:
            raise RunNotFoundError(f"{err} `amlrun runs list` shows the runs there.") from None

    @classmethod
    def get(cls, workspace: Workspace, run_id: str) -> Run:
        """The recorded run ``run_id`` of ``workspace``."""
        return cls(workspace, run_id)

    @staticmethod
    def get_context() -> ScriptSideRun:
        """Inside a training script: the run it is part of (see ``airflow_amlrun.run_context.Run``)."""
        from airflow_amlrun.run_context import Run as ScriptSideRun

        return ScriptSideRun.get_context()

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def experiment(self) -> str:
        """The name of the run's experiment."""
        return self.record.experiment

    @property
    def status(self) -> RunStatus:
        """The status as last read (``get_status()`` reads it anew)."""
        return self.record.status

    @property
    def tags(self) -> dict[str, Any]:
        """The tags as last read (``get_tags()`` reads them anew)."""
        return dict(self.record.tags)

    def _record(self) -> RunRecord:
        self.record = super()._record()
        return self.record

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, experiment={self.experiment!r}, status={str(self.status)!r})"

    def wait_for_completion(
        self,
        show_output: bool = True,
        raise_on_error: bool = True,
        output: Callable[[str], None] | None = None,
    ) -> RunRecord:
        """Wait for the run to end, which whoever started it (a task, another process) records, streaming its
        output; returns the run as it ended.

        The output is read from the run's target while it runs where this machine can read it (local, SSH and
        Spark runs), else from the store once it ended.

        :param show_output: pass each line of the run's output to ``output`` (default: print it).
        :param raise_on_error: raise RunFailedError (with the output's last lines) or RunCanceledError unless
            the run Completed.
        :param output: where the lines go.
        :raises AmlRunError: nobody reports on the run any more (the task following it died): ``amlrun
            reconcile`` settles it.
        """
        from airflow_amlrun.config import load_settings

        settings = load_settings()
        emit = (output or print_output) if show_output else None
        run_log = RunLog(self.workspace, self.id, settings)
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        position = LogPosition()
        poll = min(max(settings.poll_interval_seconds, 0.05), 2.0)
        # Read on the target while it runs, where this machine can (else its status alone is watched), and
        # from the store once it ended (RunLog.read switches by itself, at the same place in the log).
        live = True
        grew, pending = time.monotonic(), 0
        while True:
            if live:
                try:
                    read = run_log.read(position)
                except LogUnavailableError:
                    if self._record().status.is_terminal:
                        break  # no log was stored: nothing more to show
                    live = False
                    continue
                for line in read.lines:
                    tail.append(line)
                    if emit is not None:
                        emit(line)
                position, self.record = read.position, read.record
                if read.ended:
                    break
                if read.lines or read.pending != pending:
                    grew, pending = time.monotonic(), read.pending
                if read.lines or read.record.status.is_terminal:
                    continue
            elif self._record().status.is_terminal:
                live = True
                continue
            threshold = settings.reconcile_after_seconds
            silent = silent_seconds(self.record)
            if silent > threshold and time.monotonic() - grew > threshold:
                raise AmlRunError(
                    f"Run {self.id} is {self.record.status}, but nothing has reported on it for {silent:.0f} s: "
                    "the task following it died, or cannot reach the history. `amlrun reconcile` settles it."
                )
            time.sleep(poll)
        record = self._record()
        if raise_on_error:
            raise_for_outcome(record, list(tail))
        return record


def raise_for_outcome(record: RunRecord, tail: list[str]) -> None:
    """Raise what a run that did not complete ended with: RunCanceledError, or RunFailedError (RunTimeoutError
    past its limit) carrying the last lines of its output."""
    if record.status is RunStatus.COMPLETED:
        return
    if record.status is RunStatus.CANCELED:
        raise RunCanceledError(
            f"Run {record.id} was canceled. {record.error or ''}".strip(), run_id=record.id
        )
    message = f"Run {record.id} failed: {record.error}"
    shown_lines = "\n".join(f"  | {line}" for line in tail[-20:])
    if shown_lines:
        message += f"\nLast lines of its output:\n{shown_lines}"
    timed_out = (record.error or "").startswith("Exceeded max_run_duration_seconds")
    error_type = RunTimeoutError if timed_out else RunFailedError
    raise error_type(message, run_id=record.id, log_tail=tail)
