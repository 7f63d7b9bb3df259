"""Overhead of a ScriptRunOperator task over the stock operator running the same script, per target.

Target `plain` measures the entry point without Airflow instead: a fresh `python submit.py` process doing the
five steps of a script (Workspace.get, Experiment, ScriptRunConfig, submit, wait_for_completion) on the local
target, against `python train.py` run directly, alternating, after a warm-up of each. It prints the same
medians (wall time of the process), its ratio, and the CPU time of each process and its children
(`*_cpu_median_s`): every task under a real executor is such a fresh process.

For each target, both tasks run the same 2-second training script, as Airflow runs them (dag.test on a
migrated AIRFLOW_HOME), in this one process, alternating, for several rounds after a warm-up round of each.
Baselines: local -> BashOperator (`python train.py`); other targets bring their own case module
(`benchmarks/overhead_<target>.py`) with the provider's stock operator. Prints one JSON object per target:
  amlrun_median_s / baseline_median_s: median task duration as Airflow records it (start to end),
  ratio: their quotient,
  *_dag_test_median_s, dag_test_ratio: the same for the whole dag.test() call,
  *_first_s: the first (warm-up) task of each kind, which pays the one-time costs of the process.

    python benchmarks/overhead.py [--targets plain,local,docker,ssh,spark,deferrable] [--rounds 5] [--seconds 2]

Target `deferrable` runs under a real scheduler and triggerer (LocalExecutor, its own AIRFLOW_HOME and
PostgreSQL databases, see tests/integration/airflow_cluster.py) a `--deferred-seconds` (60) script as a
deferred ScriptRunOperator on the local target against BashOperator, which has no deferrable mode, alternating.
Besides the median DAG-run durations and their ratio it prints the worker-slot seconds each task held: how long
a task runner process of the task instance was alive (looked at every 0.1 s), the deferred task's two
executions (submit, then execute_complete) together.

A case module defines `prepare(root, source, seconds) -> (amlrun_dag_text, baseline_dag_text)` (DAG ids
`overhead_<target>_amlrun` and `overhead_<target>_baseline`), `BASELINE` (a description) and optionally
`teardown()`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

TRAIN = """
import sys, time
from airflow_amlrun.run_context import Run

run = Run.get_context()
seconds = float(sys.argv[1])
for epoch in range(4):
    time.sleep(seconds / 4)
    run.log("loss", 1.0 / (epoch + 1), step=epoch)
    print(f"epoch {epoch} done", flush=True)
