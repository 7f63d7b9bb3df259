"""A sweep's sampler rebuilt from its recorded runs draws what the first process would have drawn next: pure
logic (a retry resuming a sweep under Airflow: tests/integration/test_hyperdrive_airflow.py)."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_amlrun.history import RunRecord, RunStatus
from airflow_amlrun.hyperdrive import (
    BanditPolicy,
    BayesianParameterSampling,
    GridParameterSampling,
    HyperDriveConfig,
    MedianStoppingPolicy,
    NoTerminationPolicy,
    RandomParameterSampling,
    TruncationSelectionPolicy,
    choice,
    normal,
    quniform,
    uniform,
)
from airflow_amlrun.hyperdrive.parameters import ParameterSampling
from airflow_amlrun.hyperdrive.policies import policy_from_dict
from airflow_amlrun.hyperdrive.replay import new_sampler, parameters_tag, restored_sampler
from airflow_amlrun.runconfig import ScriptRunConfig

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPACE = {
    "--alpha": uniform(0, 1),
    "--depth": choice(2, 4, 8),
    "--q": quniform(0, 10, 0.5),
    "--n": normal(0, 1),
}


def config_of(sampling: ParameterSampling, total: int = 12) -> HyperDriveConfig:
    return HyperDriveConfig(
        run_config=ScriptRunConfig("src", script="train.py"),
        hyperparameter_sampling=sampling,
        primary_metric_name="loss",
        primary_metric_goal="minimize",
        max_total_runs=total,
        max_concurrent_runs=3,
    )


def record(
    n: int,
    params: dict[str, Any],
    created: datetime,
    status: RunStatus,
    end: datetime | None,
    loss: float | None,
) -> RunRecord:
    return RunRecord(
        id=f"run{n}",
        experiment="sweeps",
        status=status,
        target="local",
        script="train.py",
        command=None,
        arguments=[],
        environment=None,
        snapshot_id=None,
        git=None,
        tags={"hyperparameters": parameters_tag(params)},
        handle=None,
        outputs_uri=None,
        logs_uri=None,
        error=None,
        created_at=created,
        start=created,
        end=end,
        dag_id=None,
        task_id=None,
        airflow_run_id=None,
        map_index=None,
        try_number=None,
        metrics={} if loss is None else {"loss": loss},
    )


def first_process(config: HyperDriveConfig, runs: int, seed: int) -> tuple[Any, list[RunRecord]]:
    """A sweep followed by one process until it died: runs started 3 at a time, ending in a random order, some
    Completed, some stopped, some failed; the last ones still going on. Its sampler, and the runs recorded."""
    rng = random.Random(seed)
    sampler = new_sampler(config)
    clock = T0
    live: list[tuple[int, dict[str, Any]]] = []
    ended: dict[int, tuple[RunStatus, datetime, float | None]] = {}
    started: list[tuple[int, dict[str, Any], datetime]] = []
    while len(started) < runs:
        while len(live) < 3 and len(started) < runs:
            clock += timedelta(seconds=1)
            drawn = sampler.next_parameters(config)
            assert drawn is not None
            params, trial = drawn
            n = len(started)
            sampler.trials[f"run{n}"] = trial
            started.append((n, params, clock))
            live.append((n, params))
        clock += timedelta(seconds=1)
        n, params = live.pop(rng.randrange(len(live)))
        status = rng.choice([RunStatus.COMPLETED, RunStatus.COMPLETED, RunStatus.CANCELED, RunStatus.FAILED])
        loss = float(params["--alpha"]) * int(params["--depth"]) if status is RunStatus.COMPLETED else None
        ended[n] = (status, clock, loss)
        sampler.tell(f"run{n}", *(("COMPLETE", loss) if loss is not None else (_state(status), None)))
    records = []
    for n, params, created in started:
        status, end, loss = ended.get(n, (RunStatus.RUNNING, None, None))
        records.append(record(n, params, created, status, end, loss))
    return sampler, records


def _state(status: RunStatus) -> str:
    return "PRUNED" if status is RunStatus.CANCELED else "FAIL"


@pytest.mark.parametrize("method", [RandomParameterSampling, BayesianParameterSampling])
# TPE's first draws import and compile much of Optuna: no deadline on one example.
@settings(max_examples=60)
@given(runs=st.integers(min_value=1, max_value=9), order=st.integers(0, 2**16), seed=st.integers(0, 2**16))
def test_a_restored_sampler_draws_what_the_first_process_would_have_drawn_next(
    method: type[RandomParameterSampling], runs: int, order: int, seed: int
) -> None:
    config = config_of(method(SPACE, seed=seed))
    first, records = first_process(config, runs, order)

    restored = restored_sampler(config, records)

    assert restored.replayed
    # The runs still going on wait for their outcome, in both.
    assert set(restored.trials) == {r.id for r in records if not r.status.is_terminal}
    assert [restored.next_parameters(config)[0] for _ in range(3)] == [  # type: ignore[index]
        first.next_parameters(config)[0]
        for _ in range(3)  # type: ignore[index]
    ]


def test_a_sampler_that_draws_otherwise_is_told_the_recorded_runs_instead() -> None:
    config = config_of(RandomParameterSampling(SPACE, seed=1))
    _, records = first_process(config_of(RandomParameterSampling(SPACE, seed=2)), 6, 0)

    restored = restored_sampler(config, records)

    assert not restored.replayed
    told = sorted(restored.study.trials, key=lambda t: t.number)
    space = config.hyperparameter_sampling.parameter_space
    recorded = [json.loads(r.tags["hyperparameters"]) for r in records]
    drawn = [{k: space[k].value(t.params[k]) for k in space} for t in told]
    assert [d["--alpha"] for d in drawn] == [p["--alpha"] for p in recorded]
    assert [d["--n"] for d in drawn] == pytest.approx([p["--n"] for p in recorded])
    completed = {r.id: r.metrics["loss"] for r in records if r.status is RunStatus.COMPLETED}
    assert sorted(t.value for t in told if t.value is not None) == sorted(completed.values())
    assert set(restored.trials) == {r.id for r in records if not r.status.is_terminal}


def test_a_restored_grid_goes_on_with_the_points_no_run_took() -> None:
    config = config_of(GridParameterSampling({"--a": choice(1, 2, 3), "--b": choice("x", "y")}))
    taken = [{"--a": 1, "--b": "y"}, {"--a": 2, "--b": "x"}, {"--a": 1, "--b": "x"}]
    records = [record(n, p, T0, RunStatus.COMPLETED, T0, 1.0) for n, p in enumerate(taken)]

    restored = restored_sampler(config, records)

    left = []
    while (drawn := restored.next_parameters(config)) is not None:
        left.append(drawn[0])
    assert left == [{"--a": 2, "--b": "y"}, {"--a": 3, "--b": "x"}, {"--a": 3, "--b": "y"}]


@pytest.mark.parametrize(
    "policy",
    [
        NoTerminationPolicy(),
        BanditPolicy(slack_amount=0.5, evaluation_interval=2, delay_evaluation=1),
        BanditPolicy(slack_factor=0.1),
        MedianStoppingPolicy(delay_evaluation=3),
        TruncationSelectionPolicy(25, evaluation_interval=3),
    ],
)
def test_a_policy_given_to_the_triggerer_is_the_same_policy(policy: Any) -> None:
    again = policy_from_dict(json.loads(json.dumps(policy.to_dict())))
    assert type(again) is type(policy) and again.to_dict() == policy.to_dict()


def test_a_run_whose_primary_metric_is_not_finite_has_no_metric_to_rank() -> None:
    from airflow_amlrun.hyperdrive.results import metric_of

    created = datetime(2026, 1, 1, tzinfo=UTC)
    assert metric_of(record(1, {"alpha": 1}, created, RunStatus.COMPLETED, created, 0.5), "loss") == 0.5
    for value in (math.nan, math.inf, -math.inf):
        assert (
            metric_of(record(2, {"alpha": 2}, created, RunStatus.COMPLETED, created, value), "loss") is None
        )
