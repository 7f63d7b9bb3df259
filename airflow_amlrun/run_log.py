"""A run's log as a reader outside the process following the run sees it (the `amlrun` CLI).

The log is read by byte offset, as the task following a run reads it: on the run's target while the run goes
on (``ComputeTarget.read_log``), and from the workspace store once the run ended, where the run's logs/ folder
was stored. The two are not the same bytes: on the target each line the script wrote to stderr begins with
the supervisor's ``STDERR_MARK`` (and a stdout line that starts with ESC with its ``STDOUT_MARK``), which the
stored copy does not hold. A reader therefore keeps two offsets
(`LogPosition`): the one on the target, and what it consumed there counted without the marks, which is where
it goes on in the store. The stored log is read in pieces of ``READ_CAP`` bytes, its last line even without a
newline. Reading changes nothing: the run, its row and its heartbeat are left to whoever follows it.

What it gives is the script's text as the log holds it, for a terminal: see `printable`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow_amlrun.errors import AmlRunError
from airflow_amlrun.runconfig import SWEEP_TARGET
from airflow_amlrun.targets.common import READ_CAP, STD_LOG, lines_from

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from airflow_amlrun.config import Settings
    from airflow_amlrun.history import RunRecord
    from airflow_amlrun.targets.base import ComputeTarget
    from airflow_amlrun.targets.handles import RunHandle
    from airflow_amlrun.workspace import Workspace

# Targets whose read_log only reads (a file of this machine, or one read over SSH). The Docker target copies
# the container's log into a spool file of the worker that follows the run: a second reader would copy it
# into the same file, under the task's feet.
READ_IN_PLACE = ("local", "ssh", "spark")
# What stands for a secret of the workspace in a line shown, as Airflow's masker shows one.
MASK = "***"
# What a terminal would act on rather than show: escape sequences (CSI up to its final byte, OSC, DCS, SOS,
# PM and APC up to BEL or ST, any other ESC and the character after it), C0 controls but tab, DEL, and C1
# controls (U+0080 to U+009F, which some terminals read as ESC sequences: U+009B as CSI, U+009D as OSC).
_CONTROL = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b.?"
    r"|[\x00-\x08\x0a-\x1f\x7f-\x9f]",
    re.DOTALL,
)


def printable(text: str) -> str:
    """The text a script wrote, without what would drive the terminal showing it (its title, its clipboard
    through OSC 52, the cursor, colours): escape sequences and control characters but tab are removed."""
    return _CONTROL.sub("", text)


def masked(text: str, secrets: Iterable[str]) -> str:
    """The text with every occurrence of each secret value replaced by MASK (the longest first, so that a
    secret holding another is masked whole)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text


def silent_seconds(record: RunRecord, now: datetime | None = None) -> float:
    """How long nobody has reported on an unfinished run: since its task's last heartbeat, else since it
    started or was created (the rule `amlrun reconcile` settles runs by)."""
    heard = record.heartbeat_at or record.start or record.created_at
    return ((now or datetime.now(UTC)) - heard).total_seconds()


class LogUnavailableError(AmlRunError):
    """The log of a run cannot be read from here (yet), and why.

    A run that never reached its target has none; one that runs on a target this process cannot reach is read where
    its task runs, or once it ended and its log was collected into the store.
    """


def sweep_logs(sweep: RunRecord, runs: Sequence[RunRecord]) -> str:
    """Where the logs of a sweep are: a sweep's parent run runs no code, so it has none; each of its `runs` (oldest
    first) has its own, and the commands that print its best and first run's are named."""
    from airflow_amlrun.hyperdrive.recorded import runs_to_read  # a sweep's modules: only for a sweep

    said = "A sweep runs no code of its own, so it has no log: each of its runs has its own."
    return f"{said} {runs_to_read(sweep, runs, 'amlrun runs logs', 'prints')}"


def stored_log_key(run_id: str) -> str:
    """The store key of a finished run's combined stdout/stderr (its logs/ folder is kept under runs/<id>/)."""
    return f"runs/{run_id}/logs/{STD_LOG}"


@dataclass(frozen=True)
class LogPosition:
    """Where a reader is in a run's log: its byte offset in the log on the run's target, and the same place
    in the log the store keeps, which lacks the supervisor's mark at the start of each stderr line."""

    on_target: int = 0
    in_store: int = 0


