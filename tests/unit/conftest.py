"""Fixtures of the unit tests, which need no service and no Airflow database, and how `make unit` runs them."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

from airflow_amlrun.config import OPTIONS

if TYPE_CHECKING:
    from xdist.scheduler import LoadFileScheduling

# No property test has a deadline: an example that takes longer than Hypothesis's 200 ms on a loaded machine is
# no failure (no test asserts on wall time), and a deadline would make the outcome follow the machine's load.
settings.register_profile("amlrun", deadline=None)
settings.load_profile("amlrun")

# The unit tests that import Airflow: the Airflow layer's own, the DAG files of test_paths, and a plain
# script's look-up of a workspace connection (in Airflow's way). Importing Airflow takes seconds of a core, so
# `make unit` runs them all in one of its processes, and the others never import it. These modules import
# Airflow in their tests, not when they are collected (every process collects every module). A test elsewhere
# that imports Airflow still passes, only it costs that second import.
AIRFLOW_TESTS = (
    "tests/unit/hooks/",
    "tests/unit/operators/",
    "tests/unit/triggers/",
    "tests/unit/environment/test_paths.py::",
    "tests/unit/test_config_sources.py::",
    "tests/unit/hyperdrive/test_takeover.py::test_an_error_fails_the_sweep_and_an_interruption_cancels_it",
    "tests/unit/hyperdrive/test_takeover.py::test_a_failure_may_be_left_for_a_retry_while_an_interruption_",
)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A test module that imports Airflow as it is collected fails to collect, named: every process of `make unit`
    would pay that import (see AIRFLOW_TESTS)."""
    loaded = "airflow" in sys.modules
    report = yield
    if isinstance(collector, pytest.Module) and report.passed and not loaded and "airflow" in sys.modules:
        report.outcome = "failed"
        report.longrepr = (
            f"{collector.nodeid} imports Airflow as it is collected: import it in the tests that use it (a fixture, "
            "or an import in the test), and name them in AIRFLOW_TESTS (tests/unit/conftest.py)."
        )
    return report


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadFileScheduling | None:
    """With -n and xdist's default --dist load: each module's tests in one process (what a module sets up once
    is set up once), and the Airflow tests all in one.

    (xdist's own grouping, `--dist loadgroup` with `xdist_group` marks, groups nothing with pytest 9.2: it
    renames the tests' node ids, which pytest no longer lets it do; pytest-xdist issue 1386.)
    """
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadFileScheduling

    class AirflowInOneProcess(LoadFileScheduling):
        # A scope is a unit of work, given to one process as a whole.
        def _split_scope(self, nodeid: str) -> str:
            return "airflow" if nodeid.startswith(AIRFLOW_TESTS) else super()._split_scope(nodeid)

    return AirflowInOneProcess(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Generator[None, object, object]:
    """Collect without the garbage collector, then set aside what collection left for good.

    Collection imports the test modules and all they import (Hypothesis, SQLAlchemy, Optuna, ...): a large
    heap of objects that live as long as the process. The collector finds nothing to free among them,
    yet each full collection walks them all, during the imports and then during every test that allocates a
    lot (a million-point series, Hypothesis's examples); frozen, they are no longer walked. The tests' own
    objects are collected as before.
    """
    gc.disable()
    try:
        return (yield)
    finally:
        gc.enable()
        gc.freeze()


@pytest.fixture
def amlrun_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., None]:
    """Set `[amlrun]` options as a user would (AIRFLOW__AMLRUN__* variables); the options not given get
    their published default. Every option is set, so Airflow's own configuration (slow to import) is never
    asked."""

    def set_options(**values: str) -> None:
        monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
        for name, option in OPTIONS.items():
            monkeypatch.setenv(f"AIRFLOW__AMLRUN__{name.upper()}", values.pop(name, option.default))
        assert not values, f"not options: {sorted(values)}"

    return set_options
