"""What the Spark target reads from spark-submit's log, which interpreter a shipped build needs (on a real
virtualenv), and which airflow_amlrun a Python with the run's code archive imports (real interpreters); the
target itself runs against real Spark in tests/integration/test_spark_target.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import airflow_amlrun
from airflow_amlrun.environment.build_archive import base_interpreter
from airflow_amlrun.targets.common import write_run_context_package
from airflow_amlrun.targets.spark import _code_archive, _failure_reason

IVY_REPORT = b"""
:: resolving dependencies :: org.apache.spark#spark-submit-parent-18580bc1;1.0
\t\tmodule not found: org.example#gone;0.0.1
\t\t::::::::::::::::::::::::::::::::::::::::::::::
\t\t::          UNRESOLVED DEPENDENCIES         ::
\t\t::::::::::::::::::::::::::::::::::::::::::::::
\t\t:: org.example#gone;0.0.1: not found
\t\t:: com.acme#other_2.13;1.2: not found
Exception in thread "main" java.lang.RuntimeException: [unresolved dependency: org.example#gone;0.0.1: not found]
"""


def test_unresolved_packages_are_named_as_the_environment_writes_them():
    reason = _failure_reason(IVY_REPORT, None)
    assert reason is not None
    assert reason.startswith(
        "spark-submit could not resolve the Spark package(s) com.acme:other_2.13:1.2, org.example:gone:0.0.1: "
    )


def test_an_executor_that_cannot_start_the_shipped_python_names_the_interpreter_it_needs():
    log = b'java.io.IOException: Cannot run program "./env/bin/python": error=2, No such file or directory\n'
    reason = _failure_reason(log, "/opt/python/3.11/bin/python3")
    assert reason is not None
    assert (
        "its bin/python links to /opt/python/3.11/bin/python3, which every node running executors must have"
        in reason
    )
    # Without a shipped environment, the same line is the cluster's own business.
    assert _failure_reason(log, None) is None
    assert _failure_reason(b"Traceback: ValueError: bad input\n", "/usr/bin/python3") is None


def test_a_builds_interpreter_is_the_one_its_links_lead_to_outside_it(tmp_path):
    venv = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    needed = base_interpreter(venv)
    assert Path(needed).is_absolute()
    assert not Path(needed).is_relative_to(venv)
    assert Path(needed).resolve() == (venv / "bin" / "python").resolve()


IMPORTS = (
    "import airflow_amlrun; from airflow_amlrun.run_context import Run; import airflow_amlrun.run_context as rc; "
    "import airflow_amlrun.mlflow_capture as capture; print(airflow_amlrun.__file__); print(rc.__file__); "
    "print(capture.__file__); print(getattr(airflow_amlrun, '__version__', None))"
)


def _imported(code_zip: Path, pylib: Path, *flags: str) -> list[str]:
    """What a fresh interpreter imports with the code archive on its path (twice, as a driver may have it), then
    a run folder's copy of run_context (as a driver on another interpreter than the worker's has it)."""
    env = {**os.environ, "PYTHONPATH": f"{code_zip}:{code_zip}:{pylib}"}
    done = subprocess.run(
        [sys.executable, *flags, "-c", IMPORTS],
        cwd=code_zip.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_code_archives_run_context_gives_way_to_an_installed_airflow_amlrun(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".amlrun").mkdir(parents=True)
    (run_dir / "train.py").write_text("print('training')\n")
    code_zip = tmp_path / "code.zip"
    _code_archive(run_dir, code_zip)
    pylib = write_run_context_package(tmp_path / "pylib")

    # Installed here: the installed package, whole, is what the script imports.
    installed = Path(airflow_amlrun.__file__).parent
    assert _imported(code_zip, pylib) == [
        airflow_amlrun.__file__,
        str(installed / "run_context.py"),
        str(installed / "mlflow_capture" / "__init__.py"),
        airflow_amlrun.__version__,
    ]
    # Not installed (no site-packages): the archive's run_context, and the run folder's MLflow capture.
    assert _imported(code_zip, pylib, "-S") == [
        f"{code_zip}/airflow_amlrun/__init__.py",
        f"{code_zip}/airflow_amlrun/run_context.py",
        str(pylib / "airflow_amlrun" / "mlflow_capture" / "__init__.py"),
        "None",
    ]
