"""Fixtures of the unit tests, which need no service and no Airflow database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from airflow_amlrun.config import OPTIONS


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
