"""The trigger following a deferred run: what the triggerer stores of it gives back the same trigger."""

from __future__ import annotations

import importlib
import json
from datetime import UTC
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.run import FollowState
from tests.unit.strategies import CONN_IDS, RUN_IDS

if TYPE_CHECKING:
    from airflow_amlrun.triggers.script_run import ScriptRunTrigger


@pytest.fixture(scope="module")
def trigger_class() -> type[ScriptRunTrigger]:
    """ScriptRunTrigger, imported by the tests that use it, not when they are collected: an Airflow class, and
    `make unit` keeps Airflow out of one of its two processes (tests/unit/conftest.py)."""
    from airflow_amlrun.triggers.script_run import ScriptRunTrigger

    return ScriptRunTrigger


states = st.builds(
    FollowState,
    log_offset=st.integers(min_value=0, max_value=2**53),
    events_offset=st.integers(min_value=0, max_value=2**53),
    event_seq=st.integers(min_value=0, max_value=2**31),
    timed_out=st.booleans(),
    cancel_requested=st.booleans(),
    stop_reason=st.one_of(st.none(), st.text(max_size=80)),
    model_requests=st.lists(
        st.fixed_dictionaries(
            {
                "kind": st.just("register_model"),
                "name": st.text(max_size=20),
                "path": st.text(max_size=40),
                "tags": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
            }
        ),
        max_size=3,
    ).map(tuple),
)


@given(
    run_id=RUN_IDS,
    state=states,
    conn_id=st.one_of(st.none(), CONN_IDS),
    show=st.booleans(),
    stop_at=st.one_of(st.none(), st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat())),
)
def test_a_stored_trigger_comes_back_the_same(trigger_class, run_id, state, conn_id, show, stop_at):
    trigger = trigger_class(
        run_id, state.to_json(), workspace_conn_id=conn_id, show_output=show, stop_at=stop_at
    )

    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))

    assert type(again) is trigger_class
    assert FollowState.from_json(again.state) == state
    assert (again.run_id, again.workspace_conn_id, again.show_output, again.stop_at) == (
        run_id,
        conn_id,
        show,
        stop_at,
    )
    assert again.serialize() == trigger.serialize()


@given(states)
def test_a_follow_state_survives_json(state):
    assert FollowState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_not_before_is_waited_for_only_while_it_is_ahead() -> None:
    from datetime import datetime, timedelta

    from airflow_amlrun.triggers.script_run import seconds_until

    now = datetime.now(UTC)
    assert seconds_until(None) == 0.0
    assert seconds_until((now - timedelta(seconds=5)).isoformat()) == 0.0
    assert 55 < seconds_until((now + timedelta(seconds=60)).isoformat()) <= 60
