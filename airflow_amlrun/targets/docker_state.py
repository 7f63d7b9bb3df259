"""What a container's state (``inspect_container``'s ``State``) and its daemon's ``/info`` say of a Docker run:
whether it may still change its files, how it ended, and whether its daemon stopped it by going down."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow_amlrun.targets.base import TargetStatus
from airflow_amlrun.targets.common import exit_status

if TYPE_CHECKING:
    from airflow_amlrun.targets.docker_options import DockerOptions

# How long before its daemon was found not answering a container may have ended and still be taken for one the
# daemon stopped as it went down: its log stream ends as the daemon stops it, and the waiting task asks the
# daemon next, which no longer answers.
DAEMON_STOP_SLACK_SECONDS = 10.0


def live(state: dict[str, Any]) -> bool:
    """Whether a container in this state may still change its files."""
    return bool(state.get("Running")) or state.get("Status") in ("restarting", "paused")


def stopped_with_daemon(
    state: dict[str, Any], info: dict[str, Any], *, went_away: float, now: float
) -> float | None:
    """When (epoch seconds, this machine's clock) a container ended that its daemon stopped by going down, else
    None. ``went_away`` is when the daemon stopped answering a process that followed the running container,
    ``state`` the container's state and ``info`` the daemon's ``/info`` once it answers again, at ``now``.

    A daemon without live-restore stops its containers as it stops, after it stopped answering: one that ended
    then (or a moment before its waiting task found the daemon gone) was stopped by it. With live-restore a
    restart stops nothing, so the container ended of its own. The daemon's clock (``SystemTime``) may differ
    from this machine's: the container's end is read on this one.
    """
    if info.get("LiveRestoreEnabled"):
        return None
    finished = docker_time(state.get("FinishedAt"))
    if finished is None:
        return None
    daemon_now = docker_time(info.get("SystemTime"))
    ended = finished - (daemon_now - now if daemon_now is not None else 0.0)
    if ended < went_away - DAEMON_STOP_SLACK_SECONDS:
        return None  # it had ended before its daemon went away
    return ended


def docker_time(value: object) -> float | None:
    """Epoch seconds of a time as the Docker API writes it (RFC 3339 with nanoseconds, of which Python keeps
    microseconds); None for none (the year 1: a container that never ended) or not one."""
    if not isinstance(value, str) or value.startswith("0001-"):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def utc_text(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def outcome(
    state: dict[str, Any], options: DockerOptions, *, timed_out: bool = False, stopped_by: str | None = None
) -> TargetStatus:
    code = state.get("ExitCode")
    exit_code = int(code) if isinstance(code, int) else None
    if state.get("OOMKilled"):
        limit = f"mem_limit={options.mem_limit}" if options.mem_limit else "no mem_limit (the host ran out)"
        return TargetStatus(
            running=False,
            exit_code=exit_code,
            reason=f"the container ran out of memory and was killed (OOMKilled) with {limit}; raise the "
            "target's mem_limit, or make the script use less memory",
            stopped_by=stopped_by,
        )
    if state.get("Error"):
        return TargetStatus(
            running=False,
            exit_code=exit_code,
            reason=f"the container could not run the script: {state['Error']}",
            timed_out=timed_out,
            stopped_by=stopped_by,
        )
    return exit_status(exit_code, timed_out=timed_out, stopped_by=stopped_by)


def stopped_by_restart(
    container: str, state: dict[str, Any], info: dict[str, Any], *, daemon: str, went_away: float, now: float
) -> str | None:
    """Why ``container`` ended, if its daemon stopped it by going down (see ``stopped_with_daemon``); None if it
    ended otherwise. ``daemon`` names the daemon: its URL, and where it comes from."""
    ended = stopped_with_daemon(state, info, went_away=went_away, now=now)
    if ended is None:
        return None
    return (
        f"its container {container} was stopped by the Docker daemon at {daemon}, which restarted while the run "
        f"went on: the daemon stopped answering at {utc_text(went_away)} and, when it answered again, the container "
        f"had ended (at {utc_text(ended)}, exit code {state.get('ExitCode')}); a daemon that runs without "
        "live-restore stops its containers when it stops. Run the task again; to keep runs going through a restart "
        'of the daemon, start dockerd with --live-restore (or set "live-restore": true in its '
        "/etc/docker/daemon.json)"
    )


def no_interpreter_reason(image: str | None, python: str | None) -> str:
    """Why a container whose supervisor never started (exit code 127) failed: ``image`` has no ``python``."""
    return (
        f"the image {image!r} could not run {python!r} (exit code 127, which says it has no such interpreter): "
        "the Docker target starts every run (a script or a command) under a small Python supervisor that "
        "enforces its time limit and records how it ended, which needs Python 3.7 or newer in the image. Use an "
        "image with Python, or name its interpreter in the environment's python.interpreter_path"
    )
