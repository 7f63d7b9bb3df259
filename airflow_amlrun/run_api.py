"""The run API users know from Azure ML's ``Run``: status, details, metrics, files, tags, display name.

One implementation for both handles of a run: the ``ScriptRun`` that ``Experiment.submit`` returns, and the
``Run`` that ``Run.get(ws, run_id)`` gives of any recorded run. Each method reads the run history (or the
workspace store) as it is now; nothing is cached here.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_amlrun import progress
from airflow_amlrun.errors import ConfigurationError, DownloadError, shown
from airflow_amlrun.history import MetricPoint, RunRecord, RunStatus

if TYPE_CHECKING:
    from airflow_amlrun.model import Model
    from airflow_amlrun.workspace import Workspace

# The folders of a run kept in the store, as its file names begin: what it wrote to outputs/, and its logs.
FILE_FOLDERS = ("logs", "outputs")
# A run's display name is a short label (the column's size); its description may be a paragraph.
MAX_DISPLAY_NAME = 256
MAX_DESCRIPTION = 64 * 1024
_CHUNK = 8 << 20


class RunApi:
    """The Azure ML run methods, for a class that has a ``workspace`` and an ``id``."""

    workspace: Workspace

    @property
    def id(self) -> str:
        raise NotImplementedError

    def _record(self) -> RunRecord:
        """The run as the history holds it now."""
        return self.workspace.history.get_run(self.id)

    # status and details

    def register_model(
        self,
        model_name: str,
        model_path: str,
        tags: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
    ) -> Model:
        """Register a file or folder of this Completed run's outputs as the next version of a model; see
        ``Model.register``."""
        from airflow_amlrun.model import Model

        return Model.register(
            self.workspace, self.id, model_name, model_path, tags=tags, properties=properties
        )

    def get_status(self) -> RunStatus:
        """The run's status now: Queued, Preparing, Starting, Running, Finalizing, Completed, Failed or
        Canceled (a ``RunStatus``, equal to its name as a string)."""
        return self._record().status

    def get_details(self) -> dict[str, Any]:
        """The run as Azure ML's ``get_details`` describes one: ``runId``, ``status``, ``startTimeUtc``,
        ``endTimeUtc``, ``properties`` (code snapshot, git state), ``runDefinition`` (script, arguments, target,
        environment), ``logFiles`` (name: where the store keeps it) and, for a run that failed, ``error``."""
        record = self._record()
        store = self.workspace.store
        logs = [f"logs/{key}" for key in store.list(f"runs/{record.id}/logs")]
        return run_details(record, {name: store.uri_for(f"runs/{record.id}/{name}") for name in logs})

    # metrics

    def get_metrics(self, name: str | None = None) -> dict[str, Any]:
        """Every metric the run logged, by name: a list of the values of a metric logged more than once (in the
        order they were logged), the value of one logged once.

        :param name: only this metric (an empty dict if the run never logged it).
        """
        if name is not None and not isinstance(name, str):
            raise ConfigurationError(f"get_metrics: name={shown(name)} must be a metric's name, or None.")
        return metric_values(self.workspace.history.get_metrics(self.id, name))

    # tags, display name, description

    def get_tags(self) -> dict[str, str]:
        """The run's tags: those given at submission, those the script set, and those set since."""
        return dict(self._record().tags)

    def tag(self, key: str, value: Any = None) -> None:
        """Set one tag of the run (others are kept).

        :param key: the tag's name.
        :param value: its value, kept as a string (None: an empty one, a tag that is only a name).
        """
        self.set_tags({key: "" if value is None else value})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set tags of the run (others are kept); values are kept as strings."""
        from airflow_amlrun.runconfig import render_tags

        rendered = render_tags(tags)
        if rendered:
            self.workspace.history.update_run(self.id, add_tags=rendered)

    @property
    def display_name(self) -> str | None:
        """What the run is called where it is listed; set it to rename the run (None: no name but its id)."""
        return self._record().display_name

    @display_name.setter
    def display_name(self, value: str | None) -> None:
        self.workspace.history.update_run(
            self.id, display_name=_text(value, "display_name", MAX_DISPLAY_NAME)
        )

    @property
    def description(self) -> str | None:
        """What the run is for, in its users' words; set it to change it (None: none)."""
        return self._record().description

    @description.setter
    def description(self, value: str | None) -> None:
        self.workspace.history.update_run(self.id, description=_text(value, "description", MAX_DESCRIPTION))

    # files

    def get_file_names(self) -> list[str]:
        """The names of the run's files in the store: ``outputs/...`` (what it wrote to outputs/) and
        ``logs/...``. They are stored when the run ends, so a run still going on has none yet."""
        store = self.workspace.store
        return [
            f"{folder}/{key}" for folder in FILE_FOLDERS for key in store.list(f"runs/{self.id}/{folder}")
        ]

    def download_file(self, name: str, output_file_path: str | os.PathLike[str] | None = None) -> str:
        """Write one of the run's files (a name ``get_file_names`` gives) to a local file; returns its path.

        :param name: e.g. ``outputs/model.pkl``.
        :param output_file_path: the file to write (replaced if it exists), or a folder to write it into under
            its own name; default: its own name in the working directory.
        """
        key = self._file_key(name)
        if output_file_path is None:
            destination = posixpath.basename(name)
        else:
            destination = os.fspath(output_file_path)
            if os.path.isdir(destination):
                destination = os.path.join(destination, posixpath.basename(name))
        folder = os.path.dirname(os.path.abspath(destination))
        os.makedirs(folder, exist_ok=True)
        with progress.step(f"Downloading {name}", unit="bytes") as advance:
            _copy_out(self.workspace, key, destination, advance)
        return destination

    def download_files(
        self,
        prefix: str | None = None,
        output_directory: str | os.PathLike[str] | None = None,
        append_prefix: bool = True,
    ) -> list[str]:
        """Write the run's files whose names start with ``prefix`` into a local folder, each under its name;
        returns their paths.

        The names come from the store; one that would be written outside ``output_directory`` (through '..',
        or a folder there that is a link leading out), or two that would be written to the same path
        (``append_prefix=False``), are refused before anything is written. Every file
        arrives beside its place first and is put there once all have arrived: a download that fails partway
        removes what it wrote (files and folders it made) and leaves the files that were there before as they
        were.

        :param prefix: e.g. ``outputs/`` or ``outputs/model``; None: every file.
        :param output_directory: the folder (created if missing); default the working directory.
        :param append_prefix: keep the prefix in the paths written (``out/outputs/model.pkl``); False writes
            the rest of the name only (``out/model.pkl`` for the prefix ``outputs/``).
        :raises DownloadError: a file could not be read from the store or written; it names the file.
        """
        if prefix is not None and not isinstance(prefix, str):
            raise ConfigurationError(
                f"download_files: prefix={shown(prefix)} must be a string such as 'outputs/'."
            )
        names = [n for n in self.get_file_names() if prefix is None or n.startswith(prefix)]
        root = os.path.abspath(os.fspath(output_directory) if output_directory is not None else ".")
        planned = _destinations(names, prefix, append_prefix)
        for name, relative in planned:  # every name first: a bad one stops the download before any file
            _check_parts(root, relative, name)
        download = _Download(root)
        # The file being written, and where (None: the output directory is being made), for the error.
        current: tuple[str, str] | None = None
        try:
            os.makedirs(root, exist_ok=True)
            with progress.step(
                f"Downloading {len(planned)} files of run {self.id}", total=len(planned), unit="files"
            ) as done:
                for name, relative in planned:
                    current = (name, os.path.join(root, relative))
                    destination = _confined(root, relative, name, download.folders)
                    download.stage(self.workspace, f"runs/{self.id}/{name}", name, destination)
                    done(1)
            for staged in download.staged:
                current = (staged.name, staged.destination)
                download.put_in_place(staged)
        except BaseException as err:
            download.undo()
            if current is None or isinstance(err, ConfigurationError) or not isinstance(err, Exception):
                raise  # each names the file or folder already
            name, destination = current
            raise DownloadError(
                f"Run {self.id}: downloading its file {name!r} to {destination!r} failed "
                f"({str(err).rstrip('.') or type(err).__name__}). {download.undone()}",
                run_id=self.id,
                name=name,
                path=destination,
            ) from err
        return [staged.destination for staged in download.staged]

    def _file_key(self, name: object) -> str:
        """The store key of a file of the run, by the name ``get_file_names`` gives; else an error naming some."""
        parts = name.split("/") if isinstance(name, str) else []
        if len(parts) < 2 or parts[0] not in FILE_FOLDERS or any(p in ("", ".", "..") for p in parts):
            raise ConfigurationError(
                f"Run {self.id}: {shown(name)} is not a file name of a run: names begin with outputs/ or logs/, "
                "as get_file_names() gives them (e.g. 'outputs/model.pkl')."
            )
        key = f"runs/{self.id}/{name}"
        if not self.workspace.store.exists(key):
            names = self.get_file_names()
            raise ConfigurationError(
                f"Run {self.id} has no file {name!r}. Its files: {', '.join(names[:20]) or 'none yet'}"
                f"{' ...' if len(names) > 20 else ''}."
            )
        return key


