"""Fixtures of the unit tests, which need no service and no Airflow database."""

from __future__ import annotations

import gc
from collections.abc import Callable, Generator
from pathlib import Path

import pytest

from airflow_amlrun.config import OPTIONS


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
