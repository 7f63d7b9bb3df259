"""Typed errors of the snapshot library; each message names the value at fault and the next step."""

from __future__ import annotations

from dataclasses import dataclass

from airflow_amlrun.errors import AmlRunError


class SnapshotError(AmlRunError):
    """Base class of every error the snapshot library raises on purpose."""


class SourceDirectoryError(SnapshotError):
    """The source directory to snapshot does not exist or is not a directory."""


class SourceChangedError(SnapshotError):
    """A file kept changing while it was being snapshotted."""


class SourceUnreadableError(SnapshotError):
    """A file listed in the source directory could not be read: it vanished, or it is not readable."""


class ExcludedFileError(SnapshotError, ValueError):
    """A file the run needs (its script) is left out of the snapshot by an ignore rule; nothing was stored."""


class InvalidKeyError(SnapshotError):
    """A digest or store key is malformed (and could otherwise address a path outside the store)."""


class BlobMissingError(SnapshotError):
    """A blob a manifest refers to is not in the store."""


class BlobCorruptError(SnapshotError):
    """A blob (or manifest) in the store does not hash to the name it is stored under."""


class StoreFullError(SnapshotError, OSError):
    """The store's disk is full, over quota or read-only: what was being written was removed, not published."""


class SnapshotNotFoundError(SnapshotError):
    """No manifest with the requested snapshot id exists in the store."""


class UnsafeManifestError(SnapshotError):
    """A manifest entry would write outside the destination directory or is otherwise malformed."""


class DestinationNotEmptyError(SnapshotError):
    """A restore or materialize destination already holds files."""


@dataclass(frozen=True)
class SizeOffender:
    """One file or directory that contributes much to a too-large snapshot."""

    path: str
    size: int
    file_count: int
    is_dir: bool
    ignore_line: str


class SnapshotTooLargeError(SnapshotError):
    """The included files exceed the configured size or file-count limit; nothing was stored."""

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
