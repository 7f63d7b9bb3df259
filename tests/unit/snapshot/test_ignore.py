"""Which files a snapshot takes: git's ignore semantics (git itself is the oracle) plus default excludes."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_amlrun.snapshot.ignore import (
    IgnoreMatcher,
    compile_pattern,
    ignore_line_for,
    parse_ignore_line,
)
from airflow_amlrun.snapshot.walk import scan_tree

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}
# The default excludes, written as git's lowest-precedence exclude file, so git can be the oracle.
DEFAULT_EXCLUDES_FOR_GIT = "__pycache__/\n.ipynb_checkpoints/\n/outputs/\n/logs/\n"


def included(root: Path) -> set[str]:
    scan = scan_tree(root)
    return {f.path for f in scan.files} | {link.path for link in scan.links}


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def git(root: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, env=GIT_ENV, input=stdin, capture_output=True, text=True, check=True
    ).stdout


def git_included(root: Path) -> set[str]:
    """Files git would add (untracked, not ignored): the oracle for the whole walk."""
    out = git(root, "ls-files", "--others", "--exclude-standard", "-z")
    return {p for p in out.split("\0") if p}


def git_check_ignored(root: Path, paths: list[str]) -> set[str]:
    """Files ``git check-ignore`` reports as ignored (it accounts for excluded parent directories)."""
    proc = subprocess.run(
        ["git", "check-ignore", "--stdin", "-z"],
        cwd=root,
        env=GIT_ENV,
        input="\0".join(paths) + "\0",
        capture_output=True,
        text=True,
    )
    assert proc.returncode in (0, 1), proc.stderr  # 1 means "nothing ignored"
    return {p for p in proc.stdout.split("\0") if p}


# ---------------------------------------------------------------- pattern translation


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.log", "a.log", True),
        ("*.log", "dir/a.log", False),  # compile_pattern matches the whole string; basename handled above
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("**/z", "z", True),
        ("**/z", "q/r/z", True),
        ("foo/**", "foo", False),
        ("foo/**", "foo/x/y", True),
        ("a**b", "a/b", False),  # "**" not a whole component is a plain "*"
        ("[a-c]x", "bx", True),
        ("[!a-c]x", "dx", True),
        ("[!a-c]x", "/x", False),
        ("[[:digit:]]", "7", True),
        ("\\*", "*", True),
        ("\\*", "a", False),
        ("?", "/", False),
    ],
)
def test_git_wildmatch_patterns_match_like_git(pattern: str, path: str, expected: bool) -> None:
    regex = compile_pattern(pattern)
    assert regex is not None
    assert (regex.fullmatch(path) is not None) is expected


def test_unterminated_bracket_never_matches() -> None:
    assert compile_pattern("[abc") is None


def test_ignore_lines_keep_gits_quirks() -> None:
    assert parse_ignore_line("# comment") is None
    assert parse_ignore_line("   ") is None
    escaped = parse_ignore_line("\\#notes")
    assert escaped is not None and escaped.regex is not None and escaped.regex.fullmatch("#notes")
    trailing = parse_ignore_line("name\\ ")
    assert trailing is not None and trailing.regex is not None and trailing.regex.fullmatch("name ")
    dir_only = parse_ignore_line("build/")
    assert dir_only is not None and dir_only.dir_only and dir_only.basename_only


def test_a_deeper_gitignore_overrides_a_shallower_one() -> None:
    matcher = IgnoreMatcher().with_file("", "*.log\n", ".gitignore").with_file("sub", "!keep.log\n", "x")
    assert matcher.is_excluded("sub/other.log", False)
    assert not matcher.is_excluded("sub/keep.log", False)
    assert matcher.is_excluded("keep.log", False)


def test_the_suggested_ignore_line_excludes_exactly_that_path() -> None:
    line = ignore_line_for("data/raw [v2]*", True)
    matcher = IgnoreMatcher().with_file("", line + "\n", ".amlignore")
    assert matcher.is_excluded("data/raw [v2]*", True)
    assert not matcher.is_excluded("data/raw v2x", True)
    assert not matcher.is_excluded("other/data/raw [v2]*", True)


# ---------------------------------------------------------------- the walk, on real trees


def test_amlignore_replaces_every_gitignore(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            ".gitignore": "*.py\n",
            "sub/.gitignore": "*.txt\n",
            ".amlignore": "data/\n",
            "train.py": "",
            "sub/notes.txt": "",
            "data/big.bin": "",
        },
    )
    assert included(tmp_path) == {".gitignore", ".amlignore", "sub/.gitignore", "train.py", "sub/notes.txt"}


def test_code_is_taken_without_vcs_caches_venvs_and_run_outputs(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            "train.py": "",
            ".git/config": "",
            "pkg/__pycache__/m.cpython-311.pyc": "",
            "nb/.ipynb_checkpoints/a.ipynb": "",
            "outputs/model.pkl": "",
            "logs/run.log": "",
            "pkg/outputs/keep.py": "",  # only the root outputs/ is a run's
            "env/pyvenv.cfg": "",
            "env/lib/site.py": "",
            "tools/venv2/pyvenv.cfg": "",
        },
    )
    assert included(tmp_path) == {"train.py", "pkg/outputs/keep.py"}


def test_no_ignore_rule_takes_back_the_git_folder(tmp_path: Path) -> None:
    # As git: a broad re-include would otherwise ship the whole repository history.
    write_tree(
        tmp_path,
        {
            ".gitignore": "!*/\n!.git/\n!.git\n!*\n",
            ".git/config": "",
            ".git/refs/heads/main": "",
            "train.py": "",
        },
    )
    assert included(tmp_path) == {".gitignore", "train.py"}


def test_an_ignore_file_can_re_include_a_default_exclude(tmp_path: Path) -> None:
    write_tree(tmp_path, {".amlignore": "!outputs/\n!env/\n", "outputs/seed.csv": "", "env/pyvenv.cfg": ""})
    assert included(tmp_path) == {".amlignore", "outputs/seed.csv", "env/pyvenv.cfg"}


def test_a_file_cannot_be_re_included_below_an_excluded_directory(tmp_path: Path) -> None:
    write_tree(tmp_path, {".gitignore": "build/\n!build/keep.txt\n", "build/keep.txt": "", "a.py": ""})
    assert included(tmp_path) == {".gitignore", "a.py"}


DIR_NAMES = ["a", "b", "build", "sub", "logs", "outputs", "__pycache__"]
FILE_NAMES = ["x.py", "y.log", "keep.log", "z.txt", "a", "build", "!x.py", "#n"]
PATTERNS = [
    "*.log",
    "!keep.log",
    "build/",
    "build",
    "/a",
    "a/",
    "!a/",
    "b/*.txt",
    "**/z.txt",
    "!z.txt",
    "x.*",
    "/b/x.py",
    "!build/",
    "*",
    "!*/",
    "!*.py",
    "a/**",
    "!a/**/x.py",
    "sub/**/y.log",
    "#comment",
    "",
    "\\!x.py",
    "[xy].py",
    "?.txt",
    "!/outputs/",
    "!logs/",
    "__pycache__",
    "!__pycache__/",
    "/sub",
    "*/x.py",
    "a/**/",
    "build/**",
    "!build/**",
    "\\#n",
    "[!x]*.py",
    "**/sub/",
    "b",
    "x.py ",
    "!a",
]


@st.composite
def trees(draw: st.DrawFn) -> tuple[list[str], dict[str, list[str]]]:
    dirs = st.lists(st.sampled_from(DIR_NAMES), max_size=3).map(tuple)
    files = draw(st.lists(st.tuples(dirs, st.sampled_from(FILE_NAMES)), min_size=1, max_size=25))
    paths = ["/".join((*d, f)) for d, f in files]
    all_dirs = sorted({"/".join(d[:i]) for d, _ in files for i in range(len(d) + 1)})
    ignores = draw(
        st.dictionaries(
            st.sampled_from(all_dirs), st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=6), max_size=4
        )
    )
    return paths, ignores


def materialize_tree(root: Path, paths: list[str], ignores: dict[str, list[str]]) -> list[str]:
    dir_set = {str(Path(p).parent) for p in paths} | {d for d in ignores}
    for d in sorted(dir_set):
        (root / d).mkdir(parents=True, exist_ok=True)
    written = []
    for p in paths:
        target = root / p
        if not target.is_dir() and not any(parent.is_file() for parent in target.parents):
            target.write_text(p)
            written.append(p)
    for d, lines in ignores.items():
        if (root / d).is_dir():
            (root / d / ".gitignore").write_text("\n".join(lines) + "\n")
            written.append(f"{d}/.gitignore" if d else ".gitignore")
    return sorted(set(written))


@pytest.fixture(scope="module")
def new_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .git folder of a new repository whose lowest-precedence excludes are the default ones: made once,
    for every example's tree to use (cheaper than `git init` each time). Git only reads it here."""
    root = tmp_path_factory.mktemp("repository")
    git(root, "init", "-q", "--template=", ".")
    (root / ".git" / "info").mkdir(exist_ok=True)
    (root / ".git" / "info" / "exclude").write_text(DEFAULT_EXCLUDES_FOR_GIT)
    return root / ".git"


