"""A DAG author's view of the Spark target: real spark-submit, a real local[2] master and a standalone master
and worker on 127.0.0.1 (tests/integration/spark_cluster.py), the driver on the worker (client mode)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

import airflow_amlrun
from airflow_amlrun import Environment, Experiment, ScriptRunConfig, Workspace
from airflow_amlrun.environment import PythonSection, SparkSection
from airflow_amlrun.errors import ConfigurationError
from airflow_amlrun.submission import AirflowTask
from tests.conftest import REPO, dag_source, wait_until_running, worker_dies_mid_run, write_script
from tests.integration.orphans import group_members
from tests.integration.spark_cluster import free_port, set_connection

pytestmark = pytest.mark.usefixtures("airflow_db")
pytest_plugins = ["tests.integration.spark_cluster"]

# A pyspark training script: its data file read by relative path on the driver, a module of its own imported
# on the executors, metrics and an output from the driver; and which airflow_amlrun package the driver and an
# executor import.
TRAIN = """
import os, sys
import airflow_amlrun
from pyspark.sql import SparkSession
from airflow_amlrun.run_context import Run
from helpers import square

def package(_):
    import airflow_amlrun
    return airflow_amlrun.__file__, getattr(airflow_amlrun, "__version__", None)

run = Run.get_context()
spark = SparkSession.builder.getOrCreate()
numbers = [int(line) for line in open("data/numbers.txt")]
total = spark.sparkContext.parallelize(numbers, 2).map(square).sum()
print("sum of squares", total, flush=True)
run.log("sum_of_squares", total)
for epoch in range(3):
    run.log("loss", 1.0 / (epoch + 1), step=epoch)
