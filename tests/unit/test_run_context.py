"""What a training script sees of run_context: metrics the history cannot keep are refused where logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun.run_context import MAX_METRIC_NAME_LENGTH, MetricError, OfflineRun, Run, metric_problem


class Step:
    """An integer type of another library (numpy, torch): it has __index__."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def submitted(tmp_path: Path) -> Run:
    return Run("r1", "exp", str(tmp_path / "events.jsonl"), str(tmp_path / "outputs"))


def events(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]


def test_a_metric_the_history_cannot_keep_raises_in_an_offline_run() -> None:
    run = OfflineRun("offline", None, None, "outputs")
    with pytest.raises(
        MetricError, match=r"is 300 characters long; the run history keeps names of at most 255"
    ):
        run.log("n" * 300, 1.0)
    with pytest.raises(MetricError, match=r"step 18446744073709551616 of metric 'loss' must be an integer"):
        run.log("loss", 1.0, step=2**64)
    with pytest.raises(MetricError, match=r"step 2\.5 of metric 'loss'"):
        run.log("loss", 1.0, step=2.5)
    with pytest.raises(MetricError, match="must be a non-empty string"):
        run.log("  ", 1.0)
    assert run.metrics == {}


def test_a_submitted_run_drops_a_metric_the_history_cannot_keep_with_one_warning_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = submitted(tmp_path)
    for epoch in range(3):
        run.log("loss", 0.1, step=epoch + 0.5)
        run.log("accuracy", 0.9, step=epoch)
    run.log("n" * 300, 1.0)

    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        "amlrun: WARNING: Run.log: a point of metric 'loss' was not recorded: step 0.5 of metric 'loss' must "
        "be an integer from -2**63 to 2**63-1. The run goes on; further points of this metric the run history "
        "cannot keep are dropped without another warning.",
        f"amlrun: WARNING: Run.log: a point of metric '{'n' * 40}...' was not recorded: metric name "
        f"'{'n' * 40}'... is 300 characters long; the run history keeps names of at most 255. The run goes on; "
        "further points of this metric the run history cannot keep are dropped without another warning.",
    ]
    assert [(e["name"], e["step"]) for e in events(tmp_path)] == [
        ("accuracy", 0),
        ("accuracy", 1),
        ("accuracy", 2),
    ]
    assert run.metrics == {"accuracy": [0.9, 0.9, 0.9]}


def test_steps_of_any_integer_type_up_to_64_bits_are_kept(tmp_path: Path) -> None:
    run = submitted(tmp_path)
    run.log("tokens", 0.5, step=2**40)
    run.log("tokens", 0.4, step=Step(2**41))
    run.log("tokens", 0.3, step=3.0)
    assert [e["step"] for e in events(tmp_path)] == [2**40, 2**41, 3]


@given(
    name=st.text(min_size=1, max_size=300),
    step=st.one_of(st.none(), st.integers(min_value=-(2**70), max_value=2**70)),
)
def test_a_metric_is_accepted_exactly_when_the_history_can_keep_it(name: str, step: int | None) -> None:
    fits = bool(name.strip()) and len(name) <= MAX_METRIC_NAME_LENGTH
    fits = fits and (step is None or -(2**63) <= step < 2**63)
    assert (metric_problem(name, 1.0, step) is None) == fits


@pytest.mark.parametrize("offline", [False, True])
def test_a_tag_in_the_providers_own_names_is_refused_naming_it(tmp_path: Path, offline: bool) -> None:
    run = OfflineRun("offline", None, None, str(tmp_path / "outputs")) if offline else submitted(tmp_path)
    with pytest.raises(
        ValueError, match=r"Run\.tag: the name 'amlrun\.stop_requested' starts with 'amlrun\.'"
    ):
        run.tag("amlrun.stop_requested", "Canceled.")
    run.tag("stage", "dev")
    assert run.tags == {"stage": "dev"}
    if not offline:
        assert [e["key"] for e in events(tmp_path)] == ["stage"]
