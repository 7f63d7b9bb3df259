"""Git-compatible ignore rules deciding which files of a source directory belong in a snapshot.

Why not ``pathspec.GitIgnoreSpec``: its compiled patterns answer "is this file, *or one of its parent
directories*, matched", which is right for one root ``.gitignore`` but gives git-incompatible answers
once ``.gitignore`` files at several levels compete (a deeper file would win through a pattern that
only matched a parent directory), and it reports ``foo/`` as matched by ``foo/**``. Git itself matches
each path on its own, walking top-down and never descending into an excluded directory. This module
does exactly that: :func:`compile_pattern` translates one line with git's ``wildmatch`` rules
(``WM_PATHNAME``), and :class:`IgnoreMatcher` applies the layers with git's precedence. The tests use
``git check-ignore`` / ``git ls-files`` on generated trees as the oracle.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

AMLIGNORE = ".amlignore"
GITIGNORE = ".gitignore"

# Directory names excluded anywhere in the tree unless an ignore file re-includes them.
DEFAULT_EXCLUDED_DIR_NAMES = frozenset({"__pycache__", ".ipynb_checkpoints"})
# Directories excluded only at the root: a run writes its outputs and logs there.
DEFAULT_EXCLUDED_ROOT_DIRS = frozenset({"outputs", "logs"})

_CHAR_CLASSES = {
    "alnum": "a-zA-Z0-9",
    "alpha": "a-zA-Z",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    "space": " \\t\\n\\r\\f\\v",
    "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}


@dataclass(frozen=True)
class IgnoreRule:
    """One compiled line of an ignore file."""

    text: str
    source: str
    line: int
    negated: bool
    dir_only: bool
    # Patterns without a slash match the basename at any depth; others the path relative to the base.
    basename_only: bool
    regex: re.Pattern[str] | None

    def matches(self, rel_path: str, is_dir: bool) -> bool:
        """Whether this rule matches ``rel_path`` (relative to the ignore file's directory) itself."""
        if self.regex is None or (self.dir_only and not is_dir):
            return False
        subject = posixpath.basename(rel_path) if self.basename_only else rel_path
        return self.regex.fullmatch(subject) is not None


@dataclass(frozen=True)
class IgnoreLayer:
    """The rules of one ignore file, applying to paths under ``base`` ("" for the root)."""

    base: str
    rules: tuple[IgnoreRule, ...]

    def decide(self, rel_path: str, is_dir: bool) -> IgnoreRule | None:
        """The last rule of this file matching ``rel_path`` (relative to the root), if any."""
        if self.base:
            if not rel_path.startswith(self.base + "/"):
                return None
            rel_path = rel_path[len(self.base) + 1 :]
        for rule in reversed(self.rules):
            if rule.matches(rel_path, is_dir):
                return rule
        return None


@dataclass(frozen=True)
class IgnoreMatcher:
    """The ignore layers in force for one directory of the walk, shallowest first."""

    layers: tuple[IgnoreLayer, ...] = ()

    def with_file(self, base: str, text: str, source: str) -> IgnoreMatcher:
        """A matcher that also applies the ignore file ``source`` (content ``text``) found in ``base``."""
        rules = parse_ignore_file(text, source)
        if not rules:
            return self
        return IgnoreMatcher((*self.layers, IgnoreLayer(base, rules)))

    def decide(self, rel_path: str, is_dir: bool) -> IgnoreRule | None:
        """The rule that decides ``rel_path``: git checks deeper ignore files first, last line first."""
        for layer in reversed(self.layers):
            rule = layer.decide(rel_path, is_dir)
            if rule is not None:
                return rule
        return None

    def exclusion(self, rel_path: str, is_dir: bool, *, is_virtualenv: bool = False) -> Exclusion | None:
        """Why ``rel_path`` is left out (the rule, or the default that excludes it), or None if it is not."""
        if posixpath.basename(rel_path) != ".git":
            rule = self.decide(rel_path, is_dir)
            if rule is not None:
                return None if rule.negated else Exclusion(rel_path, is_dir, rule=rule)
        reason = default_exclusion_reason(rel_path, is_dir, is_virtualenv=is_virtualenv)
        return None if reason is None else Exclusion(rel_path, is_dir, default=reason)

    def is_excluded(self, rel_path: str, is_dir: bool, *, is_virtualenv: bool = False) -> bool:
        """Whether ``rel_path`` is left out: ignore files first, then the default excludes.

        ``.git`` is the exception: like git itself, nothing re-includes it (a broad ``!*/`` would
        otherwise ship the whole repository history).
        """
        if posixpath.basename(rel_path) == ".git":
            return True
        rule = self.decide(rel_path, is_dir)
        if rule is not None:
            return not rule.negated
        return is_default_excluded(rel_path, is_dir, is_virtualenv=is_virtualenv)


@dataclass(frozen=True)
class Exclusion:
    """What leaves a path out of a snapshot: a line of an ignore file, or one of the default excludes.

    :param path: the excluded path (a file, or the folder holding it), relative to the root.
    :param is_dir: whether ``path`` is a folder.
    :param rule: the ignore-file line that excludes it.
    :param default: why the default excludes leave it out, when no line decides.
    """

    path: str
    is_dir: bool
    rule: IgnoreRule | None = None
    default: str | None = None

    def describe(self) -> str:
        """Which rule excludes the path, as a message names it."""
        shown = self.path + ("/" if self.is_dir else "")
        if self.rule is not None:
            return (
                f"line {self.rule.line} of {self.rule.source} ({self.rule.text!r}), which matches {shown!r}"
            )
        return f"default: {self.default}"


def default_exclusion_reason(rel_path: str, is_dir: bool, *, is_virtualenv: bool = False) -> str | None:
    """Why the default excludes leave a path out, or None if they do not."""
    name = posixpath.basename(rel_path)
    if name == ".git":
        return "'.git' is never part of a snapshot"
    if not is_dir:
        return None
    if is_virtualenv:
        return f"{rel_path + '/'!r} is a virtualenv (it holds pyvenv.cfg)"
    if name in DEFAULT_EXCLUDED_DIR_NAMES:
        return f"{name + '/'!r} folders are left out unless an ignore file re-includes them"
    if "/" not in rel_path and name in DEFAULT_EXCLUDED_ROOT_DIRS:
        return f"the root's {name + '/'!r} folder is where a run writes its own {name}"
    return None


def is_default_excluded(rel_path: str, is_dir: bool, *, is_virtualenv: bool = False) -> bool:
    """Whether a path is excluded by default (VCS data, virtualenvs, caches, a run's own outputs)."""
    name = posixpath.basename(rel_path)
    if name == ".git":
        # A worktree or submodule has a ``.git`` file instead of a directory; neither is code.
        return True
    if not is_dir:
        return False
    if is_virtualenv or name in DEFAULT_EXCLUDED_DIR_NAMES:
        return True
    return "/" not in rel_path and name in DEFAULT_EXCLUDED_ROOT_DIRS


def parse_ignore_file(text: str, source: str) -> tuple[IgnoreRule, ...]:
    """Parse the content of a ``.gitignore``-style file into rules, skipping blanks and comments."""
    rules = []
    for number, raw in enumerate(text.split("\n"), start=1):
        rule = parse_ignore_line(raw, source, number)
        if rule is not None:
            rules.append(rule)
    return tuple(rules)


def parse_ignore_line(raw: str, source: str = "<string>", line: int = 0) -> IgnoreRule | None:
    """Parse one ignore-file line the way git does; ``None`` for blank lines and comments."""
    text = raw[:-1] if raw.endswith("\r") else raw
    if not text or text.startswith("#"):
        return None
    pattern = _trim_trailing_spaces(text)
    negated = pattern.startswith("!")
    if negated:
        pattern = pattern[1:]
    dir_only = pattern.endswith("/")
    if dir_only:
        pattern = pattern[:-1]
    if not pattern:
        return None
    basename_only = "/" not in pattern
    if pattern.startswith("/"):
        pattern = pattern[1:]
    return IgnoreRule(
        text=text,
        source=source,
        line=line,
        negated=negated,
        dir_only=dir_only,
        basename_only=basename_only,
        regex=compile_pattern(pattern),
    )


def _trim_trailing_spaces(text: str) -> str:
    # Git drops trailing spaces unless the last one is escaped with a backslash.
    i = 0
    last_kept = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 2
            last_kept = i
            continue
        if text[i] != " ":
            last_kept = i + 1
        i += 1
    return text[:last_kept]


def compile_pattern(pattern: str) -> re.Pattern[str] | None:
    """Translate a git wildmatch pattern (``WM_PATHNAME``) to a regex for ``fullmatch``.

    Returns ``None`` for patterns git can never match (an unterminated ``[`` or a trailing ``\\``).
    """
    out: list[str] = []
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            at_start = i == 0 or pattern[i - 1] == "/"
            if j - i >= 2 and at_start and (j == n or pattern[j] == "/"):
                # "**" as a whole component crosses directories; "**/" may also match nothing.
                if j == n:
                    out.append(".*")
                    i = j
                else:
                    out.append("(?:.*/)?")
                    i = j + 1
            else:
                out.append("[^/]*")
                i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            parsed = _parse_bracket(pattern, i)
            if parsed is None:
                return None
            regex, i = parsed
            out.append(regex)
        elif c == "\\":
            if i + 1 >= n:
                return None
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def _parse_bracket(pattern: str, start: int) -> tuple[str, int] | None:
    # Returns (regex, index after "]"), or None when git would abort the match.
    i = start + 1
    n = len(pattern)
    negated = i < n and pattern[i] in "!^"
    if negated:
        i += 1
    parts: list[str] = []
    first = True
    while True:
        if i >= n:
            return None
        c = pattern[i]
        if c == "]" and not first:
            i += 1
            break
        first = False
        if c == "[" and pattern.startswith("[:", i):
            end = pattern.find(":]", i + 2)
            if end < 0:
                return None
            name = pattern[i + 2 : end]
            if name not in _CHAR_CLASSES:
                return None
            parts.append(_CHAR_CLASSES[name])
            i = end + 2
            continue
        if c == "\\":
            i += 1
            if i >= n:
                return None
            c = pattern[i]
        low = c
        i += 1
        if i + 1 < n and pattern[i] == "-" and pattern[i + 1] != "]":
            high = pattern[i + 1]
            i += 2
            if high == "\\":
                if i >= n:
                    return None
                high = pattern[i]
                i += 1
            if low <= high:
                parts.append(f"{re.escape(low)}-{re.escape(high)}")
            continue
        parts.append(re.escape(low))
    body = "".join(parts)
    # Under WM_PATHNAME a bracket never matches "/", negated or not.
    if negated:
        return f"[^/{body}]", i
    if not body:
        return "(?!)", i
    return f"(?!/)[{body}]", i


def ignore_line_for(rel_path: str, is_dir: bool) -> str:
    """The ignore-file line that excludes exactly ``rel_path`` (relative to the root)."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in rel_path)
    if escaped.endswith(" "):
        escaped = escaped[:-1] + "\\ "
    # A leading "/" anchors the pattern to the root (and makes "!" or "#" names literal).
    return "/" + escaped + ("/" if is_dir else "")