def metric_values(points: list[MetricPoint]) -> dict[str, Any]:
    """Points by metric name, as Azure ML's ``get_metrics`` gives them: the value of a metric logged once, the
    list of values (in logging order) of one logged more often."""
    series: dict[str, list[Any]] = {}
    for point in points:
        series.setdefault(point.name, []).append(point.value)
    return {name: values[0] if len(values) == 1 else values for name, values in series.items()}


def run_details(record: RunRecord, log_files: dict[str, str]) -> dict[str, Any]:
    """A run described with the keys of Azure ML's ``get_details``."""
    config = record.config or {}
    environment = dict(record.environment or {})
    framework = str(environment.get("framework") or config.get("framework") or "python")
    details: dict[str, Any] = {
        "runId": record.id,
        "experiment": record.experiment,
        "target": record.target,
        "status": str(record.status),
        "startTimeUtc": _utc(record.start),
        "endTimeUtc": _utc(record.end),
        "properties": run_properties(record),
        "runDefinition": {
            "script": record.script,
            "command": record.command,
            "arguments": list(record.arguments),
            "target": record.target,
            "framework": "PySpark" if framework == "pyspark" else "Python",
            "environment": environment,
            "maxRunDurationSeconds": record.max_run_duration_seconds,
            "environmentVariables": dict(config.get("environment_variables") or {}),
        },
        "logFiles": log_files,
        "submittedBy": (
            f"Airflow task {record.dag_id}.{record.task_id}" if record.dag_id is not None else None
        ),
    }
    if record.display_name is not None:
        details["displayName"] = record.display_name
    if record.description is not None:
        details["description"] = record.description
    if record.error:
        details["error"] = {"error": {"code": str(record.status), "message": record.error}}
    return details


