"""The scan of a source directory: which files and symlinks a snapshot holds, with their stat data.

Symlink policy:

* a link whose target resolves inside the source tree is kept as a link (relative target);
* a link pointing outside is followed and its content snapshotted under the link's path, with a warning;
* a directory link leading back to one of its own ancestors (a cycle) is skipped with a warning;
* a dangling or self-referencing link is skipped with a warning.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from dataclasses import dataclass, field

from airflow_amlrun.snapshot.errors import SnapshotError, SourceDirectoryError
from airflow_amlrun.snapshot.ignore import AMLIGNORE, GITIGNORE, Exclusion, IgnoreMatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScannedFile:
    """A regular file to snapshot: where to read it, and the stat data the cache is keyed on."""

    path: str
    source: str
    size: int
    mode: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int


@dataclass(frozen=True)
class ScannedLink:
    """A symlink kept as a link, with a target relative to the link's directory."""

    path: str
    target: str


@dataclass(frozen=True)
class ScanResult:
    """Everything :func:`scan_tree` found: included files and links, warnings, the ignore file in use."""

    root: str
    files: tuple[ScannedFile, ...]
    links: tuple[ScannedLink, ...]
    warnings: tuple[str, ...]
    ignore_file: str

    @property
    def total_bytes(self) -> int:
        """Total size of the included files."""
        return sum(f.size for f in self.files)


def normalize_mode(st_mode: int) -> int:
    """The mode recorded in a manifest: git's two file modes, so umask differences keep ids stable."""
    return 0o755 if st_mode & 0o111 else 0o644


@dataclass
class _Walk:
    root: str
    real_root: str
    use_amlignore: bool
    files: list[ScannedFile] = field(default_factory=list)
    links: list[ScannedLink] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message)


def scan_tree(source_dir: str | os.PathLike[str]) -> ScanResult:
    """Walk ``source_dir`` applying the ignore rules and the symlink policy; reads no file content."""
    root = os.path.abspath(os.fspath(source_dir))
    if not os.path.isdir(root):
        raise SourceDirectoryError(
            f"Source directory {root!r} does not exist or is not a directory; "
            "check the source_directory of the run configuration."
        )
    real_root = os.path.realpath(root)
    use_amlignore = os.path.isfile(os.path.join(root, AMLIGNORE))
    walk = _Walk(root=root, real_root=real_root, use_amlignore=use_amlignore)
    matcher = IgnoreMatcher()
    if use_amlignore:
        matcher = matcher.with_file("", _read_text(os.path.join(root, AMLIGNORE)), AMLIGNORE)
    root_stat = os.stat(root)
    stack: list[tuple[str, str, IgnoreMatcher, frozenset[tuple[int, int]]]] = [
        (root, "", matcher, frozenset({(root_stat.st_dev, root_stat.st_ino)}))
    ]
    while stack:
        dir_path, dir_rel, dir_matcher, ancestors = stack.pop()
        if not use_amlignore:
            gitignore = os.path.join(dir_path, GITIGNORE)
            # Like git, never read an ignore file through a symlink.
            if os.path.isfile(gitignore) and not os.path.islink(gitignore):
                source = posixpath.join(dir_rel, GITIGNORE) if dir_rel else GITIGNORE
                dir_matcher = dir_matcher.with_file(dir_rel, _read_text(gitignore), source)
        try:
            entries = sorted(os.scandir(dir_path), key=lambda e: e.name)
        except OSError as exc:
            walk.warn(f"Cannot list directory {dir_rel or '.'!r} ({exc.strerror}); it was skipped.")
            continue
        for entry in entries:
            rel = f"{dir_rel}/{entry.name}" if dir_rel else entry.name
            _visit(walk, entry, rel, dir_matcher, ancestors, stack)
    return ScanResult(
        root=root,
        files=tuple(sorted(walk.files, key=lambda f: f.path)),
        links=tuple(sorted(walk.links, key=lambda link: link.path)),
        warnings=tuple(walk.warnings),
        ignore_file=AMLIGNORE if use_amlignore else GITIGNORE,
    )


