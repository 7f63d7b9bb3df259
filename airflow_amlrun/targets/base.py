"""The protocol every compute target follows, and the records that pass through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from airflow_amlrun.environment import ResolvedEnvironment
from airflow_amlrun.snapshot import BlobStore, Snapshot
from airflow_amlrun.targets.handles import RunHandle

# A target's own handle type (see targets/handles.py).
H = TypeVar("H", bound=RunHandle)


@dataclass(frozen=True)
class Job:
    """One run, as a target needs it: what to start, with what, and under which limits."""

    run_id: str
    experiment: str
    source_directory: Path
    script: str | None
    command: str | list[str] | None
    arguments: list[str]
    environment: ResolvedEnvironment
    environment_variables: dict[str, str]
    max_run_duration_seconds: float | None
    snapshot_id: str | None = None
    # Set for the script like environment_variables, but never logged, shown or recorded anywhere.
    secret_environment_variables: dict[str, str] = field(default_factory=dict, repr=False)
    # "python", or "pyspark": the script uses Spark (see ScriptRunConfig.framework).
    framework: str = "python"


@dataclass(frozen=True)
class TargetStatus:
    """What a target reports of a run: still running, or finished with an exit code."""

    running: bool
    exit_code: int | None = None
    # Why the target ended the run itself (e.g. killed for memory), if it knows.
    reason: str | None = None
    # The target stopped the run itself for running longer than max_run_duration_seconds.
    timed_out: bool = False
    # The signal of a stop that reached the run while it ran, whoever sent it (its supervisor recorded it).
    stopped_by: str | None = None


@dataclass(frozen=True)
class Chunk:
    """New complete lines of a stream since an offset, and the offset to ask from next time."""

    lines: list[str]
    offset: int
    # The last line is a piece of one longer than a read takes, which the next chunk's first line goes on with.
    cut: bool = False
    # Bytes read past `offset` that wait for the rest of their line (a progress bar's "\r" updates).
    pending: int = 0


@dataclass(frozen=True)
class Collected:
    """Where a finished run's outputs and logs were brought back to on this machine."""

    outputs_dir: Path | None
    # The script's logs/ folder, holding std_log.txt (its combined stdout and stderr) too.
    logs_dir: Path | None
    extra: dict[str, Any] = field(default_factory=dict)


class CodeSource(Protocol):
    """The code of a run: its snapshot (manifest) in the workspace store.

    A target on this machine writes it with `materialize`; a remote target reads `snapshot.entries` and
    sends only the blobs (`store.get_bytes(digest)` / `store.copy_to`) the remote host lacks.
    """

    snapshot: Snapshot
    store: BlobStore

    def materialize(self, dest: Path) -> None:
        """Write the run's code tree into dest (which exists and is empty)."""


class ComputeTarget(Protocol[H]):
    """A place runs execute: prepare, submit, wait, read_log, read_events, cancel, collect, cleanup."""

    name: str
    kind: str
    # What submit returns and the other steps take; the run row holds its JSON (`handle_type.from_json`).
    handle_type: type[H]

    @property
    def followed_only_here(self) -> bool:
        """Whether a run can be followed only from this machine (its processes, files or Docker socket), so
        that a deferred task's trigger must run here too."""

    def check(self, job: Job) -> None:
        """Refuse a job this target cannot run, before anything is recorded (raise ConfigurationError)."""

    def prepare(self, job: Job, code: CodeSource) -> None:
        """Make the run directory on the target, holding the job's code."""

    def submit(self, job: Job) -> H:
        """Start the run; returns its handle, whose JSON is saved on the run row."""

    def wait(self, handle: H, timeout: float) -> TargetStatus:
        """Block at most `timeout` seconds, returning early once the run has finished."""

    def read_log(self, handle: H, offset: int, final: bool = False) -> Chunk:
        """The script's combined stdout/stderr lines written since `offset`, as its supervisor wrote them: each
        stderr line begins with ``supervisor.STDERR_MARK``, a stdout line beginning with ESC with
        ``supervisor.STDOUT_MARK`` (``run.OutputLine.read`` takes either off)."""

    def read_events(self, handle: H, offset: int, final: bool = False) -> Chunk:
        """The metric and tag events (JSON lines) the script logged since `offset`."""

    def cancel(self, handle: H) -> bool:
        """Stop the run and everything it started. Returns whether the stop found the run going: ``False`` when
        it had already ended on its own (then it is recorded as it ended, not as stopped)."""

    def collect(self, handle: H) -> Collected:
        """Bring outputs/ and logs/ of a finished run to this machine."""

    def cleanup(self, handle: H, *, remove_files: bool) -> None:
        """Release what the target holds for an ended run, once its outcome is recorded (e.g. its container);
        with remove_files (per ``[amlrun] cleanup``), delete its run directory too."""

    def attachable(self, handle: H) -> str | None:
        """None when this process can follow the run of this handle; otherwise why it cannot.

        A retry re-attaching to its earlier try's run asks this first: a run on another worker's own
        machine (the local target, a Docker daemon on that worker's socket) cannot be reached from here.
        """

    def gone(self, handle: H) -> str | None:
        """Why the run of a handle this process cannot attach to certainly exists nowhere any more, else None.

        Reconcile settles such a run (recorded Failed with the reason) rather than leaving it to the machine
        it ran on: e.g. a local run of this very worker before it restarted.
        """

    def find(self, job: Job) -> H | None:
        """The handle of a run with this job's run id already on the target, if any.

        Used when a retry finds its earlier try's run in the history without a saved handle (the worker died
        between submitting and recording): labels, remote run directories and the like carry the run id; and
        when a start fails without its answer, to stop what it may have started. Only looks: a run found but
        never started (a container created, not yet started) may belong to a task that is about to start it,
        and is reported as not found. The local target finds only the runs it started itself (its children,
        whose supervisor may not have its request yet): any other process found by a run id could not be
        trusted to be the run's.
        """

    def detach(self, handle: H) -> None:
        """Stop following the run from this process (streams, threads) without touching it: another process
        (a deferred task's trigger, or the task again) follows it on."""

    def discard(self, job: Job) -> None:
        """Remove what a run that never started left on the target (e.g. a container created, never started),
        once the run is recorded lost: by a retry of its task, or by a reconcile that claimed it."""

    def describe(self) -> dict[str, Any]:
        """What to record about the target on the run (kind, host, ...)."""
