"""The supervisor's folders of the Docker target in the worker's cache, where no daemon is needed to tell: a process
choosing its folder, links, a recorded daemon that does not answer or hangs, a cache another user made, folders
older versions left. What containers use is tests/integration/test_docker_cache.py."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.hooks.docker_daemon import DockerDaemon
from airflow_amlrun.targets import docker_lib
from airflow_amlrun.targets.docker_lib import lib_folder, lib_name, remove_unused
from airflow_amlrun.targets.docker_lib_record import DAEMONS, UNANSWERED
from tests.conftest import process_holding_lock

# Another worker's process between choosing its folder (this version's) and having started its container.
HOLD = """
import sys
from pathlib import Path
from airflow_amlrun.targets.docker_lib import lib_folder

with lib_folder(Path(sys.argv[1]), bind_daemon=None) as lib:
    print(lib.name, flush=True)
    sys.stdin.readline()
"""

DAY = 24 * 3600


def other_version(cache: Path, digest: str, *, days_ago: float = 0) -> Path:
    """The folder another version of the package made (as a run of it left it), that many days ago."""
    folder = cache / "docker" / f"lib-{digest}"
    (folder / "pylib").mkdir(parents=True)
    (folder / "supervisor.py").write_text("# another version\n")
    if days_ago:
        made = time.time() - days_ago * DAY
        os.utime(folder, (made, made))
    return folder


def recorded_daemons(cache: Path) -> list[str]:
    lines = (cache / "docker" / DAEMONS).read_text().splitlines()
    return [line for line in lines if not line.startswith("#")]


def time_passes(cache: Path, seconds: float) -> None:
    """As if the record of daemons had begun, and its daemons had last failed, that much earlier."""
    record = cache / "docker" / DAEMONS
    since = int(re.search(r"^# since (\d+)", record.read_text(), re.M).group(1))  # type: ignore[union-attr]
    record.write_text(record.read_text().replace(f"# since {since}", f"# since {since - int(seconds * 1e9)}"))
    unanswered = cache / "docker" / UNANSWERED
    if unanswered.exists():
        failures = json.loads(unanswered.read_text())
        for failure in failures.values():
            failure["last"] -= seconds
        unanswered.write_text(json.dumps(failures))


class SilentDaemon:
    """A unix socket where a Docker daemon would listen, that takes connections and never answers: a wedged daemon.
    ``asked`` is set at the first connection; leaving it closes every connection, as a daemon that went away."""

    def __init__(self, path: Path) -> None:
        self.url = f"unix://{path}"
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        self.asked = threading.Event()
        self.connections: list[socket.socket] = []

    def __enter__(self) -> SilentDaemon:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)
            self.asked.set()


@contextlib.contextmanager
def holding_its_folder(cache: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that is choosing its folder (``HOLD``) until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(cache)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        yield holder
    finally:
        holder.communicate("\n", timeout=60)


def test_a_cleanup_leaves_the_folder_another_process_is_choosing_and_removes_it_once_let_go(tmp_path):
    cache = tmp_path / "cache"
    newer = other_version(cache, "f" * 16)  # the folder of the run that just started, in a newer version
    with holding_its_folder(cache) as holder:
        assert holder.stdout is not None
        held = cache / "docker" / holder.stdout.readline().strip()
        assert held.name == lib_name() and (held / "supervisor.py").is_file()

        assert remove_unused(cache, keep=newer, clients={}) == []
        assert (held / "supervisor.py").is_file()
    assert holder.returncode == 0

    assert remove_unused(cache, keep=newer, clients={}) == [held.name]
    assert {p.name for p in (cache / "docker").iterdir()} == {"lib.lock", DAEMONS, newer.name}
    # The next run of that version makes it again.
    with lib_folder(cache, bind_daemon=None) as lib:
        assert lib == held and (lib / "supervisor.py").is_file()


def test_a_cleanup_follows_no_link_out_of_the_cache(tmp_path):
    cache = tmp_path / "cache"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("not the cache's")
    with lib_folder(cache, bind_daemon=None) as current:
        pass
    old = other_version(cache, "0" * 16)
    (old / "pylib" / "escape").symlink_to(outside, target_is_directory=True)
    planted = cache / "docker" / f"lib-{'1' * 16}"
    planted.symlink_to(outside, target_is_directory=True)

    removed = remove_unused(cache, keep=current, clients={})

    assert removed == [old.name]
    assert not old.exists()
    assert planted.is_symlink() and (outside / "precious.txt").read_text() == "not the cache's"
    assert (current / "supervisor.py").is_file()


def test_a_folder_left_half_made_by_a_process_that_died_is_removed(tmp_path):
    cache = tmp_path / "cache"
    leftover = ".tmp-lib-0123456789abcdef-0badf00d"
    (cache / "docker" / leftover / "pylib").mkdir(parents=True)
    with lib_folder(cache, bind_daemon=None) as current:
        pass

    assert remove_unused(cache, keep=current, clients={}) == [leftover]
    assert {p.name for p in (cache / "docker").iterdir()} == {"lib.lock", DAEMONS, current.name}


# ---------------------------------------------------------------- daemons that do not answer


def test_no_run_waits_for_a_cleanup_that_waits_for_a_hanging_daemon(tmp_path, monkeypatch):
    # The daemon's question may take as long as it takes: the other run must not depend on it ending.
    monkeypatch.setattr(docker_lib, "DAEMON_TIMEOUT_SECONDS", 600)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(1) as pool, SilentDaemon(tmp_path / "wedged.sock") as wedged:
        with lib_folder(cache, bind_daemon=DockerDaemon(base_url=wedged.url)) as current:
            pass
        old = other_version(cache, "0" * 16)
        cleanup = pool.submit(remove_unused, cache, keep=current, clients={})
        assert wedged.asked.wait(60)

        with holding_its_folder(cache) as holder:
            assert holder.stdout is not None
            chose, _, _ = select.select([holder.stdout], [], [], 60)
            # It has its folder while the cleanup still waits for the daemon to answer.
            assert chose, "another run waited for the cleanup's question to a hanging daemon"
            assert holder.stdout.readline().strip() == current.name
            assert not cleanup.done()

    # Once the daemon went away, the cleanup keeps every folder: that daemon may have a run using one.
    assert cleanup.result(timeout=60) == []
    assert (old / "supervisor.py").is_file()


def test_a_daemon_that_does_not_answer_is_asked_again_only_later_and_named_with_the_fix_if_it_goes_on(
    tmp_path, caplog
):
    cache = tmp_path / "cache"
    gone = f"unix://{tmp_path}/gone.sock"
    for _ in range(2):  # two runs bind-mounted through it: it is recorded once
        with lib_folder(cache, bind_daemon=DockerDaemon(base_url=gone)) as current:
            pass
    assert recorded_daemons(cache) == [gone]
    old = other_version(cache, "0" * 16)
    record = cache.resolve() / "docker" / DAEMONS

    def cleanup() -> list[tuple[str, str]]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="airflow_amlrun.targets"):
            assert remove_unused(cache, keep=current, clients={}) == []
        return [(r.levelname, r.getMessage()) for r in caplog.records]

    [(level, message)] = cleanup()
    assert level == "INFO"
    assert f"the Docker daemon at {gone}, whose containers may use one, does not answer" in message
    assert "It is asked again after" in message
    # The next runs do not ask it again (which takes them time) until then, and keep everything meanwhile.
    assert cleanup() == []
    assert (old / "supervisor.py").is_file()

    time_passes(cache, DAY)
    [(level, _)] = cleanup()
    assert level == "INFO"
    time_passes(cache, DAY)
    [(level, message)] = cleanup()
    assert level == "WARNING"
    assert f"the Docker daemon at {gone}, recorded in {record} as one whose containers may use one" in message
    assert "did not answer 3 times in a row" in message
    assert f"If that daemon is gone for good, remove its line from {record}" in message

    # The user does so: the next cleanup asks the daemons left.
    record.write_text("".join(line for line in record.read_text().splitlines(True) if gone not in line))
    assert remove_unused(cache, keep=current, clients={}) == [old.name]


# ---------------------------------------------------------------- a cache another user made first

# A run of a user who is not the one that made the cache: it chooses its folder (bind-mounted through a daemon of
# its own), then its cleanup runs, twice.
OTHER_USER = """
import logging, sys
from pathlib import Path
from airflow_amlrun.hooks.docker_daemon import DockerDaemon
from airflow_amlrun.targets.docker_lib import lib_folder, remove_unused

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
cache = Path(sys.argv[1])
with lib_folder(cache, bind_daemon=DockerDaemon(base_url="unix:///run/user/65534/docker.sock")) as lib:
    print(lib.name, flush=True)
