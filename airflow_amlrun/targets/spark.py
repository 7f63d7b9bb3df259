"""The Spark target: any Airflow connection of type `spark` (``local[*]``, ``spark://host:port``, ``yarn``,
``k8s://...``) runs the training script as a Spark application, submitted through the Spark provider's
`SparkSubmitHook` in the deploy mode the connection says.

spark-submit runs on the worker under the run's supervisor, exactly as a local run does (local.py): the
supervisor keeps the run's time limit, records its exit code and leads the run's process group. In client mode
its job is the command line the hook builds (`_client_command`), and the driver, which runs the training
script through spark_main.py, is in that group too. So the driver's output is the run's log,
`Run.get_context()` in the driver writes the run's events file, `outputs/` is the run directory's, and a stop
of the run (cancel, time limit, the task killed) ends spark-submit and the driver, and with it the application
on the cluster. In cluster mode the job is the hook itself (spark_job.py), whose `on_kill` stops the driver
on the cluster: a stop waits up to spark_job.ON_KILL_SECONDS for it, and the connection (secrets and all)
reaches that process in a file only the worker's user may read, deleted as it is read, never through an
environment.
A worker's death ends a client-mode driver with it: the retry finds its supervisor gone and records the old
run Failed with why, then starts a new one.

What travels with the application: a `--py-files` archive of the run's code (the snapshot, with run_context
under a stand-in package that gives way to an installed airflow_amlrun: standin_package.py), so executors
import the script's own modules; the environment's `spark` section (packages, repositories, configuration);
and a managed environment as an archive (environment/build_archive.py).

Cluster mode on YARN or Kubernetes is submitted as the connection says, and the run's control folder records
where the driver runs (the hook's YARN application id or driver pod, spark_job.SUBMISSION_FILE). Re-attaching
a retry to such a driver by that submission id once the worker that submitted it is gone is the designed next
step (`attachable`/`find` would read it and look the driver up through the hook's status calls), not built
and not tested: no YARN or Kubernetes cluster is reachable from this project's machines. Until then such a
run is followed like a client-mode one: while its supervisor on the submitting worker lives.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from airflow_amlrun.config import Settings
from airflow_amlrun.environment.build_archive import SparkArchive, ensure_spark_archive
from airflow_amlrun.errors import ConfigurationError, UnknownComputeTargetError
from airflow_amlrun.targets import spark_main, standin_package
from airflow_amlrun.targets.base import CodeSource, Job, TargetStatus
from airflow_amlrun.targets.common import (
    CONTROL_DIR,
    RUN_FOLDERS,
    STD_LOG,
    TERM_GRACE_SECONDS,
    find_java,
    read_control,
)
from airflow_amlrun.targets.handles import SparkHandle
from airflow_amlrun.targets.local import LocalTarget
from airflow_amlrun.targets.spark_job import ON_KILL_SECONDS, expand_variables
from airflow_amlrun.targets.spark_main import APPLICATION_ID_TAG, UI_URL_TAG

log = logging.getLogger(__name__)

# In the run's control folder: the code shipped to executors, the driver's launcher, the hook's request.
CODE_ARCHIVE = "code.zip"
LAUNCHER = "spark_main.py"
REQUEST = "spark_request.json"
# The connection for the hook's process (cluster mode), deleted by that process as it reads it.
CONNECTION_FILE = "spark_connection.json"
# The folder executors unpack the shipped environment into (`--archives env.tar.gz#env`).
ARCHIVE_NAME = "env"
# How long the check waits for a standalone master to answer.
CONNECT_TIMEOUT_SECONDS = 5.0
# How much of the end of a failed run's log is searched for why spark-submit failed.
LOG_TAIL_BYTES = 256 * 1024
# In the cache folder: a file per set of Spark packages resolved on this worker (named by its hash).
RESOLVED_PACKAGES_DIR = "spark-packages"
# How long resolving an environment's Spark packages before submission may take; past it, the run goes on
# (spark-submit resolves them again).
RESOLVE_TIMEOUT_SECONDS = 600.0
# How Ivy (spark-submit's package resolver) names a package it could not find: group#artifact;version.
_UNRESOLVED = re.compile(r"(?:module not found|::)\s+([\w.\-]+)#([\w.\-]+);([^\s:]+)(?:: not found)?")

__all__ = ["APPLICATION_ID_TAG", "UI_URL_TAG", "SparkTarget"]


class SparkTarget(LocalTarget):
    """Runs on Spark: spark-submit (through `SparkSubmitHook`) on the worker, under the run's supervisor."""

    kind = "spark"
    handle_type = SparkHandle  # type: ignore[assignment]
    # A pyspark script is a Spark application of the target's master here, not of a Spark of its own.
    local_spark = False

    def __init__(
        self,
        name: str,
        *,
        connection: str,
        master: str,
        deploy_mode: str,
        spark_binary: str,
        settings: Settings,
        cache_dir: Path,
    ) -> None:
        super().__init__(settings, cache_dir, name)
        self.connection = connection
        self.master = master
        self.deploy_mode = deploy_mode
        self.spark_binary = spark_binary

    @classmethod
    def from_connection(cls, name: str, conn: Any, settings: Settings, cache_dir: Path) -> SparkTarget:
        """The target of the Airflow connection `name` (type `spark`), as the registry builds it: the master
        and deploy mode as the provider's hook reads them from the connection."""
        try:
            from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
        except ModuleNotFoundError as err:
            raise UnknownComputeTargetError(
                f"Compute target {name!r} is a Spark connection, and Spark targets need the Spark provider "
                f"({err.name!r} is not installed): pip install 'airflow-amlrun[spark]' on the worker."
            ) from err
        try:
            # Only the master and deploy mode are read here: keytab="" keeps the hook from writing the
            # connection's keytab to a file (the hook of a cluster-mode run's own process does that).
            resolved = SparkSubmitHook(conn_id=name, keytab="")._connection
        except ValueError as err:
            raise ConfigurationError(f"Spark connection {name!r}: {err}") from err
        master = str(resolved["master"])
        deploy_mode = str(resolved["deploy_mode"] or "client")
        if deploy_mode not in ("client", "cluster"):
            raise ConfigurationError(
                f"Spark connection {name!r} has deploy-mode {deploy_mode!r}; set its extra 'deploy-mode' to "
                "'client' or 'cluster'."
            )
        if deploy_mode == "cluster" and (master.startswith("spark://") or master.startswith("local")):
            kind = "a standalone master" if master.startswith("spark://") else "a local master"
            raise ConfigurationError(
                f"Spark connection {name!r} asks for deploy-mode 'cluster' on {kind} ({master}), where Spark "
                "runs Python applications in client mode only. Set the connection's extra 'deploy-mode' to "
                "'client' (the driver then runs on the Airflow worker), or use a YARN or Kubernetes master for "
                "cluster mode."
            )
        return cls(
            name,
            connection=conn.as_json(),
            master=master,
            deploy_mode=deploy_mode,
            spark_binary=str(resolved["spark_binary"] or "spark-submit"),
            settings=settings,
            cache_dir=cache_dir,
        )

    # ------------------------------------------------------------------ the protocol

    def check(self, job: Job) -> None:
        """spark-submit, Java, the master and the environment's Spark packages, looked at now: what is missing
        fails before the run is recorded."""
        if job.script is None:
            raise ConfigurationError(
                f"Compute target {self.name!r} is a Spark connection, which runs a Python script as a Spark "
                f"application; the config gives command={job.command!r}. Use script='train.py' (with "
                "arguments=[...]) instead of command."
            )
        self._spark_submit()
        find_java()
        self._check_master()
        super().check(job)
        self._check_packages(job)

    def prepare(self, job: Job, code: CodeSource) -> None:
        super().prepare(job, code)
        control = self.run_dir(job) / CONTROL_DIR
        _code_archive(self.run_dir(job), control / CODE_ARCHIVE)
        shutil.copyfile(spark_main.__file__, control / LAUNCHER)

    def submit(self, job: Job) -> SparkHandle:
        run_dir = self.run_dir(job).resolve()
        control = run_dir / CONTROL_DIR
        python = self.python(job)
        spark = job.environment.spec.spark
        conf: dict[str, str] = {"spark.pyspark.driver.python": python}
        hook: dict[str, Any] = {
            "name": job.run_id,
            "py_files": str(control / CODE_ARCHIVE),
            "application_args": [job.script, *job.arguments],
        }
        archive = None
        if self.master.startswith("local"):
            # Executors are threads of the driver here: they run the driver's interpreter.
            conf["spark.pyspark.python"] = python
        elif not job.environment.user_managed:
            archive = self._archive(job)
            hook["archives"] = f"{archive.path}#{ARCHIVE_NAME}"
            conf["spark.pyspark.python"] = f"./{ARCHIVE_NAME}/bin/python"
        elif job.environment.spec.python.interpreter_path is not None:
            conf["spark.pyspark.python"] = python
        # else: a user-managed environment uses the cluster's Python.
        conf.update(spark.configuration)
        hook["conf"] = conf
        if spark.packages:
            hook["packages"] = ",".join(spark.packages)
        if spark.repositories:
            # As written, ${VAR} references and all, so that no password is logged or written down; filled in
            # only in the command line spark-submit gets.
            hook["repositories"] = ",".join(spark.repositories)
        if self.deploy_mode == "client":
            argv = self._client_command(hook, str(control / LAUNCHER))
            variables = self._variables()
        else:
            # The driver runs on the cluster: the run's variables go with the submission (not the secret ones),
            # and the hook itself follows the driver there and stops it (spark_job.py).
            hook["env_vars"] = {**job.environment.spec.environment_variables, **job.environment_variables}
            connection = _private_file(control / CONNECTION_FILE, self.connection)
            request = {
                "control": str(control),
                "application": str(control / LAUNCHER),
                "connection_file": str(connection),
                "hook": hook,
            }
            (control / REQUEST).write_text(json.dumps(request))
            argv = [sys.executable, "-I", "-m", "airflow_amlrun.targets.spark_job", str(control / REQUEST)]
            variables = self._variables()
        try:
            return self.start_supervised(
                job,
                argv,
                python,
                functools.partial(
                    SparkHandle,
                    master=self.master,
                    deploy_mode=self.deploy_mode,
                    archive_build_key=archive.build_key if archive else None,
                    archive_interpreter=archive.interpreter if archive else None,
                ),
                variables,
                grace_seconds=_stop_grace(self.deploy_mode),
            )
        except BaseException:
            # Not started (or not known to be): the connection, with its secrets, is not left for nobody to read.
            with contextlib.suppress(OSError):
                os.unlink(control / CONNECTION_FILE)
            raise

    def wait(self, handle: SparkHandle, timeout: float) -> TargetStatus:  # type: ignore[override]
        status = super().wait(handle, timeout)
        if not status.running:
            # Its process reads and deletes it first thing; one that never started left it.
            with contextlib.suppress(OSError):
                os.unlink(Path(handle.run_dir, CONTROL_DIR, CONNECTION_FILE))
        if status.running or not status.exit_code or status.reason:
            return status
        tail = read_control(handle.run_dir, STD_LOG, max(0, _log_size(handle) - LOG_TAIL_BYTES))
        reason = _failure_reason(tail, handle.archive_interpreter)
        return replace(status, reason=reason)

    def cleanup(self, handle: SparkHandle, *, remove_files: bool) -> None:  # type: ignore[override]
        # The connection (with its secrets) of a run stopped before its process read it, should no look at its
        # end have removed it (a start interrupted, found and stopped): never kept with the run's files.
        with contextlib.suppress(OSError):
            os.unlink(Path(handle.run_dir, CONTROL_DIR, CONNECTION_FILE))
        super().cleanup(handle, remove_files=remove_files)

    def stop_grace_seconds(self, handle: SparkHandle) -> float:  # type: ignore[override]
        return _stop_grace(handle.deploy_mode)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "master": self.master,
            "deploy_mode": self.deploy_mode,
            "host": os.uname().nodename,
        }

    # ------------------------------------------------------------------ what a submission needs here

    def _client_command(self, arguments: dict[str, Any], application: str) -> list[str]:
        """spark-submit's command line for a client-mode run, as the provider's SparkSubmitHook builds it from
        the connection, for the run's supervisor to start.

        The driver runs in the run's process group, so stopping the group (cancel, time limit, the task
        killed) ends the application, as the hook's `on_kill` would by ending spark-submit; its output is the
        run's log as it comes (stderr, where Spark logs, joined to stdout, where the driver prints). Starting
        spark-submit here, not through a process running the hook, saves each run an Airflow import.
        """
        from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

        hook = SparkSubmitHook(conn_id=self.name, **arguments)
        command = list(hook._build_spark_submit_command(application))
        for index, word in enumerate(command[:-1]):
            if word == "--repositories":
                command[index + 1] = expand_variables(command[index + 1])
        return ["/bin/sh", "-c", 'exec "$0" "$@" 2>&1', *command]

    def _archive(self, job: Job) -> SparkArchive:
        """The managed environment's archive for the executors; its interpreter path must exist on every node,
        this worker too (a driver in client mode runs the same build here)."""
        archive = ensure_spark_archive(job.environment, self.cache_dir)
        if not os.access(archive.interpreter, os.X_OK):
            raise ConfigurationError(
                f"Environment {job.environment.name!r}: its build for Spark links to the interpreter "
                f"{archive.interpreter}, which this worker lacks, and every node running the archive needs it at "
                "that path. Install that Python there (at that path), or set python.interpreter_path to a "
                "Python every node has."
            )
        return archive

    def _spark_submit(self) -> str:
        """spark-submit on this worker: on PATH, or installed with pyspark beside this interpreter."""
        found = shutil.which(self.spark_binary) or shutil.which(
            self.spark_binary, path=str(Path(sys.executable).parent)
        )
        if found is None:
            raise ConfigurationError(
                f"Compute target {self.name!r}: {self.spark_binary!r} is not on this worker's PATH, nor beside "
                f"its Python ({Path(sys.executable).parent}). Install Spark's client with pyspark in the "
                "worker's environment (pip install 'airflow-amlrun[spark]', which brings pyspark and "
                "spark-submit), or put a Spark distribution's bin/ folder on PATH."
            )
        return found

    def _variables(self) -> dict[str, str]:
        """What spark-submit needs in its environment: its folder on PATH, and pyspark's own Spark as SPARK_HOME
        if no other is set."""
        folder = str(Path(self._spark_submit()).parent)
        variables = {"PATH": f"{folder}:{os.environ.get('PATH', '')}"}
        if "SPARK_HOME" not in os.environ:
            spec = importlib.util.find_spec("pyspark")
            home = Path(spec.origin).parent if spec is not None and spec.origin else None
            if home is not None and (home / "bin" / "spark-submit").exists():
                variables["SPARK_HOME"] = str(home)
        return variables

    def _check_packages(self, job: Job) -> None:
        """The environment's Spark packages must resolve: spark-submit resolves them on this worker (Ivy) before
        anything starts, in every deploy mode, so a package that cannot be found is named now, before the run
        is recorded. A set of packages resolved once on this worker is not resolved again here, and Ivy's
        cache makes the run's own resolution of it quick."""
        spark = job.environment.spec.spark
        if not spark.packages:
            return
        ivy = {k: str(v) for k, v in sorted(spark.configuration.items()) if k.startswith("spark.jars.")}
        key = hashlib.sha256(json.dumps([spark.packages, spark.repositories, ivy]).encode()).hexdigest()
        marker = self.cache_dir / RESOLVED_PACKAGES_DIR / key
        if marker.exists():
            return
        with tempfile.TemporaryDirectory(prefix="amlrun-spark-packages-") as folder:
            application = Path(folder, "resolved.py")
            application.write_text("")
            argv = [self._spark_submit(), "--master", "local[1]", "--packages", ",".join(spark.packages)]
            if spark.repositories:
                argv += ["--repositories", expand_variables(",".join(spark.repositories))]
            for name, value in {**ivy, "spark.ui.enabled": "false"}.items():
                argv += ["--conf", f"{name}={value}"]
            argv += ["--conf", f"spark.pyspark.driver.python={sys.executable}", str(application)]
            try:
                done = subprocess.run(
                    argv,
                    cwd=folder,
                    env={**os.environ, **self._variables()},
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=RESOLVE_TIMEOUT_SECONDS,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                log.warning(
                    "Resolving the Spark packages of environment %r took over %g s; the run goes on, and "
                    "spark-submit resolves them itself.",
                    job.environment.name,
                    RESOLVE_TIMEOUT_SECONDS,
                )
                return
        if done.returncode == 0:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            return
        reason = _unresolved_packages(done.stdout[-LOG_TAIL_BYTES:] + done.stderr[-LOG_TAIL_BYTES:])
        if reason is not None:
            raise ConfigurationError(f"Environment {job.environment.name!r}: {reason}.")
        # Something else failed (not the packages): the run itself will say what.

    def _check_master(self) -> None:
        """A standalone master must answer on its port now; YARN and Kubernetes are reached by spark-submit."""
        if not self.master.startswith("spark://"):
            return
        answered: list[str] = []
        failures: list[str] = []
        for address in self.master.removeprefix("spark://").split(","):
            host, _, port = address.rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_SECONDS):
                    answered.append(address)
            except (OSError, ValueError) as err:
                failures.append(f"{address}: {err}")
        if not answered:
            raise ConfigurationError(
                f"Compute target {self.name!r}: the Spark master {self.master} does not answer "
                f"({'; '.join(failures)}). Start the master (spark-class org.apache.spark.deploy.master.Master "
                "--host HOST --port PORT), or fix the host and port of connection "
                f"{self.name!r}."
            )