print("warming up the executors", file=sys.stderr, flush=True)
os.makedirs("outputs", exist_ok=True)
open("outputs/model.txt", "w").write(f"weights {total}")
print("master", spark.sparkContext.master, flush=True)
print("driver package", airflow_amlrun.__file__, getattr(airflow_amlrun, "__version__", None), flush=True)
print("executor package", *spark.sparkContext.parallelize([0], 1).map(package).first(), flush=True)
spark.stop()
"""


def spark_source(root, script: str = TRAIN):
    write_script(root, "train.py", script)
    write_script(root, "helpers.py", "def square(x):\n    return x * x\n")
    (root / "data").mkdir()
    (root / "data" / "numbers.txt").write_text("1\n2\n3\n4\n")
    return root


def test_a_pyspark_script_runs_on_a_local_master_with_metrics_log_outputs_and_application(
    run_dag, tmp_path, spark_local
):
    result = run_dag(dag_source(spark_source(tmp_path / "src"), target=spark_local))

    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    assert summary["status"] == "Completed"
    assert summary["target"] == spark_local
    assert summary["metrics"] == {"sum_of_squares": 30, "loss": pytest.approx(1 / 3)}
    # The driver's output, and spark-submit's own, in the task log.
    assert "sum of squares 30" in result.log
    assert "warming up the executors" in result.log
    assert "SparkContext: Running Spark version" in result.log
    assert "master local[2]" in result.log
    # The Spark application, on the run and in the XCom.
    assert summary["tags"]["spark.application_id"].startswith("local-")
    assert summary["tags"]["spark.ui_url"].startswith("http://")
    run = Workspace.get().get_run(summary["run_id"])
    assert run.tags["spark.application_id"] == summary["tags"]["spark.application_id"]
    assert run.handle["master"] == "local[2]" and run.handle["deploy_mode"] == "client"
    assert Path(summary["outputs_uri"], "model.txt").read_text() == "weights 30"
    # The installed airflow_amlrun, on the driver and on the executors: the code archive's copy of run_context
    # shadows nothing.
    installed = f"{REPO / 'airflow_amlrun' / '__init__.py'} {airflow_amlrun.__version__}"
    assert f"driver package {installed}" in result.log
    assert f"executor package {installed}" in result.log


def test_the_same_pyspark_script_runs_on_the_local_target_with_framework_pyspark(
    run_dag, tmp_path, amlrun_home
):
    source = spark_source(tmp_path / "src")

    result = run_dag(dag_source(source, framework="pyspark"))

    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    assert summary["target"] == "local"
    assert summary["metrics"] == {"sum_of_squares": 30, "loss": pytest.approx(1 / 3)}
    assert summary["environment"]["framework"] == "pyspark"
    assert "sum of squares 30" in result.log
    # A local Spark of the script's own, its Python workers on the run's interpreter.
    assert "master local[*]" in result.log


def test_a_pyspark_script_whose_interpreter_lacks_pyspark_is_refused_before_anything_is_recorded(
    tmp_path, amlrun_home
):
    source = spark_source(tmp_path / "src")
    plain = Environment("plain", python=PythonSection(interpreter_path="/usr/bin/python3"))
    config = ScriptRunConfig(str(source), script="train.py", environment=plain, framework="pyspark")

    with pytest.raises(
        ConfigurationError,
        match=r"interpreter /usr/bin/python3 of compute target 'local' cannot import pyspark\. Add pyspark to the environment",
    ):
        Experiment(Workspace.get(), "refused").submit(config)
    assert Workspace.get().list_runs() == []


def test_a_standalone_master_runs_the_script_in_client_mode_with_the_environments_spark_section(
    run_dag, tmp_path, spark_standalone, standalone_cluster, maven_repository
):
    source = spark_source(
        tmp_path / "src",
        TRAIN.replace(
            'print("master"',
            'print("marker", spark.conf.get("spark.amlrun.marker"), "executor memory", '
            'spark.conf.get("spark.executor.memory"), flush=True)\n'
            'print("jars", spark.conf.get("spark.jars"), flush=True)\nprint("master"',
        ),
    )
    configuration = {
        "spark.amlrun.marker": "from-env",
        "spark.executor.memory": "512m",
        "spark.jars.ivy": str(tmp_path / "ivy"),
    }
    environment = (
        f'Environment("spark-conf", spark=SparkSection(packages=[{maven_repository.package!r}], '
        f"repositories=[{maven_repository.url!r}], configuration={configuration!r}))"
    )

    result = run_dag(dag_source(source, target=spark_standalone, environment=environment))

    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    assert summary["metrics"] == {"sum_of_squares": 30, "loss": pytest.approx(1 / 3)}
    assert f"master {standalone_cluster.master_url}" in result.log
    assert "marker from-env executor memory 512m" in result.log
    # The package, resolved from the repository, is on the application's classpath.
    assert re.search(r"jars \S*org\.example\.amlrun_hello-1\.0\.jar", result.log), result.log
    application = summary["tags"]["spark.application_id"]
    assert application.startswith("app-")
    # The environment's spark section is recorded with the run.
    assert summary["environment"]["spark"] == {
        "packages": [maven_repository.package],
        "repositories": [maven_repository.url],
        "configuration": configuration,
    }
    # The application ran on the standalone cluster, named by the run, and is over.
    completed = {app["id"]: app for app in standalone_cluster.state()["completedapps"]}
    assert completed[application]["name"] == summary["run_id"]
    assert completed[application]["state"] == "FINISHED"


def test_cluster_deploy_mode_on_a_standalone_master_is_refused_before_anything_is_recorded(
    tmp_path, amlrun_home, monkeypatch
):
    conn = set_connection(
        monkeypatch, "spark_cluster_mode", "spark://127.0.0.1:7077", **{"deploy-mode": "cluster"}
    )
    config = ScriptRunConfig(str(spark_source(tmp_path / "src")), script="train.py", compute_target=conn)

    with pytest.raises(
        ConfigurationError,
        match=r"Spark connection 'spark_cluster_mode' asks for deploy-mode 'cluster' on a standalone master "
        r"\(spark://127\.0\.0\.1:7077\), where Spark runs Python applications in client mode only\. Set the "
        r"connection's extra 'deploy-mode' to 'client'",
    ):
        Experiment(Workspace.get(), "refused").submit(config)
    assert Workspace.get().list_runs() == []


SHIPPED = """
import sys
from pyspark.sql import SparkSession
from airflow_amlrun.run_context import Run

def on_executor(x):
    import tomli_w  # only in the shipped environment
    from airflow_amlrun import run_context  # from the code archive: not installed there
    return sys.executable, tomli_w.dumps({"x": x}), run_context.__file__

run = Run.get_context()
spark = SparkSession.builder.getOrCreate()
results = spark.sparkContext.parallelize([1, 2, 3], 3).map(on_executor).collect()
for python, text, module in results:
    print("executor python", python, "wrote", text.strip(), "run_context", module, flush=True)
