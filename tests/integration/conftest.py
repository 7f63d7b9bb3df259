"""Fixtures shared by the integration test modules: the SSH test host and a LocalExecutor Airflow deployment
(one per session each, whichever module asks first), and `target`, each compute target a scenario runs on."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import airflow  # noqa: F401  (see below)
import pytest

from tests.integration.airflow_cluster import AirflowCluster
from tests.integration.orphans import group_members
from tests.integration.private_postgres import PrivatePostgres, private_postgres
from tests.integration.sshd_host import SshdHost, host_for_tests

# Airflow configures the process's logging as it is first imported, replacing the root logger's handlers, and with
# them the one through which a test's caplog sees records: imported here, before any test, rather than inside
# one (the first connection a test reads, the first DAG it runs), whose caplog would then see nothing.

# The Airflow connection through which the scenarios reach the SSH test host.
SSH_CONN_ID = "ssh_vm"


# `make test` runs the browser and integration tests on two processes (pytest-xdist), each module as a whole in
# one of them, so that what a module starts is started once. The work is handed out longest first, so that the
# two processes end close together: first the modules that share `local_cluster` (together about four minutes
# on the two-core machine the suite runs on), one after another in one process, then the modules below, each
# a minute or more; then the rest in the order pytest collects them.
LOCAL_CLUSTER_ORDER = (
    # The reattach scenarios' own CeleryExecutor deployment comes and goes before `local_cluster` starts.
    ("test_scheduler_reattach.py", "CeleryExecutor"),
    ("test_hyperdrive_airflow.py", None),
    ("test_task_log_levels.py", None),
    ("test_scheduler_reattach.py", "LocalExecutor"),
)
SLOWEST_FIRST = (
    "test_spark_target.py",
    "test_deferrable.py",
    "test_compose.py",
    "test_reconcile.py",
    "test_ssh_target.py",
    "test_targets.py",
    "test_docker_restart.py",
    "test_ui.py",
    "test_hyperdrive.py",
)
LOCAL_CLUSTER_MODULES = frozenset(module for module, _ in LOCAL_CLUSTER_ORDER)


def _local_cluster_rank(item: pytest.Item) -> int | None:
    callspec = getattr(item, "callspec", None)
    executor = callspec.params.get("cluster") if callspec is not None else None
    key = (item.path.name, executor)
    return LOCAL_CLUSTER_ORDER.index(key) if key in LOCAL_CLUSTER_ORDER else None


def _rank(item: pytest.Item) -> tuple[int, int]:
    cluster = _local_cluster_rank(item)
    if cluster is not None:
        return (0, cluster)
    name = item.path.name
    return (1, SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST))


@pytest.hookimpl(trylast=True)  # after pytest has grouped the tests by their parametrised fixtures
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort: within a rank, modules and their tests keep the order pytest gave them.
    items.sort(key=_rank)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With -n: each module's tests in one process, the local_cluster modules all in one, handed out in the
    order of the collection above (xdist's own would hand out the modules with the most tests first)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        # A scope is a unit of work, given to one process as a whole.
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "local_cluster" if module.rsplit("/", 1)[-1] in LOCAL_CLUSTER_MODULES else module

    config.option.loadscopereorder = False
    return ByModule(config, log)


_local_clusters: list[AirflowCluster] = []


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[AirflowCluster]:
    """A LocalExecutor deployment (scheduler, dag-processor, triggerer, api-server) for the tests that need
    nothing else of one: starting one costs about half a minute. Its tests write DAGs of their own ids, and
    kill only the processes of their own tasks. It is stopped after the last of them (see below)."""
    with AirflowCluster() as started:
        _local_clusters.append(started)
        yield started


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop `local_cluster` once the tests that share it are done (they run one after another), rather than
    leave it idling, a scheduler, a triggerer and an api-server, while this process runs other modules."""
    last_of_them = nextitem is None or _local_cluster_rank(nextitem) is None
    if _local_clusters and _local_cluster_rank(item) is not None and last_of_them:
        _local_clusters.pop().stop()  # safe to call again when the session ends


@pytest.fixture
def own_postgres(amlrun_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivatePostgres]:
    """The workspace's history on a PostgreSQL server of this test's own."""
    with private_postgres() as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_AMLRUN_DEFAULT",
            json.dumps(
                {
                    "conn_type": "amlrun",
                    "extra": {"database_url": server.url, "store_url": str(amlrun_home / "store")},
                }
            ),
        )
        yield server


