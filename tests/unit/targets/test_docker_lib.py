"""The supervisor's folders of the Docker target in the worker's cache, where no daemon is needed to tell: a process
choosing its folder, links, a recorded daemon that does not answer. What containers use is
tests/integration/test_docker_cache.py."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from airflow_amlrun.targets.docker_lib import DAEMONS, lib_folder, lib_name, remove_unused

# Another worker's process between choosing its folder (this version's) and having created its container.
HOLD = """
import sys
from pathlib import Path
from airflow_amlrun.targets.docker_lib import lib_folder

with lib_folder(Path(sys.argv[1]), bind_daemon=None) as lib:
    print(lib.name, flush=True)
    sys.stdin.readline()
"""


def other_version(cache: Path, digest: str) -> Path:
    """The folder another version of the package made (as a run of it left it)."""
    folder = cache / "docker" / f"lib-{digest}"
    (folder / "pylib").mkdir(parents=True)
    (folder / "supervisor.py").write_text("# another version\n")
    return folder


def test_a_cleanup_leaves_the_folder_another_process_is_choosing_and_removes_it_once_let_go(tmp_path):
    cache = tmp_path / "cache"
    newer = other_version(cache, "f" * 16)  # the folder of the run that just started, in a newer version
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(cache)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        held = cache / "docker" / holder.stdout.readline().strip()
        assert held.name == lib_name() and (held / "supervisor.py").is_file()

        assert remove_unused(cache, keep=newer, clients={}) == []
        assert (held / "supervisor.py").is_file()
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0

    assert remove_unused(cache, keep=newer, clients={}) == [held.name]
    assert {p.name for p in (cache / "docker").iterdir()} == {"lib.lock", newer.name}
    # The next run of that version makes it again.
    with lib_folder(cache, bind_daemon=None) as lib:
        assert lib == held and (lib / "supervisor.py").is_file()


def test_a_cleanup_follows_no_link_out_of_the_cache(tmp_path):
    cache = tmp_path / "cache"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("not the cache's")
    old = other_version(cache, "0" * 16)
    (old / "pylib" / "escape").symlink_to(outside, target_is_directory=True)
    planted = cache / "docker" / f"lib-{'1' * 16}"
    planted.symlink_to(outside, target_is_directory=True)

    with lib_folder(cache, bind_daemon=None) as current:
        pass
    removed = remove_unused(cache, keep=current, clients={})

    assert removed == [old.name]
    assert not old.exists()
    assert planted.is_symlink() and (outside / "precious.txt").read_text() == "not the cache's"
    assert (current / "supervisor.py").is_file()


def test_a_recorded_daemon_that_does_not_answer_keeps_every_folder_and_says_how_to_forget_it(
    tmp_path, caplog
):
    cache = tmp_path / "cache"
    old = other_version(cache, "0" * 16)
    gone = f"unix://{tmp_path}/gone.sock"
    for _ in range(2):  # two runs bind-mounted through it: it is recorded once
        with lib_folder(cache, bind_daemon=gone) as current:
            pass
    assert (cache / "docker" / DAEMONS).read_text() == f"{gone}\n"

    with caplog.at_level(logging.INFO, logger="airflow_amlrun.targets.docker_lib"):
        removed = remove_unused(cache, keep=current, clients={})

    assert removed == []
    assert (old / "supervisor.py").is_file()
    [message] = [r.getMessage() for r in caplog.records]
    assert f"the Docker daemon at {gone}, whose containers may use one, does not answer" in message
    assert (
        f"If that daemon is gone for good, remove its line from {cache.resolve() / 'docker' / DAEMONS}"
        in message
    )


def test_a_folder_left_half_made_by_a_process_that_died_is_removed(tmp_path):
    cache = tmp_path / "cache"
    leftover = ".tmp-lib-0123456789abcdef-0badf00d"
    (cache / "docker" / leftover / "pylib").mkdir(parents=True)
    with lib_folder(cache, bind_daemon=None) as current:
        pass

    assert remove_unused(cache, keep=current, clients={}) == [leftover]
    assert {p.name for p in (cache / "docker").iterdir()} == {"lib.lock", current.name}
