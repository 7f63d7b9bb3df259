"""The copies of a Docker run's log and events that a process makes while it follows the run: one of each per
container and process.

The container's log (``docker logs --follow``, the same for every daemon) is spooled by a thread and read by
offset; the stream ends when the container does, which is also how ``wait`` learns the run ended. A process that
re-attaches (a retry) follows the stream again from its start, so offsets mean the same in every process. With
``archive`` transfer the events file is copied the same way, by offset (``docker_transfer.EventsFollower``).
Both spools lie in the worker's folder of the run, beside the container's run folder, never in it: the container
cannot plant anything there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_amlrun.targets.docker_transfer import EVENTS_SPOOL, LOG_SPOOL, EventsFollower, LogFollower

if TYPE_CHECKING:
    from airflow_amlrun.hooks.docker_daemon import DockerDaemon
    from airflow_amlrun.targets.handles import DockerHandle


class Followers:
    """The log and events followers of the containers this process follows, by container id.

    :param api_version: the API version of the target's client (which connects when first asked): each
        follower connects on its own with it.
    """

    def __init__(self, daemon: DockerDaemon, api_version: Callable[[], str]) -> None:
        self._daemon = daemon
        self._api_version = api_version
        self._logs: dict[str, LogFollower] = {}
        self._events: dict[str, EventsFollower] = {}
        # Re-entrant: Airflow's SIGTERM handler runs on_kill (cancel) in the thread it interrupts, which may
        # hold this lock at that moment (a look at the run's followers).
        self._lock = threading.RLock()

    def log(self, handle: DockerHandle) -> LogFollower:
        """The container's log follower, started if there is none."""
        with self._lock:
            follower = self._logs.get(handle.container_id)
            if follower is None:
                spool = Path(handle.run_dir) / LOG_SPOOL
                follower = LogFollower(self._daemon, self._api_version(), handle, spool)
                self._logs[handle.container_id] = follower
            return follower

    def log_if_any(self, handle: DockerHandle) -> LogFollower | None:
        """The container's log follower if one was started; starts none."""
        with self._lock:
            return self._logs.get(handle.container_id)

    def restart_log(self, handle: DockerHandle) -> None:
        """Follow the container's log again, from its start (into the same spool, so offsets stay what they
        were)."""
        with self._lock:
            self._logs.pop(handle.container_id, None)
        self.log(handle)

    def events(self, handle: DockerHandle) -> EventsFollower:
        """The container's events follower (``archive``), started if there is none."""
        with self._lock:
            follower = self._events.get(handle.container_id)
            if follower is None:
                spool = Path(handle.run_dir) / EVENTS_SPOOL
                follower = EventsFollower(self._daemon, self._api_version(), handle, spool)
                self._events[handle.container_id] = follower
            return follower

    def restart_events(self, handle: DockerHandle) -> None:
        """Read a container's events again from their start (into the same spool, so offsets stay what they
        were), if a follower read them and gave up (its daemon did not answer)."""
        with self._lock:
            follower = self._events.get(handle.container_id)
            if follower is None or not follower.done.is_set():
                return
            del self._events[handle.container_id]
        self.events(handle)

    def forget(self, handle: DockerHandle) -> list[LogFollower | EventsFollower]:
        """Let go of the container's followers; returns them (to stop, if the run goes on without them)."""
        with self._lock:
            followers = [
                self._logs.pop(handle.container_id, None),
                self._events.pop(handle.container_id, None),
            ]
        return [follower for follower in followers if follower is not None]
