"""The run list's sort keys, cursors and the parameters read from a run's arguments."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.history.paging import (
    BadListRequestError,
    RunSort,
    decode_cursor,
    encode_cursor,
    parameters,
)


def test_a_sort_key_names_a_column_or_a_metric_and_a_direction():
    assert RunSort.parse("-created_at") == RunSort("created_at", None, True)
    assert RunSort.parse("target") == RunSort("target", None, False)
    assert RunSort.parse("-metrics.val/acc") == RunSort(None, "val/acc", True)
    assert RunSort.parse("metrics.loss").text == "metrics.loss"
    assert RunSort.parse("metrics.loss").nullable and RunSort.parse("end_time").nullable
    assert not RunSort.parse("created_at").nullable


@pytest.mark.parametrize("text", ["handle", "metrics.", "-", "created_at;drop"])
def test_an_unknown_sort_key_is_refused_naming_the_keys_there_are(text):
    with pytest.raises(BadListRequestError, match="sort by one of created_at, start_time"):
        RunSort.parse(text)


@given(
    st.one_of(
        st.none(),
        st.datetimes(timezones=st.just(UTC)),
    ),
    # Run ids are text a database stores: no NUL character.
    st.text(st.characters(blacklist_characters="\x00"), min_size=1, max_size=40),
)
def test_a_cursor_gives_back_the_position_it_was_made_from(value, run_id):
    sort = RunSort.parse("-start_time")
    cursor = encode_cursor(sort, value, run_id)
    assert cursor.isascii() and "=" not in cursor
    decoded = decode_cursor(sort, cursor)
    assert (decoded.value, decoded.run_id) == (value, run_id)


@given(st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)))
def test_a_metric_cursor_keeps_its_number(value):
    sort = RunSort.parse("metrics.loss")
    assert decode_cursor(sort, encode_cursor(sort, value, "r")).value == value


def test_a_cursor_is_refused_for_another_order_or_when_damaged():
    cursor = encode_cursor(RunSort(), datetime(2026, 1, 1, tzinfo=UTC), "r1")
    with pytest.raises(BadListRequestError, match="sorted by '-created_at', not 'created_at'"):
        decode_cursor(RunSort.parse("created_at"), cursor)
    for damaged in ("x", cursor[:-3], "!!!"):
        with pytest.raises(BadListRequestError, match="not one this server gave out"):
            decode_cursor(RunSort(), damaged)
    metric = encode_cursor(RunSort.parse("metrics.a"), "text", "r1")
    with pytest.raises(BadListRequestError, match="damaged"):
        decode_cursor(RunSort.parse("metrics.a"), metric)


def test_parameters_are_read_from_options_and_their_values():
    arguments = ["--alpha", "0.5", "--epochs=3", "--verbose", "--tag", "a", "data.csv", "--dry-run"]
    assert parameters(arguments) == {
        "alpha": "0.5",
        "epochs": "3",
        "verbose": True,
        "tag": "a",
        "arg0": "data.csv",
        "dry-run": True,
    }
    assert parameters([1, 2.5]) == {"arg0": "1", "arg1": "2.5"}
    assert parameters([]) == {}