def xdist_worker() -> int:
    """This process's number among the suite's (pytest-xdist's gw0, gw1, ...); 0 when it runs alone."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


@pytest.fixture(scope="session")
def ssh_host() -> Iterator[SshdHost]:
    """The remote VM: sshd in a network namespace with its own address, user and host key; each process of
    the suite has one of its own, as has each test session on the machine (subnets 1-3 are first offered to the
    SSH tests' own hosts and the benchmark)."""
    worker = xdist_worker()
    host = host_for_tests(
        user=f"amlrun-remote{worker}-{os.getpid()}", subnet=0 if worker == 0 else 3 + worker
    )
    try:
        yield host
    finally:
        host.stop()


@dataclass(frozen=True)
class Target:
    """A compute target a scenario runs on, and how a test sees its runs from this machine.

    :param name: the config's compute_target.
    :param kind: local, docker or ssh.
    :param where: the machine, as a run's messages name it.
    :param runs: the folder of the run directories, as this machine sees it (the SSH test host's files are
        this machine's; a Docker run's folder is bind-mounted from here).
    :param python: the interpreter a script runs under there.
    :param outside: a folder outside every run directory that the run's user may write.
    :param docker: the Docker Engine's API client, for the docker target.
    :param in_container: the run directory as a script in a container sees it.
    :param says: how the target's messages about a run's files on its machine begin.
    :param work: the folder of a run's folder (under `runs`) that is the script's run directory, when it is
        not the run's folder itself (docker: the folder bind-mounted into the container).
    """

    name: str
    kind: str
    where: str
    runs: Path
    python: str
    outside: Path
    docker: Any = None
    in_container: str | None = None
    says: str = ""
    work: str | None = None

    def run_dir(self, run_id: str) -> Path:
        """The script's run directory (its working directory), as this machine sees it."""
        return self.runs / run_id / self.work if self.work else self.runs / run_id

    def script_dir(self, run_id: str) -> str:
        """The run directory as the script sees it: its working directory."""
        return self.in_container or str(self.run_dir(run_id))

    def still_running(self, run_id: str, pids: Iterable[int] = (), group: int | None = None) -> list[str]:
        """What of a run still runs on the target: its containers (docker: a container's pids are not this
        machine's, and `pids` and `group` are not looked at), or those of `pids` and of the members of process
        group `group` that live (local, and the SSH host, whose processes this machine sees: its namespace
        has a network of its own, not pids of its own)."""
        if self.docker is not None:
            from tests.integration.docker_engine import containers_of

            return [
                f"container {c['Id'][:12]} ({c['State']})"
                for c in containers_of(self.docker, run_id)
                if c["State"] in ("running", "restarting", "paused")
            ]
        members = set(group_members(group)) if group is not None else set()
        return [f"process {pid}" for pid in sorted(members | {p for p in pids if alive(p)})]

    def containers(self, run_id: str) -> list[str]:
        """The containers of a run on the target, whatever their state (none but on docker)."""
        if self.docker is None:
            return []
        from tests.integration.docker_engine import containers_of

        return [f"container {c['Id'][:12]} ({c['State']})" for c in containers_of(self.docker, run_id)]


def alive(pid: int) -> bool:
    """Whether a process of this machine runs (a zombie has ended all the same)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(params=["local", "docker", "ssh"])
def target(
    request: pytest.FixtureRequest, amlrun_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Target:
    """Each compute target in turn, with a fresh workspace: the worker's own processes, the local Docker
    Engine (a module asking for it declares ``pytest_plugins = ["tests.integration.docker_engine"]``), and
    the SSH test host through connection `ssh_vm`. A module narrows the targets with
    ``@pytest.mark.parametrize("target", [...], indirect=True)``, and adds "spark" (connection `spark_local`,
    master local[2]) to a scenario that fits a Spark application."""
    runs = (amlrun_home / "runs").resolve()
    if request.param == "spark":
        # Not among the default params: a scenario that fits Spark names it (spark-submit, local[2]).
        from tests.integration.spark_cluster import LOCAL_CONN_ID, set_connection, spark_variables

        for key, value in spark_variables().items():
            monkeypatch.setenv(key, value)
        set_connection(monkeypatch, LOCAL_CONN_ID, "local[2]")
        return Target(
            LOCAL_CONN_ID, "spark", f"worker {os.uname().nodename!r}", runs, sys.executable, tmp_path
        )
    if request.param == "local":
        return Target("local", "local", f"worker {os.uname().nodename!r}", runs, sys.executable, tmp_path)
    if request.param == "docker":
        api = request.getfixturevalue("docker_home")
        return Target(
            "docker",
            "docker",
            "docker",
            runs,
            "/usr/bin/python3",
            tmp_path,
            docker=api,
            in_container="/amlrun/run",
            work="run",
        )
    host: SshdHost = request.getfixturevalue("ssh_host")
    monkeypatch.setenv(f"AIRFLOW_CONN_{SSH_CONN_ID.upper()}", host.connection())
    return Target(
        SSH_CONN_ID,
        "ssh",
        f"host {host.address}",
        host.home / ".amlrun" / "runs",
        "/usr/bin/python3",
        host.home,
        says=f"Host {host.address}: ",
    )