"""

LOCAL_AMLRUN = """
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG("overhead_local_amlrun", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    ScriptRunOperator(
        task_id="train",
        experiment="overhead",
        config=ScriptRunConfig({source!r}, script="train.py", arguments=[{seconds!r}]),
    )
"""

LOCAL_BASELINE = """
import pendulum
from airflow.sdk import DAG
from airflow.providers.standard.operators.bash import BashOperator

with DAG("overhead_local_baseline", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    BashOperator(task_id="train", bash_command={command!r}, cwd={source!r})
"""


PLAIN_SUBMIT = """
import sys
from airflow_amlrun import Experiment, ScriptRunConfig, Workspace

ws = Workspace.get()
experiment = Experiment(ws, "overhead")
config = ScriptRunConfig({source!r}, script="train.py", arguments=[{seconds!r}])
record = experiment.submit(config).wait_for_completion()
if record.status != "Completed":
    sys.exit(f"the run ended {{record.status}}: {{record.error}}")
"""


class LocalCase:
    BASELINE = "BashOperator running the same script with the same interpreter"

    @staticmethod
    def prepare(root: Path, source: Path, seconds: float) -> tuple[str, str]:
        return (
            LOCAL_AMLRUN.format(source=str(source), seconds=seconds),
            LOCAL_BASELINE.format(command=f"{sys.executable} train.py {seconds}", source=str(source)),
        )


def case(target: str) -> Any:
    if target == "local":
        return LocalCase
    sys.path.insert(0, str(Path(__file__).parent))
    return importlib.import_module(f"overhead_{target}")


def setup_airflow(root: Path, *, migrate: bool) -> Path:
    home = root / "airflow"
    dags = home / "dags"
    dags.mkdir(parents=True)
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__AMLRUN__HOME": str(root / "amlrun"),
        }
    )
    if migrate:
        subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True
        )
    return dags


def load(dags: Path, name: str, text: str) -> Any:
    import importlib.util

    path = dags / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def measure(dag: Any) -> tuple[float, float]:
    started = time.perf_counter()
    dag_run = dag.test()
    wall = time.perf_counter() - started
    [ti] = dag_run.get_task_instances()
    if str(ti.state) != "success":
        raise SystemExit(f"{dag.dag_id} did not succeed: {ti.state}")
    return (ti.end_date - ti.start_date).total_seconds(), wall


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall time of a fresh process, and the CPU time it and its children used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def run_plain(root: Path, source: Path, rounds: int, seconds: float) -> dict[str, Any]:
    submit = root / "submit.py"
    submit.write_text(PLAIN_SUBMIT.format(source=str(source), seconds=seconds))
    commands = {
        "amlrun": [sys.executable, str(submit)],
        "baseline": [sys.executable, "train.py", str(seconds)],
    }
    # Warm-up: the first process of each kind finds the operating system's file cache cold.
    first = {name: timed(command, source)[0] for name, command in commands.items()}
    times: dict[str, list[tuple[float, float]]] = {"amlrun": [], "baseline": []}
    for _ in range(rounds):
        for name, command in commands.items():
            times[name].append(timed(command, source))

    def median(name: str, index: int) -> float:
        return round(statistics.median(t[index] for t in times[name]), 3)

    return {
        "target": "plain",
        "rounds": rounds,
        "script_seconds": seconds,
        "amlrun_median_s": median("amlrun", 0),
        "baseline_median_s": median("baseline", 0),
        "ratio": round(median("amlrun", 0) / median("baseline", 0), 3),
        "amlrun_cpu_median_s": median("amlrun", 1),
        "baseline_cpu_median_s": median("baseline", 1),
        "amlrun_first_s": round(first["amlrun"], 3),
        "baseline_first_s": round(first["baseline"], 3),
        "baseline": "python train.py in a fresh process, the same interpreter",
    }


def run_target(
    target: str, root: Path, dags: Path, source: Path, rounds: int, seconds: float
) -> dict[str, Any]:
    module = case(target)
    amlrun_text, baseline_text = module.prepare(root, source, seconds)
    try:
        amlrun = load(dags, f"overhead_{target}_amlrun", amlrun_text)
        baseline = load(dags, f"overhead_{target}_baseline", baseline_text)
        # Warm-up: the first task of each kind pays one-time costs in this process (imports, the schema
        # check, a cold snapshot); they are reported apart, as *_first_s, not mixed into the medians.
        first = {"amlrun": measure(amlrun)[0], "baseline": measure(baseline)[0]}
        times: dict[str, list[tuple[float, float]]] = {"amlrun": [], "baseline": []}
        for _ in range(rounds):
            times["amlrun"].append(measure(amlrun))
            times["baseline"].append(measure(baseline))
    finally:
        if hasattr(module, "teardown"):
            module.teardown()

    def median(name: str, index: int) -> float:
        return round(statistics.median(t[index] for t in times[name]), 3)

    return {
        "target": target,
        "rounds": rounds,
        "script_seconds": seconds,
        "amlrun_median_s": median("amlrun", 0),
        "baseline_median_s": median("baseline", 0),
        "ratio": round(median("amlrun", 0) / median("baseline", 0), 3),
        "amlrun_dag_test_median_s": median("amlrun", 1),
        "baseline_dag_test_median_s": median("baseline", 1),
        "dag_test_ratio": round(median("amlrun", 1) / median("baseline", 1), 3),
        "amlrun_first_s": round(first["amlrun"], 3),
        "baseline_first_s": round(first["baseline"], 3),
        "baseline": module.BASELINE,
    }


DEFERRED_AMLRUN = """
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    ScriptRunOperator(
        task_id="train",
        experiment="overhead",
        config=ScriptRunConfig({source!r}, script="train.py", arguments=[{seconds!r}]),
        deferrable=True,
    )
"""

DEFERRED_BASELINE = """
import pendulum
from airflow.sdk import DAG
from airflow.providers.standard.operators.bash import BashOperator

with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    BashOperator(task_id="train", bash_command={command!r}, cwd={source!r})
"""


def slot_seconds(cluster: Any, dag_id: str) -> tuple[float, float]:
    """Run the DAG once; its run's duration, and the seconds a task runner process of its task was alive."""
    import threading

    from tests.integration.airflow_cluster import _cmdline, _pids

    run_id = cluster.trigger(dag_id)
    alive = 0.0
    done = threading.Event()

    def watch() -> None:
        # Each look at the process table costs time itself: what is counted is the time between two looks
        # that both saw the task runner alive, plus half of each interval where it came or went.
        nonlocal alive
        ti_id = None
        was_alive, last = False, time.monotonic()
        while not done.is_set():
            if ti_id is None:
                ti = cluster.task_instances(dag_id, run_id).get("train")
                ti_id = ti.id if ti is not None else None
            now = time.monotonic()
            is_alive = ti_id is not None and any(
                _cmdline(pid) == f"airflow worker -- {ti_id}" for pid in _pids()
            )
            if is_alive and was_alive:
                alive += now - last
            elif is_alive != was_alive:
                alive += (now - last) / 2
            was_alive, last = is_alive, now
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.perf_counter()
    watcher.start()
    state = cluster.wait_for_dag_run(dag_id, run_id, timeout=3600)
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    if state != "success":
        raise SystemExit(f"{dag_id} ended {state}:\n{cluster.component_logs()}")
    return wall, alive


def run_deferrable(root: Path, source: Path, rounds: int, seconds: float) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.integration.airflow_cluster import AirflowCluster

    with AirflowCluster() as cluster:
        amlrun = cluster.write_dag(DEFERRED_AMLRUN.format(source=str(source), seconds=seconds))
        baseline = cluster.write_dag(
            DEFERRED_BASELINE.format(command=f"{sys.executable} train.py {seconds}", source=str(source))
        )
        times: dict[str, list[tuple[float, float]]] = {"amlrun": [], "baseline": []}
        for _ in range(rounds):
            times["amlrun"].append(slot_seconds(cluster, amlrun))
            times["baseline"].append(slot_seconds(cluster, baseline))

    def median(name: str, index: int) -> float:
        return round(statistics.median(t[index] for t in times[name]), 3)

    return {
        "target": "deferrable",
        "rounds": rounds,
        "script_seconds": seconds,
        "amlrun_median_s": median("amlrun", 0),
        "baseline_median_s": median("baseline", 0),
        "ratio": round(median("amlrun", 0) / median("baseline", 0), 3),
        "amlrun_slot_seconds_median": median("amlrun", 1),
        "baseline_slot_seconds_median": median("baseline", 1),
        "slot_ratio": round(median("amlrun", 1) / median("baseline", 1), 3),
        "baseline": "BashOperator (no deferrable mode), the same script, under the same scheduler",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--targets", default="local", help="comma-separated: plain, local, docker, ssh, spark, deferrable"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="how long the training script runs")
    parser.add_argument(
        "--deferred-seconds", type=float, default=60.0, help="how long the script runs for target deferrable"
    )
    args = parser.parse_args()

    targets = [target.strip() for target in args.targets.split(",")]
    root = Path(tempfile.mkdtemp(prefix="amlrun-overhead-"))
    # Only the DAG targets need Airflow's database; a plain script never touches it.
    dags = setup_airflow(root, migrate=any(target not in ("plain", "deferrable") for target in targets))
    source = root / "src"
    source.mkdir()
    (source / "train.py").write_text(textwrap.dedent(TRAIN))
    # Task logs go to stdout; send them to stderr so stdout carries only the JSON.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    try:
        for target in targets:
            os.dup2(2, 1)
            if target == "plain":
                result = run_plain(root, source, args.rounds, args.seconds)
            elif target == "deferrable":
                result = run_deferrable(root, source, args.rounds, args.deferred_seconds)
            else:
                result = run_target(target, root, dags, source, args.rounds, args.seconds)
            sys.stdout.flush()
            os.dup2(saved_stdout, 1)
            print(json.dumps(result), flush=True)
    finally:
        os.dup2(saved_stdout, 1)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
