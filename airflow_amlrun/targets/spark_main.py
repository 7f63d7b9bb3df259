"""The application the Spark target submits: runs the training script in the driver as Python would, and
records the Spark application it starts on the run.

    spark-submit ... spark_main.py SCRIPT [ARGUMENTS...]

The script runs as ``__main__`` with its own arguments, its folder first on ``sys.path`` and the run
directory as working directory, so it reads its data files by relative path as on any other target. Once the
script has a SparkContext, its application id and web UI URL become the run's tags ``spark.application_id``
and ``spark.ui_url`` (through ``Run.get_context()``, as the script's own tags). The SparkContext is looked for
from a thread, so nothing of pyspark is changed or imported before the script imports it.

It runs on the driver's interpreter: it imports only the standard library (and run_context, shipped with
the run), and runs on Python 3.7 and newer.
"""

from __future__ import annotations

import os
import runpy
import sys
import threading

APPLICATION_ID_TAG = "spark.application_id"
UI_URL_TAG = "spark.ui_url"
# How often the thread looks for the script's SparkContext.
LOOK_SECONDS = 0.05


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.stderr.write("usage: spark_main.py SCRIPT [ARGUMENTS...]\n")
        sys.exit(2)
    script = argv[1]
    sys.argv = argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    threading.Thread(target=_record_application, name="amlrun-spark-application", daemon=True).start()
    runpy.run_path(script, run_name="__main__")


def _record_application() -> None:
    """Tag the run with the script's Spark application once it has one (the first SparkContext)."""
    stop = threading.Event()
    while not stop.wait(LOOK_SECONDS):
        pyspark = sys.modules.get("pyspark")
        context = getattr(getattr(pyspark, "SparkContext", None), "_active_spark_context", None)
        if context is None:
            continue
        try:
            application_id = context.applicationId
            ui_url = context.uiWebUrl
        except Exception:  # stopped as it was looked at
            continue
        from airflow_amlrun.run_context import Run

        run = Run.get_context()
        run.tag(APPLICATION_ID_TAG, application_id)
        if ui_url:
            run.tag(UI_URL_TAG, ui_url)
        return


if __name__ == "__main__":
    main(sys.argv)
