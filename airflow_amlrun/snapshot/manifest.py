"""The snapshot manifest: entries, canonical JSON, the id that names it, and the checks that make it safe.

A manifest is a tree of per-directory nodes, as git's trees are: each node lists its directory's files,
links and subdirectories by name, a subdirectory by the hash of its own node. The snapshot id is the hash
of the root node; the other nodes are stored by their hash beside it. A change to one file rewrites only
the nodes on its path, not a listing of every file. Snapshots taken before trees (version 1, one flat
list of every path) are still read.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3

from airflow_amlrun.snapshot.errors import InvalidKeyError, UnsafeManifestError

MANIFEST_VERSION = 2
# One flat list of every path, hashed whole: what snapshots were before trees. Read, never written.
FLAT_MANIFEST_VERSION = 1
# A node reached twice is expanded twice: bound the work a hand-made manifest can ask for.
_MAX_NODES = 1_000_000
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
        """The entry as it appears in a flat (version 1) manifest's JSON."""
        if self.link is not None:
            return {"path": self.path, "link": self.link}
        return {"path": self.path, "mode": self.mode, "size": self.size, "hash": self.digest}


@dataclass(frozen=True)
class Snapshot:
    """A content-addressed manifest of a source tree; ``id`` is the BLAKE3 hash of its root node's JSON.

    ``entries`` lists every file and link with its full path, whatever the stored form. ``trees`` holds
    the canonical JSON of every directory node below the root, by digest: what a store keeps beside the
    root so that the snapshot can be read back.
    """

    id: str
    entries: tuple[SnapshotEntry, ...]
    version: int = MANIFEST_VERSION
    trees: Mapping[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_entries(cls, entries: Iterable[SnapshotEntry]) -> Snapshot:
        """Build a snapshot (sorted, validated) and compute its id."""
        ordered = tuple(sorted(entries, key=lambda e: e.path))
        validate_entries(ordered)
        root, trees = _build_tree(ordered)
        return cls(id=hash_bytes(root), entries=ordered, trees=trees)

    @classmethod
    def from_json(cls, text: str | bytes, load_tree: Callable[[str], bytes] | None = None) -> Snapshot:
        """Parse and validate a manifest; raises :class:`UnsafeManifestError` for malformed entries.

        :param load_tree: returns the stored JSON of a directory node from its digest (checked against
            it); needed to read a tree manifest with subdirectories.
        """
        doc = _parse(text, "Manifest")
        if doc.get("version") == FLAT_MANIFEST_VERSION:
            ordered = tuple(sorted((_entry_from_dict(raw) for raw in doc["entries"]), key=lambda e: e.path))
            validate_entries(ordered)
            flat = _flat_canonical(ordered).encode("utf-8")
            return cls(id=hash_bytes(flat), entries=ordered, version=FLAT_MANIFEST_VERSION)
        _check_version(doc.get("version"), "Manifest")
        return cls.from_entries(_flatten(doc, load_tree))

    def nodes(self) -> Mapping[str, bytes]:
        """The directory nodes below the root, by digest: ``trees``, or built from the entries when this
        snapshot was made without them (a stat cache's last snapshot of an unchanged tree)."""
        if (
            self.trees
            or self.version == FLAT_MANIFEST_VERSION
            or not any("/" in e.path for e in self.entries)
        ):
            return self.trees
        return _build_tree(self.entries)[1]

    def to_json(self) -> str:
        """The canonical JSON that ``id`` hashes: the root node (sorted entries and keys, no whitespace)."""
        if self.version == FLAT_MANIFEST_VERSION:
            return _flat_canonical(self.entries)
        return _build_tree(self.entries)[0].decode("utf-8")

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


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _flat_canonical(entries: tuple[SnapshotEntry, ...]) -> str:
    doc = {"version": FLAT_MANIFEST_VERSION, "entries": [e.to_dict() for e in entries]}
    return _dumps(doc).decode("utf-8")


def _build_tree(entries: tuple[SnapshotEntry, ...]) -> tuple[bytes, dict[str, bytes]]:
    """The root node's JSON, and every other node's JSON by digest, for validated ``entries``."""
    listed: dict[str, list[dict[str, Any]]] = defaultdict(list)
    listed[""] = []
    for entry in entries:
        parent, name = posixpath.split(entry.path)
        node = {"name": name, **entry.to_dict()}
        del node["path"]
        listed[parent].append(node)
        # Every directory on the way gets a node, even one that holds only directories.
        while parent and (parent := posixpath.dirname(parent)) not in listed:
            listed[parent] = []
    trees: dict[str, bytes] = {}
    # Deepest first, so that a directory's node is hashed before its parent lists it; the root last.
    for directory in sorted(listed, key=lambda d: (-d.count("/") if d else 1, d)):
        data = _dumps({"version": MANIFEST_VERSION, "entries": sorted(listed[directory], key=_name)})
        if not directory:
            return data, trees
        digest = hash_bytes(data)
        trees[digest] = data
        parent, name = posixpath.split(directory)
        listed[parent].append({"name": name, "tree": digest})
    raise AssertionError("the root directory is always listed")


def _name(node: dict[str, Any]) -> str:
    return str(node["name"])


def _parse(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsafeManifestError(f"{what} is not valid JSON ({exc}); the store copy is damaged.") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise UnsafeManifestError(f"{what} has no 'entries' list; it was not written by this library.")
    return doc


def _check_version(version: object, what: str) -> None:
    if version != MANIFEST_VERSION:
        raise UnsafeManifestError(
            f"{what} version {version!r} is not supported (expected {FLAT_MANIFEST_VERSION} or "
            f"{MANIFEST_VERSION}); upgrade airflow-amlrun."
        )


def _flatten(root: dict[str, Any], load_tree: Callable[[str], bytes] | None) -> list[SnapshotEntry]:
    """Every entry of a tree manifest with its full path; the nodes below the root come from ``load_tree``."""
    out: list[SnapshotEntry] = []
    pending: list[tuple[str, dict[str, Any]]] = [("", root)]
    parsed: dict[str, dict[str, Any]] = {}
    nodes = 0
    while pending:
        prefix, doc = pending.pop()
        nodes += 1
        if nodes + len(out) > _MAX_NODES:
            raise UnsafeManifestError(
                f"Manifest lists more than {_MAX_NODES} entries and directories; it was not written by "
                "this library. Refusing the manifest."
            )
        for raw in doc["entries"]:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise UnsafeManifestError(
                    f"Manifest entry {raw!r} in {prefix or '/'!r} has no string 'name'; the manifest is malformed."
                )
            path = prefix + raw["name"]
            if raw["name"] in ("", ".", "..") or "/" in raw["name"] or "\x00" in raw["name"]:
                raise UnsafeManifestError(
                    f"Manifest entry {path!r} is not a plain name ('/', '.', '..', empty or NUL); it could "
                    "escape the destination. Refusing the manifest."
                )
            if "tree" not in raw:
                out.append(_entry_from_dict({**raw, "path": path}))
                continue
            digest = raw["tree"]
            if not is_digest(digest):
                raise UnsafeManifestError(f"Manifest entry {path!r} has a malformed tree digest {digest!r}.")
            if load_tree is None:
                raise UnsafeManifestError(
                    f"Manifest entry {path!r} is a directory node, and no store was given to read it from."
                )
            sub = parsed.get(digest)
            if sub is None:
                # Identical folders share one node: each is read (from a remote store, fetched) once.
                sub = parsed[digest] = _parse(load_tree(digest), f"Manifest node {digest} ({path + '/'!r})")
                _check_version(sub.get("version"), f"Manifest node {digest}")
            pending.append((path + "/", sub))
    return out


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
    # Each folder is looked at once: the walk up from a path stops at a folder found clear already.
    clear: set[str] = set()
    for path in kinds:
        parent = path.rpartition("/")[0]
        while parent and parent not in clear:
            if parent in kinds:
                what = "a symlink" if kinds[parent] else "a file"
                raise UnsafeManifestError(
                    f"Manifest entry {path!r} lies below {parent!r}, which is {what} in the same manifest; "
                    "restoring it would write through that entry. Refusing the manifest."
                )
            clear.add(parent)
            parent = parent.rpartition("/")[0]


def _check_path(entry: SnapshotEntry) -> None:
    path = entry.path
    parts = path.split("/")
    if not path or path.startswith("/") or "\x00" in path or "" in parts or "." in parts or ".." in parts:
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
