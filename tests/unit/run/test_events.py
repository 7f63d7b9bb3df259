"""What the worker reads of a run's events file (run.events): in order, each line numbered, what this version's
run_context would not have written skipped with a warning."""

from __future__ import annotations

import json

import pytest

from airflow_amlrun.run.events import read_events


def line(**event: object) -> str:
    return json.dumps(event)


def test_metrics_tags_and_model_requests_are_read_in_order_numbered_from_the_offset() -> None:
    events = read_events(
        [
            line(kind="metric", name="loss", value=0.5, step=1, time=1_700_000_000.5),
            line(kind="tag", key="stage", value="dev"),
            line(kind="metric", name="loss", value=0.25, step=2),
            line(kind="register_model", name="clf", path="outputs/model.pkl"),
        ],
        first_seq=10,
        run_id="r1",
    )
    assert [(p.name, p.value, p.step, p.seq) for p in events.points] == [
        ("loss", 0.5, 1, 10),
        ("loss", 0.25, 2, 12),
    ]
    assert (
        events.points[0].logged_at is not None and events.points[0].logged_at.timestamp() == 1_700_000_000.5
    )
    assert events.points[1].logged_at is None
    assert events.tags == {"stage": "dev"}
    assert events.model_requests == [{"kind": "register_model", "name": "clf", "path": "outputs/model.pkl"}]
    assert events.next_seq == 14


def test_a_tag_in_the_providers_own_names_is_not_recorded(caplog: pytest.LogCaptureFixture) -> None:
    # A script writing the events file itself (not through Run.tag, which refuses it) cannot make the run's record
    # say a stop was asked.
    events = read_events(
        [
            line(kind="tag", key="amlrun.stop_requested", value="Canceled."),
            line(kind="tag", key="amlrunner", value="x"),
        ],
        first_seq=0,
        run_id="r1",
    )
    assert events.tags == {"amlrunner": "x"}
    assert "Run r1: the script's tag 'amlrun.stop_requested' was not recorded" in caplog.text


def test_lines_the_run_context_would_not_write_are_skipped_and_still_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = read_events(
        [
            "{not json",
            "[1, 2]",
            line(kind="metric", name="", value=1.0),
            line(kind="metric", name="acc", value=0.9),
        ],
        first_seq=0,
        run_id="r1",
    )
    assert [(p.name, p.seq) for p in events.points] == [("acc", 3)]
    assert events.next_seq == 4
    assert "skipping a malformed event line: {not json" in caplog.text
    assert "skipping an event line that is not an object: [1, 2]" in caplog.text
    assert "a metric was not recorded" in caplog.text
