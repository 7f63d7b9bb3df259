"""Content-addressed, incremental code snapshots with git provenance (no Airflow import needed)."""

from __future__ import annotations

from airflow_amlrun.snapshot.errors import (
    BlobCorruptError,
    BlobMissingError,
    DestinationNotEmptyError,
    ExcludedFileError,
    InvalidKeyError,
    SizeOffender,
    SnapshotError,
    SnapshotNotFoundError,
    SnapshotTooLargeError,
    SourceChangedError,
    SourceDirectoryError,
    SourceUnreadableError,
    StoreFullError,
    UnsafeManifestError,
)
from airflow_amlrun.snapshot.git import GitInfo, read_git_info, strip_credentials
from airflow_amlrun.snapshot.ignore import IgnoreMatcher, ignore_line_for, parse_ignore_file
from airflow_amlrun.snapshot.manifest import Snapshot, SnapshotEntry, hash_bytes
from airflow_amlrun.snapshot.restore import materialize, restore_snapshot
from airflow_amlrun.snapshot.snapshot import (
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_TOTAL_BYTES,
    SnapshotResult,
    check_limits,
    hash_file,
    take_snapshot,
)
from airflow_amlrun.snapshot.store import BlobStore
from airflow_amlrun.snapshot.walk import ScanResult, scan_tree

__all__ = [
    "DEFAULT_MAX_FILES",
    "DEFAULT_MAX_TOTAL_BYTES",
    "BlobCorruptError",
    "BlobMissingError",
    "BlobStore",
    "DestinationNotEmptyError",
    "ExcludedFileError",
    "GitInfo",
    "IgnoreMatcher",
    "InvalidKeyError",
    "ScanResult",
    "SizeOffender",
    "Snapshot",
    "SnapshotEntry",
    "SnapshotError",
    "SnapshotNotFoundError",
    "SnapshotResult",
    "SnapshotTooLargeError",
    "SourceChangedError",
    "SourceDirectoryError",
    "SourceUnreadableError",
    "StoreFullError",
    "UnsafeManifestError",
    "check_limits",
    "hash_bytes",
    "hash_file",
    "ignore_line_for",
    "materialize",
    "parse_ignore_file",
    "read_git_info",
    "restore_snapshot",
    "scan_tree",
    "strip_credentials",
    "take_snapshot",
]
