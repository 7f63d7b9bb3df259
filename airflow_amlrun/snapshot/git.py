"""Git provenance of a source directory: where the code came from, and what was uncommitted.

Never raises: a directory outside git, a missing git binary or a repository git refuses to read
gives ``None`` (with a log line saying why), because provenance must not stop a run. Environment
variables override what git reports (CI systems check out detached heads and know better).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

DEFAULT_MAX_DIFF_BYTES = 1_000_000
_MAX_UNTRACKED_LISTED = 200

ENV_REPOSITORY_URI = "AMLRUN_GIT_REPOSITORY_URI"
ENV_BRANCH = "AMLRUN_GIT_BRANCH"
ENV_COMMIT = "AMLRUN_GIT_COMMIT"
ENV_DIRTY = "AMLRUN_GIT_DIRTY"
ENV_BUILD_ID = "AMLRUN_GIT_BUILD_ID"
ENV_BUILD_URI = "AMLRUN_GIT_BUILD_URI"
_ENV_VARS = (ENV_REPOSITORY_URI, ENV_BRANCH, ENV_COMMIT, ENV_DIRTY, ENV_BUILD_ID, ENV_BUILD_URI)


@dataclass(frozen=True)
class GitInfo:
    """The git state of the code a run used."""

    repository_uri: str | None = None
    branch: str | None = None
    commit: str | None = None
    dirty: bool | None = None
    build_id: str | None = None
    build_uri: str | None = None
    diff: str | None = None

    def summary(self) -> dict[str, Any]:
        """The fields a run summary shows: repository, branch, commit, dirty flag."""
        return {
            "repository_uri": self.repository_uri,
            "branch": self.branch,
            "commit": self.commit,
            "dirty": self.dirty,
        }


def strip_credentials(url: str) -> str:
    """Remove secrets from a remote URL: all user info for http(s), the password for other schemes.

    ``https://user:token@host/x`` -> ``https://host/x``; ``ssh://git:pw@host/x`` -> ``ssh://git@host/x``;
    scp-like ``git@host:org/repo.git`` and local paths are returned unchanged (they hold no secret).
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if parts.scheme.lower() in ("http", "https"):
        netloc = hostport
    else:
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{hostport}" if user else hostport
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def read_git_info(
    source_dir: str | os.PathLike[str],
    *,
    max_diff_bytes: int = DEFAULT_MAX_DIFF_BYTES,
    environ: Mapping[str, str] | None = None,
) -> GitInfo | None:
    """The git provenance of ``source_dir``, with ``AMLRUN_GIT_*`` overrides; ``None`` outside git.

    :param max_diff_bytes: cap on the recorded ``git diff HEAD`` text (UTF-8 bytes); longer diffs are
        cut and end with a ``[diff truncated ...]`` marker.
    :param environ: where to read overrides from (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    info = _read_repository(os.fspath(source_dir), max_diff_bytes)
    overrides = {name: env[name] for name in _ENV_VARS if env.get(name)}
    if not overrides:
        return info
    base = info or GitInfo()
    dirty = base.dirty
    if ENV_DIRTY in overrides:
        dirty = overrides[ENV_DIRTY].strip().lower() in ("1", "true", "yes", "on")
    repo_uri = overrides.get(ENV_REPOSITORY_URI)
    return replace(
        base,
        repository_uri=strip_credentials(repo_uri) if repo_uri else base.repository_uri,
        branch=overrides.get(ENV_BRANCH, base.branch),
        commit=overrides.get(ENV_COMMIT, base.commit),
        dirty=dirty,
        build_id=overrides.get(ENV_BUILD_ID, base.build_id),
        build_uri=overrides.get(ENV_BUILD_URI, base.build_uri),
    )


def _inside_a_checkout(source_dir: str) -> bool:
    """Whether ``source_dir`` or a folder above it holds ``.git`` (or ``GIT_DIR`` names one): only then is
    GitPython, whose import runs the git binary, worth its cost."""
    if os.environ.get("GIT_DIR"):
        return True
    folder = os.path.abspath(source_dir)
    while True:
        if os.path.lexists(os.path.join(folder, ".git")):
            return True
        parent = os.path.dirname(folder)
        if parent == folder:
            return False
        folder = parent


def _read_repository(source_dir: str, max_diff_bytes: int) -> GitInfo | None:
    if not _inside_a_checkout(source_dir):
        return None
    if shutil.which("git") is None and not os.environ.get("GIT_PYTHON_GIT_EXECUTABLE"):
        log.info("No git executable on PATH; no git provenance recorded for %s.", source_dir)
        return None
    try:
        import git  # GitPython; imported late because importing it runs the git binary
    except ImportError as exc:
        log.info("GitPython cannot run git (%s); no git provenance recorded for %s.", exc, source_dir)
        return None
    try:
        repo = git.Repo(source_dir, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    except Exception as exc:
        log.warning("Cannot open the git repository of %s (%s); no git provenance recorded.", source_dir, exc)
        return None
    try:
        with repo:
            return _describe(repo, max_diff_bytes)
    except Exception as exc:
        # e.g. git's "dubious ownership" refusal when the checkout belongs to another user.
        log.warning(
            "Cannot read git state of %s (%s); no git provenance recorded. If git reports dubious "
            "ownership, add the directory with `git config --global --add safe.directory`.",
            source_dir,
            exc,
        )
        return None


def _describe(repo: Any, max_diff_bytes: int) -> GitInfo:
    remote_url = None
    remotes = list(repo.remotes)
    if remotes:
        chosen = next((r for r in remotes if r.name == "origin"), remotes[0])
        urls = list(chosen.urls)
        remote_url = strip_credentials(urls[0]) if urls else None
    branch = None if repo.head.is_detached else repo.active_branch.name
    try:
        commit: str | None = repo.head.commit.hexsha
    except ValueError:
        commit = None  # no commit yet
    untracked = list(repo.untracked_files)
    if commit is not None:
        diff_text = repo.git.diff("HEAD")
        dirty = bool(diff_text) or bool(untracked)
    else:
        diff_text = repo.git.diff("--cached")
        dirty = bool(diff_text) or bool(untracked) or repo.is_dirty()
    diff = _compose_diff(diff_text, untracked, max_diff_bytes) if dirty else None
    return GitInfo(repository_uri=remote_url, branch=branch, commit=commit, dirty=dirty, diff=diff)


def _compose_diff(diff_text: str, untracked: list[str], max_bytes: int) -> str:
    parts = [diff_text] if diff_text else []
    if untracked:
        listed = untracked[:_MAX_UNTRACKED_LISTED]
        note = ["# Untracked files (not in the diff):", *(f"#   {p}" for p in listed)]
        if len(untracked) > len(listed):
            note.append(f"#   ... and {len(untracked) - len(listed)} more")
        parts.append("\n".join(note))
    return truncate_text("\n".join(parts) + "\n", max_bytes)


def truncate_text(text: str, max_bytes: int) -> str:
    """Cut ``text`` to at most ``max_bytes`` UTF-8 bytes (plus a marker saying how much was cut)."""
    data = text.encode("utf-8", errors="surrogateescape")
    if len(data) <= max_bytes:
        return text
    kept = data[:max_bytes].decode("utf-8", errors="ignore")
    return kept + f"\n[diff truncated at {max_bytes:,} of {len(data):,} bytes]\n"