def run_properties(record: RunRecord) -> dict[str, str]:
    """What is fixed about a run once submitted, as string properties under Azure ML's names where it has them
    (the code snapshot, the git state) and ``amlrun.`` ones otherwise."""
    found: dict[str, Any] = {
        "ContentSnapshotId": record.snapshot_id,
        "amlrun.created_time_utc": _utc(record.created_at),
        "amlrun.rerun_of": record.rerun_of,
        "amlrun.parent_run_id": record.parent_run_id,
    }
    git = record.git or {}
    for key, name in (
        ("repository_uri", "azureml.git.repository_uri"),
        ("branch", "azureml.git.branch"),
        ("commit", "azureml.git.commit"),
        ("dirty", "azureml.git.dirty"),
    ):
        found[name] = git.get(key)
    if record.dag_id is not None:
        found.update(
            {
                "amlrun.airflow.dag_id": record.dag_id,
                "amlrun.airflow.task_id": record.task_id,
                "amlrun.airflow.run_id": record.airflow_run_id,
                "amlrun.airflow.try_number": record.try_number,
            }
        )
    return {key: str(value) for key, value in found.items() if value is not None}


def _utc(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: object, what: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"{what}={shown(value)} must be a string, or None to remove it.")
    if "\0" in value or len(value) > limit:
        raise ConfigurationError(
            f"{what} must be text without NUL bytes, at most {limit} characters ({len(value)} given)."
        )
    return value


def _relative_destination(name: str, prefix: str | None, append_prefix: bool) -> str:
    if append_prefix or not prefix:
        return name
    rest = name[len(prefix) :].lstrip("/")
    return rest or posixpath.basename(name)


def _destinations(names: list[str], prefix: str | None, append_prefix: bool) -> list[tuple[str, str]]:
    """Each name with the path under the output directory it is written to; an error naming two names that
    would be written to the same path (the rest of each name after the prefix alone may be the same), or one
    to a path another needs as a folder."""
    planned: list[tuple[str, str]] = []
    taken: dict[str, str] = {}
    for name in names:
        relative = _relative_destination(name, prefix, append_prefix)
        first = taken.setdefault(relative, name)
        if first != name:
            narrower = f" such as {prefix + '/'!r}" if prefix and not prefix.endswith("/") else ""
            raise ConfigurationError(
                f"download_files(prefix={prefix!r}, append_prefix=False) would write both the run's file "
                f"{first!r} and its file {name!r} to {relative!r} in the output directory, one over the other: "
                "nothing was downloaded. Pass append_prefix=True to keep each file's whole name, or a narrower "
                f"prefix{narrower}."
            )
        planned.append((name, relative))
    for name, relative in planned:
        # A file where another's folder would be ('b', and 'b/c'): the second could only fail halfway.
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in taken:
                fix = (
                    "Pass append_prefix=True to keep each file's whole name, or download them with two prefixes."
                    if not append_prefix
                    else "Download them into two folders, one prefix each."
                )
                raise ConfigurationError(
                    f"download_files(prefix={prefix!r}, append_prefix={append_prefix}) would write the run's "
                    f"file {taken[folder]!r} to {folder!r} in the output directory, and its file {name!r} to "
                    f"{relative!r}, beneath a folder of that same name: nothing was downloaded. {fix}"
                )
    return planned


