"""The trigger a deferred sweep waits on: what the triggerer stores of it gives back the same trigger."""

from __future__ import annotations

import importlib
import json
from datetime import UTC
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.hyperdrive import BanditPolicy
from airflow_amlrun.hyperdrive.takeover import SweepState
from airflow_amlrun.run import FollowState
from tests.unit.strategies import RUN_IDS, unstopped_runs

if TYPE_CHECKING:
    from airflow_amlrun.triggers.hyperdrive import HyperDriveTrigger


@pytest.fixture(scope="module")
def trigger_class() -> type[HyperDriveTrigger]:
    """HyperDriveTrigger, imported by the tests that use it, not when they are collected: an Airflow class, and
    `make unit` keeps Airflow out of one of its two processes (tests/unit/conftest.py)."""
    from airflow_amlrun.triggers.hyperdrive import HyperDriveTrigger

    return HyperDriveTrigger


states = st.builds(
    SweepState,
    children=st.dictionaries(
        RUN_IDS,
        st.builds(
            FollowState,
            log_offset=st.integers(0, 2**53),
            events_offset=st.integers(0, 2**53),
            event_seq=st.integers(0, 2**31),
            cancel_requested=st.booleans(),
        ),
        max_size=4,
    ),
    looked_at=st.dictionaries(st.text(max_size=12), st.integers(0, 10**6), max_size=4),
    unstopped=unstopped_runs(max_size=2),
)


@given(
    state=states, when=st.one_of(st.none(), st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()))
)
def test_a_stored_sweep_trigger_comes_back_the_same(
    trigger_class: type[HyperDriveTrigger], state: SweepState, when: str | None
) -> None:
    trigger = trigger_class(
        "sweeps_1_deadbeef",
        state.to_json(),
        BanditPolicy(slack_factor=0.2).to_dict(),
        "loss",
        "minimize",
        workspace_conn_id=None,
        deadline=when,
        stop_at=when,
        not_before=when,
    )

    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))

    assert type(again) is trigger_class
    assert SweepState.from_json(again.state) == state
    assert again.serialize() == trigger.serialize()
