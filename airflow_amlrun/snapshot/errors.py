"""Typed errors of the snapshot library; each message names the value at fault and the next step."""

from __future__ import annotations

from dataclasses import dataclass

from airflow_amlrun.errors import AmlRunError


class SnapshotError(AmlRunError):
    """Base class of every error the snapshot library raises on purpose: catch it for any of those below."""


class SourceDirectoryError(SnapshotError):
    """The source directory to snapshot does not exist or is not a directory; nothing was stored or recorded.

    The message names the directory. Fix the run configuration's ``source_directory`` (a relative one starts at
    the DAG file's folder, or at the run file's for ``amlrun submit``).
    """


class SourceChangedError(SnapshotError):
    """A file kept changing while it was being snapshotted; nothing was recorded.

    The message names the file. Stop the process writing it, or ignore it (``.amlignore``) if the run does not need
    it, then submit again.
    """


class SourceUnreadableError(SnapshotError):
    """A file listed in the source directory could not be read: it vanished, or it is not readable; nothing was
    recorded.

    The message names the file and the fix: make it readable for the user the task runs as, or ignore it.
    """


class ExcludedFileError(SnapshotError, ValueError):
    """A file the run needs (its script) is left out of the snapshot by an ignore rule; nothing was stored.

    The message names the file and the rule (``.amlignore``, a ``.gitignore`` or a default exclude) and how to keep
    the file in.
    """


class InvalidKeyError(SnapshotError):
    """A digest or store key is malformed (and could otherwise address a path outside the store).

    Pass a snapshot id (64 hex characters) exactly as a run's ``snapshot_id`` or the store reported it.
    """


class BlobMissingError(SnapshotError):
    """A blob a snapshot's manifest refers to is not in the store, so that code cannot be restored or sent.

    The store was pruned, or it is not the one the snapshot was taken into: check the workspace's ``store_url``.
    """


class BlobCorruptError(SnapshotError):
    """A blob (or manifest) in the store does not hash to the name it is stored under: its copy is damaged.

    The message names the blob. Delete it from the store and take the snapshot again (submitting the run again
    stores it anew).
    """


class StoreFullError(SnapshotError, OSError):
    """The store's disk is full, over quota or read-only: what was being written was removed, not published.

    Free space on the store's disk (old runs' outputs), or point the workspace's ``store_url`` at a larger store.
    """


class SnapshotNotFoundError(SnapshotError):
    """No manifest with the requested snapshot id exists in the store.

    Check the snapshot id (``amlrun runs show RUN_ID`` names a run's) and that the workspace is the one the run was
    recorded in.
    """


class UnsafeManifestError(SnapshotError):
    """A manifest entry would write outside the destination directory or is otherwise malformed; nothing of it was
    written.

    The store's copy was damaged or not written by airflow-amlrun (or by a newer version: upgrade it).
    """


class DestinationNotEmptyError(SnapshotError):
    """A restore or materialize destination already holds files (or is not a directory); nothing was written.

    Restore into an empty or new directory.
    """


@dataclass(frozen=True)
class SizeOffender:
    """One file or directory that contributes much to a too-large snapshot."""

    path: str
    size: int
    file_count: int
    is_dir: bool
    ignore_line: str


class SnapshotTooLargeError(SnapshotError):
    """The included files exceed the configured size or file-count limit; nothing was stored.

    The message lists the largest files and directories, each with the ignore line that leaves it out. Exclude what
    the run does not need (``.amlignore``), or raise ``[amlrun] snapshot_max_size_mb`` / ``snapshot_max_files``.
    """

    def __init__(
        self,
        *,
        source_dir: str,
        total_bytes: int,
        file_count: int,
        max_total_bytes: int,
        max_files: int,
        largest_files: list[SizeOffender],
        largest_dirs: list[SizeOffender],
        ignore_file: str,
    ) -> None:
        self.source_dir = source_dir
        self.total_bytes = total_bytes
        self.file_count = file_count
        self.max_total_bytes = max_total_bytes
        self.max_files = max_files
        self.largest_files = largest_files
        self.largest_dirs = largest_dirs
        self.ignore_file = ignore_file
        super().__init__(self._message())

    def _message(self) -> str:
        over = []
        if self.total_bytes > self.max_total_bytes:
            over.append(f"{human_size(self.total_bytes)} > limit {human_size(self.max_total_bytes)}")
        if self.file_count > self.max_files:
            over.append(f"{self.file_count:,} files > limit {self.max_files:,}")
        lines = [
            f"Snapshot of {self.source_dir!r} is too large ({'; '.join(over)}); nothing was stored.",
            f"Exclude what the run does not need with {self.ignore_file}, or raise the limit "
            "(max_total_bytes / max_files).",
        ]
        if self.largest_dirs:
            lines.append("Largest directories:")
            lines.extend(_offender_line(o, self.ignore_file) for o in self.largest_dirs)
        if self.largest_files:
            lines.append("Largest files:")
            lines.extend(_offender_line(o, self.ignore_file) for o in self.largest_files)
        return "\n".join(lines)


def _offender_line(offender: SizeOffender, ignore_file: str) -> str:
    name = offender.path + ("/" if offender.is_dir else "")
    count = f" in {offender.file_count:,} files" if offender.is_dir else ""
    return f'  {name}  {human_size(offender.size)}{count}  -> add "{offender.ignore_line}" to {ignore_file}'


def human_size(n: int) -> str:
    """Format a byte count for people: 1.5 MB, 300.0 MB, 12 B."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
