"""Train a linear regression with Spark MLlib on a Spark compute target, tracked in the run history.

The target is the Airflow connection `spark_local` (type `spark`). Create it once, e.g. for a Spark of the
worker's own:

    airflow connections add spark_local --conn-type spark --conn-host 'local[*]' \
        --conn-extra '{"deploy-mode": "client"}'

or point it at a cluster (`spark://host:7077`, `yarn`, `k8s://https://host:443`): the DAG does not change.
The same script runs on the "local" target too (framework="pyspark" gives it a local Spark there).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from airflow_amlrun import ScriptRunConfig, ScriptRunOperator

with DAG(
    dag_id="train_spark",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"reg_param": Param(0.1, type="number", minimum=0)},
    tags=["amlrun", "example", "spark"],
    doc_md=__doc__,
) as dag:
    ScriptRunOperator(
        task_id="train",
        experiment="spark_linear",
        config=ScriptRunConfig(
            source_directory="train_spark",  # relative to this file
            script="train.py",
            compute_target="spark_local",
            framework="pyspark",
            max_run_duration_seconds=1800,
        ),
        arguments=["--reg-param", "{{ params.reg_param }}"],
    )
