"""A run's log as a reader outside the process following the run sees it (the `amlrun` CLI).

The log is read by byte offset, as the task following a run reads it: on the run's target while the run goes
on (``ComputeTarget.read_log``), and from the workspace store once the run ended, where the run's logs/ folder
was stored (its ``std_log.txt`` is the same bytes, so an offset read on the target goes on in the store).
Reading changes nothing: the run, its row and its heartbeat are left to whoever follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.targets.base import Chunk
from airflow_amlrun.targets.common import STD_LOG, lines_from

if TYPE_CHECKING:
    from airflow_amlrun.config import Settings
    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.targets.base import ComputeTarget
    from airflow_amlrun.targets.handles import RunHandle
    from airflow_amlrun.workspace import Workspace

# Targets whose read_log only reads (a file of this machine, or one read over SSH). The Docker target copies
# the container's log into a spool file of the worker that follows the run: a second reader would copy it
# into the same file, under the task's feet.
READ_IN_PLACE = ("local", "ssh")


class LogUnavailableError(AmlRunError):
    """The log of a run cannot be read from here (yet), and why."""


def stored_log_key(run_id: str) -> str:
    """The store key of a finished run's combined stdout/stderr (its logs/ folder is kept under runs/<id>/)."""
    return f"runs/{run_id}/logs/{STD_LOG}"


@dataclass(frozen=True)
class LogRead:
    """New lines of a run's log since an offset, the offset to read from next, and the run as it was read."""

    chunk: Chunk
    record: RunRecord


class RunLog:
    """The log of one run, read by byte offset wherever it is at the moment.

    :param workspace: the run's workspace.
    :param run_id: the run.
    :param settings: this process's settings (default: loaded when a target is needed).
    """

    def __init__(self, workspace: Workspace, run_id: str, settings: Settings | None = None) -> None:
        self.workspace = workspace
        self.run_id = run_id
        self._settings = settings
        self._target: ComputeTarget[Any] | None = None
        self._handle: RunHandle | None = None

    def location(self, record: RunRecord) -> str | None:
        """Where the log of a finished run is kept in the store (a path or URL), if it was collected."""
        if record.logs_uri is None:
            return None
        return self.workspace.store.uri_for(stored_log_key(record.id))

    def stored(self, record: RunRecord) -> bytes:
        """The whole log of a finished run, as the store keeps it."""
        if record.logs_uri is None:
            raise LogUnavailableError(
                f"Run {record.id} ({record.status}) has no stored log: nothing was collected from its target"
                f"{' (' + record.error + ')' if record.error else ''}."
            )
        try:
            return self.workspace.store.get_object(stored_log_key(record.id))
        except FileNotFoundError:
            raise LogUnavailableError(
                f"Run {record.id}: its logs were stored at {record.logs_uri}, but hold no {STD_LOG} (removed "
                "from the store since?)."
            ) from None

    def tail(self, record: RunRecord, lines: int) -> list[str]:
        """The last lines of a finished run's stored log."""
        if lines <= 0:
            return []
        return self.stored(record).decode("utf-8", errors="replace").splitlines()[-lines:]

    def read(self, offset: int) -> LogRead:
        """The complete lines written since `offset`: from the store once the run ended (every line, the last
        one even without its newline), else from its target (none before it reached its target)."""
        record = self.workspace.get_run(self.run_id)
        if record.status.is_terminal:
            data = self.stored(record)[offset:]
            return LogRead(lines_from(data, offset, final=True) if data else Chunk([], offset), record)
        if record.handle is None:
            return LogRead(Chunk([], offset), record)
        target, handle = self._on_target(record)
        return LogRead(target.read_log(handle, offset), record)

    def _on_target(self, record: RunRecord) -> tuple[ComputeTarget[Any], RunHandle]:
        if self._target is None or self._handle is None:
            from airflow_amlrun.config import load_settings
            from airflow_amlrun.targets.registry import resolve_target

            settings = self._settings or load_settings()
            target = resolve_target(record.target, settings, self.workspace.cache_dir)
            if target.kind not in READ_IN_PLACE:
                raise LogUnavailableError(
                    f"Run {record.id} runs on the {target.kind} target {record.target!r}, whose log only the "
                    "task following it reads while it runs: see that task's log, or run `amlrun runs logs "
                    f"{record.id}` once it ended."
                )
            assert record.handle is not None
            handle = target.handle_type.from_json(record.handle)
            unreachable = target.attachable(handle)
            if unreachable is not None:
                raise LogUnavailableError(
                    f"Run {record.id}'s log cannot be read from here while it runs: {unreachable}. Once it "
                    f"ended, `amlrun runs logs {record.id}` prints it from the store."
                )
            self._target, self._handle = target, handle
        return self._target, self._handle
