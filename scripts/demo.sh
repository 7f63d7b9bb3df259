#!/usr/bin/env bash
# The example DAG end to end on the embedded workspace (SQLite + a local store under .demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export AIRFLOW_HOME="$PWD/.demo/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
mkdir -p "$AIRFLOW_HOME"

echo "== Airflow metadata database: $AIRFLOW_HOME"
$BIN/airflow db migrate >/dev/null

echo "== Running DAG train_local (the training script's output streams into the task log)"
$BIN/airflow dags test train_local -c '{"alpha": 0.5}' 2>&1 | grep -E "\[DAG TEST\]|ScriptRunOperator|DagRun Finished" || true

echo "== Run history"
$BIN/amlrun runs list --limit 5
latest=$($BIN/amlrun runs list --limit 1 --json | $BIN/python -c 'import json,sys; print(json.load(sys.stdin)[0]["run_id"])')
$BIN/amlrun runs show "$latest"
status=$($BIN/amlrun runs show "$latest" --json | $BIN/python -c 'import json,sys; print(json.load(sys.stdin)["status"])')
test "$status" = Completed || { echo "demo run ended $status" >&2; exit 1; }