def _stop_grace(deploy_mode: str) -> float:
    """How long a stopped run gets on SIGTERM before its group is killed: in cluster mode, the hook's on_kill
    kills the application on the cluster meanwhile."""
    return ON_KILL_SECONDS if deploy_mode == "cluster" else TERM_GRACE_SECONDS


def _private_file(path: Path, text: str) -> Path:
    """Write a new file only this user may read (whatever the umask), never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, 0o600), "w", encoding="utf-8") as stream:
        stream.write(text)
    return path


def _code_archive(run_dir: Path, dest: Path) -> None:
    """Zip the run's code (what is not a run folder) with run_context, for `--py-files`: executors import the
    script's modules from it, and a driver or executor without airflow-amlrun installed finds run_context
    there (under a stand-in package that gives way to an installed one: standin_package.py)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(run_dir.rglob("*")):
            relative = path.relative_to(run_dir)
            if relative.parts[0] in RUN_FOLDERS or path.is_symlink() or not path.is_file():
                continue
            archive.write(path, str(relative))
        from airflow_amlrun import run_context

        if not any(name.startswith("airflow_amlrun/") for name in archive.namelist()):
            # (A snapshot with an airflow_amlrun package of its own ships that one.)
            archive.write(standin_package.__file__, "airflow_amlrun/__init__.py")
            archive.write(run_context.__file__, "airflow_amlrun/run_context.py")


