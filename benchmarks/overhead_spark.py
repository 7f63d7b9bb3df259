"""Case module of benchmarks/overhead.py for the Spark target (``--targets spark``).

Both tasks submit the same pyspark script (a SparkSession, a small job on the executors, the training's
sleep, metrics through run_context) with spark-submit to the same master, ``local[2]``, through the same
Airflow connection (type ``spark``), with the same driver and executor interpreter (this one):
- amlrun: ScriptRunOperator with compute_target on that connection (snapshot, run row, the code archive for
  --py-files, spark-submit through the provider's SparkSubmitHook under the run's supervisor, the driver's
  log streamed, metrics, tags and outputs collected);
- baseline: the stock SparkSubmitOperator of apache-airflow-providers-apache-spark submitting the script.
The script's Spark start-up (a JVM) is part of both; what differs is the target's per-run work.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

BASELINE = (
    "SparkSubmitOperator (apache-airflow-providers-apache-spark) submitting the same script to local[2]"
)
CONN_ID = "overhead_spark"

TRAIN = """
import sys, time
from pyspark.sql import SparkSession
from airflow_amlrun.run_context import Run

run = Run.get_context()
spark = SparkSession.builder.getOrCreate()
total = spark.sparkContext.parallelize(range(1000), 2).map(lambda x: x * x).sum()
seconds = float(sys.argv[1])
for epoch in range(4):
    time.sleep(seconds / 4)
    run.log("loss", 1.0 / (epoch + 1), step=epoch)
    print(f"epoch {epoch} done, sum {total}", flush=True)
spark.stop()
"""

AMLRUN = """
import pendulum
from airflow.sdk import DAG
from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG("overhead_spark_amlrun", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    ScriptRunOperator(
        task_id="train",
        experiment="overhead_spark",
        config=ScriptRunConfig(
            {source!r}, script="train.py", arguments=[{seconds!r}], compute_target={conn!r}, framework="pyspark"
        ),
    )
"""

BASELINE_DAG = """
import pendulum
from airflow.sdk import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

with DAG("overhead_spark_baseline", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    SparkSubmitOperator(
        task_id="train",
        conn_id={conn!r},
        application={application!r},
        application_args=[{seconds!r}],
        conf={conf!r},
    )
"""


def prepare(root: Path, source: Path, seconds: float) -> tuple[str, str]:
    """The connection (local[2], loopback only), spark-submit on PATH, the script, and the two DAGs."""
    spark_source = root / "spark-src"
    spark_source.mkdir()
    (spark_source / "train.py").write_text(textwrap.dedent(TRAIN))
    conn = {"conn_type": "spark", "host": "local[2]", "extra": {"deploy-mode": "client"}}
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(conn)
    os.environ.update({"SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOCAL_HOSTNAME": "localhost"})
    # The stock operator runs `spark-submit` from PATH: the one pyspark installed beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    python = {"spark.pyspark.python": sys.executable, "spark.pyspark.driver.python": sys.executable}
    return (
        AMLRUN.format(source=str(spark_source), seconds=str(seconds), conn=CONN_ID),
        BASELINE_DAG.format(
            conn=CONN_ID, application=str(spark_source / "train.py"), seconds=str(seconds), conf=python
        ),
    )