print("driver run_context", sys.modules["airflow_amlrun.run_context"].__file__, flush=True)
run.log("rows", len(results))
spark.stop()
"""


def test_a_managed_environment_ships_to_the_executors_as_an_archive_built_once_from_its_lock(
    run_dag, tmp_path, spark_standalone, amlrun_home
):
    source = spark_source(tmp_path / "src", SHIPPED)
    environment = 'Environment("shipped", python=PythonSection(pip_requirements=["tomli-w==1.0.0"]))'

    result = run_dag(dag_source(source, target=spark_standalone, environment=environment))

    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    assert summary["metrics"] == {"rows": 3}
    # The executors ran the environment unpacked from the archive, in their own working folders.
    pythons = re.findall(r"executor python (\S+) wrote x = (\d) run_context (\S+)", result.log)
    assert sorted({x for _, x, _ in pythons}) == ["1", "2", "3"]
    assert all(python.endswith("/env/bin/python") for python, _, _ in pythons), pythons
    assert all("/runs/" not in python for python, _, _ in pythons), pythons
    # Neither has airflow-amlrun installed: the driver and the executors import run_context from the code
    # archive.
    assert all(module.endswith("code.zip/airflow_amlrun/run_context.py") for _, _, module in pythons), pythons
    assert re.search(r"driver run_context \S+code\.zip/airflow_amlrun/run_context\.py", result.log), (
        result.log
    )
    # Built once, from the lock, by the environment's build key, which the run records with the interpreter
    # every node needs.
    shipped = summary["environment"]["spark_archive"]
    assert shipped["build_key"] == summary["environment"]["build_key"]
    assert Path(shipped["interpreter"]).exists()
    archive = amlrun_home / "cache" / "spark-archives" / f"{shipped['build_key']}.tar.gz"
    assert archive.is_file()
    built = archive.stat().st_mtime_ns

    again = run_dag(dag_source(source, target=spark_standalone, environment=environment))

    assert again.state == "success", again.log
    assert again.xcoms["train"]["environment"]["spark_archive"] == shipped
    assert archive.stat().st_mtime_ns == built


TRAINS_ON_THE_CLUSTER_FOR_GOOD = """
import time
print("driver started", flush=True)
from pyspark.sql import SparkSession