for _ in range(2):
    print(remove_unused(cache, keep=lib, clients={}), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a cache made by one user and used by another: needs root")
def test_a_cache_another_user_made_first_still_runs_this_users_docker_runs():
    # Somewhere the other user may enter (a test's own folder is the test user's alone).
    shared = Path(tempfile.mkdtemp(prefix="amlrun-shared-cache-"))
    try:
        shared.chmod(0o755)
        cache = shared / "cache"
        # `sudo amlrun ...`: root's run of this version, through the system's daemon, and an older version's folder.
        with lib_folder(cache, bind_daemon=DockerDaemon(base_url="unix:///var/run/docker.sock")):
            pass
        old = other_version(cache, "0" * 16)

        done = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                OTHER_USER,
                cache,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [lib_name(), "[]", "[]"]
        warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
        docker = cache.resolve() / "docker"
        assert len(warnings) == 2, done.stderr
        assert warnings[0].startswith(
            f"WARNING The Docker daemon unix:///run/user/65534/docker.sock is not recorded in {docker / DAEMONS}, "
            "which this user (uid 65534) may not write (it belongs to uid 0)"
        )
        assert warnings[1].startswith(
            f"WARNING The supervisor's folders of other versions in {docker} are not removed by this process"
        )
        assert f"(sudo chown -R 65534 {docker})" in warnings[1]
        assert (old / "supervisor.py").is_file()
    finally:
        shutil.rmtree(shared)


# ---------------------------------------------------------------- folders older versions left


def test_folders_made_before_the_daemons_were_recorded_are_kept_a_week_from_then(tmp_path):
    cache = tmp_path / "cache"
    # A version that recorded no daemon made its folder a month ago; it has used it since, perhaps through a daemon
    # no record names, for a run that still goes on.
    before = other_version(cache, "0" * 16, days_ago=30)
    with lib_folder(cache, bind_daemon=None) as current:  # this version's first run: the record begins
        pass
    # A version since, whose runs are over.
    since = other_version(cache, "1" * 16)

    assert remove_unused(cache, keep=current, clients={}) == [since.name]
    assert (before / "supervisor.py").is_file()

    time_passes(cache, 6 * DAY)
    assert remove_unused(cache, keep=current, clients={}) == []
    time_passes(cache, 1 * DAY)
    assert remove_unused(cache, keep=current, clients={}) == [before.name]


def test_a_process_holding_the_lock_too_long_is_named_and_nothing_waits_for_it_past_the_bound(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(docker_lib, "LOCK_WAIT_SECONDS", 0.4)
    cache = tmp_path / "cache"
    with lib_folder(cache, bind_daemon=None):  # makes the cache's folder and its lock file
        pass
    lock = cache / "docker" / "lib.lock"
    with process_holding_lock(lock) as holder:
        assert docker_lib.exclusive_holders(lock) == [holder.pid]
        started = time.monotonic()
        with pytest.raises(ConfigurationError) as raised, lib_folder(cache, bind_daemon=None):
            pytest.fail("the folder was handed out while another process held the lock exclusively")
        assert time.monotonic() - started >= 0.4  # it did wait for the lock, as long as it may
    assert f"waited 0.4 s for the shared lock {lock}" in str(raised.value)
    assert f"process {holder.pid} ({sys.executable} -c " in str(raised.value)
    # Let go: the folder is handed out again, and nobody is named as holding the lock.
    assert docker_lib.exclusive_holders(lock) == []
    with lib_folder(cache, bind_daemon=None) as lib:
        assert lib.is_dir()
