"""The Docker target's cache on the worker, on the real Docker Engine: the supervisor's folder of each version of
the package, which runs' containers mount, is removed once no run uses it, and never while one does."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from airflow_amlrun import Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.config import load_settings
from airflow_amlrun.targets import docker_lib
from tests.conftest import write_script

pytest_plugins = ["tests.integration.docker_engine"]

# A run of the running version, which waits for the test's word before it imports run_context: from the
# supervisor's folder its container mounts.
WAITS = """
import os, sys, time
print("waiting", flush=True)
for _ in range(1200):
    if os.path.exists("go"):
        break
    time.sleep(0.1)
else:
    sys.exit("never told to go")
from airflow_amlrun.run_context import Run
Run.get_context().log("after_cleanup", 1)
print("went on", flush=True)
"""

QUICK = """
from airflow_amlrun.run_context import Run
Run.get_context().log("acc", 0.9)
"""


def an_earlier_version(cache: Path, digest: str, *, days_ago: float = 0) -> Path:
    """The supervisor's folder of another version of the package, made that many days ago."""
    folder = cache / f"lib-{digest}"
    (folder / "pylib").mkdir(parents=True)
    (folder / "supervisor.py").write_text("# an earlier version\n")
    if days_ago:
        made = time.time() - days_ago * 24 * 3600
        os.utime(folder, (made, made))
    return folder


def recorded_daemons(cache: Path) -> list[str]:
    """The daemons recorded as ones whose containers may mount a folder of the cache."""
    return [line for line in (cache / "lib-daemons").read_text().splitlines() if not line.startswith("#")]


def test_a_new_version_removes_the_folders_no_run_uses_and_keeps_the_one_a_running_container_mounts(
    docker_home, tmp_path, monkeypatch
):
    write_script(tmp_path / "old", "train.py", WAITS)
    write_script(tmp_path / "new", "train.py", QUICK)
    cache = Workspace.get().cache_dir / "docker"
    experiment = Experiment(Workspace.get(), "docker-cache")

    # A run of this version starts, and goes on...
    old_run = experiment.submit(ScriptRunConfig(tmp_path / "old", script="train.py", compute_target="docker"))
    # (A version between, whose runs are over.)
    unused = an_earlier_version(cache, "0" * 16)
    lines: list[str] = []
    waiting = threading.Event()

    def follow() -> None:
        def output(line: str) -> None:
            lines.append(line)
            if line == "waiting":
                waiting.set()

        old_run.wait_for_completion(output=output, raise_on_error=False)

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        assert waiting.wait(120), lines
        old_lib = cache / docker_lib.lib_name()

        # ...while the worker is upgraded: a new version of the supervisor's files.
        newer = tmp_path / "newer_supervisor_part.py"
        newer.write_text("# what the next version changed\n")
        sources = docker_lib.lib_sources
        monkeypatch.setattr(docker_lib, "lib_sources", lambda: [*sources(), newer])
        new_lib = cache / docker_lib.lib_name()
        assert new_lib != old_lib

        record = experiment.submit(
            ScriptRunConfig(tmp_path / "new", script="train.py", compute_target="docker")
        ).wait_for_completion(show_output=False)

        assert record.status == "Completed", record.error
        assert record.metrics == {"acc": 0.9}
        assert (new_lib / "supervisor.py").is_file()
        assert not unused.exists()
        assert (old_lib / "pylib" / "airflow_amlrun" / "run_context.py").is_file()  # its container mounts it
    finally:
        # The old run goes on, and imports run_context from its folder.
        (load_settings().local_runs_dir / old_run.id / "run" / "go").write_text("")
        follower.join(120)

    old = Workspace.get().get_run(old_run.id)
    assert old.status == "Completed", (old.error, lines)
    assert old.metrics == {"after_cleanup": 1}
    assert "went on" in lines

    # No run uses the old version's folder any more: the next run removes it.
    again = experiment.submit(
        ScriptRunConfig(tmp_path / "new", script="train.py", compute_target="docker")
    ).wait_for_completion(show_output=False)
    assert again.status == "Completed", again.error
    assert {p.name for p in cache.iterdir()} == {new_lib.name, "lib.lock", "lib-daemons"}
    assert recorded_daemons(cache) == ["unix:///var/run/docker.sock"]


def test_a_run_that_copies_the_folder_into_its_container_uses_it_only_until_it_starts(
    docker_home, tmp_path, monkeypatch
):
    # The archive transfer (a daemon that does not see the worker's files): the folder goes into the container
    # with the code, and no container mounts it.
    monkeypatch.setenv("AMLRUN_DOCKER_TRANSFER", "archive")
    write_script(tmp_path / "src", "train.py", QUICK)
    cache = Workspace.get().cache_dir / "docker"
    experiment = Experiment(Workspace.get(), "docker-cache")
    config = ScriptRunConfig(tmp_path / "src", script="train.py", compute_target="docker")
    first = experiment.submit(config).wait_for_completion(show_output=False)
    old_lib = cache / docker_lib.lib_name()
    assert old_lib.is_dir()

    newer = tmp_path / "newer_supervisor_part.py"
    newer.write_text("# what the next version changed\n")
    sources = docker_lib.lib_sources
    monkeypatch.setattr(docker_lib, "lib_sources", lambda: [*sources(), newer])
    second = experiment.submit(config).wait_for_completion(show_output=False)

    assert (first.status, second.status) == ("Completed", "Completed")
    assert second.metrics == {"acc": 0.9}
    assert {p.name for p in cache.iterdir()} == {docker_lib.lib_name(), "lib.lock", "lib-daemons"}
    assert not Path(old_lib).exists()
    assert recorded_daemons(cache) == []  # no container mounts the folders