@settings(
    max_examples=120,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tree=trees())
def test_snapshot_takes_exactly_what_git_would_track(
    new_repository: Path, tree: tuple[list[str], dict[str, list[str]]]
) -> None:
    paths, ignores = tree
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # A work tree's .git file naming the repository, as `git worktree add` writes it: git reads the
        # repository's excludes, and the walk meets a .git it must leave out, without a copy of the repository
        # to write and delete for every example (a .git folder is left out in the tests above).
        (root / ".git").write_text(f"gitdir: {new_repository}\n")
        files = materialize_tree(root, paths, ignores)

        ours = included(root)
        assert ours == git_included(root)
        assert ours == set(files) - git_check_ignored(root, files)


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_a_left_out_file_is_explained_by_the_rule_that_excludes_it(
    tree: tuple[list[str], dict[str, list[str]]],
) -> None:
    from airflow_amlrun.snapshot.walk import find_exclusion

    paths, ignores = tree
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = materialize_tree(root, paths, ignores)
        taken = included(root)
        for path in files:
            exclusion = find_exclusion(root, path)
            assert (exclusion is None) == (path in taken), (path, exclusion)
            if exclusion is not None and exclusion.rule is not None:
                source = (root / exclusion.rule.source).read_text().split("\n")
                assert source[exclusion.rule.line - 1] == exclusion.rule.text
                assert path == exclusion.path or path.startswith(exclusion.path + "/")