@dataclass(frozen=True)
class LogRead:
    """New lines of a run's log (their stderr marks taken off), where to read on from, whether that is its end
    (the run ended and its stored log is read whole), and the run as it was read."""

    lines: list[str]
    position: LogPosition
    ended: bool
    record: RunRecord
    # Bytes of a line still being written, read past `position` on the target: the log grows while they do.
    pending: int = 0


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
        self._secrets: list[str] | None = None

    def location(self, record: RunRecord) -> str | None:
        """Where the log of a finished run is kept in the store (a path or URL), if it was collected."""
        if record.logs_uri is None:
            return None
        return self.workspace.store.uri_for(stored_log_key(record.id))

    def shown(self, text: str) -> str:
        """Text of the run (a line of its log, a tag it set, its error) as a terminal may show it: `printable`,
        with the workspace's own secrets (its database password, its store's keys) masked.

        The secret values a run was given (``secret_environment_variables``) are stored nowhere, so a line
        printing one shows it: only the task log, whose process knew them, masks those."""
        if self._secrets is None:
            self._secrets = self.workspace.credentials()
        return masked(printable(text), self._secrets)

    def _stored_piece(self, record: RunRecord, offset: int) -> bytes:
        """READ_CAP bytes at most of a finished run's stored log, from offset."""
        if record.logs_uri is None:
            raise LogUnavailableError(
                f"Run {record.id} ({record.status}) has no stored log: nothing was collected from its target"
                f"{' (' + record.error + ')' if record.error else ''}."
            )
        try:
            return self.workspace.store.read_object(stored_log_key(record.id), offset, READ_CAP)
        except FileNotFoundError:
            raise LogUnavailableError(
                f"Run {record.id}: its logs were stored at {record.logs_uri}, but hold no {STD_LOG} (removed "
                "from the store since?)."
            ) from None

    def _stored_lines(self, record: RunRecord) -> Iterator[str]:
        position = LogPosition()
        while True:
            read = self._read_stored(record, position)
            yield from read.lines
            if read.ended:
                return
            position = read.position

    def tail(self, record: RunRecord, lines: int) -> list[str]:
        """The last lines of a finished run's stored log (read in pieces: only those lines are kept)."""
        if lines <= 0:
            return []
        self._not_a_sweep(record)
        return list(deque(self._stored_lines(record), maxlen=lines))

    def read(self, position: LogPosition) -> LogRead:
        """The complete lines written since `position`: from the store once the run ended (a piece of at most
        READ_CAP bytes a read, the last line even without its newline), else from its target (none before it
        reached its target)."""
        from airflow_amlrun.run_output import OutputLine  # the submission's modules: only once a log is read

        record = self.workspace.get_run(self.run_id)
        self._not_a_sweep(record)
        if record.status.is_terminal:
            return self._read_stored(record, position)
        if record.handle is None:
            return LogRead([], position, False, record)
        target, handle = self._on_target(record)
        chunk = target.read_log(handle, position.on_target)
        lines = [OutputLine.read(raw) for raw in chunk.lines]
        # The store's copy lacks each mark the lines read here began with (a stderr line's, or the one before a
        # stdout line that starts with ESC). The marks are ASCII: a character of one is a byte.
        marks = sum(len(raw) - len(line) for raw, line in zip(chunk.lines, lines, strict=True))
        consumed = chunk.offset - position.on_target
        return LogRead(
            [str(line) for line in lines],
            LogPosition(chunk.offset, position.in_store + consumed - marks),
            False,
            record,
            chunk.pending,
        )

    def _not_a_sweep(self, record: RunRecord) -> None:
        # Its log would be read as that of a run that never reached its target: none while it goes on, and
        # "nothing was collected" once it ended.
        if record.target == SWEEP_TARGET:
            runs = self.workspace.history.child_runs(record.id)
            raise LogUnavailableError(f"Run {record.id} is a sweep. {sweep_logs(record, runs)}")

    def _read_stored(self, record: RunRecord, position: LogPosition) -> LogRead:
        piece = self._stored_piece(record, position.in_store)
        # A piece shorter than READ_CAP ends the log: lines_from then takes its last line whole.
        chunk = lines_from(piece, position.in_store, final=True)
        return LogRead(
            chunk.lines, LogPosition(position.on_target, chunk.offset), len(piece) < READ_CAP, record
        )

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
