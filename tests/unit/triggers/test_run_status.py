"""The trigger a deferred task waits on: what the triggerer stores of it gives back the same trigger."""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.strategies import CONN_IDS, RUN_IDS

if TYPE_CHECKING:
    from airflow_amlrun.triggers.run_status import RunStatusTrigger


@pytest.fixture(scope="module")
def trigger_class() -> type[RunStatusTrigger]:
    """RunStatusTrigger, imported by the tests that use it, not when they are collected: an Airflow class, and
    `make unit` keeps Airflow out of one of its two processes (tests/unit/conftest.py)."""
    from airflow_amlrun.triggers.run_status import RunStatusTrigger

    return RunStatusTrigger


def _rebuilt(trigger: RunStatusTrigger) -> RunStatusTrigger:
    """The trigger as the triggerer makes it again: from the class path and the keyword arguments, stored as
    JSON in Airflow's database."""
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**json.loads(json.dumps(kwargs)))  # type: ignore[no-any-return]


@given(
    run_id=RUN_IDS,
    conn_id=st.one_of(st.none(), CONN_IDS),
    poll=st.floats(min_value=0.01, max_value=3600),
)
def test_a_stored_trigger_comes_back_the_same(trigger_class, run_id, conn_id, poll):
    trigger = trigger_class(run_id, workspace_conn_id=conn_id, poll_interval=poll)

    again = _rebuilt(trigger)

    assert type(again) is trigger_class
    assert (again.run_id, again.workspace_conn_id, again.poll_interval) == (run_id, conn_id, poll)
    assert again.serialize() == trigger.serialize()


def test_the_class_path_names_the_trigger_where_it_lives(trigger_class):
    classpath, _ = trigger_class("r").serialize()
    assert classpath == f"{trigger_class.__module__}.{trigger_class.__qualname__}"


@pytest.mark.parametrize("poll", [None, 5.0])
def test_a_trigger_made_with_the_defaults_keeps_them(trigger_class, poll):
    trigger = trigger_class("r") if poll is None else trigger_class("r", poll_interval=poll)
    assert _rebuilt(trigger).serialize()[1] == {
        "run_id": "r",
        "workspace_conn_id": None,
        "poll_interval": 5.0,
    }