def _outside(root: str, name: str) -> ConfigurationError:
    return ConfigurationError(
        f"The run's file {name!r} would be written outside the output directory {root!r} (its name, or a "
        "folder there that is a link, leads out of it): it was not downloaded. Download into an empty folder."
    )


def _check_parts(root: str, relative: str, name: str) -> None:
    """Refuse a name that leads out of the folder it is written into by itself ('..', an absolute path)."""
    if any(part in ("", ".", "..") or "\0" in part or os.sep in part for part in relative.split("/")):
        raise _outside(root, name)


def _confined(root: str, relative: str, name: str, made: list[str]) -> str:
    """The path ``relative`` under ``root`` with its folders made (each added to `made`), each checked to be a
    folder and not a link (which could lead out of ``root``); else an error naming the file, with nothing made
    outside ``root``."""
    _check_parts(root, relative, name)
    parts = relative.split("/")
    current = os.path.realpath(root)
    for part in parts[:-1]:
        current = os.path.join(current, part)
        with contextlib.suppress(FileExistsError):
            os.mkdir(current)
            made.append(current)
        if os.path.islink(current) or not os.path.isdir(current):
            raise _outside(root, name)
    return os.path.join(current, parts[-1])


class _Staged(NamedTuple):
    """A file of a download, fetched beside its place."""

    name: str
    temporary: str
    destination: str


class _Download:
    """What one ``download_files`` call writes: each file fetched beside its place, then all put in place; or,
    if the call fails, all it wrote taken back."""

    def __init__(self, root: str) -> None:
        # The folders the call makes, parents first: the output directory's missing ones, then those beneath.
        self.folders = _absent_folders(root)
        self.staged: list[_Staged] = []
        # Files put in place where there was none (with their device and inode: only they are taken back), and how
        # many replaced one that was there.
        self.placed: list[tuple[str, tuple[int, int]]] = []
        self.replaced = 0

    def stage(self, workspace: Workspace, key: str, name: str, destination: str) -> None:
        temporary = _fetched(workspace, key, destination, lambda amount: None)
        self.staged.append(_Staged(name, temporary, destination))

    def put_in_place(self, staged: _Staged) -> None:
        fetched = os.lstat(staged.temporary)
        existed = os.path.lexists(staged.destination)
        os.replace(staged.temporary, staged.destination)
        if existed:
            self.replaced += 1
        else:
            self.placed.append((staged.destination, (fetched.st_dev, fetched.st_ino)))

    def undo(self) -> None:
        """Remove what the call wrote: fetched files, files it put where there was none, folders it made (those
        still empty). Never a file that was there before."""
        for staged in self.staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged.temporary)
        for path, identity in self.placed:
            # Another process may have put a file of its own there since: that one stays.
            with contextlib.suppress(FileNotFoundError):
                found = os.lstat(path)
                if (found.st_dev, found.st_ino) == identity:
                    os.unlink(path)
        for folder in reversed(self.folders):
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    def undone(self) -> str:
        """What ``undo`` left, for the error's message."""
        if not self.replaced:
            return "What the download wrote was removed; the files that were there before are as they were."
        return (
            f"What the download wrote was removed, but {self.replaced} file(s) that were there before had been "
            "replaced by the run's already."
        )


def _absent_folders(path: str) -> list[str]:
    """The folders of `path` that do not exist yet (itself included), parents first."""
    absent = []
    while not os.path.lexists(path):
        absent.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return absent[::-1]


def _fetched(workspace: Workspace, key: str, destination: str, advance: Callable[[int], None]) -> str:
    """Copy a stored object into a new file beside ``destination``; returns that file's path (removed again if
    the copy fails)."""
    folder = os.path.dirname(os.path.abspath(destination))
    temporary = os.path.join(folder, f".amlrun-download-{secrets.token_hex(6)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            offset = 0
            while True:
                piece = workspace.store.read_object(key, offset, _CHUNK)
                out.write(piece)
                offset += len(piece)
                advance(len(piece))
                if len(piece) < _CHUNK:
                    break
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return temporary


def _copy_out(workspace: Workspace, key: str, destination: str, advance: Callable[[int], None]) -> None:
    """Copy a stored object to a local file atomically: written beside it under a new name, then renamed over
    it (a link at the destination is replaced, never written through)."""
    temporary = _fetched(workspace, key, destination, advance)
    try:
        os.replace(temporary, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
