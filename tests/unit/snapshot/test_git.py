"""Git provenance a run records: where the code came from, on real repositories made with git itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_amlrun.snapshot.git import read_git_info, strip_credentials

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Ada",
    "GIT_AUTHOR_EMAIL": "ada@example.com",
    "GIT_COMMITTER_NAME": "Ada",
    "GIT_COMMITTER_EMAIL": "ada@example.com",
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, env=GIT_ENV, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "train").mkdir()
    (root / "train" / "train.py").write_text("print('v1')\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "first")
    git(root, "remote", "add", "origin", "https://ada:ghp_secret@github.com/org/models.git")
    return root


def test_a_clean_checkout_records_repository_branch_and_commit_without_credentials(repo: Path) -> None:
    info = read_git_info(repo / "train", environ={})
    assert info is not None
    assert info.summary() == {
        "repository_uri": "https://github.com/org/models.git",
        "branch": "main",
        "commit": git(repo, "rev-parse", "HEAD"),
        "dirty": False,
    }
    assert info.diff is None
    assert "ghp_secret" not in repr(info)


def test_uncommitted_changes_are_recorded_as_a_diff_with_untracked_files(repo: Path) -> None:
    (repo / "train" / "train.py").write_text("print('v2')\n")
    (repo / "train" / "new_helper.py").write_text("X = 1\n")
    info = read_git_info(repo / "train", environ={})
    assert info is not None and info.dirty is True
    assert info.diff is not None
    assert "-print('v1')" in info.diff and "+print('v2')" in info.diff
    assert "Untracked files" in info.diff and "train/new_helper.py" in info.diff


def test_a_huge_diff_is_cut_with_a_marker(repo: Path) -> None:
    (repo / "train" / "train.py").write_text("".join(f"line {i}\n" for i in range(50_000)))
    info = read_git_info(repo, max_diff_bytes=10_000, environ={})
    assert info is not None and info.diff is not None
    assert len(info.diff.encode()) < 10_200
    assert info.diff.rstrip().endswith("bytes]")
    assert "[diff truncated at 10,000 of" in info.diff


def test_a_detached_head_has_no_branch(repo: Path) -> None:
    git(repo, "checkout", "-q", "--detach")
    info = read_git_info(repo, environ={})
    assert info is not None
    assert info.branch is None
    assert info.commit == git(repo, "rev-parse", "HEAD")


def test_a_repository_without_commits_does_not_fail(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "a.py").write_text("")
    info = read_git_info(tmp_path, environ={})
    assert info is not None
    assert (info.branch, info.commit, info.dirty, info.repository_uri) == ("main", None, True, None)


def test_an_ssh_remote_keeps_its_user(repo: Path) -> None:
    git(repo, "remote", "set-url", "origin", "git@github.com:org/models.git")
    info = read_git_info(repo, environ={})
    assert info is not None and info.repository_uri == "git@github.com:org/models.git"


def test_code_outside_git_records_nothing(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("")
    assert read_git_info(tmp_path, environ={}) is None


def test_without_a_git_binary_nothing_is_recorded_and_nothing_fails(repo: Path, tmp_path: Path) -> None:
    code = (
        "from airflow_amlrun.snapshot.git import read_git_info; import sys; print(read_git_info(sys.argv[1]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMLRUN_GIT", "GIT_PYTHON"))}
    env["PATH"] = str(tmp_path / "empty-bin")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(repo)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert proc.stdout.strip() == "None"


def test_ci_variables_override_what_git_says(repo: Path) -> None:
    environ = {
        "AMLRUN_GIT_REPOSITORY_URI": "https://ci:tok@gitlab.example.com/team/models.git",
        "AMLRUN_GIT_BRANCH": "release/1.2",
        "AMLRUN_GIT_COMMIT": "0123abcd",
        "AMLRUN_GIT_DIRTY": "true",
        "AMLRUN_GIT_BUILD_ID": "build-77",
        "AMLRUN_GIT_BUILD_URI": "https://ci.example.com/builds/77",
    }
    info = read_git_info(repo, environ=environ)
    assert info is not None
    assert info.summary() == {
        "repository_uri": "https://gitlab.example.com/team/models.git",
        "branch": "release/1.2",
        "commit": "0123abcd",
        "dirty": True,
    }
    assert (info.build_id, info.build_uri) == ("build-77", "https://ci.example.com/builds/77")


def test_ci_variables_alone_describe_code_outside_git(tmp_path: Path) -> None:
    info = read_git_info(tmp_path, environ={"AMLRUN_GIT_COMMIT": "feedbeef", "AMLRUN_GIT_DIRTY": "0"})
    assert info is not None
    assert (info.commit, info.dirty, info.branch) == ("feedbeef", False, None)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:token@github.com/org/x.git", "https://github.com/org/x.git"),
        ("https://token@github.com/org/x.git", "https://github.com/org/x.git"),
        ("http://u:p@git.local:8080/x", "http://git.local:8080/x"),
        ("ssh://git:hunter2@host.example/x.git", "ssh://git@host.example/x.git"),
        ("ssh://git@host.example:2222/x.git", "ssh://git@host.example:2222/x.git"),
        ("git@github.com:org/x.git", "git@github.com:org/x.git"),
        ("/srv/git/x.git", "/srv/git/x.git"),
        ("https://github.com/org/x.git", "https://github.com/org/x.git"),
    ],
)
def test_remote_urls_lose_their_secrets(url: str, expected: str) -> None:
    assert strip_credentials(url) == expected