def find_exclusion(source_dir: str | os.PathLike[str], rel_path: str) -> Exclusion | None:
    """The ignore rule (or default exclude) that leaves ``rel_path`` out of a scan of ``source_dir``.

    Follows the path from the root the way :func:`scan_tree` would reach it, reading the same ignore files,
    and names the first folder or the file itself that is excluded; None if nothing excludes it.
    """
    root = os.path.abspath(os.fspath(source_dir))
    use_amlignore = os.path.isfile(os.path.join(root, AMLIGNORE))
    matcher = IgnoreMatcher()
    if use_amlignore:
        matcher = matcher.with_file("", _read_text(os.path.join(root, AMLIGNORE)), AMLIGNORE)
    parts = [p for p in rel_path.split("/") if p]
    for depth, name in enumerate(parts):
        dir_rel = "/".join(parts[:depth])
        dir_path = os.path.join(root, *parts[:depth])
        gitignore = os.path.join(dir_path, GITIGNORE)
        if not use_amlignore and os.path.isfile(gitignore) and not os.path.islink(gitignore):
            source = posixpath.join(dir_rel, GITIGNORE) if dir_rel else GITIGNORE
            matcher = matcher.with_file(dir_rel, _read_text(gitignore), source)
        rel = posixpath.join(dir_rel, name) if dir_rel else name
        path = os.path.join(dir_path, name)
        is_dir = depth < len(parts) - 1
        is_venv = is_dir and os.path.isfile(os.path.join(path, "pyvenv.cfg"))
        found = matcher.exclusion(rel, is_dir, is_virtualenv=is_venv)
        if found is not None:
            return found
    return None


def _visit(
    walk: _Walk,
    entry: os.DirEntry[str],
    rel: str,
    matcher: IgnoreMatcher,
    ancestors: frozenset[tuple[int, int]],
    stack: list[tuple[str, str, IgnoreMatcher, frozenset[tuple[int, int]]]],
) -> None:
    if entry.is_symlink():
        _visit_link(walk, entry.path, rel, matcher, ancestors, stack)
        return
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError as exc:
        walk.warn(f"Cannot stat {rel!r} ({exc.strerror}); it was skipped.")
        return
    if stat.S_ISDIR(st.st_mode):
        is_venv = os.path.isfile(os.path.join(entry.path, "pyvenv.cfg"))
        if not matcher.is_excluded(rel, True, is_virtualenv=is_venv):
            stack.append((entry.path, rel, matcher, ancestors | {(st.st_dev, st.st_ino)}))
    elif stat.S_ISREG(st.st_mode):
        if not matcher.is_excluded(rel, False):
            walk.files.append(_scanned_file(rel, entry.path, st))
    elif not matcher.is_excluded(rel, False):
        walk.warn(f"{rel!r} is not a regular file, directory or symlink (a socket or device?); skipped.")


def _visit_link(
    walk: _Walk,
    path: str,
    rel: str,
    matcher: IgnoreMatcher,
    ancestors: frozenset[tuple[int, int]],
    stack: list[tuple[str, str, IgnoreMatcher, frozenset[tuple[int, int]]]],
) -> None:
    try:
        target = os.path.realpath(path, strict=True)
        st = os.stat(target)
    except FileNotFoundError:
        if not matcher.is_excluded(rel, False):
            walk.warn(f"Symlink {rel!r} -> {_readlink(path)!r} is dangling; it was skipped.")
        return
    except OSError as exc:
        if not matcher.is_excluded(rel, False):
            walk.warn(f"Symlink {rel!r} -> {_readlink(path)!r} cannot be resolved ({exc}); it was skipped.")
        return
    if target == walk.real_root or target.startswith(walk.real_root + os.sep):
        # Git records any symlink as a file-like entry, so match it as a file.
        if matcher.is_excluded(rel, False):
            return
        logical_target = os.path.relpath(target, walk.real_root).replace(os.sep, "/")
        parent = posixpath.dirname(rel) or "."
        _check_utf8(rel)
        walk.links.append(ScannedLink(rel, posixpath.relpath(logical_target, parent)))
        return
    is_dir = stat.S_ISDIR(st.st_mode)
    if matcher.is_excluded(rel, is_dir):
        return
    if is_dir:
        if (st.st_dev, st.st_ino) in ancestors:
            walk.warn(
                f"Symlink {rel!r} -> {target!r} leads back to one of its own parent directories "
                "(a cycle); it was skipped. Remove the link or exclude it in the ignore file."
            )
            return
        walk.warn(f"Symlink {rel!r} points outside the source directory to {target!r}; copying its content.")
        stack.append((target, rel, matcher, ancestors | {(st.st_dev, st.st_ino)}))
    elif stat.S_ISREG(st.st_mode):
        walk.warn(f"Symlink {rel!r} points outside the source directory to {target!r}; copying its content.")
        walk.files.append(_scanned_file(rel, target, st))
    else:
        walk.warn(f"Symlink {rel!r} -> {target!r} is not a regular file or directory; it was skipped.")


def _scanned_file(rel: str, source: str, st: os.stat_result) -> ScannedFile:
    _check_utf8(rel)
    return ScannedFile(
        path=rel,
        source=source,
        size=st.st_size,
        mode=normalize_mode(st.st_mode),
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        inode=st.st_ino,
        device=st.st_dev,
    )


def _check_utf8(rel: str) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise SnapshotError(
            f"File name {rel!r} is not valid UTF-8 and cannot be recorded in a manifest; "
            "rename it or exclude it in the ignore file."
        ) from None


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()
