"""Run handles: what a target's run row keeps to follow the run from any process (a retry, reconcile).

Each target has its own frozen dataclass; the run row stores its JSON (`to_json`), and a handle is read back
with `from_json`. A row written by an older version may lack keys a handle has now, or hold keys it no
longer has: both are written back as they were, so a row that is followed again keeps its shape (the local
target tells a handle from before start times by the key's absence).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self

from airflow_amlrun.errors import AmlRunError


class UnreadableHandleError(AmlRunError, ValueError):
    """A run row's handle is not one this target writes: the run cannot be followed from it.

    The row was written by something else, or edited. A retry of the task records such a run Failed ("Lost") and
    starts a new one; ``amlrun reconcile`` settles it the same way.
    """


@dataclass(frozen=True)
class RunHandle:
    """The JSON round trip every target's handle shares."""

    # Fields the row it was read from lacked, and keys it held besides the fields: written back as they were.
    absent: frozenset[str] = field(default=frozenset(), kw_only=True, repr=False, compare=False)
    other: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        """The handle a run row holds (as `to_json` wrote it, or an older version's)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("absent", "other")]
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name in names
            and f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise UnreadableHandleError(
                f"The run row's handle lacks {', '.join(missing)}, which every {cls.__name__} has: {data!r}. It was "
                "not written by airflow-amlrun (or was edited since), so the run cannot be followed from it."
            )
        return cls(
            **{name: data[name] for name in names if name in data},
            absent=frozenset(name for name in names if name not in data),
            other={key: value for key, value in data.items() if key not in names},
        )

    def environment_record(self) -> dict[str, Any]:
        """What the run's environment record adds about what the run ran in (e.g. the image): nothing, unless
        the target says."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """What the run row stores."""
        data = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("absent", "other") and f.name not in self.absent
        }
        return {**data, **self.other}


@dataclass(frozen=True)
class LocalHandle(RunHandle):
    """A run of the local target: its supervisor's process, named by what identifies it for certain."""

    pid: int
    # In clock ticks since boot; with the pid, it names one process for good. Absent from a handle recorded
    # before handles carried it: such a run is followed only while its process works in its run directory.
    start_time: int | None = None
    host: str | None = None
    boot_id: str | None = None
    pid_namespace: str | None = None
    # Keyword-only, so that it may follow the optional fields and keep its place in the JSON.
    run_dir: str = field(kw_only=True)
    std_log: str | None = None
    events: str | None = None
    exit_code: str | None = None
    ended_by: str | None = None
    python: str | None = None

    @property
    def legacy(self) -> bool:
        """Whether it was recorded before handles named the process's start time."""
        return "start_time" in self.absent


@dataclass(frozen=True)
class DockerHandle(RunHandle):
    """A run of the Docker target: its container, the daemon that runs it, and how its files travel."""

    container_id: str
    container: str
    daemon: str | None = None
    daemon_id: str | None = None
    image: str | None = None
    run_dir: str = field(kw_only=True)
    # "bind" (the daemon mounts the worker's run folder) or "archive" (files are copied in and out).
    transfer: str | None = None
    python: str | None = None
    user: str | None = None
    # The worker whose files a bind-mounted run uses: only there can it be followed.
    host: str | None = None
    # The image's id, and the build key it is labelled with when amlrun built it (as `image` may be re-tagged).
    image_id: str | None = None
    image_build_key: str | None = None

    def environment_record(self) -> dict[str, Any]:
        if self.image is None or self.image_id is None:
            return {}
        return {"image": {"reference": self.image, "id": self.image_id, "build_key": self.image_build_key}}

    @property
    def legacy(self) -> bool:
        """Whether it was recorded before handles said how the run's files travel: a retry cannot follow it."""
        return "transfer" in self.absent


@dataclass(frozen=True)
class SSHHandle(RunHandle):
    """A run of the SSH target: its host, run directory, and its supervisor there."""

    host: str
    port: int
    user: str | None
    run_id: str
    base_dir: str
    run_dir: str
    # The run's supervisor on the host: the pid names it only together with its start and boot.
    pid: int
    start_time: int | str | None = None
    boot_id: str | None = None
    pid_namespace: str | None = None
    python: str | None = None
    helper: str | None = None
    helper_python: str | None = None
    blob_bytes_sent: int | None = None
    blobs_sent: int | None = None


@dataclass(frozen=True)
class SparkHandle(LocalHandle):
    """A run of the Spark target: spark-submit under the run's supervisor on the worker (the driver too, in
    client mode), and where it was submitted.

    In cluster mode (YARN, Kubernetes) the driver runs on the cluster, and the run's control folder names it
    there (spark_job.SUBMISSION_FILE: the YARN application id, the driver pod): what a retry would re-attach
    by once the worker that submitted it is gone. That path is designed, not built or tested (no such cluster
    is reachable here).
    """

    master: str = field(kw_only=True)
    deploy_mode: str = field(default="client", kw_only=True)
    # The built environment's archive shipped to the executors, by its build key (None: the cluster's Python).
    archive_build_key: str | None = field(default=None, kw_only=True)
    # The interpreter the archive's bin/python links to, which every node must have at that path.
    archive_interpreter: str | None = field(default=None, kw_only=True)

    def environment_record(self) -> dict[str, Any]:
        if self.archive_build_key is None:
            return {}
        return {
            "spark_archive": {"build_key": self.archive_build_key, "interpreter": self.archive_interpreter}
        }
