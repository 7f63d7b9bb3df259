"""Runs under the run's supervisor on the worker for a cluster-mode run (YARN, Kubernetes): submits the run's
application through the Spark provider's `SparkSubmitHook`, which follows the driver on the cluster, passes
spark-submit's output on to the run's log, and exits with its outcome. (A client-mode run's supervisor starts
the spark-submit command line the hook builds directly: see SparkTarget._client_command.)

    python -I -m airflow_amlrun.targets.spark_job REQUEST_FILE

The request (JSON, written by the Spark target) holds the hook's arguments; the connection comes in the
variable named by CONNECTION_ENV (an Airflow connection in JSON, as ``AIRFLOW_CONN_*`` variables hold them),
which is taken out of this process's environment as soon as the hook has read it, so neither spark-submit nor
the driver (the training script, in client mode) sees its secrets.

A stop (the run canceled, or past its time limit: the supervisor sends SIGTERM to the run's group) goes
through the hook's `on_kill`, which ends spark-submit and, in cluster mode, the application on the cluster
(``yarn application -kill``, the driver pod, the standalone driver). What the hook learns of the application
on the cluster (its YARN id, driver pod or driver id) is written to SUBMISSION_FILE in the run's control
folder as it appears, for the target to record.
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

# The variable holding the Spark connection for the hook, and the connection id it is known by here.
CONNECTION_ENV = "AIRFLOW_CONN_AMLRUN_SPARK_TARGET"
CONNECTION_ID = "amlrun_spark_target"
SUBMISSION_FILE = "spark_submission.json"
# Exit status when spark-submit failed and said nothing of its own exit code (the hook raised).
SUBMIT_FAILED = 1


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m airflow_amlrun.targets.spark_job REQUEST_FILE\n")
        return 2
    request = json.loads(Path(argv[1]).read_text())
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    class RunHook(SparkSubmitHook):
        """The provider's hook, passing each line of spark-submit's output on as it reads it."""

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
    hook = RunHook(conn_id=CONNECTION_ID, **arguments)
    os.environ.pop(CONNECTION_ENV, None)

    def stop(signum: int, frame: Any) -> None:
        hook.on_kill()
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        hook.submit(request["application"])
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
    """spark-submit's output lines, each written to this process's stdout (the run's log) as it comes, and
    what the hook learned from it of the application on the cluster recorded once it changes."""
    known: dict[str, Any] = {}
    for line in lines:
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
        sys.stdout.flush()
        yield line
        seen = {
            key: value
            for key, value in (
                ("yarn_application_id", getattr(hook, "_yarn_application_id", None)),
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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
