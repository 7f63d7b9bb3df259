"""Runs under the run's supervisor on the worker for a cluster-mode run (YARN, Kubernetes): submits the run's
application through the Spark provider's `SparkSubmitHook`, which follows the driver on the cluster, passes
spark-submit's output on to the run's log, and exits with its outcome. (A client-mode run's supervisor starts
the spark-submit command line the hook builds directly: see SparkTarget._client_command.)

    python -I -m airflow_amlrun.targets.spark_job REQUEST_FILE

The request (JSON, written by the Spark target) holds the hook's arguments and names the file holding the
connection (an Airflow connection in JSON): a file only the worker's user may read, deleted here as soon as
it is read. The connection's secrets (a password, a keytab) are never in a process's environment, where
they would be readable through /proc by whatever runs as the worker's user, and inherited by every child.

spark-submit runs in a session of its own, killed by the kernel should this process end, so that a stop of
the run (the run canceled, or past its time limit: SIGTERM to the run's process group) reaches this process
alone: it stops the application through the hook's `on_kill`, which ends spark-submit and then the
application on the cluster (``yarn application -kill``, the driver pod), and only then exits. The target
gives it ON_KILL_SECONDS for that before the group is killed. Had the group's SIGTERM reached spark-submit
too, the hook would find it gone and skip the application's kill, which it makes only while spark-submit
runs.

What the hook learns of the application on the cluster (its YARN id, driver pod or driver id) is written to
SUBMISSION_FILE in the run's control folder as it appears, and its application id and web UI URL become the
run's tags (spark_main.APPLICATION_ID_TAG and UI_URL_TAG) as a client-mode driver makes them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from airflow_amlrun.targets.spark_main import APPLICATION_ID_TAG, UI_URL_TAG

# The id the connection is known by in this process.
CONNECTION_ID = "amlrun_spark_target"
SUBMISSION_FILE = "spark_submission.json"
# How long a stop waits for the hook's on_kill (killing the application on the cluster) before the run's group
# is killed: within the time Airflow gives a stopped task (killed_task_cleanup_time, 60 s by default).
ON_KILL_SECONDS = 30.0
# Exit status when spark-submit failed and said nothing of its own exit code (the hook raised).
SUBMIT_FAILED = 1
# The web UI of a YARN application, as YARN's client reports it.
_TRACKING_URL = re.compile(r"tracking URL: (https?://\S+)")
# prctl(2) option: the signal a process gets when its parent ends.
_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m airflow_amlrun.targets.spark_job REQUEST_FILE\n")
        return 2
    request = json.loads(Path(argv[1]).read_text())
    connection_text = _take(Path(request["connection_file"]))

    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
    from airflow.sdk import Connection

    connection = Connection.from_json(connection_text, conn_id=CONNECTION_ID)
    del connection_text

    class RunHook(SparkSubmitHook):
        """The provider's hook, on the run's connection, passing each line of spark-submit's output on as it
        reads it."""

        @classmethod
        def get_connection(cls, conn_id: str) -> Any:
            return connection

        @property
        def log(self) -> Any:
            # The run's log gets spark-submit's own lines (passed on below), not the hook's copy of each; the
            # hook's warnings and errors go to stderr as they are.
            return _HOOK_LOG

        def _process_spark_submit_log(self, itr: Iterator[Any]) -> None:
            super()._process_spark_submit_log(_passed_on(itr, self, Path(request["control"])))

    arguments = dict(request["hook"])
    if arguments.get("repositories"):
        # Repository URLs hold passwords as ${VAR} references, filled in from this process's environment.
        arguments["repositories"] = expand_variables(arguments["repositories"])
    # A keytab in the connection is written to a file by the hook: readable by this user alone.
    umask = os.umask(0o077)
    try:
        hook = RunHook(conn_id=CONNECTION_ID, **arguments)
    finally:
        os.umask(umask)

    def stop(signum: int, frame: Any) -> None:
        # Once: the run's group may be signalled again while the application is being killed.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            hook.on_kill()
        except Exception as err:
            sys.stderr.write(f"amlrun: stopping the Spark application failed: {type(err).__name__}: {err}\n")
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        hook.submit(request["application"], start_new_session=True, preexec_fn=_ends_with_this_process())
    except Exception as err:
        process = getattr(hook, "_submit_sp", None)
        returncode = process.returncode if process is not None else None
        if returncode:
            # The hook's message repeats the command line, which may hold a repository's password.
            sys.stderr.write(f"amlrun: spark-submit exited with code {returncode}\n")
            return int(returncode)
        first = str(err).splitlines()[0] if str(err) else ""
        sys.stderr.write(
            f"amlrun: submitting through SparkSubmitHook failed: {type(err).__name__}: {first}\n"
        )
        return SUBMIT_FAILED
    return 0


def expand_variables(urls: str) -> str:
    """Repository URLs with their ${VAR} references filled in from this process's environment."""
    return re.sub(r"\$\{(\w+)\}", lambda m: os.environ.get(m.group(1), ""), urls)


def _take(path: Path) -> str:
    """The content of the connection's file, which is deleted first: it is read once, by this process."""
    with open(path, encoding="utf-8") as stream:
        os.unlink(path)
        return stream.read()


def _ends_with_this_process() -> Any:
    """What spark-submit runs before its program: the kernel is to SIGKILL it when this process ends, as the
    supervisor's own job is when the supervisor ends (spark-submit is out of the run's group)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(SUBMIT_FAILED)  # this process ended before the request took effect

    return in_child


def _hook_log() -> logging.Logger:
    logger = logging.getLogger("airflow_amlrun.spark_job")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("amlrun: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    return logger


_HOOK_LOG = _hook_log()


def _passed_on(lines: Iterator[Any], hook: Any, control: Path) -> Iterator[Any]:
    """spark-submit's output lines, each written to this process's stdout (the run's log) as it comes; what
    the hook learned from it of the application on the cluster is recorded once it changes, and its id and
    web UI URL tag the run."""
    known: dict[str, Any] = {}
    tagged: dict[str, str] = {}
    for line in lines:
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
        sys.stdout.flush()
        yield line
        seen = {
            key: value
            for key, value in (
                ("yarn_application_id", getattr(hook, "_yarn_application_id", None)),
                ("kubernetes_application_id", getattr(hook, "_kubernetes_application_id", None)),
                ("kubernetes_driver_pod", getattr(hook, "_kubernetes_driver_pod", None)),
                ("driver_id", getattr(hook, "_driver_id", None)),
            )
            if value
        }
        if seen != known:
            known = seen
            tmp = control / f".{SUBMISSION_FILE}.tmp"
            tmp.write_text(json.dumps(seen))
            os.replace(tmp, control / SUBMISSION_FILE)
        tags = dict(tagged)
        application = seen.get("yarn_application_id") or seen.get("kubernetes_application_id")
        if application:
            tags[APPLICATION_ID_TAG] = application
        url = _TRACKING_URL.search(line)
        if url and application:
            tags[UI_URL_TAG] = url.group(1)
        if tags != tagged:
            _tag_run({key: value for key, value in tags.items() if tagged.get(key) != value})
            tagged = tags


def _tag_run(tags: dict[str, str]) -> None:
    from airflow_amlrun.run_context import Run

    run = Run.get_context()
    for key, value in tags.items():
        run.tag(key, value)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
