"""The snapshot manifest: entries, canonical JSON, the id that names it, and the checks that make it safe."""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import blake3

from airflow_amlrun.snapshot.errors import InvalidKeyError, UnsafeManifestError

MANIFEST_VERSION = 1
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def hash_bytes(data: bytes) -> str:
    """The content digest used everywhere in the store: BLAKE3, hex."""
    return blake3.blake3(data).hexdigest()


def is_digest(value: object) -> bool:
    """Whether ``value`` has the form of a digest (a lowercase 64-hex BLAKE3 hash)."""
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a lowercase 64-hex BLAKE3 digest; raise otherwise."""
    if not isinstance(digest, str) or _DIGEST_RE.fullmatch(digest) is None:
        raise InvalidKeyError(
            f"{digest!r} is not a BLAKE3 hex digest (64 lowercase hex characters); "
            "pass a snapshot id or blob digest exactly as the store reported it."
        )
    return digest


@dataclass(frozen=True)
class SnapshotEntry:
    """One manifest entry: a regular file (``digest`` set) or a symlink (``link`` set)."""

    path: str
    mode: int = 0o644
    size: int = 0
    digest: str | None = None
    link: str | None = None

    @property
    def is_link(self) -> bool:
        """Whether this entry is a symlink rather than a file."""
        return self.link is not None

    def to_dict(self) -> dict[str, Any]:
        """The entry as it appears in the manifest JSON."""
        if self.link is not None:
            return {"path": self.path, "link": self.link}
        return {"path": self.path, "mode": self.mode, "size": self.size, "hash": self.digest}


@dataclass(frozen=True)
class Snapshot:
    """A content-addressed manifest of a source tree; ``id`` is the BLAKE3 hash of its canonical JSON."""

    id: str
    entries: tuple[SnapshotEntry, ...]

    @classmethod
    def from_entries(cls, entries: Iterable[SnapshotEntry]) -> Snapshot:
        """Build a snapshot (sorted, validated) and compute its id."""
        ordered = tuple(sorted(entries, key=lambda e: e.path))
        validate_entries(ordered)
        return cls(id=hash_bytes(_canonical(ordered).encode("utf-8")), entries=ordered)

    @classmethod
    def from_json(cls, text: str | bytes) -> Snapshot:
        """Parse and validate a manifest; raises :class:`UnsafeManifestError` for malformed entries."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnsafeManifestError(
                f"Manifest is not valid JSON ({exc}); the store copy is damaged."
            ) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
            raise UnsafeManifestError("Manifest has no 'entries' list; it was not written by this library.")
        if doc.get("version") != MANIFEST_VERSION:
            raise UnsafeManifestError(
                f"Manifest version {doc.get('version')!r} is not supported (expected {MANIFEST_VERSION}); "
                "upgrade airflow-amlrun."
            )
        return cls.from_entries(_entry_from_dict(raw) for raw in doc["entries"])

    def to_json(self) -> str:
        """The canonical manifest JSON (sorted entries and keys, no whitespace) that ``id`` hashes."""
        return _canonical(self.entries)

    @property
    def total_bytes(self) -> int:
        """Total size of the files in the snapshot."""
        return sum(e.size for e in self.entries if not e.is_link)

    @property
    def file_count(self) -> int:
        """Number of regular files (symlinks not counted)."""
        return sum(1 for e in self.entries if not e.is_link)

    def digests(self) -> set[str]:
        """The distinct blob digests the snapshot refers to."""
        return {e.digest for e in self.entries if e.digest is not None}


def _canonical(entries: tuple[SnapshotEntry, ...]) -> str:
    doc = {"version": MANIFEST_VERSION, "entries": [e.to_dict() for e in entries]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _entry_from_dict(raw: Any) -> SnapshotEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
        raise UnsafeManifestError(f"Manifest entry {raw!r} has no string 'path'; the manifest is malformed.")
    path = raw["path"]
    if "link" in raw:
        if not isinstance(raw["link"], str):
            raise UnsafeManifestError(f"Manifest entry {path!r} has a non-string link target.")
        return SnapshotEntry(path=path, link=raw["link"])
    mode, size, digest = raw.get("mode"), raw.get("size"), raw.get("hash")
    if not isinstance(mode, int) or not isinstance(size, int) or not isinstance(digest, str):
        raise UnsafeManifestError(f"Manifest entry {path!r} lacks an integer mode/size or a string hash.")
    return SnapshotEntry(path=path, mode=mode, size=size, digest=digest)


def validate_entries(entries: tuple[SnapshotEntry, ...]) -> None:
    """Refuse entries that could write outside a restore destination or collide with each other.

    Rules: relative posix paths without ``.``/``..``/empty components; no entry below a symlink entry
    or below a file entry (that would write through it); no duplicates; link targets relative, made of
    leading ``..`` components then plain names, never climbing above the destination root; modes only
    permission bits; digests well-formed.
    """
    kinds: dict[str, bool] = {}  # path -> is_link
    for entry in entries:
        _check_path(entry)
        if entry.path in kinds:
            raise UnsafeManifestError(
                f"Manifest entry {entry.path!r} appears twice; the manifest is malformed."
            )
        kinds[entry.path] = entry.is_link
        if entry.link is not None:
            _check_link(entry)
        else:
            if entry.digest is None:
                raise UnsafeManifestError(f"Manifest entry {entry.path!r} has neither a hash nor a link.")
            try:
                check_digest(entry.digest)
            except InvalidKeyError as exc:
                raise UnsafeManifestError(f"Manifest entry {entry.path!r}: {exc}") from None
            if entry.mode & ~0o777 or entry.size < 0:
                raise UnsafeManifestError(
                    f"Manifest entry {entry.path!r} has mode {entry.mode:o} / size {entry.size}; "
                    "only permission bits and non-negative sizes are allowed."
                )
    for path in kinds:
        parent = posixpath.dirname(path)
        while parent:
            if parent in kinds:
                what = "a symlink" if kinds[parent] else "a file"
                raise UnsafeManifestError(
                    f"Manifest entry {path!r} lies below {parent!r}, which is {what} in the same manifest; "
                    "restoring it would write through that entry. Refusing the manifest."
                )
            parent = posixpath.dirname(parent)


def _check_path(entry: SnapshotEntry) -> None:
    path = entry.path
    parts = path.split("/")
    if not path or path.startswith("/") or "\x00" in path or any(part in ("", ".", "..") for part in parts):
        raise UnsafeManifestError(
            f"Manifest entry {path!r} is not a plain relative path (absolute, '..', '.', empty or NUL "
            "component); it could escape the destination. Refusing the manifest."
        )


def _check_link(entry: SnapshotEntry) -> None:
    target = entry.link or ""
    if target == ".":
        return  # the link's own directory
    parts = target.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    depth = entry.path.count("/")  # real directories between the destination root and the link
    if (
        not target
        or target.startswith("/")
        or "\x00" in target
        or ups > depth
        or any(part in ("", ".", "..") for part in parts[ups:])
    ):
        raise UnsafeManifestError(
            f"Manifest entry {entry.path!r} is a symlink to {target!r}, which is absolute, climbs above "
            "the destination, or uses '..' after a name (it could escape through another link). "
            "Refusing the manifest."
        )