spark = SparkSession.builder.getOrCreate()
print("training on the cluster", flush=True)
spark.sparkContext.parallelize([1], 1).map(lambda x: time.sleep(300)).collect()
"""


def _wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_killing_the_task_kills_the_spark_application_and_the_driver(
    run_dag, tmp_path, spark_standalone, standalone_cluster, amlrun_home
):
    source = spark_source(tmp_path / "src", TRAINS_ON_THE_CLUSTER_FOR_GOOD)
    seen: dict[str, object] = {}

    def kill_task_once_the_application_runs() -> None:
        # What Airflow does to a task it stops: SIGTERM to the task process, whose handler calls on_kill.
        running = wait_until_running(timeout=120)
        if running is None:
            return

        def application() -> str | None:
            # The application is named by the run (spark-submit --name).
            apps = standalone_cluster.state()["activeapps"]
            return next(
                (app["id"] for app in apps if app["name"] == running.id and app["state"] == "RUNNING"), None
            )

        log = amlrun_home / "runs" / running.id / ".amlrun" / "std_log.txt"
        training = lambda: b"training on the cluster" in log.read_bytes()  # noqa: E731
        if _wait_for(lambda: application() is not None, timeout=120) and _wait_for(training):
            seen["application"] = application()
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill_task_once_the_application_runs)
    killer.start()
    result = run_dag(dag_source(source, target=spark_standalone))
    killer.join()

    assert seen, f"the application never ran:\n{result.log}"
    assert result.state == "failed"
    [run] = Workspace.get().list_runs()
    assert run.status == "Canceled"
    assert "training on the cluster" in result.log
    assert run.tags["spark.application_id"] == seen["application"]
    # The application is over on the cluster, and nothing of the run (spark-submit, the driver) runs here.
    assert _wait_for(
        lambda: seen["application"] in {a["id"] for a in standalone_cluster.state()["completedapps"]}
    ), standalone_cluster.state()
    assert seen["application"] not in {a["id"] for a in standalone_cluster.state()["activeapps"]}
    assert group_members(int(run.handle["pid"])) == []


def _refused(config: ScriptRunConfig, message: str) -> None:
    """Submitting the config fails with the message, and leaves no run behind."""
    with pytest.raises(ConfigurationError, match=message):
        Experiment(Workspace.get(), "refused").submit(config)
    assert Workspace.get().list_runs() == []


def test_missing_spark_submit_java_or_master_are_named_before_anything_is_recorded(
    tmp_path, amlrun_home, monkeypatch, spark_local
):
    source = str(spark_source(tmp_path / "src"))
    binary = set_connection(monkeypatch, "spark_binary", "local[2]", **{"spark-binary": "spark3-submit"})
    _refused(
        ScriptRunConfig(source, script="train.py", compute_target=binary),
        r"Compute target 'spark_binary': 'spark3-submit' is not on this worker's PATH, nor beside its Python "
        r".*pip install 'airflow-amlrun\[spark\]', which brings pyspark and spark-submit",
    )

    unreachable = set_connection(monkeypatch, "spark_away", f"spark://127.0.0.1:{free_port()}")
    _refused(
        ScriptRunConfig(source, script="train.py", compute_target=unreachable),
        r"Compute target 'spark_away': the Spark master spark://127\.0\.0\.1:\d+ does not answer \(127\.0\.0\.1:\d+: "
        r".*refused\)\. Start the master",
    )

    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    _refused(
        ScriptRunConfig(source, script="train.py", compute_target=spark_local),
        rf"JAVA_HOME is '{tmp_path}', which has no bin/java: spark-submit needs Java",
    )
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path))
    _refused(
        ScriptRunConfig(source, script="train.py", compute_target=spark_local),
        r"spark-submit needs Java, and there is no java on this worker's PATH .*apt-get install -y "
        r"default-jre-headless",
    )


def test_a_spark_package_that_cannot_be_resolved_is_named_before_anything_is_recorded(
    tmp_path, spark_local, maven_repository
):
    environment = Environment(
        "bad-package",
        spark=SparkSection(
            packages=["org.example.amlrun:no-such-thing:0.0.1", maven_repository.package],
            repositories=[maven_repository.url],
            configuration={"spark.jars.ivy": str(tmp_path / "ivy")},
        ),
    )
    config = ScriptRunConfig(
        str(spark_source(tmp_path / "src")),
        script="train.py",
        compute_target=spark_local,
        environment=environment,
    )

    _refused(
        config,
        r"Environment 'bad-package': spark-submit could not resolve the Spark package\(s\) "
        r"org\.example\.amlrun:no-such-thing:0\.0\.1: check the environment's spark\.packages "
        r"\(group:artifact:version\) and spark\.repositories",
    )


def test_a_spark_run_past_its_max_duration_is_stopped_with_its_driver(
    run_dag, tmp_path, spark_local, monkeypatch
):
    # Waits this long: what stops the run at its limit is its supervisor on the worker, not the task.
    monkeypatch.setenv("AIRFLOW__AMLRUN__POLL_INTERVAL_SECONDS", "120")
    source = spark_source(tmp_path / "src", TRAINS_ON_THE_CLUSTER_FOR_GOOD)

    result = run_dag(dag_source(source, target=spark_local, limit=20))

    assert result.state == "failed"
    [run] = Workspace.get().list_runs()
    assert run.status == "Failed"
    assert run.error == "Exceeded max_run_duration_seconds=20; the run was stopped."
    # (How far the driver got in 20 s depends on the machine's load: it had started.)
    assert "driver started" in result.log
    assert group_members(int(run.handle["pid"])) == []


def test_the_example_spark_dag_trains_a_model_with_mllib(run_dag, tmp_path, spark_local):
    dag = (REPO / "dags" / "train_spark.py").read_text()
    shutil.copytree(REPO / "dags" / "train_spark", tmp_path / "train_spark")
    dag = dag.replace('source_directory="train_spark"', f"source_directory={str(tmp_path / 'train_spark')!r}")

    result = run_dag(dag.replace('dag_id="train_spark"', 'dag_id="DAG_ID"'), reg_param=0.0)

    assert result.state == "success", result.log
    summary = result.xcoms["train"]
    assert summary["metrics"]["r2"] > 0.95
    assert summary["tags"]["reg_param"] == "0.0"
    model = json.loads(Path(summary["outputs_uri"], "model.json").read_text())
    assert model["weights"] == pytest.approx([3.0, -2.0, 0.5, 1.5], abs=0.05)


def test_a_retry_after_the_task_process_died_follows_the_driver_still_running_on_the_worker(
    tmp_path, spark_local
):
    source = spark_source(
        tmp_path / "src",
        """
        import os, time
        from pyspark.sql import SparkSession
        from airflow_amlrun.run_context import Run

        os.makedirs("outputs", exist_ok=True)
        open("outputs/starts.txt", "a").write("started\\n")
        spark = SparkSession.builder.getOrCreate()
        run = Run.get_context()
        for epoch in range(6):
            print(f"epoch {epoch}", flush=True)
            run.log("loss", 1 / (epoch + 1), step=epoch)
            time.sleep(1)
        spark.stop()
        print("finished", flush=True)
        """,
    )
    # Try 1: a task process that submits the run, then is killed while spark-submit starts the driver.
    orphan = worker_dies_mid_run(source, spark_local, settle=2.0)
    assert orphan.status == "Running"

    # Try 2: the same task instance finds the run's supervisor alive on this worker and follows it.
    task = AirflowTask(dag_id="retrain", task_id="train", run_id="manual_1", map_index=None, try_number=2)
    config = ScriptRunConfig(str(source), script="train.py", compute_target=spark_local)
    lines: list[str] = []
    record = (
        Experiment(Workspace.get(), "reattach")
        .submit(config, airflow_task=task)
        .wait_for_completion(output=lines.append)
    )

    assert record.id == orphan.id
    assert record.status == "Completed" and record.try_number == 2
    assert [line for line in lines if line.startswith("epoch ")] == [f"epoch {n}" for n in range(6)]
    assert "finished" in lines
    assert [p.step for p in Workspace.get().history.get_metrics(record.id, "loss")] == list(range(6))
    assert record.tags["spark.application_id"].startswith("local-")
    assert Path(record.outputs_uri, "starts.txt").read_text() == "started\n"  # the application ran once
    assert [run.id for run in Workspace.get().list_runs()] == [orphan.id]


# Cluster mode (YARN): spark-submit and YARN's CLI are stand-ins (tests/integration/spark_cluster.py: no YARN
# cluster is reachable here); the target, the supervisor, the hook's process and the provider's hook are real.


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cluster_mode_run(tmp_path: Path, conn_id: str, limit: float | None = None):
    source = str(spark_source(tmp_path / "src"))
    config = ScriptRunConfig(
        source, script="train.py", compute_target=conn_id, max_run_duration_seconds=limit
    )
    return Experiment(Workspace.get(), "on-yarn").submit(config)


def test_a_cluster_mode_run_keeps_the_connections_secrets_out_of_every_process_environment(
    tmp_path, yarn_cluster_mode
):
    yarn = yarn_cluster_mode
    run = _cluster_mode_run(tmp_path, yarn.conn_id)
    submitted = yarn.submission()
    control = Path(run.handle.run_dir) / ".amlrun"
    # What runs for the run on the worker: its supervisor, the hook's process, spark-submit.
    processes = {*group_members(run.handle.pid), submitted["pid"]}
    environments = {pid: Path(f"/proc/{pid}/environ").read_bytes() for pid in processes}
    connection_file_left = [path.name for path in control.iterdir() if "connection" in path.name]
    yarn.finish()
    record = run.wait_for_completion(show_output=False)

    assert record.status == "Completed"
    assert len(environments) >= 3, environments.keys()
    for pid, environment in environments.items():
        for secret in (yarn.password, yarn.keytab_base64, yarn.keytab.decode()):
            assert secret.encode() not in environment, (
                f"process {pid} has a secret of the connection in its environment"
            )
    assert connection_file_left == []
    # The hook had the connection all the same: its master, deploy mode, queue and keytab reached spark-submit.
    argv = submitted["argv"]
    assert argv[argv.index("--master") + 1] == "yarn"
    assert argv[argv.index("--deploy-mode") + 1] == "cluster"
    assert argv[argv.index("--queue") + 1] == "q-amlrun"
    keytab = Path(argv[argv.index("--keytab") + 1])
    assert keytab.read_bytes() == yarn.keytab
    assert keytab.stat().st_mode & 0o777 == 0o600
    # The application on the cluster, as the hook learned it, is on the run.
    assert record.tags["spark.application_id"] == yarn.application
    assert record.tags["spark.ui_url"] == f"http://127.0.0.1:8088/proxy/{yarn.application}/"


@pytest.mark.parametrize("stop", ["cancel", "time limit"])
def test_stopping_a_cluster_mode_run_waits_for_the_hook_to_kill_the_application(
    tmp_path, yarn_cluster_mode, stop
):
    yarn = yarn_cluster_mode
    run = _cluster_mode_run(tmp_path, yarn.conn_id, limit=10 if stop == "time limit" else None)
    submitted = yarn.submission()

    if stop == "cancel":
        run.cancel()
        record = Workspace.get().get_run(run.id)
        assert record.status == "Canceled"
    else:
        record = run.wait_for_completion(show_output=False, raise_on_error=False)
        assert record.status == "Failed"
        assert record.error == "Exceeded max_run_duration_seconds=10; the run was stopped."

    # The hook's on_kill killed the application on YARN, and was let finish though that took longer than the
    # grace a plain run gets; nothing of the run is left running on the worker.
    assert yarn.yarn_calls() == [
        f"application -kill {yarn.application} {what}" for what in ("started", "done")
    ]
    assert not _alive(submitted["pid"])
    assert group_members(int(run.handle.pid)) == []