def _log_size(handle: SparkHandle) -> int:
    with contextlib.suppress(OSError):
        return os.stat(Path(handle.run_dir, CONTROL_DIR, STD_LOG)).st_size
    return 0


def _failure_reason(tail: bytes, interpreter: str | None) -> str | None:
    """Why spark-submit failed, when its log says in a way users should not have to dig for.

    :param interpreter: the interpreter the shipped environment's bin/python links to, if one was shipped.
    """
    text = tail.decode("utf-8", errors="replace")
    if interpreter is not None and re.search(
        rf"Cannot run program \"\./{ARCHIVE_NAME}/bin/python\"|{ARCHIVE_NAME}/bin/python.*(No such file|not found)",
        text,
    ):
        return (
            f"an executor could not start the shipped environment's Python: its bin/python links to {interpreter}, "
            "which every node running executors must have at that path (install that Python there, or set the "
            "environment's python.interpreter_path to a Python every node has)"
        )
    return _unresolved_packages(tail)


def _unresolved_packages(output: bytes) -> str | None:
    """What spark-submit's output says of the Spark packages it could not resolve, if it says so."""
    text = output.decode("utf-8", errors="replace")
    unresolved = sorted(
        {
            f"{group}:{artifact}:{version}"
            for group, artifact, version in _UNRESOLVED.findall(text)
            if not artifact.startswith("spark-submit-parent")  # spark-submit's own stand-in, not a package
        }
    )
    if unresolved:
        return (
            f"spark-submit could not resolve the Spark package(s) {', '.join(unresolved)}: check the "
            "environment's spark.packages (group:artifact:version) and spark.repositories"
        )
    return None
