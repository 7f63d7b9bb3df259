"""What one process hands to the next that takes a sweep over: pure data, through JSON (a trigger's kwargs, an
event's payload) and back (the deferred sweep itself: tests/integration/test_hyperdrive_trigger.py)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.hyperdrive.takeover import SweepState
from airflow_amlrun.run import FollowState
from tests.unit.strategies import RUN_IDS

states = st.builds(
    SweepState,
    children=st.dictionaries(RUN_IDS, st.builds(FollowState, log_offset=st.integers(0, 2**53)), max_size=3),
    looked_at=st.dictionaries(RUN_IDS, st.integers(0, 10**6), max_size=3),
    unstopped=st.dictionaries(RUN_IDS, st.text(max_size=200), max_size=3),
)


@given(state=states)
def test_a_handed_over_sweep_keeps_the_runs_whose_stop_failed_and_why(state: SweepState) -> None:
    again = SweepState.from_json(json.loads(json.dumps(state.to_json())))

    assert again == state
    assert again.unstopped == state.unstopped


def test_a_state_handed_over_by_an_earlier_version_loads_with_no_run_left_to_stop() -> None:
    earlier = {"children": {"tuning_1_deadbeef": {"log_offset": 42}}, "looked_at": {"tuning_1_deadbeef": 3}}

    state = SweepState.from_json(earlier)

    assert state.unstopped == {}
    assert (state.children["tuning_1_deadbeef"].log_offset, state.looked_at) == (42, {"tuning_1_deadbeef": 3})
